//! LLaMA-architecture models: the hyper-parameters ([`config`]), the weights as row-major
//! f32 buffers in Hugging Face's layout, loaded from GGUF or safetensors ([`weights`]), and
//! the byte-level BPE tokenizer rebuilt from GGUF metadata ([`tokenizer`]).

pub mod attention;
pub mod config;
pub mod llama;
pub mod tokenizer;
pub mod weights;
