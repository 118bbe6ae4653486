//! CPU kernels over f32 activations and weights in their stored dtype.
//!
//! Products widen weights to f32 in registers; accumulation is f32. The `linear` kernel reads
//! each weight row once for all rows of activations (a prefill chunk, or one token from each
//! sequence of a decode batch), which is where batched throughput comes from.

mod dot;
#[cfg(target_arch = "x86_64")]
mod gemm;
mod gemv;
mod ggml;
pub mod ops;
#[cfg(target_arch = "x86_64")]
mod simd;
mod spin;

pub use dot::{dot, dot_4x4, dot_bf16, dot_f16, dot_q4, dot_q8, dot_scalar};
pub use ops::*;

use rayon::prelude::*;

use gemv::Rows;

use crate::tensor::{Matrix, Tensor, TensorData};

/// Matrices with fewer elements than this decode on one thread (a fork-join costs more).
const SMALL_MATRIX: usize = 1 << 16;

/// From this many activation rows on, [`linear`] runs as a packed GEMM (`gemm.rs`) where
/// AVX-512 is available (`cargo run --release --example prefill_gemm`): 1.6–2.4× the
/// dot-product tiles from 64 rows on, 1.2–1.3× at 16 for bf16 and f16. Quantized matrices
/// switch at 32: at 16 rows Q8's tiles were as fast or faster (dequantizing a strip costs
/// more than widening one).
const GEMM_ROWS: usize = 16;
const GEMM_ROWS_QUANTIZED: usize = 32;

/// Rows of the weight matrix handled by one parallel task.
const ROW_BLOCK: usize = 16;

/// The host's available and total memory in bytes (`/proc/meminfo`; zeros where unreadable).
pub fn host_memory() -> (usize, usize) {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| -> usize {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (kib("MemAvailable:") << 10, kib("MemTotal:") << 10)
}

/// `out[t, o] = Σ_i x[t, i] · w[o, i]` for `t < n_rows`.
///
/// Shapes: `x` [n_rows, in], `w` [out, in] (nn.Linear layout, any stored dtype or
/// quantized), `out` [n_rows, out].
pub fn linear(x: &[f32], n_rows: usize, w: &Matrix, out: &mut [f32]) {
    let (n_out, n_in) = (w.rows(), w.cols());
    assert_eq!(x.len(), n_rows * n_in, "linear: activation length");
    assert_eq!(out.len(), n_rows * n_out, "linear: output length");
    if n_rows == 0 {
        return;
    }
    if n_rows == 1 {
        linear_group(1, &mut [(x, w, out)]);
        return;
    }
    let data = rows_of(w);
    // Several rows of activations. Quantized matrices multiply the rounded activation, as in
    // decode (tensor::quant). From GEMM_ROWS rows on, with AVX-512: the packed GEMM. Else
    // widen a block of weight rows once, then 4×4 tiles of (weight row, activation row) dot
    // products, built transposed, [out, n_rows], so each task owns a contiguous block.
    let x_hat;
    let x = match &data {
        Rows::Quantized(q) => {
            let mut row_hat = Vec::new();
            let mut all = Vec::with_capacity(x.len());
            for row in x.chunks_exact(n_in) {
                q.quant().rounded_activation(row, &mut row_hat);
                all.extend_from_slice(&row_hat);
            }
            x_hat = all;
            &x_hat[..]
        }
        Rows::Ggml(g) => {
            let mut row_hat = Vec::new();
            let mut all = Vec::with_capacity(x.len());
            for row in x.chunks_exact(n_in) {
                crate::tensor::ggml::Activation16::new(row, g.ty().block_size(), &mut row_hat);
                all.extend_from_slice(&row_hat);
            }
            x_hat = all;
            &x_hat[..]
        }
        _ => x,
    };
    #[cfg(target_arch = "x86_64")]
    {
        let gemm_rows = match data {
            Rows::Dense(_) => GEMM_ROWS,
            Rows::Quantized(_) | Rows::Ggml(_) => GEMM_ROWS_QUANTIZED,
        };
        if n_rows >= gemm_rows && simd::level() == simd::Level::Avx512 {
            let weight_row = |o: usize, buf: &mut [f32]| match &data {
                Rows::Dense(d) => d.row_to_f32(o * n_in, buf),
                Rows::Quantized(q) => q.row_to_f32(o, buf),
                Rows::Ggml(g) => ggml::dequantize(g.ty(), g.row(o), buf),
            };
            gemm::matmul(&gemm::PackedRows::new(x, n_rows, n_in), n_out, &weight_row, out);
            return;
        }
    }
    let mut out_t = vec![0f32; n_out * n_rows];
    out_t
        .par_chunks_mut(ROW_BLOCK * n_rows)
        .enumerate()
        .for_each_init(
            || vec![0f32; ROW_BLOCK * n_in],
            |scratch, (b, chunk)| {
                let rows = chunk.len() / n_rows;
                let mut rest = scratch.as_mut_slice();
                let mut block: Vec<&[f32]> = Vec::with_capacity(rows);
                for j in 0..rows {
                    let (head, tail) = rest.split_at_mut(n_in);
                    rest = tail;
                    let r = b * ROW_BLOCK + j;
                    block.push(match &data {
                        Rows::Dense(d) => weight_row(d, r * n_in, n_in, head),
                        Rows::Quantized(q) => {
                            q.row_to_f32(r, head);
                            &*head
                        }
                        Rows::Ggml(g) => {
                            ggml::dequantize(g.ty(), g.row(r), head);
                            &*head
                        }
                    });
                }
                let xrow = |t: usize| &x[t * n_in..(t + 1) * n_in];
                let (full_r, full_t) = (rows / 4 * 4, n_rows / 4 * 4);
                for t0 in (0..full_t).step_by(4) {
                    let xs = [xrow(t0), xrow(t0 + 1), xrow(t0 + 2), xrow(t0 + 3)];
                    for r0 in (0..full_r).step_by(4) {
                        let ws = [block[r0], block[r0 + 1], block[r0 + 2], block[r0 + 3]];
                        let tile = dot_4x4(ws, xs, n_in);
                        for (dr, row) in tile.iter().enumerate() {
                            for (dt, &v) in row.iter().enumerate() {
                                chunk[(r0 + dr) * n_rows + t0 + dt] = v;
                            }
                        }
                    }
                }
                // Edges: the rows and activation rows that do not fill a 4×4 tile.
                for (j, row) in block.iter().enumerate() {
                    let first = if j < full_r { full_t } else { 0 };
                    for t in first..n_rows {
                        chunk[j * n_rows + t] = dot(row, xrow(t));
                    }
                }
            },
        );
    for (o, col) in out_t.chunks_exact(n_rows).enumerate() {
        for (t, &v) in col.iter().enumerate() {
            out[t * n_out + o] = v;
        }
    }
}

/// `out = x · wᵀ` for every `(x, w, out)` of `products` (shapes as [`linear`], `n_rows` rows
/// each). In decode the whole group is one job of the spinning pool (`spin.rs`): projections
/// that depend on nothing but their inputs (q/k/v, gate/up, the RG-LRU gates of every head)
/// share one hand-off and one join, and the pool balances their row blocks together. Its
/// helpers spin between the products of a step where rayon's workers would sleep: measured
/// 85–88% of the read bandwidth against rayon's 62–86% on TinyLlama q8 (four alternating
/// pairs of `gyre bench --synthetic tinyllama-1.1b --quant q8 --gen 32`).
pub fn linear_group(n_rows: usize, products: &mut [(&[f32], &Matrix, &mut [f32])]) {
    if n_rows != 1 {
        for (x, w, out) in products.iter_mut() {
            linear(x, n_rows, w, out);
        }
        return;
    }
    for (x, w, out) in products.iter() {
        assert_eq!(x.len(), w.cols(), "linear: activation length");
        assert_eq!(out.len(), w.rows(), "linear: output length");
    }
    // Decode: stream each weight row once, widening in registers. A few large contiguous
    // blocks per thread and matrix (whole groups of eight rows) keep each core's prefetcher
    // on long streams; a matrix too small to repay splitting runs as one block.
    let data: Vec<Rows> = products.iter().map(|(_, w, _)| rows_of(w)).collect();
    // One prepared activation per distinct (input, weight format): q/k/v share one.
    let mut acts: Vec<gemv::Activation> = Vec::new();
    let mut act_of = Vec::with_capacity(products.len());
    for (i, ((x, _, _), rows)) in products.iter().zip(&data).enumerate() {
        let same = |j: &usize| {
            let (xj, ..) = &products[*j];
            std::ptr::eq(*xj, *x) && gemv::Activation::shared_by(&data[*j], rows)
        };
        match (0..i).find(same) {
            Some(j) => act_of.push(act_of[j]),
            None => {
                act_of.push(acts.len());
                acts.push(gemv::Activation::new(x, rows));
            }
        }
    }
    let threads = spin::SpinPool::global().threads();
    let elements: usize = products.iter().map(|(x, _, out)| x.len() * out.len()).sum();
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::new();
    for (i, (_, w, out)) in products.iter_mut().enumerate() {
        let n_out = w.rows();
        let block = if n_out * w.cols() < SMALL_MATRIX {
            n_out
        } else {
            n_out
                .div_ceil(threads * 4)
                .next_multiple_of(gemv::ROWS)
                .max(ROW_BLOCK)
        };
        for (b, chunk) in out.chunks_mut(block.max(1)).enumerate() {
            tasks.push((i, b * block, chunk));
        }
    }
    let run = |(i, first, chunk): (usize, usize, &mut [f32])| {
        gemv::rows_times(&data[i], &acts[act_of[i]], first, chunk)
    };
    if elements < SMALL_MATRIX {
        tasks.into_iter().for_each(run);
    } else {
        // Each task is taken by exactly one thread; the lock is never contended.
        let tasks: Vec<std::sync::Mutex<Option<_>>> = tasks
            .into_iter()
            .map(|t| std::sync::Mutex::new(Some(t)))
            .collect();
        spin::SpinPool::global().run(tasks.len(), &|i| {
            if let Some(task) = tasks[i].lock().unwrap_or_else(|e| e.into_inner()).take() {
                run(task);
            }
        });
    }
}

/// A matrix's rows as the kernels read them.
fn rows_of(w: &Matrix) -> Rows<'_> {
    match w {
        Matrix::Dense(t) => Rows::Dense(t.data()),
        Matrix::Quantized(q) => Rows::Quantized(q),
        Matrix::Ggml(g) => Rows::Ggml(g),
    }
}

/// The weight row starting at element `start`, as f32: borrowed when stored as f32,
/// otherwise widened into `scratch`.
fn weight_row<'a>(data: &'a TensorData<'a>, start: usize, n: usize, scratch: &'a mut [f32]) -> &'a [f32] {
    match data {
        TensorData::F32(s) => &s[start..start + n],
        _ => {
            data.row_to_f32(start, &mut scratch[..n]);
            &scratch[..n]
        }
    }
}

/// Scalar reference for [`linear`] over a dense tensor.
pub fn linear_scalar(x: &[f32], n_rows: usize, w: &Tensor, out: &mut [f32]) {
    let (n_out, n_in) = (w.shape()[0], w.shape()[1]);
    let wf = w.to_f32_vec();
    for t in 0..n_rows {
        for o in 0..n_out {
            out[t * n_out + o] = dot_scalar(&wf[o * n_in..(o + 1) * n_in], &x[t * n_in..(t + 1) * n_in]);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tensor::Quant;

    /// Deterministic values in [−1, 1) (xorshift), shared by the kernel tests.
    pub(crate) fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn linear_matches_scalar_for_every_dtype_and_odd_shapes() {
        for &(n_out, n_in, rows) in &[
            (1, 1, 1),
            (17, 33, 1),
            (40, 129, 3),
            (33, 64, 9),
            (5, 7, 17),
            (29, 300, 40),
        ] {
            let wv = pseudo(n_out * n_in, 7);
            let x = pseudo(rows * n_in, 11);
            for w in [
                Tensor::from_f32(&wv, vec![n_out, n_in]),
                Tensor::from_f32_as_bf16(&wv, vec![n_out, n_in]),
                Tensor::from_f32_as_f16(&wv, vec![n_out, n_in]),
            ] {
                let mut got = vec![0.0; rows * n_out];
                let mut want = vec![0.0; rows * n_out];
                linear(&x, rows, &Matrix::Dense(w.clone()), &mut got);
                linear_scalar(&x, rows, &w, &mut want);
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{:?} {rows}: {g} vs {e}",
                        w
                    );
                }
            }
        }
    }

    #[test]
    fn many_rows_equal_one_row_at_a_time_in_every_format() {
        // Prefill ≡ decode at the kernel: 16 and 40 rows (the GEMM where AVX-512 is, the tiles
        // for quantized at 16) against the decode product of each row alone.
        let (n_out, n_in) = (70, 300);
        let wv = pseudo(n_out * n_in, 17);
        for rows in [16, 40] {
            let x = pseudo(rows * n_in, 19);
            for quant in [None, Some(Quant::Q8), Some(Quant::Q4)] {
                let w = Matrix::new(Tensor::from_f32_as_bf16(&wv, vec![n_out, n_in]), quant);
                let mut all = vec![0f32; rows * n_out];
                linear(&x, rows, &w, &mut all);
                for t in 0..rows {
                    let mut one = vec![0f32; n_out];
                    linear(&x[t * n_in..(t + 1) * n_in], 1, &w, &mut one);
                    for (g, e) in all[t * n_out..(t + 1) * n_out].iter().zip(&one) {
                        assert!(
                            (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                            "{quant:?} {rows} rows, row {t}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_product_group_equals_its_products_one_by_one() {
        // Mixed formats and sizes: below and above the fork threshold, a partial row block;
        // products 4 and 5 share product 1's input (one with its format, one with another).
        let shapes = [(24, 40), (300, 256), (8, 16), (130, 512), (40, 256), (64, 256)];
        let formats = [
            None,
            Some(Quant::Q8),
            Some(Quant::Q4),
            None,
            Some(Quant::Q8),
            None,
        ];
        let input_of = [0, 1, 2, 3, 1, 1];
        let mats: Vec<Matrix> = shapes
            .iter()
            .zip(formats)
            .enumerate()
            .map(|(i, (&(o, n), f))| {
                Matrix::new(
                    Tensor::from_f32_as_bf16(&pseudo(o * n, 13 + i as u32), vec![o, n]),
                    f,
                )
            })
            .collect();
        for rows in [1, 3] {
            let xs: Vec<Vec<f32>> = shapes[..4]
                .iter()
                .map(|&(_, n)| pseudo(rows * n, 29 + n as u32))
                .collect();
            let mut want: Vec<Vec<f32>> = shapes.iter().map(|&(o, _)| vec![0f32; rows * o]).collect();
            for (i, (m, w)) in mats.iter().zip(want.iter_mut()).enumerate() {
                linear(&xs[input_of[i]], rows, m, w);
            }
            let mut got: Vec<Vec<f32>> = shapes.iter().map(|&(o, _)| vec![0f32; rows * o]).collect();
            let mut group: Vec<(&[f32], &Matrix, &mut [f32])> = mats
                .iter()
                .zip(got.iter_mut())
                .enumerate()
                .map(|(i, (m, g))| (&xs[input_of[i]][..], m, &mut g[..]))
                .collect();
            linear_group(rows, &mut group);
            assert_eq!(got, want, "{rows} rows");
        }
    }
}
