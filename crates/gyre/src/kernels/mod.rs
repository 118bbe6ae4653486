//! Numeric kernels. They take slices (or device pointers) and shapes and never know about models.
//!
//! `cpu` holds the CPU kernels: each has a plain scalar reference it is tested against.
//! `cuda` holds the CUDA kernels (NVRTC sources compiled at run time) and their launchers.

pub mod cpu;
pub mod cuda;
