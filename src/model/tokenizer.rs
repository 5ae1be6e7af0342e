//! The model's tokenizer, rebuilt from GGUF metadata as a Hugging Face
//! `tokenizers::Tokenizer`: a byte-level BPE (GPT-2 style, `tokenizer.ggml.model = gpt2`)
//! from `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, with the pre-tokenizer named
//! by `tokenizer.ggml.pre` and a byte-level decoder.
//!
//! Pre-tokenizers: `smollm` (SmolLM/SmolLM2, also StarCoder) splits every digit into its
//! own piece first, then applies the GPT-2 byte-level split; `gpt-2`/`default` is the
//! byte-level split alone. That matches both llama.cpp's regexes for these types and the
//! models' own `tokenizer.json` (`Sequence[Digits(individual), ByteLevel]`).
//! Tokens of type CONTROL (3) or USER_DEFINED (4) in `tokenizer.ggml.token_type` are
//! registered as special tokens, so `<|im_start|>` in text becomes one id.
//! Nothing is added implicitly: [`Tokenizer::encode`] returns exactly the text's tokens;
//! callers add BOS/EOS themselves.

use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

const OP: &str = "tokenizer";
/// llama.cpp's `LLAMA_TOKEN_TYPE_CONTROL` and `_USER_DEFINED`.
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// A byte-level BPE tokenizer built from a GGUF file. See the module docs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn meta(key: &str, msg: impl Into<String>) -> Error {
    Error::Metadata { key: key.into(), msg: msg.into() }
}

impl Tokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata. Only byte-level BPE
    /// (`model = gpt2`) with the `smollm`, `gpt-2` or `default` pre-tokenizer is supported;
    /// anything else is an [`Error::Metadata`] naming the key.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let model = f.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(meta(
                "tokenizer.ggml.model",
                format!("`{model}` is not supported (only byte-level BPE, `gpt2`)"),
            ));
        }
        let pre = f.optional_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
        let pre_tokenizer = match pre {
            "smollm" => Sequence::new(vec![PreTokenizerWrapper::Digits(Digits::new(true)), byte_level]),
            "gpt-2" | "default" => Sequence::new(vec![byte_level]),
            other => {
                return Err(meta(
                    "tokenizer.ggml.pre",
                    format!("pre-tokenizer `{other}` is not supported (smollm, gpt-2, default)"),
                ))
            }
        };

        let tokens = f.get_str_array("tokenizer.ggml.tokens")?;
        if tokens.len() > u32::MAX as usize {
            return Err(meta("tokenizer.ggml.tokens", format!("{} tokens do not fit in u32 ids", tokens.len())));
        }
        let mut vocab = Vocab::default();
        for (id, tok) in tokens.iter().enumerate() {
            if vocab.insert(tok.clone(), id as u32).is_some() {
                return Err(meta("tokenizer.ggml.tokens", format!("token `{tok}` appears twice")));
            }
        }
        let merges = f
            .get_str_array("tokenizer.ggml.merges")?
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                    Ok((a.to_string(), b.to_string()))
                }
                _ => {
                    Err(meta("tokenizer.ggml.merges", format!("merge `{m}` is not two tokens separated by one space")))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| meta("tokenizer.ggml.merges", format!("cannot build the BPE model: {e}")))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        if f.contains_key("tokenizer.ggml.token_type") {
            let types = f.get_i32_array("tokenizer.ggml.token_type")?;
            if types.len() != tokens.len() {
                return Err(meta(
                    "tokenizer.ggml.token_type",
                    format!("{} entries for {} tokens", types.len(), tokens.len()),
                ));
            }
            let special: Vec<AddedToken> = tokens
                .iter()
                .zip(types)
                .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
                .map(|(tok, _)| AddedToken::from(tok.clone(), true))
                .collect();
            inner.add_special_tokens(&special);
        }
        let id = |key: &str| -> Result<Option<u32>> {
            match f.optional_u32(key)? {
                Some(id) if id as usize >= tokens.len() => {
                    Err(meta(key, format!("id {id} is outside the vocabulary of {}", tokens.len())))
                }
                other => Ok(other),
            }
        };
        Ok(Tokenizer { inner, bos: id("tokenizer.ggml.bos_token_id")?, eos: id("tokenizer.ggml.eos_token_id")? })
    }

    /// The ids of `text`, without BOS/EOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::invalid(OP, format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`; special tokens are kept (so encode/decode round-trips text that
    /// contains them). Unknown ids are an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let n = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= n) {
            return Err(Error::invalid(OP, format!("token id {bad} is outside the vocabulary of {n}")));
        }
        self.inner.decode(ids, false).map_err(|e| Error::invalid(OP, format!("cannot decode: {e}")))
    }

    /// The vocabulary entry of `id` (byte-level form: a leading space shows as `Ġ`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of vocabulary entry `token` (byte-level form).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The underlying `tokenizers` tokenizer (e.g. to save it as `tokenizer.json`).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
