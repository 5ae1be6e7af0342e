//! Ready-made pieces of fine-tuning workflows: labelled sentence-classification tasks
//! ([`classify`]).

pub mod classify;
