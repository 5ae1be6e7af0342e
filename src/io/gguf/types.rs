//! ggml tensor types: the id, name, block size and bytes per block of every type a GGUF
//! file may hold (so any file's tensor table can be bounds-checked), and dequantisation to
//! f32 of the types this crate reads: F32, F16, BF16, Q8_0, Q4_0 and Q4_1, following ggml's
//! block layouts (`ggml-common.h`, `dequantize_row_*` in `ggml-quants.c`) exactly.

use crate::error::{Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;

/// A ggml tensor element type, numbered as in `enum ggml_type`. Ids that ggml retired
/// (4, 5, 31-33, 36-38) are not listed and parse as unknown.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// (type, id, name, elements per block, bytes per block), from ggml's `type_traits`.
const TABLE: &[(GgmlType, u32, &str, usize, usize)] = &[
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
    (GgmlType::Q2_K, 10, "Q2_K", 256, 84),
    (GgmlType::Q3_K, 11, "Q3_K", 256, 110),
    (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
    (GgmlType::Q8_K, 15, "Q8_K", 256, 292),
    (GgmlType::IQ2_XXS, 16, "IQ2_XXS", 256, 66),
    (GgmlType::IQ2_XS, 17, "IQ2_XS", 256, 74),
    (GgmlType::IQ3_XXS, 18, "IQ3_XXS", 256, 98),
    (GgmlType::IQ1_S, 19, "IQ1_S", 256, 50),
    (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 18),
    (GgmlType::IQ3_S, 21, "IQ3_S", 256, 110),
    (GgmlType::IQ2_S, 22, "IQ2_S", 256, 82),
    (GgmlType::IQ4_XS, 23, "IQ4_XS", 256, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::IQ1_M, 29, "IQ1_M", 256, 56),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (GgmlType::TQ1_0, 34, "TQ1_0", 256, 54),
    (GgmlType::TQ2_0, 35, "TQ2_0", 256, 66),
    (GgmlType::MXFP4, 39, "MXFP4", 32, 17),
];

/// The types `GgufFile::tensor_f32` handles, for error messages.
pub(crate) const DEQUANTIZABLE: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

impl GgmlType {
    /// The type with ggml id `id`, or `None` for an unknown or retired id.
    pub fn from_id(id: u32) -> Option<Self> {
        TABLE.iter().find(|e| e.1 == id).map(|e| e.0)
    }

    fn entry(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        // Every variant has exactly one row; the fallback is unreachable but keeps this
        // function free of panics should the table and the enum ever drift apart.
        TABLE.iter().find(|e| e.0 == self).unwrap_or(&TABLE[0])
    }

    /// ggml's numeric id.
    pub fn id(self) -> u32 {
        self.entry().1
    }

    /// ggml's name (`"Q4_1"`).
    pub fn name(self) -> &'static str {
        self.entry().2
    }

    /// Elements per block (1 for plain types, 32 or 256 for quantised ones).
    pub fn block_size(self) -> usize {
        self.entry().3
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.entry().4
    }

    /// Whether `GgufFile::tensor_f32` supports this type.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1
        )
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Blocks per parallel task: large enough that rayon's overhead vanishes, small enough
/// that a 28M-element embedding spreads over every core.
const BLOCKS_PER_TASK: usize = 4096;

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantises `bytes`, holding `out.len()` elements of type `ty`, into `out`.
/// `name` is only for errors. The caller passes exactly `out.len() / block * type_size`
/// bytes; anything else is reported, not indexed past.
pub(crate) fn dequantize(ty: GgmlType, name: &str, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    if !ty.can_dequantize() {
        return Err(Error::Dtype {
            name: name.to_string(),
            expected: format!("a ggml type this crate can dequantise ({DEQUANTIZABLE})"),
            got: format!("unsupported ggml type {ty}"),
        });
    }
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let blocks = out.len() / bs;
    if out.len() % bs != 0 || blocks.checked_mul(ts) != Some(bytes.len()) {
        return Err(Error::format(
            None,
            format!("tensor `{name}`: {} bytes of {ty} cannot hold {} elements", bytes.len(), out.len()),
        ));
    }
    // Each task converts whole blocks, so every chunk below has the exact block sizes
    // (chunks_exact leaves no remainder: the lengths were checked above).
    let elems_per_task = bs * BLOCKS_PER_TASK;
    let bytes_per_task = ts * BLOCKS_PER_TASK;
    out.par_chunks_mut(elems_per_task).zip(bytes.par_chunks(bytes_per_task)).for_each(|(y, x)| match ty {
        GgmlType::F32 => {
            y.iter_mut().zip(x.chunks_exact(4)).for_each(|(y, b)| *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => y.iter_mut().zip(x.chunks_exact(2)).for_each(|(y, b)| *y = f16_at(b, 0)),
        GgmlType::BF16 => y
            .iter_mut()
            .zip(x.chunks_exact(2))
            .for_each(|(y, b)| *y = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
        // block_q8_0 { ggml_half d; int8_t qs[32]; }: y = d * q.
        GgmlType::Q8_0 => y.chunks_exact_mut(32).zip(x.chunks_exact(34)).for_each(|(y, b)| {
            let d = f16_at(b, 0);
            y.iter_mut().zip(&b[2..34]).for_each(|(y, &q)| *y = (q as i8) as f32 * d);
        }),
        // block_q4_0 { ggml_half d; uint8_t qs[16]; }: byte j holds element j in its low
        // nibble and element j + 16 in its high nibble, both offset by 8: y = d * (q - 8).
        GgmlType::Q4_0 => y.chunks_exact_mut(32).zip(x.chunks_exact(18)).for_each(|(y, b)| {
            let d = f16_at(b, 0);
            let (lo, hi) = y.split_at_mut(16);
            for (j, &q) in b[2..18].iter().enumerate() {
                lo[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }),
        // block_q4_1 { ggml_half d; ggml_half m; uint8_t qs[16]; }: same nibble order as
        // Q4_0, unsigned, with an offset: y = d * q + m.
        GgmlType::Q4_1 => y.chunks_exact_mut(32).zip(x.chunks_exact(20)).for_each(|(y, b)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let (lo, hi) = y.split_at_mut(16);
            for (j, &q) in b[4..20].iter().enumerate() {
                lo[j] = (q & 0x0F) as f32 * d + m;
                hi[j] = (q >> 4) as f32 * d + m;
            }
        }),
        // Excluded by can_dequantize above.
        _ => {}
    });
    Ok(())
}
