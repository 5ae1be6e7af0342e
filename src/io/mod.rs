//! File formats: reading and atomically writing safetensors files (memory-mapped, every
//! lookup checked, errors naming the file, tensor or metadata key at fault) and reading
//! GGUF files. Every loader and writer goes through the file-system guards of `fs`
//! (regular files only, never blocking on a FIFO, never clobbering a special file) and
//! parses JSON strictly (`json`: no key twice).

// Public but hidden: the command line, the examples and the hardening tests use the same
// guards (atomic writes, regular-file reads, escaping for messages); not the library's API.
#[doc(hidden)]
pub mod fs;
pub mod gguf;
pub(crate) mod json;
pub mod safetensors;

pub use self::safetensors::{check_finite, Dtype, SafetensorsFile, SafetensorsWriter};
