//! Speed of the many-row product (prefill chunks, large decode batches) on real layer shapes:
//! `cargo run --release --example prefill_gemm [bf16|f16|f32|q8|q4]`.
//!
//! For each shape and number of activation rows it prints GFLOP/s (2 flops per weight and
//! row), the median of seven products, next to the machine's f32 FMA peak measured in the
//! same run on the same threads (a register-resident FMA loop), so the ratio holds on a
//! shared machine.

use std::time::Instant;

use gyre::kernels::cpu::linear;
use gyre::tensor::{Matrix, Quant, Tensor};
use rayon::prelude::*;

/// f32 FMA throughput of all pool threads, GFLOP/s: twelve independent AVX-512 FMA chains
/// per thread, in registers (0 without AVX-512).
fn fma_peak() -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        let steps = 1usize << 22;
        let t = Instant::now();
        let total: f32 = (0..rayon::current_num_threads())
            .into_par_iter()
            // SAFETY: AVX-512F is supported (checked above).
            .map(|w| unsafe { fma_chains(steps, w as f32) })
            .sum();
        std::hint::black_box(total);
        let flops = 2 * 16 * 12 * steps * rayon::current_num_threads();
        return flops as f64 / t.elapsed().as_secs_f64() / 1e9;
    }
    0.0
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains(steps: usize, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(seed); 12];
    let (m, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    for _ in 0..steps {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, m, c);
        }
    }
    acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let format = std::env::args().nth(1).unwrap_or_else(|| "bf16".into());
    let quant = match format.as_str() {
        "q8" => Some(Quant::Q8),
        "q4" => Some(Quant::Q4),
        _ => None,
    };
    println!("{format}, {} threads", rayon::current_num_threads());
    for &(n_out, n_in) in &[(2048, 2048), (5632, 2048), (2560, 2560), (4096, 4096)] {
        let values: Vec<f32> = (0..n_out * n_in)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let t = match format.as_str() {
            "f32" => Tensor::from_f32(&values, vec![n_out, n_in]),
            "f16" => Tensor::from_f32_as_f16(&values, vec![n_out, n_in]),
            _ => Tensor::from_f32_as_bf16(&values, vec![n_out, n_in]),
        };
        let w = Matrix::new(t, quant);
        for rows in [8, 16, 24, 32, 64, 256] {
            let x: Vec<f32> = (0..rows * n_in)
                .map(|i| ((i * 31) % 97) as f32 * 1e-2 - 0.5)
                .collect();
            let mut out = vec![0f32; rows * n_out];
            let flops = (2 * rows * n_out * n_in) as f64;
            let mut speeds = Vec::new();
            let mut peaks = Vec::new();
            for _ in 0..7 {
                peaks.push(fma_peak());
                let t = Instant::now();
                linear(&x, rows, &w, &mut out);
                speeds.push(flops / t.elapsed().as_secs_f64() / 1e9);
            }
            let (speed, peak) = (median(speeds), median(peaks));
            println!(
                "{n_out:>6} × {n_in:<6} rows {rows:>4}: {speed:>7.1} GFLOP/s  ({:>5.1}% of the FMA peak {peak:.0})",
                100.0 * speed / peak
            );
        }
    }
}
