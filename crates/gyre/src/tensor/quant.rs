//! Quantized weight matrices, made at load time from a stored-dtype [`Tensor`].
//!
//! Q8 format: each row is split into groups of [`Q8_GROUP`] columns; a group stores one f32
//! scale `s = max|w| / 127` and its values as `round(w / s)` in int8 (round half away from
//! zero), so `w ≈ s · q`. A matrix of R×C takes `R·C + 4·R·⌈C/32⌉` bytes (≈ 1.125 bytes per
//! weight), against 2 for bf16. Products dequantize in registers and accumulate in f32.

use std::sync::Arc;

use rayon::prelude::*;

use super::Tensor;

/// Columns per Q8 scale.
pub const Q8_GROUP: usize = 32;

/// Quantization applied to weight matrices at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    /// Group-wise int8 with f32 scales (see the module docs).
    Q8,
}

impl Quant {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Quant::Q8 => "q8",
        }
    }
}

/// A row-major R×C matrix in the Q8 format.
#[derive(Debug)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// [rows, ⌈cols/32⌉] scales
    scales: Vec<f32>,
    /// [rows, cols] quantized values
    qs: Vec<i8>,
}

impl Q8Matrix {
    /// Quantizes a 2-D tensor, row by row in parallel.
    pub fn quantize(t: &Tensor) -> Q8Matrix {
        let (rows, cols) = (t.shape()[0], t.shape()[1]);
        let gpr = cols.div_ceil(Q8_GROUP);
        let mut scales = vec![0f32; rows * gpr];
        let mut qs = vec![0i8; rows * cols];
        let data = t.data();
        qs.par_chunks_mut(cols)
            .zip(scales.par_chunks_mut(gpr))
            .enumerate()
            .for_each_init(
                || vec![0f32; cols],
                |row, (r, (q, s))| {
                    data.row_to_f32(r * cols, row);
                    for (g, (qg, wg)) in q.chunks_mut(Q8_GROUP).zip(row.chunks(Q8_GROUP)).enumerate() {
                        let amax = wg.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let scale = amax / 127.0;
                        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                        s[g] = scale;
                        for (qv, &w) in qg.iter_mut().zip(wg) {
                            *qv = (w * inv).round().clamp(-127.0, 127.0) as i8;
                        }
                    }
                },
            );
        Q8Matrix {
            rows,
            cols,
            scales,
            qs,
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Scales and values of row `r`.
    pub fn row(&self, r: usize) -> (&[f32], &[i8]) {
        let gpr = self.cols.div_ceil(Q8_GROUP);
        (
            &self.scales[r * gpr..(r + 1) * gpr],
            &self.qs[r * self.cols..(r + 1) * self.cols],
        )
    }

    /// Row `r` dequantized into `out` [cols].
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let (scales, qs) = self.row(r);
        for ((o, q), s) in out.chunks_mut(Q8_GROUP).zip(qs.chunks(Q8_GROUP)).zip(scales) {
            for (ov, &qv) in o.iter_mut().zip(q) {
                *ov = qv as f32 * s;
            }
        }
    }

    /// Bytes of storage.
    pub fn nbytes(&self) -> usize {
        self.qs.len() + self.scales.len() * 4
    }
}

/// A weight matrix as the kernels read it: stored dtype, or quantized.
#[derive(Clone, Debug)]
pub enum Matrix {
    /// F32 / F16 / BF16 as stored (memory-mapped).
    Dense(Tensor),
    /// Quantized at load.
    Q8(Arc<Q8Matrix>),
}

impl Matrix {
    /// Wraps a 2-D tensor, quantizing it when `quant` says so.
    pub fn new(t: Tensor, quant: Option<Quant>) -> Matrix {
        match quant {
            None => Matrix::Dense(t),
            Some(Quant::Q8) => Matrix::Q8(Arc::new(Q8Matrix::quantize(&t))),
        }
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        match self {
            Matrix::Dense(t) => t.shape()[0],
            Matrix::Q8(q) => q.rows,
        }
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        match self {
            Matrix::Dense(t) => t.shape()[1],
            Matrix::Q8(q) => q.cols,
        }
    }

    /// Bytes read by one pass over the matrix.
    pub fn nbytes(&self) -> usize {
        match self {
            Matrix::Dense(t) => t.nbytes(),
            Matrix::Q8(q) => q.nbytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_round_trip_error_is_within_half_a_step() {
        let (rows, cols) = (3, 70); // a partial last group
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let q = Q8Matrix::quantize(&Tensor::from_f32(&v, vec![rows, cols]));
        assert_eq!(q.nbytes(), rows * cols + rows * 3 * 4);
        let mut back = vec![0f32; cols];
        for r in 0..rows {
            q.row_to_f32(r, &mut back);
            let (scales, _) = q.row(r);
            for (c, &b) in back.iter().enumerate() {
                let step = scales[c / Q8_GROUP];
                assert!((b - v[r * cols + c]).abs() <= step * 0.5 + 1e-6);
            }
        }
        let zeros = Q8Matrix::quantize(&Tensor::from_f32(&[0.0; 40], vec![1, 40]));
        zeros.row_to_f32(0, &mut back[..40]);
        assert!(back[..40].iter().all(|&x| x == 0.0));
    }
}
