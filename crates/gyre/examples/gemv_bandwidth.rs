//! Decode matrix–vector product speed against a plain read of the same bytes, on real layer
//! shapes: `cargo run --release --example gemv_bandwidth [bf16|f16|f32|q8|q4|q4_k|q6_k|…]` (any
//! GGUF block type by name, quantized here by round-to-nearest).
//!
//! Each shape is copied until the set exceeds the last-level cache, so every pass streams
//! from memory; the read (a parallel f32 sum over an owned buffer of the same size, laid out
//! like the weights) and the product alternate, and each column is the median of nine passes.
//! `GEMV_MB=8` keeps the set in the cache instead (the kernels' compute speed).

use std::time::Instant;

use gyre::kernels::cpu::{linear, sum};
use gyre::tensor::{GgmlMatrix, GgmlType, Matrix, Quant, Tensor};
use rayon::prelude::*;

fn main() {
    let format = std::env::args().nth(1).unwrap_or_else(|| "bf16".into());
    let quant = match format.as_str() {
        "q8" => Some(Quant::Q8),
        "q4" => Some(Quant::Q4),
        _ => None,
    };
    println!("{format}, {} threads", rayon::current_num_threads());
    for &(rows, cols) in &[
        (2048, 2048),
        (7168, 2048),
        (2560, 2560),
        (15360, 2560),
        (2560, 7680),
        (4096, 4096),
        (14336, 4096),
        (4096, 14336),
    ] {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let ggml = GgmlType::from_name(&format).filter(|t| t.dense().is_none());
        let make = || {
            let t = match format.as_str() {
                "f32" => Tensor::from_f32(&values, vec![rows, cols]),
                "f16" => Tensor::from_f32_as_f16(&values, vec![rows, cols]),
                _ => Tensor::from_f32_as_bf16(&values, vec![rows, cols]),
            };
            match ggml {
                Some(ty) => Matrix::Ggml(std::sync::Arc::new(GgmlMatrix::quantize(&t, ty))),
                None => Matrix::new(t, quant),
            }
        };
        let first = make();
        let total: usize = std::env::var("GEMV_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256);
        let copies = (total << 20).div_ceil(first.nbytes());
        let mats: Vec<Matrix> = std::iter::once(first)
            .chain((1..copies).map(|_| make()))
            .collect();
        let bytes: f64 = mats.iter().map(|m| m.nbytes() as f64).sum();
        let buffer = Tensor::from_f32(&vec![1.0; bytes as usize / 4], vec![bytes as usize / 4]);
        let x: Vec<f32> = (0..cols).map(|i| (i % 13) as f32 * 0.1).collect();
        let mut out = vec![0f32; rows];
        let (mut read, mut product) = (Vec::new(), Vec::new());
        for _ in 0..9 {
            let t0 = Instant::now();
            let floats: &[f32] = bytemuck::cast_slice(buffer.raw());
            std::hint::black_box(floats.par_chunks(1 << 20).map(sum).sum::<f32>());
            read.push(bytes / t0.elapsed().as_secs_f64() / 1e9);
            let t0 = Instant::now();
            for m in &mats {
                linear(&x, 1, m, &mut out);
            }
            std::hint::black_box(&out);
            product.push(bytes / t0.elapsed().as_secs_f64() / 1e9);
        }
        let (r, p) = (median(&mut read), median(&mut product));
        println!(
            "{rows:>6} x {cols:<6} read {r:5.1} GB/s   product {p:5.1} GB/s   {:3.0}%",
            100.0 * p / r
        );
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
