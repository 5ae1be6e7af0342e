//! Mutations of seed files: bit flips, interesting bytes and little-endian integers
//! (0, all ones, 2^31, 2^32 - 1, 2^62, sizes near the file's), insertions, deletions,
//! truncation, duplicated and spliced chunks, and for text (JSON headers) digits turned
//! into huge numbers and keys repeated.

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
    16000,
];

const NUMBERS: [&str; 12] = [
    "0",
    "-1",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "4611686018427387904",
    "1e39",
    "1e-50",
    "NaN",
    "16000",
    "100000",
];

/// One random change of `b` (which may come from `other`, another seed, for splicing).
fn mutate_once(r: &mut Rng, b: &mut Vec<u8>, other: &[u8]) {
    let len = b.len();
    match r.below(11) {
        0 if len > 0 => {
            let i = r.below(len);
            b[i] ^= 1 << r.below(8);
        }
        1 if len > 0 => {
            let i = r.below(len);
            b[i] = *r.pick(&[0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'}', b',', b'\n', b'9']);
        }
        2 if len >= 8 => {
            // An 8-, 4- or 2-byte little-endian integer, often where a length or offset sits.
            let w = *r.pick(&[8usize, 4, 2]);
            let i = r.below(len - w + 1);
            let v = match r.below(3) {
                0 => *r.pick(&INTERESTING),
                1 => (len as u64).wrapping_add(r.below(64) as u64).wrapping_sub(32),
                _ => u64::from_le_bytes(
                    b[i..i + w]
                        .iter()
                        .chain([0u8; 8].iter())
                        .take(8)
                        .copied()
                        .collect::<Vec<_>>()
                        .try_into()
                        .unwrap_or([0; 8]),
                )
                .wrapping_add(r.below(17) as u64)
                .wrapping_sub(8),
            };
            b[i..i + w].copy_from_slice(&v.to_le_bytes()[..w]);
        }
        3 => {
            let i = r.below(len + 1);
            let n = 1 + r.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| r.next() as u8).collect();
            b.splice(i..i, bytes);
        }
        4 if len > 0 => {
            let i = r.below(len);
            let n = 1 + r.below((len - i).min(64));
            b.drain(i..i + n);
        }
        5 if len > 0 => b.truncate(r.below(len)),
        6 if len > 0 => {
            let i = r.below(len);
            let n = 1 + r.below((len - i).min(256));
            let chunk = b[i..i + n].to_vec();
            let at = r.below(len + 1);
            b.splice(at..at, chunk);
        }
        7 if !other.is_empty() && len > 0 => {
            let i = r.below(other.len());
            let n = 1 + r.below((other.len() - i).min(512));
            let at = r.below(len);
            let end = (at + n).min(len);
            b.splice(at..end, other[i..i + n].iter().copied());
        }
        8 => {
            // A run of ASCII digits becomes an interesting number (JSON headers, shapes).
            let digits: Vec<usize> = (0..len).filter(|&i| b[i].is_ascii_digit()).collect();
            if let Some(&start) = digits.get(r.below(digits.len().max(1))) {
                let mut end = start;
                while end < len && b[end].is_ascii_digit() {
                    end += 1;
                }
                b.splice(start..end, r.pick(&NUMBERS).bytes());
            }
        }
        9 => {
            // A quoted string repeated right after itself: duplicate JSON keys.
            let quotes: Vec<usize> = (0..len).filter(|&i| b[i] == b'"').collect();
            if quotes.len() >= 4 {
                let k = r.below(quotes.len() / 2) * 2;
                let (s, e) = (quotes[k], quotes[k + 1]);
                let mut end = e + 1;
                while end < len && b[end] != b',' && b[end] != b'}' {
                    end += 1;
                }
                if end < len {
                    let mut chunk = b[s..end].to_vec();
                    chunk.push(b',');
                    b.splice(s..s, chunk);
                }
            }
        }
        _ if len > 0 => {
            let i = r.below(len);
            b[i] = r.next() as u8;
        }
        _ => b.push(r.next() as u8),
    }
}

/// `seed` with 1 to 8 mutations.
pub fn mutate(r: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + r.below(8) {
        mutate_once(r, &mut b, other);
    }
    b
}

/// A value for a flag or metadata entry: usually hostile.
pub fn value(r: &mut Rng, normal: &[&str]) -> String {
    match r.below(4) {
        0 => r.pick(normal).to_string(),
        1 => r.pick(&NUMBERS).to_string(),
        2 => r
            .pick(&[
                "",
                " ",
                "abc",
                "-",
                "--",
                "1,2",
                "every0",
                "all",
                "\u{1b}[2J\r\nx",
                "/dev/null",
                "/proc/x",
                "1.5",
                "0x10",
                "+3",
            ])
            .to_string(),
        _ => {
            let mut s = r.pick(normal).to_string().into_bytes();
            if !s.is_empty() {
                let i = r.below(s.len());
                s[i] = *r.pick(b"09-.ex");
            }
            String::from_utf8_lossy(&s).into_owned()
        }
    }
}
