//! gyre: an inference engine for efficient open language models beyond Transformers.
//!
//! The library owns everything except argv parsing and HTTP: tensors over memory-mapped
//! weights, CPU kernels, checkpoint loaders, the model families, per-sequence state,
//! tokenizers, chat templates, sampling and the generation engine.

pub mod bench;
pub mod chat;
pub mod engine;
pub mod kernels;
pub mod loader;
pub mod models;
pub mod sampling;
pub mod state;
pub mod tensor;
pub mod tokenizer;
pub mod upscale;
