//! The generation engine: sessions (prefill, decode, sampling, stop rules).

pub mod eval;
pub mod scheduler;
pub mod session;
pub mod stop;

pub use session::{Completion, FinishReason, GenerateParams, Session};
