//! Recipes: code that is not the library's core but is shared by more than one user of it.
//!
//! The core is `backend`, `basis`, `linear`, `mlp`, `model`, `adapter` and `io`: everything
//! needed to fine-tune a layer, a block or a model with SparseGrad on any data. The modules
//! here are particular ways of using that core:
//!
//! - [`vader`]: the VADER sentence corpus as a next-token-prediction dataset (reader,
//!   train/validation split, padded batches);
//! - [`finetune`]: the paper's fine-tuning flow (validation loss, SparseGrad preliminary
//!   phase and bases, training of the selected blocks' MLPs, validation loss again) for
//!   every method the paper compares;
//! - [`classify`]: labelled sentence-classification tasks (VADER ground-truth ratings or a
//!   `label<TAB>text` TSV), stratified splits, accuracy and macro-F1, for the BERT example.
//!
//! They stay in the crate, rather than under `examples/`, because the integration tests and
//! two examples (the LLaMA fine-tuning example and the BERT classification example) all run
//! them; an `examples/` module cannot be shared with `tests/`. They depend on the core and
//! nothing in the core depends on them.

pub mod classify;
pub mod finetune;
pub mod vader;
