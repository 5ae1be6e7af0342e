//! The VADER sentiment corpus (Hutto & Gilbert, ICWSM 2014; ~23.7k sentences from tweets,
//! movie and product reviews and NYT editorials) as a language-modelling dataset.
//!
//! Corpus files are the `*_GroundTruth.txt` files of `hutto_ICWSM_2014/` (the
//! `*_anonDataRatings.txt` files beside them hold per-rater scores and no text). Each
//! line is `id<TAB>score<TAB>text` with CRLF endings; bytes that are not UTF-8 are decoded
//! lossily, a UTF-8 byte-order mark is dropped, blank lines are skipped, and the five
//! basic HTML entities the tweets and editorials carry (`&amp;`, twice-escaped `&amp;amp;`) are unescaped.
//!
//! Batches: one sentence per row, never packed: `[BOS] tokens [EOS]`, truncated to
//! `seq_len + 1` ids and right-padded. Row `b` gives `inputs[b, t]` = id `t` and
//! `targets[b, t]` = id `t + 1` (next-token prediction); `mask[b, t]` is 1.0 where the
//! target is a real token and 0.0 on padding. Right padding is invisible to a causal model:
//! real positions never attend to the pad positions after them.

use crate::error::{Error, Result};
use crate::model::llama::TokenBatch;
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::SplitMix64;
use rayon::prelude::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// File-name suffix of the corpus files that hold sentences.
pub const CORPUS_FILE_SUFFIX: &str = "_GroundTruth.txt";

/// One corpus line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sentence {
    pub id: String,
    /// Mean human sentiment rating, -4 (most negative) to +4.
    pub score: f32,
    pub text: String,
}

/// Parses one corpus file's contents; `path` only labels errors. A line with fewer than
/// three tab-separated fields or an unparsable score is an [`Error::Format`] naming the
/// line; tabs inside the text are kept as spaces.
pub fn parse_corpus(bytes: &[u8], path: Option<&Path>) -> Result<Vec<Sentence>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(line));
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: &str| {
            Error::format(path, format!("line {}: {msg}: `{}`", i + 1, line.chars().take(80).collect::<String>()))
        };
        let mut cols = line.splitn(3, '\t');
        let (Some(id), Some(score), Some(text)) = (cols.next(), cols.next(), cols.next()) else {
            return Err(bad("expected id<TAB>score<TAB>text"));
        };
        let score: f32 = score.trim().parse().map_err(|_| bad("the score is not a number"))?;
        if !score.is_finite() {
            return Err(bad("the score is not finite"));
        }
        let text = unescape_html(text.replace('\t', " ").trim());
        if !text.is_empty() {
            out.push(Sentence { id: id.trim().to_string(), score, text });
        }
    }
    Ok(out)
}

/// `&amp;`, `&lt;`, `&gt;`, `&quot;` and `&#39;` to their characters, repeated until
/// nothing changes: the NYT file escapes some ampersands twice (`&amp;amp;`).
fn unescape_html(s: &str) -> String {
    let mut s = s.to_string();
    // Each pass shortens the text, so this ends; the bound only caps the work.
    for _ in 0..4 {
        if !s.contains('&') {
            break;
        }
        let next = s
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&amp;", "&");
        if next == s {
            break;
        }
        s = next;
    }
    s
}

/// Reads and parses one corpus file.
pub fn load_corpus_file(path: &Path) -> Result<Vec<Sentence>> {
    let bytes = crate::io::fs::read_bytes(path, crate::io::fs::MAX_TEXT_FILE_BYTES)?;
    parse_corpus(&bytes, Some(path))
}

/// The corpus files in `dir` (`*_GroundTruth.txt`), sorted by name.
pub fn corpus_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.file_name().to_string_lossy().ends_with(CORPUS_FILE_SUFFIX) && entry.path().is_file() {
            files.push(entry.path());
        }
    }
    if files.is_empty() {
        return Err(Error::format(
            Some(dir),
            format!("no *{CORPUS_FILE_SUFFIX} corpus files here (run scripts/fetch-assets.sh)"),
        ));
    }
    files.sort();
    Ok(files)
}

/// The texts of every sentence of every corpus file in `dir`, files in name order, lines
/// in file order.
pub fn load_corpus(dir: impl AsRef<Path>) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    for f in corpus_files(dir.as_ref())? {
        texts.extend(load_corpus_file(&f)?.into_iter().map(|s| s.text));
    }
    Ok(texts)
}

/// A train/validation split.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub train: Vec<String>,
    pub validation: Vec<String>,
}

/// Splits `sentences` at random (seeded) into train and validation sets. Exact duplicate
/// texts are kept once (the corpus repeats a few short ones, "great player."), so no
/// validation sentence also appears in training. The validation set gets
/// `round(unique * validation_fraction)` sentences, at least one when the fraction is
/// positive, and the train set keeps at least one. Both keep corpus order.
pub fn train_validation_split(sentences: &[String], validation_fraction: f64, seed: u64) -> Result<Split> {
    const OP: &str = "train_validation_split";
    if !(0.0..1.0).contains(&validation_fraction) {
        return Err(Error::invalid(OP, format!("validation_fraction must be in [0, 1), got {validation_fraction}")));
    }
    let mut seen = HashSet::new();
    let unique: Vec<&String> = sentences.iter().filter(|s| seen.insert(s.as_str())).collect();
    if unique.len() < 2 && validation_fraction > 0.0 {
        return Err(Error::invalid(OP, format!("{} distinct sentences cannot be split", unique.len())));
    }
    let mut n_val = (unique.len() as f64 * validation_fraction).round() as usize;
    if validation_fraction > 0.0 {
        n_val = n_val.clamp(1, unique.len() - 1);
    }
    let mut order: Vec<usize> = (0..unique.len()).collect();
    SplitMix64::new(seed).shuffle(&mut order);
    let mut is_val = vec![false; unique.len()];
    order.iter().take(n_val).for_each(|&i| is_val[i] = true);
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for (s, v) in unique.into_iter().zip(is_val) {
        if v { &mut validation } else { &mut train }.push(s.clone());
    }
    Ok(Split { train, validation })
}

/// Token ids of every sentence (no BOS/EOS), in parallel.
pub fn tokenize_all(tokenizer: &Tokenizer, sentences: &[String]) -> Result<Vec<Vec<u32>>> {
    sentences.par_iter().map(|s| tokenizer.encode(s)).collect()
}

/// How sentences become rows of a batch. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchSpec {
    /// Rows per batch.
    pub batch: usize,
    /// Positions per row.
    pub seq_len: usize,
    /// Prepended to every sentence.
    pub bos: u32,
    /// Appended to every sentence (if set), so the model learns where sentences end.
    pub eos: Option<u32>,
    /// Fills padding positions of inputs and targets; masked out, so any valid id works.
    pub pad: u32,
}

impl BatchSpec {
    fn validate(&self) -> Result<()> {
        if self.batch == 0 || self.seq_len == 0 {
            return Err(Error::invalid(
                "BatchSpec",
                format!("batch ({}) and seq_len ({}) must be positive", self.batch, self.seq_len),
            ));
        }
        // fill_batch allocates batch * seq_len ids three times over.
        if self.batch.checked_mul(self.seq_len).is_none_or(|n| n > isize::MAX as usize / 8) {
            return Err(Error::invalid(
                "BatchSpec",
                format!("batch ({}) x seq_len ({}) is too large", self.batch, self.seq_len),
            ));
        }
        Ok(())
    }
}

/// A batch of `(batch, seq_len)` rows, row-major. See the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq_len: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    /// 1.0 where `targets` holds a real next token, 0.0 on padding.
    pub mask: Vec<f32>,
}

impl Batch {
    /// The batch as the model reads it.
    pub fn tokens(&self) -> TokenBatch<'_> {
        TokenBatch { ids: &self.inputs, targets: &self.targets, mask: &self.mask, batch: self.batch, seq: self.seq_len }
    }

    /// Number of positions that count in the loss.
    pub fn n_targets(&self) -> usize {
        self.mask.iter().filter(|&&m| m != 0.0).count()
    }
}

/// Builds one batch from up to `spec.batch` token sequences; missing rows are all padding
/// (mask 0), so every batch has the same shape.
pub fn make_batch(seqs: &[&[u32]], spec: &BatchSpec) -> Result<Batch> {
    spec.validate()?;
    if seqs.len() > spec.batch {
        return Err(Error::invalid("make_batch", format!("{} sequences for a batch of {}", seqs.len(), spec.batch)));
    }
    Ok(fill_batch(seqs, spec))
}

/// [`make_batch`] once the arguments are known to be valid.
fn fill_batch(seqs: &[&[u32]], spec: &BatchSpec) -> Batch {
    let (b, l) = (spec.batch, spec.seq_len);
    let mut batch = Batch {
        batch: b,
        seq_len: l,
        inputs: vec![spec.pad; b * l],
        targets: vec![spec.pad; b * l],
        mask: vec![0.0; b * l],
    };
    let mut row = Vec::with_capacity(l + 1);
    for (r, seq) in seqs.iter().enumerate().take(b) {
        row.clear();
        row.push(spec.bos);
        row.extend_from_slice(seq);
        row.extend(spec.eos);
        row.truncate(l + 1);
        let n = row.len() - 1; // real (input, target) pairs
        let at = r * l;
        batch.inputs[at..at + n].copy_from_slice(&row[..n]);
        batch.targets[at..at + n].copy_from_slice(&row[1..]);
        batch.mask[at..at + n].fill(1.0);
    }
    batch
}

/// One pass over `seqs` in a seeded random order, `spec.batch` sequences per batch; the
/// last batch is padded with empty rows rather than dropped.
pub fn epoch<'a>(seqs: &'a [Vec<u32>], spec: &BatchSpec, seed: u64) -> Result<impl Iterator<Item = Batch> + 'a> {
    spec.validate()?;
    let spec = *spec;
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    SplitMix64::new(seed).shuffle(&mut order);
    let mut chunks: Vec<Vec<usize>> = order.chunks(spec.batch).map(<[usize]>::to_vec).collect();
    chunks.reverse();
    Ok(std::iter::from_fn(move || {
        let idx = chunks.pop()?;
        let rows: Vec<&[u32]> = idx.iter().filter_map(|&i| seqs.get(i)).map(Vec::as_slice).collect();
        Some(fill_batch(&rows, &spec))
    }))
}
