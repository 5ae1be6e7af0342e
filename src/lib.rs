//! # sparsegrad
//!
//! SparseGrad fine-tuning of transformer MLP blocks (Chekalina et al., EMNLP 2024):
//! find once, per layer group, an orthogonal basis `(P, Q)` in which weight gradients are
//! nearly sparse (HOSVD of gradients from a short preliminary phase, computed by streaming
//! Gram matrices), train the weights in that basis, keep the top ~1% of gradient entries
//! each step as COO, and apply them with SparseAdam.
//!
//! The math is written once against [`Backend`]; [`Cpu`] is the tuned CPU backend (OpenBLAS,
//! rayon, blocked kernels), checked against plain reference implementations in the tests.
//! The README's "Using the library" shows the whole flow (collect, basis, train, save,
//! load, merge) and is compiled and run as a doctest.
//!
//! ```no_run
//! use sparsegrad::{Backend, Cpu, GramAccumulator, Keep, SparseGradConfig, SparseGradLinear};
//! # fn main() -> sparsegrad::Result<()> {
//! let cpu = Cpu::new();
//! let (out, inp, t) = (64, 32, 16);
//! // Preliminary phase: stream dense weight gradients into the group's Gram matrices.
//! let mut acc = GramAccumulator::new(out, inp);
//! # let grads: Vec<Vec<f32>> = vec![vec![0.1; out * inp]; 4];
//! for g in &grads {
//!     acc.add(g)?;
//! }
//! let basis = acc.basis("up_proj")?;
//! // Train in the basis, keeping 1% of the gradient entries each step.
//! # let weight = vec![0.0f32; out * inp]; let bias = vec![0.0f32; out];
//! let cfg = SparseGradConfig { keep: Keep::Fraction(0.01), ..Default::default() };
//! let mut layer = SparseGradLinear::new(&cpu, &weight, Some(&bias), &basis, cfg)?;
//! # let x_host = vec![0.5f32; t * inp]; let g_host = vec![0.1f32; t * out];
//! let (x, g) = (cpu.upload(&x_host)?, cpu.upload(&g_host)?);
//! let mut y = cpu.alloc::<f32>(t * out)?;
//! let mut dx = cpu.alloc::<f32>(t * inp)?;
//! layer.forward(&x, t, &mut y)?;
//! layer.backward(&g, t, Some(&mut dx))?; // dx exact; the COO gradient of Wt stays inside
//! layer.step()?; // SparseAdam on Wt, AdamW on the bias
//! let merged_weight: Vec<f32> = layer.merged_weight()?; // W = P Wt Q^T
//! # Ok(()) }
//! ```

//! # Features
//!
//! - `cuda`: the CUDA backend (`Cuda`), with no way of linking CUDA and no CUDA version:
//!   those belong to the final binary (an engine enables cudarc's `dynamic-linking`,
//!   `static-linking` or `dynamic-loading` and a CUDA version itself).
//! - `cuda-dynamic-loading` (default, with `cuda`): cudarc's `dynamic-loading` and CUDA 13.0,
//!   so `cargo build` alone gives a crate that runs with or without a GPU.
//! - `recipes`: the fine-tuning flows, corpus reader and classification tasks the examples
//!   and tests share (`recipes`); not part of the library's core.

// The README's library example is compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub mod adapter;
pub mod backend;
pub mod basis;
pub mod error;
pub mod io;
pub mod linear;
pub mod mlp;
pub mod model;
pub mod optim;
pub mod perf;
#[cfg(feature = "cuda")]
pub mod plan;
#[cfg(feature = "recipes")]
pub mod recipes;
pub mod scalar;

// The one list of re-exports is the prelude; the root re-exports it and nothing else.
pub use prelude::*;

/// Everything a user of a layer, a block or a model needs: `use sparsegrad::prelude::*;`.
///
/// This is the crate's one list of re-exports: the crate root re-exports exactly these
/// names (`sparsegrad::SparseGradLinear` is `sparsegrad::prelude::SparseGradLinear`), and
/// everything else is reached through its module: the op set's plumbing in [`backend`]
/// (`Coo`, `Gemm`, `IndexMaps`, the backends' buffer types), the premise report and the
/// direct SVD in [`basis`], file readers and writers in [`io`], the individual layer types
/// and their state in [`linear`], the models' parts (per-layer weights, batches) in
/// [`model`].
pub mod prelude {
    pub use crate::adapter::{load_adapter, save_adapter, AdapterEntry, AdapterTarget};
    pub use crate::backend::cpu::Cpu;
    #[cfg(feature = "cuda")]
    pub use crate::backend::cuda::{Cuda, ProfileOptions};
    pub use crate::backend::{AdamParams, Backend, GeluKind, HostCoo, MemoryStats, PoolKind, Precision};
    pub use crate::basis::{Basis, BasisSet, DeviceGramAccumulator, GramAccumulator, GramSet};
    pub use crate::error::{Error, Result};
    pub use crate::linear::sparsegrad::{
        Formulation, FormulationChoice, GemmMode, MergedUpdate, ScratchLengths, Selection, SharedScratch,
        SparseGradConfig, SparseGradLinear, SparseGradScratch, StepGrads,
    };
    pub use crate::linear::trainable::{Linear, LinearBuilder, Method, TrainOptions, TrainableLinear};
    pub use crate::linear::Keep;
    pub use crate::mlp::{BertMlp, BertMlpConfig, LlamaMlp, MlpShape, ProjectionSpec};
    pub use crate::model::bert::tokenizer::BertTokenizer;
    pub use crate::model::bert::{BertConfig, BertModel, BertPlan, BertWeights, HeadConfig};
    pub use crate::model::config::LlamaConfig;
    pub use crate::model::llama::{LlamaModel, MlpPlan, TokenBatch};
    pub use crate::model::tokenizer::Tokenizer;
    pub use crate::model::weights::LlamaWeights;
    pub use crate::model::TrainingSetup;
    pub use crate::optim::Optimizer;
    pub use crate::scalar::{Elem, Real};
}
