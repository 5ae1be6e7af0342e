//! Transformer models: the LLaMA-architecture decoder ([`llama`]: hyper-parameters in
//! [`config`], weights loaded from GGUF or safetensors in [`weights`], the byte-level BPE
//! tokenizer rebuilt from GGUF metadata in [`tokenizer`]) and the BERT-family encoder
//! classifier ([`bert`], with its HF weights and WordPiece tokenizer). Attention is shared
//! ([`attention`]).

pub mod attention;
pub mod bert;
pub mod config;
pub mod llama;
pub mod tokenizer;
pub mod weights;
