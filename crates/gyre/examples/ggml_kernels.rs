//! In-cache speed of the GGUF block kernels, one thread: `cargo run --release --example
//! ggml_kernels [types…]`. A matrix of 256 rows × 4096 columns per format (0.3–1.1 MB, inside
//! a core's L2) is multiplied 400 times; the figure is weight bytes per second, the kernels'
//! compute ceiling against which a streaming product (`gemv_bandwidth`) is measured.

use std::time::Instant;

use gyre::kernels::cpu::linear;
use gyre::tensor::{GgmlMatrix, GgmlType, Matrix, Tensor};

fn main() {
    let names: Vec<String> = std::env::args().skip(1).collect();
    let types: Vec<GgmlType> = if names.is_empty() {
        GgmlType::QUANTIZED.to_vec()
    } else {
        names
            .iter()
            .map(|n| GgmlType::from_name(n).expect("a GGUF block type"))
            .collect()
    };
    let (rows, cols) = (256, 4096);
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    let t = Tensor::from_f32(&values, vec![rows, cols]);
    let x: Vec<f32> = (0..cols).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    pool.install(|| {
        for ty in types {
            let m = Matrix::Ggml(std::sync::Arc::new(GgmlMatrix::quantize(&t, ty)));
            let mut out = vec![0f32; rows];
            for _ in 0..20 {
                linear(&x, 1, &m, &mut out);
            }
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t0 = Instant::now();
                for _ in 0..80 {
                    linear(&x, 1, &m, &mut out);
                }
                best = best.min(t0.elapsed().as_secs_f64() / 80.0);
            }
            println!(
                "{:5}  {:7.1} GB/s in cache, one thread  ({:.1} ns per 256 weights)",
                ty.name(),
                m.nbytes() as f64 / best / 1e9,
                best * 1e9 / (rows * cols / 256) as f64
            );
        }
    });
}
