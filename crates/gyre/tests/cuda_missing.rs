//! Without a CUDA driver, `--device cuda` is a clear error (its own test binary: the parity
//! tests switch the process to the CUDA emulator).

mod common;

use common::*;
use gyre::kernels::cuda;
use gyre::loader::Checkpoint;
use gyre::models::{self, Device, LoadOptions};

/// Without a CUDA driver, `--device cuda` is a clear error, not a panic.
#[test]
fn cuda_device_without_a_driver_is_a_clear_error() {
    if cuda::driver_present() {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    assert!(
        std::env::var_os("GYRE_CUDA_EMULATOR").is_none(),
        "unset GYRE_CUDA_EMULATOR to run this test"
    );
    let ckpt = Checkpoint::open(&fixture("llama", "llama_gqa_f32"), |_, _| {}).unwrap();
    let on_gpu = LoadOptions {
        quant: None,
        device: Device::Cuda(0),
    };
    let err = models::load_with(&ckpt, on_gpu)
        .err()
        .expect("loading on a missing device must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("--device cuda") && msg.contains("libcuda"), "{msg}");
}
