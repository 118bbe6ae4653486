//! Numeric kernels. They take slices and shapes and never know about models.
//!
//! `cpu` holds the CPU kernels: each has a plain scalar reference it is tested against.

pub mod cpu;
