//! File formats: reading and atomically writing safetensors files (memory-mapped, every
//! lookup checked, errors naming the file, tensor or metadata key at fault).

pub mod gguf;
pub mod safetensors;

pub use self::safetensors::{check_finite, write_atomic, Dtype, SafetensorsFile, SafetensorsWriter};
