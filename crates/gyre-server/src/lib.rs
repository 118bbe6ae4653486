//! gyre-server: the OpenAI-compatible HTTP front end over the engine's handle.
//!
//! Not built yet (issue: `gyre serve`). This crate will hold routes, SSE streaming, auth,
//! limits and metrics, and talk to the engine only through its submit/stream handle.
