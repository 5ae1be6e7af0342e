//! The one error type of the crate. Library code returns these instead of panicking on
//! anything a caller (or a file) can get wrong; each variant names what was wrong.

use std::path::PathBuf;

/// Every failure sparsegrad reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor or matrix had the wrong shape for the operation.
    #[error("shape mismatch in {op}: {what}: expected {expected}, got {got}")]
    Shape { op: &'static str, what: String, expected: String, got: String },

    /// An argument outside its valid range (k = 0, k > entries, negative lr, ...).
    #[error("invalid argument for {op}: {msg}")]
    InvalidArgument { op: &'static str, msg: String },

    /// NaN or infinity where only finite numbers make sense (gradients, inputs, weights).
    #[error("non-finite value in {what} ({count} non-finite, first at index {first_index})")]
    NonFinite { what: String, count: usize, first_index: usize },

    /// A tensor that must be present in a file or map is missing.
    #[error("missing tensor `{name}`{}", context.as_deref().map(|c| format!(" in {c}")).unwrap_or_default())]
    MissingTensor { name: String, context: Option<String> },

    /// A tensor has the wrong element type.
    #[error("tensor `{name}` has dtype {got}, expected {expected}")]
    Dtype { name: String, expected: String, got: String },

    /// An operation is not implemented for a dtype on a backend.
    #[error("{op} does not support dtype {dtype} on the {backend} backend")]
    UnsupportedDtype { op: &'static str, dtype: &'static str, backend: &'static str },

    /// A basis that is not orthogonal, or otherwise unusable.
    #[error("invalid basis `{group}`: {msg}")]
    InvalidBasis { group: String, msg: String },

    /// A file that could not be parsed: truncated, corrupt, or of the wrong kind.
    #[error("corrupt or unsupported file {}: {msg}", path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "<memory>".into()))]
    Format { path: Option<PathBuf>, msg: String },

    /// Metadata missing or unparsable.
    #[error("metadata `{key}`: {msg}")]
    Metadata { key: String, msg: String },

    /// An adapter or checkpoint does not fit the model it is loaded into.
    #[error("incompatible {what}: {msg}")]
    Incompatible { what: String, msg: String },

    /// LAPACK reported a failure.
    #[error("LAPACK {routine} failed with info = {info}")]
    Lapack { routine: &'static str, info: i32 },

    /// No usable CUDA device, driver or library.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),

    /// The crate was built without nvcc, so no kernels are embedded.
    #[error("built without CUDA kernels (nvcc was not found at build time; set NVCC or CUDA_HOME and rebuild)")]
    NoKernels,

    /// A CUDA driver, cuBLAS or launch error.
    #[error("CUDA error in {op}: {msg}")]
    Cuda { op: &'static str, msg: String },

    /// Operating-system I/O.
    #[error("I/O error on {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// An allocation the machine (or the device) could not satisfy.
    #[error("out of memory: cannot allocate {} for {what}", human_bytes(*bytes))]
    OutOfMemory { what: String, bytes: u128 },

    /// A run whose memory plan ([`crate::plan::MemoryPlan`]) exceeds the device's free
    /// memory, refused before anything is loaded.
    #[error(
        "the run needs {} of device memory but {} is free; largest items: {}",
        human_bytes(*total_bytes),
        human_bytes(*free_bytes),
        largest.join(", ")
    )]
    WouldNotFit { total_bytes: u128, free_bytes: u128, largest: Vec<String> },

    /// Training produced NaN or infinity.
    #[error("training diverged at step {step}: {detail}")]
    Diverged { step: usize, detail: String },
}

/// `1.5 GB`-style sizes for messages (decimal units, as `ls -h --si` and disk vendors use).
pub fn human_bytes(b: u128) -> String {
    let units = ["bytes", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} bytes")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Crate-wide result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn shape(op: &'static str, what: impl Into<String>, expected: impl ToString, got: impl ToString) -> Self {
        Error::Shape { op, what: what.into(), expected: expected.to_string(), got: got.to_string() }
    }

    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument { op, msg: msg.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// A corrupt-file error; control characters in `msg` (names read from the file) are
    /// escaped, so a message stays one printable line.
    pub fn format(path: Option<&std::path::Path>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.map(|p| p.to_path_buf()), msg: crate::io::fs::escape(&msg.into(), 2000) }
    }

    /// The same error, with `context` (where it happened, e.g. "layer 3 MLP up") put in front
    /// of its description. The variant, and with it the kind a caller matches on, and any
    /// source stay as they were; variants without a description are returned unchanged.
    pub fn context(self, context: &str) -> Self {
        let at = |s: String| format!("{context}: {s}");
        match self {
            Error::Shape { op, what, expected, got } => Error::Shape { op, what: at(what), expected, got },
            Error::InvalidArgument { op, msg } => Error::InvalidArgument { op, msg: at(msg) },
            Error::NonFinite { what, count, first_index } => Error::NonFinite { what: at(what), count, first_index },
            Error::MissingTensor { name, context: c } => {
                Error::MissingTensor { name, context: Some(c.map_or_else(|| context.to_string(), at)) }
            }
            Error::InvalidBasis { group, msg } => Error::InvalidBasis { group, msg: at(msg) },
            Error::Incompatible { what, msg } => Error::Incompatible { what: at(what), msg },
            Error::Cuda { op, msg } => Error::Cuda { op, msg: at(msg) },
            other => other,
        }
    }
}

/// Checks that a buffer holds at least `needed` elements.
pub(crate) fn check_len(op: &'static str, what: &str, len: usize, needed: usize) -> Result<()> {
    if len < needed {
        return Err(Error::shape(op, what, format!("at least {needed} elements"), format!("{len}")));
    }
    Ok(())
}

/// `a * b`, or an error naming the op when the size overflows.
pub(crate) fn checked_mul(op: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::invalid(op, format!("size {a} x {b} overflows")))
}

/// Fails with [`Error::NonFinite`] naming `what` (count and first index) if `values` holds
/// NaN or infinity: the one host-side scan every constructor and loader uses.
pub(crate) fn ensure_finite<T: crate::scalar::Real>(what: &str, values: impl IntoIterator<Item = T>) -> Result<()> {
    let (mut count, mut first_index) = (0usize, 0usize);
    for (i, v) in values.into_iter().enumerate() {
        if !v.is_finite() {
            if count == 0 {
                first_index = i;
            }
            count += 1;
        }
    }
    if count > 0 {
        return Err(Error::NonFinite { what: what.to_string(), count, first_index });
    }
    Ok(())
}
