//! File formats: reading and atomically writing safetensors files (memory-mapped, every
//! lookup checked, errors naming the file, tensor or metadata key at fault), GGUF, and the
//! file-system guards every loader and writer goes through ([`fs`]: regular files only,
//! never blocking on a FIFO, never clobbering a special file).

pub mod fs;
pub mod gguf;
pub mod json;
pub mod safetensors;

pub use self::fs::{escape, open_regular, write_atomic};
pub use self::safetensors::{check_finite, Dtype, SafetensorsFile, SafetensorsWriter};
