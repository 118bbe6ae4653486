//! Dot products: f32·f32, bf16·f32 and f16·f32 (weights widened in registers), and the 4×4
//! block used by prefill, each dispatching to the best SIMD level at run time.

use half::{bf16, f16};

/// Σ a[i]·b[i] over the common length, using the widest instruction set the CPU has.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), which is all
            // `dot_avx2` was compiled to require.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

/// Σ w[i]·x[i] with bf16 weights, widened in registers.
#[inline]
pub fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    let bits: &[u16] = bytemuck::cast_slice(w);
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd::{self, Level};
        match simd::level() {
            // SAFETY: `level()` checked that the CPU supports these instruction sets.
            Level::Avx512 => return unsafe { simd::dot_bf16_avx512(bits, x) },
            Level::Avx2 => return unsafe { simd::dot_bf16_avx2(bits, x) },
            Level::None => {}
        }
    }
    dot_bf16_portable(bits, x)
}

/// Σ w[i]·x[i] with f16 weights, widened in registers.
#[inline]
pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
    let bits: &[u16] = bytemuck::cast_slice(w);
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd::{self, Level};
        match simd::level() {
            // SAFETY: `level()` checked that the CPU supports these instruction sets.
            Level::Avx512 => return unsafe { simd::dot_f16_avx512(bits, x) },
            Level::Avx2 => return unsafe { simd::dot_f16_avx2(bits, x) },
            Level::None => {}
        }
    }
    w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
}

/// Σ over groups of 32: scale · Σ q·x, for one Q8 row (`scales` [⌈n/32⌉], `q`, `x` [n]).
#[inline]
pub fn dot_q8(scales: &[f32], q: &[i8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd::{self, Level};
        if simd::level() == Level::Avx512 && q.len() == x.len() && scales.len() == q.len().div_ceil(32) {
            // SAFETY: AVX-512F is supported (checked) and the lengths are as required.
            return unsafe { simd::dot_q8_avx512(scales, q, x) };
        }
    }
    dot_q8_portable(scales, q, x)
}

/// Portable Q8 dot (the reference for the SIMD version).
pub fn dot_q8_portable(scales: &[f32], q: &[i8], x: &[f32]) -> f32 {
    q.chunks(32)
        .zip(x.chunks(32))
        .zip(scales)
        .map(|((qg, xg), s)| s * qg.iter().zip(xg).map(|(&a, b)| a as f32 * b).sum::<f32>())
        .sum()
}

/// Σ over groups of 32: scale · Σ (nibble − 8)·x, for one Q4 row (`scales` [⌈n/32⌉],
/// `values` [16 per group], `x` [n]; see `tensor::quant` for the layout).
#[inline]
pub fn dot_q4(scales: &[f32], values: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd::{self, Level};
        if simd::level() == Level::Avx512 && values.len() == scales.len() * 16 && x.len() <= scales.len() * 32
        {
            // SAFETY: AVX-512F is supported (checked) and the lengths are as required.
            return unsafe { simd::dot_q4_avx512(scales, values, x) };
        }
    }
    dot_q4_portable(scales, values, x)
}

/// Portable Q4 dot (the reference for the SIMD version).
pub fn dot_q4_portable(scales: &[f32], values: &[u8], x: &[f32]) -> f32 {
    x.chunks(32)
        .zip(values.chunks(16))
        .zip(scales)
        .map(|((xg, b), s)| {
            let q = |j: usize| (if j < 16 { b[j] & 0x0F } else { b[j - 16] >> 4 }) as f32 - 8.0;
            s * xg.iter().enumerate().map(|(j, v)| q(j) * v).sum::<f32>()
        })
        .sum()
}

/// Portable bf16 dot (the reference for the SIMD versions).
pub fn dot_bf16_portable(w: &[u16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (cw, cx) = (w.chunks_exact(16), x.chunks_exact(16));
    let tail: f32 = cw
        .remainder()
        .iter()
        .zip(cx.remainder())
        .map(|(&a, b)| f32::from_bits((a as u32) << 16) * b)
        .sum();
    for (a, b) in cw.zip(cx) {
        for i in 0..16 {
            acc[i] += f32::from_bits((a[i] as u32) << 16) * b[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The 4×4 block of dot products `out[r][t] = Σ w[r][i]·x[t][i]` over `n` elements.
#[inline]
pub fn dot_4x4(w: [&[f32]; 4], x: [&[f32]; 4], n: usize) -> [[f32; 4]; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd::{self, Level};
        if simd::level() == Level::Avx512 && w.iter().chain(&x).all(|s| s.len() == n) {
            // SAFETY: AVX-512F is supported (checked) and every slice has length n.
            return unsafe { simd::dot_4x4_avx512(w, x, n) };
        }
    }
    let mut out = [[0f32; 4]; 4];
    for r in 0..4 {
        for t in 0..4 {
            out[r][t] = dot(&w[r][..n], &x[t][..n]);
        }
    }
    out
}

/// Sixteen independent partial sums, so the compiler can keep them in vector registers.
#[inline(always)]
pub(super) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    let mut s8 = [0f32; 8];
    for i in 0..8 {
        s8[i] = acc[i] + acc[i + 8];
    }
    let s4 = [s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3]) + tail
}

/// Scalar reference: sequential f64 accumulation.
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_dots_match_scalar_across_lengths_and_offsets() {
        let a: Vec<f32> = (0..400).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let x: Vec<f32> = (0..400).map(|i| ((i * 53 % 97) as f32 - 48.0) / 31.0).collect();
        let wb: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
        for off in 0..3 {
            for n in [0, 1, 15, 16, 17, 63, 64, 65, 100, 333] {
                let xs = &x[off + 1..off + 1 + n];
                let want_b = dot_scalar(
                    &wb[off..off + n].iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                    xs,
                );
                let want_h = dot_scalar(
                    &wh[off..off + n].iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                    xs,
                );
                let tol = |w: f32| 1e-4 * (1.0 + w.abs());
                assert!(
                    (dot_bf16(&wb[off..off + n], xs) - want_b).abs() <= tol(want_b),
                    "bf16 n={n}"
                );
                assert!(
                    (dot_f16(&wh[off..off + n], xs) - want_h).abs() <= tol(want_h),
                    "f16 n={n}"
                );
                let bits: &[u16] = bytemuck::cast_slice(&wb[off..off + n]);
                assert!((dot_bf16_portable(bits, xs) - want_b).abs() <= tol(want_b));
            }
        }
    }

    #[test]
    fn q8_dot_matches_portable() {
        let x: Vec<f32> = (0..200).map(|i| ((i * 53 % 97) as f32 - 48.0) / 31.0).collect();
        let q: Vec<i8> = (0..200i32).map(|i| (i * 91 % 255 - 127) as i8).collect();
        for n in [1usize, 31, 32, 33, 64, 100, 200] {
            let scales: Vec<f32> = (0..n.div_ceil(32)).map(|g| 0.01 + g as f32 * 0.003).collect();
            let (got, want) = (
                dot_q8(&scales, &q[..n], &x[..n]),
                dot_q8_portable(&scales, &q[..n], &x[..n]),
            );
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "n={n}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn q4_dot_matches_portable_and_dequantized() {
        let x: Vec<f32> = (0..200).map(|i| ((i * 53 % 97) as f32 - 48.0) / 31.0).collect();
        let values: Vec<u8> = (0..112u32).map(|i| (i * 37 % 256) as u8).collect();
        for n in [1usize, 16, 31, 32, 33, 64, 100, 200] {
            let groups = n.div_ceil(32);
            let scales: Vec<f32> = (0..groups).map(|g| 0.02 + g as f32 * 0.005).collect();
            let v = &values[..groups * 16];
            let (got, want) = (dot_q4(&scales, v, &x[..n]), dot_q4_portable(&scales, v, &x[..n]));
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "n={n}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn dot_4x4_matches_scalar() {
        let v: Vec<f32> = (0..8 * 70)
            .map(|i| ((i * 29 % 83) as f32 - 41.0) / 19.0)
            .collect();
        for n in [1, 16, 33, 70] {
            let rows: Vec<&[f32]> = (0..8).map(|k| &v[k * 70..k * 70 + n]).collect();
            let got = dot_4x4(
                [rows[0], rows[1], rows[2], rows[3]],
                [rows[4], rows[5], rows[6], rows[7]],
                n,
            );
            for r in 0..4 {
                for t in 0..4 {
                    let want = dot_scalar(rows[r], rows[4 + t]);
                    assert!(
                        (got[r][t] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "n={n} r={r} t={t}"
                    );
                }
            }
        }
    }

    #[test]
    fn dot_matches_scalar_across_lengths_and_offsets() {
        let a: Vec<f32> = (0..300).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let b: Vec<f32> = (0..300).map(|i| ((i * 53 % 97) as f32 - 48.0) / 31.0).collect();
        for off in 0..4 {
            for n in [0, 1, 7, 15, 16, 17, 31, 64, 100, 257] {
                let (x, y) = (&a[off..off + n], &b[off + 1..off + 1 + n]);
                let (got, want) = (dot(x, y), dot_scalar(x, y));
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "n={n} off={off}: {got} vs {want}"
                );
            }
        }
    }
}
