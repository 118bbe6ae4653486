//! Batch-1 matrix–vector product (decode): `out[o] = Σ_i w[o, i] · x[i]`.
//!
//! With AVX-512 the kernels take eight weight rows per pass over the activation: each
//! activation load (from L1/L2) feeds eight rows, and each core keeps eight weight streams in
//! flight. On this project's Zen 4 machine one row at a time reached 60–70% of the read
//! bandwidth on real layer shapes, eight rows at a time 80–100%
//! (`cargo run --release --example gemv_rows`). Rows that do not fill a group of eight, and
//! CPUs without AVX-512, use the one-row dots of `dot.rs`.

use super::dot::{dot, dot_bf16, dot_f16, dot_q4, dot_q8};
use crate::tensor::quant::GROUP;
use crate::tensor::{QMatrix, Quant, TensorData};

/// Rows of weights one kernel call reads together.
pub const ROWS: usize = 8;

/// Where a matrix's rows come from.
pub enum Rows<'a> {
    Dense(TensorData<'a>),
    Quantized(&'a QMatrix),
}

/// The activation vector, prepared once per product for the weight format's kernel.
pub struct Activation<'a> {
    x: &'a [f32],
    /// `x` reordered for the bf16 unpack kernel (empty when unused).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    permuted: Vec<f32>,
    /// Σ x over each group of [`GROUP`] (Q4's zero-point correction; empty when unused).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    group_sums: Vec<f32>,
    wide: bool,
}

impl<'a> Activation<'a> {
    /// Prepares `x` [in] for products with `rows`.
    pub fn new(x: &'a [f32], rows: &Rows) -> Activation<'a> {
        let mut a = Activation {
            x,
            permuted: Vec::new(),
            group_sums: Vec::new(),
            wide: false,
        };
        #[cfg(target_arch = "x86_64")]
        {
            a.wide = super::simd::has_avx512bw();
            if a.wide {
                match rows {
                    Rows::Dense(TensorData::BF16(_)) => super::simd::permute_for_unpack(x, &mut a.permuted),
                    Rows::Quantized(q) if q.quant() == Quant::Q4 => {
                        a.group_sums = x.chunks(GROUP).map(super::ops::sum).collect();
                    }
                    _ => {}
                }
            }
        }
        a
    }
}

/// `out[j] = row(first + j) · x` for every `j < out.len()`.
pub fn rows_times(rows: &Rows, x: &Activation, first: usize, out: &mut [f32]) {
    let n = x.x.len();
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if x.wide {
        for (k, o) in out.chunks_exact_mut(ROWS).enumerate() {
            let r = first + k * ROWS;
            // SAFETY: `wide` means AVX-512F/BW (and F16C, which AVX-512F implies) are present;
            // each kernel checks the lengths of the slices it is given.
            let v = unsafe {
                match rows {
                    Rows::Dense(TensorData::BF16(s)) => {
                        wide::bf16(bytemuck::cast_slice(&s[r * n..(r + ROWS) * n]), n, &x.permuted)
                    }
                    Rows::Dense(TensorData::F16(s)) => {
                        wide::f16(bytemuck::cast_slice(&s[r * n..(r + ROWS) * n]), n, x.x)
                    }
                    Rows::Dense(TensorData::F32(s)) => wide::f32(&s[r * n..(r + ROWS) * n], n, x.x),
                    Rows::Quantized(q) => {
                        let (scales, values) = q.rows(r, ROWS);
                        match q.quant() {
                            Quant::Q8 => wide::q8(scales, bytemuck::cast_slice(values), n, x.x),
                            Quant::Q4 => wide::q4(scales, values, n, x.x, &x.group_sums),
                        }
                    }
                }
            };
            o.copy_from_slice(&v);
            done += ROWS;
        }
    }
    for (j, o) in out.iter_mut().enumerate().skip(done) {
        let r = first + j;
        let span = r * n..(r + 1) * n;
        *o = match rows {
            Rows::Dense(TensorData::F32(s)) => dot(&s[span], x.x),
            Rows::Dense(TensorData::BF16(s)) => dot_bf16(&s[span], x.x),
            Rows::Dense(TensorData::F16(s)) => dot_f16(&s[span], x.x),
            Rows::Quantized(q) => {
                let (scales, values) = q.row(r);
                match q.quant() {
                    Quant::Q8 => dot_q8(scales, bytemuck::cast_slice(values), x.x),
                    Quant::Q4 => dot_q4(scales, values, x.x),
                }
            }
        };
    }
}

/// The eight-row AVX-512 kernels. Each takes [`ROWS`] consecutive rows of `n` columns and
/// returns their eight dot products with the activation; accumulation is f32.
#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use super::{GROUP, ROWS};

    /// Sum of the eight lanes-vectors, one per row.
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce(acc: [__m512; ROWS]) -> [f32; ROWS] {
        acc.map(|a| _mm512_reduce_add_ps(a))
    }

    /// bf16 rows (raw bits, [8, n]) against `xp` from `simd::permute_for_unpack`: one 64-byte
    /// load and two unpacks against zero widen 32 weights.
    ///
    /// # Safety
    /// AVX-512F and AVX-512BW must be present.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn bf16(w: &[u16], n: usize, xp: &[f32]) -> [f32; ROWS] {
        assert!(w.len() == ROWS * n && xp.len() == n);
        let (wp, xptr) = (w.as_ptr(), xp.as_ptr());
        let zero = _mm512_setzero_si512();
        let mut lo_acc = [_mm512_setzero_ps(); ROWS];
        let mut hi_acc = [_mm512_setzero_ps(); ROWS];
        let mut i = 0;
        // SAFETY (loads): i + 32 <= n, and row r's elements lie at r·n .. r·n + n of w.
        while i + 32 <= n {
            let x0 = _mm512_loadu_ps(xptr.add(i));
            let x1 = _mm512_loadu_ps(xptr.add(i + 16));
            for r in 0..ROWS {
                let raw = _mm512_loadu_si512(wp.add(r * n + i) as *const __m512i);
                let lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, raw));
                let hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, raw));
                lo_acc[r] = _mm512_fmadd_ps(lo, x0, lo_acc[r]);
                hi_acc[r] = _mm512_fmadd_ps(hi, x1, hi_acc[r]);
            }
            i += 32;
        }
        let mut out = reduce(std::array::from_fn(|r| _mm512_add_ps(lo_acc[r], hi_acc[r])));
        // The tail (shorter than 32) is in natural order in `xp`.
        for (r, o) in out.iter_mut().enumerate() {
            for j in i..n {
                *o += f32::from_bits((w[r * n + j] as u32) << 16) * xp[j];
            }
        }
        out
    }

    /// f16 rows (raw bits, [8, n]), widened by the hardware conversion.
    ///
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f16(w: &[u16], n: usize, x: &[f32]) -> [f32; ROWS] {
        assert!(w.len() == ROWS * n && x.len() == n);
        let (wp, xptr) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); ROWS];
        let mut i = 0;
        // SAFETY (loads): i + 16 <= n within each row.
        while i + 16 <= n {
            let xv = _mm512_loadu_ps(xptr.add(i));
            for (r, a) in acc.iter_mut().enumerate() {
                let wv = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(r * n + i) as *const __m256i));
                *a = _mm512_fmadd_ps(wv, xv, *a);
            }
            i += 16;
        }
        let mut out = reduce(acc);
        for (r, o) in out.iter_mut().enumerate() {
            for j in i..n {
                *o += half::f16::from_bits(w[r * n + j]).to_f32() * x[j];
            }
        }
        out
    }

    /// f32 rows ([8, n]).
    ///
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32(w: &[f32], n: usize, x: &[f32]) -> [f32; ROWS] {
        assert!(w.len() == ROWS * n && x.len() == n);
        let (wp, xptr) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); ROWS];
        let mut i = 0;
        // SAFETY (loads): i + 16 <= n within each row.
        while i + 16 <= n {
            let xv = _mm512_loadu_ps(xptr.add(i));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_loadu_ps(wp.add(r * n + i)), xv, *a);
            }
            i += 16;
        }
        let mut out = reduce(acc);
        for (r, o) in out.iter_mut().enumerate() {
            for j in i..n {
                *o += w[r * n + j] * x[j];
            }
        }
        out
    }

    /// Q8 rows: `scales` [8, ⌈n/32⌉], values `q` [8, n].
    ///
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn q8(scales: &[f32], q: &[i8], n: usize, x: &[f32]) -> [f32; ROWS] {
        let gpr = n.div_ceil(GROUP);
        assert!(scales.len() == ROWS * gpr && q.len() == ROWS * n && x.len() == n);
        let (qp, sp, xptr) = (q.as_ptr(), scales.as_ptr(), x.as_ptr());
        let full = n / GROUP;
        let mut acc = [_mm512_setzero_ps(); ROWS];
        // SAFETY (loads): group g covers columns 32g .. 32g + 32 <= n of each row, and scale
        // r·gpr + g < 8·gpr.
        for g in 0..full {
            let i = g * GROUP;
            let x0 = _mm512_loadu_ps(xptr.add(i));
            let x1 = _mm512_loadu_ps(xptr.add(i + 16));
            for (r, a) in acc.iter_mut().enumerate() {
                let raw = _mm256_loadu_si256(qp.add(r * n + i) as *const __m256i);
                let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
                let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
                let s = _mm512_fmadd_ps(q1, x1, _mm512_mul_ps(q0, x0));
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*sp.add(r * gpr + g)), s, *a);
            }
        }
        let mut out = reduce(acc);
        if full < gpr {
            for (r, o) in out.iter_mut().enumerate() {
                let part: f32 = (full * GROUP..n).map(|j| q[r * n + j] as f32 * x[j]).sum();
                *o += scales[r * gpr + full] * part;
            }
        }
        out
    }

    /// Q4 rows: `scales` [8, ⌈n/32⌉], `values` [8, 16·⌈n/32⌉] (layout in `tensor::quant`),
    /// `group_sums` [⌈n/32⌉] = Σ x over each group, so Σ (nibble − 8)·x = Σ nibble·x − 8·Σ x.
    ///
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn q4(scales: &[f32], values: &[u8], n: usize, x: &[f32], group_sums: &[f32]) -> [f32; ROWS] {
        let gpr = n.div_ceil(GROUP);
        let vpr = gpr * GROUP / 2;
        assert!(scales.len() == ROWS * gpr && values.len() == ROWS * vpr && x.len() == n);
        assert!(group_sums.len() == gpr);
        let (vp, sp, xptr) = (values.as_ptr(), scales.as_ptr(), x.as_ptr());
        let full = n / GROUP;
        let low = _mm_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); ROWS];
        // SAFETY (loads): group g reads value bytes 16g .. 16g + 16 of each row and columns
        // 32g .. 32g + 32 <= n of x.
        for g in 0..full {
            let i = g * GROUP;
            let x0 = _mm512_loadu_ps(xptr.add(i));
            let x1 = _mm512_loadu_ps(xptr.add(i + 16));
            for (r, a) in acc.iter_mut().enumerate() {
                let b = _mm_loadu_si128(vp.add(r * vpr + 16 * g) as *const __m128i);
                let q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low)));
                let q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low)));
                let s = _mm512_fmadd_ps(q1, x1, _mm512_mul_ps(q0, x0));
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*sp.add(r * gpr + g)), s, *a);
            }
        }
        let mut out = reduce(acc);
        for (r, o) in out.iter_mut().enumerate() {
            let row_scales = &scales[r * gpr..r * gpr + full];
            *o -= 8.0 * row_scales.iter().zip(group_sums).map(|(s, t)| s * t).sum::<f32>();
            if full < gpr {
                let b = &values[r * vpr + 16 * full..r * vpr + 16 * full + 16];
                let part: f32 = (full * GROUP..n)
                    .map(|j| {
                        let k = j - full * GROUP;
                        let nib = if k < 16 { b[k] & 0x0F } else { b[k - 16] >> 4 };
                        (nib as f32 - 8.0) * x[j]
                    })
                    .sum();
                *o += scales[r * gpr + full] * part;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::dot_scalar;
    use crate::tensor::{Matrix, Tensor};

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
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

    /// Every format, row counts around multiples of eight, column counts around multiples
    /// of 16/32, and blocks that start at a row other than 0: the eight-row kernels and the
    /// one-row tail against a scalar product over the dequantized rows.
    #[test]
    fn eight_row_kernels_match_the_scalar_product() {
        for &(n_out, n_in) in &[
            (8, 32),
            (16, 64),
            (9, 33),
            (24, 100),
            (17, 300),
            (40, 15),
            (64, 256),
        ] {
            let wv = pseudo(n_out * n_in, 3);
            let x = pseudo(n_in, 5);
            let mats = [
                Matrix::Dense(Tensor::from_f32(&wv, vec![n_out, n_in])),
                Matrix::Dense(Tensor::from_f32_as_bf16(&wv, vec![n_out, n_in])),
                Matrix::Dense(Tensor::from_f32_as_f16(&wv, vec![n_out, n_in])),
                Matrix::new(Tensor::from_f32(&wv, vec![n_out, n_in]), Some(Quant::Q8)),
                Matrix::new(Tensor::from_f32(&wv, vec![n_out, n_in]), Some(Quant::Q4)),
            ];
            for m in &mats {
                let mut want = vec![0f32; n_out];
                let mut row = vec![0f32; n_in];
                for (r, w) in want.iter_mut().enumerate() {
                    match m {
                        Matrix::Dense(t) => t.data().row_to_f32(r * n_in, &mut row),
                        Matrix::Quantized(q) => q.row_to_f32(r, &mut row),
                    }
                    *w = dot_scalar(&row, &x);
                }
                let rows = match m {
                    Matrix::Dense(t) => Rows::Dense(t.data()),
                    Matrix::Quantized(q) => Rows::Quantized(q),
                };
                let act = Activation::new(&x, &rows);
                for first in [0, 1, n_out / 2] {
                    let mut got = vec![0f32; n_out - first];
                    rows_times(&rows, &act, first, &mut got);
                    for (j, (g, e)) in got.iter().zip(&want[first..]).enumerate() {
                        assert!(
                            (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{m:?} {n_out}x{n_in} row {}: {g} vs {e}",
                            first + j
                        );
                    }
                }
            }
        }
    }
}
