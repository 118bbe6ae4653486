//! The CUDA decode GEMV against the GPU's read bandwidth, on real layer shapes:
//! `cargo run --release --example cuda_gemv [rows]` on a machine with an NVIDIA GPU (CUDA
//! libraries on LD_LIBRARY_PATH), `rows` the activation rows (1–8, default 1).
//!
//! Each shape is copied until the set holds 1 GiB (far above the L2 cache), so every product
//! streams from device memory; a column is the median of 9 timings of one pass over all
//! copies (launches queued back to back, then one synchronisation), next to the read probe
//! (`gyre bench`'s) taken alternately. Small matrices show the fixed cost per launch.

use std::time::Instant;

use anyhow::Result;
use gyre::kernels::cuda::{DeviceReadProbe, Gpu, Product};
use gyre::tensor::DType;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let rows: usize = std::env::args().nth(1).map_or(Ok(1), |s| s.parse())?;
    let gpu = Gpu::open(0)?;
    let probe = DeviceReadProbe::new(&gpu)?;
    println!("{}, {rows} activation row(s), bf16 weights", gpu.name());
    println!(
        "{:>14} {:>9} {:>12} {:>10} {:>8}",
        "shape", "µs/prod", "GB/s", "probe", "ratio"
    );
    for &(n_out, n_in) in &[
        (2048, 2048),
        (7168, 2048),
        (2048, 7168),
        (2560, 2560),
        (7680, 2560),
        (2560, 7680),
        (4096, 4096),
        (6144, 4096),
        (28672, 4096),
        (4096, 14336),
        (65536, 2048),
        (256000, 2560),
    ] {
        let bytes = n_out * n_in * 2;
        let copies = ((1usize << 30) / bytes).max(2);
        let values: Vec<u16> = (0..n_out * n_in)
            .map(|i| half::bf16::from_f32(((i * 7919) % 1000) as f32 * 1e-3 - 0.5).to_bits())
            .collect();
        let raw: &[u8] = bytemuck::cast_slice(&values);
        let mats = (0..copies)
            .map(|_| gpu.upload_matrix(&[(raw, n_out)], DType::BF16, n_in))
            .collect::<Result<Vec<_>>>()?;
        let x = gpu.upload(&vec![0.01f32; rows * n_in])?;
        let y = gpu.zeros(rows * n_out * 4)?;
        let product = Product::new(x.ptr(), n_in, rows, y.ptr(), n_out);
        let pass = || -> Result<f64> {
            gpu.sync()?;
            let t = Instant::now();
            for m in &mats {
                gpu.linear(m, product)?;
            }
            gpu.sync()?;
            Ok(t.elapsed().as_secs_f64())
        };
        pass()?;
        let (mut times, mut reads) = (Vec::new(), Vec::new());
        for _ in 0..9 {
            times.push(pass()?);
            reads.push(probe.pass());
        }
        let per = median(times) / copies as f64;
        let gbs = bytes as f64 / per / 1e9;
        let bw = median(reads);
        println!(
            "{:>14} {:>9.2} {:>12.0} {:>10.0} {:>7.1}%",
            format!("{n_out}×{n_in}"),
            per * 1e6,
            gbs,
            bw,
            100.0 * gbs / bw
        );
    }
    Ok(())
}
