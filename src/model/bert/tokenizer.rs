//! The WordPiece tokenizer of a BERT model, read from Hugging Face's `tokenizer.json`
//! through the `tokenizers` crate: `[CLS] text [SEP]`, truncated to a maximum length (the
//! final `[SEP]` kept), and right-padded batches with their lengths.

use crate::error::{Error, Result};
use std::path::Path;

/// A tokenizer.json larger than this is refused before it is read (BERT's is ~0.5 MB).
const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// A BERT WordPiece tokenizer.
pub struct BertTokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
    sep_id: u32,
}

/// A right-padded batch: `ids` `(batch, seq)`, `lengths[b]` real tokens in row `b`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub lengths: Vec<u32>,
    pub batch: usize,
    pub seq: usize,
}

impl BertTokenizer {
    /// Reads `tokenizer.json`; it must define `[PAD]` and `[SEP]` (and add `[CLS]`/`[SEP]`
    /// through its post-processor, as BERT's does).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let size = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
        if size > MAX_TOKENIZER_BYTES {
            return Err(Error::format(Some(path), format!("{size} bytes is too large for a tokenizer.json")));
        }
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::format(Some(path), format!("not a tokenizer.json the tokenizers crate reads: {e}")))?;
        // Padding and truncation are ours (per batch, keeping the final [SEP]).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::format(Some(path), format!("cannot disable truncation: {e}")))?;
        let id = |tok: &str| {
            inner
                .token_to_id(tok)
                .ok_or_else(|| Error::format(Some(path), format!("the vocabulary has no {tok} token")))
        };
        let (pad_id, sep_id) = (id("[PAD]")?, id("[SEP]")?);
        Ok(BertTokenizer { inner, pad_id, sep_id })
    }

    /// `[CLS] text [SEP]` as ids, at most `max_len` (>= 2) of them.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        if max_len < 2 {
            return Err(Error::invalid(
                "BertTokenizer::encode",
                format!("max_len {max_len} leaves no room for [CLS] and [SEP]"),
            ));
        }
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::invalid("BertTokenizer::encode", format!("cannot tokenize {text:?}: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > max_len {
            ids.truncate(max_len);
            ids[max_len - 1] = self.sep_id;
        }
        Ok(ids)
    }

    /// Encodes `texts` into one right-padded batch as long as its longest member.
    pub fn batch(&self, texts: &[&str], max_len: usize) -> Result<Batch> {
        let encoded = texts.iter().map(|t| self.encode(t, max_len)).collect::<Result<Vec<_>>>()?;
        Ok(Self::pad(&encoded, self.pad_id))
    }

    /// Right-pads encoded sequences with `pad_id` to the longest.
    pub fn pad(encoded: &[Vec<u32>], pad_id: u32) -> Batch {
        let seq = encoded.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(encoded.len() * seq);
        for e in encoded {
            ids.extend_from_slice(e);
            ids.extend(std::iter::repeat_n(pad_id, seq - e.len()));
        }
        Batch { ids, lengths: encoded.iter().map(|e| e.len() as u32).collect(), batch: encoded.len(), seq }
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
