//! Hand-vectorised dot products for x86-64 (AVX-512F, or AVX2 + FMA + F16C), chosen at run
//! time; every function here has a portable twin in `dot.rs` that it is tested against.
//!
//! Weights are widened in registers: bf16 by a 16-bit shift into the f32 exponent/mantissa,
//! f16 by the hardware conversion. Accumulation is f32 in four independent vector sums.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// Which instruction set the dispatching functions use.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Level {
    Avx512,
    Avx2,
    None,
}

/// The best level this CPU supports (detected once).
pub fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c") {
            Level::Avx512
        } else if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            Level::Avx2
        } else {
            Level::None
        }
    })
}

/// Σ w[i]·x[i] with bf16 weights (as raw bits). Caller guarantees `level() == Avx512`.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_bf16_avx512(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads below): i + 16·k + 16 <= n for every load, so they stay in bounds.
    while i + 64 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            let raw = _mm256_loadu_si256(wp.add(i + 16 * k) as *const __m256i);
            let wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            *a = _mm512_fmadd_ps(wf, _mm512_loadu_ps(xp.add(i + 16 * k)), *a);
        }
        i += 64;
    }
    while i + 16 <= n {
        let raw = _mm256_loadu_si256(wp.add(i) as *const __m256i);
        let wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        acc[0] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(xp.add(i)), acc[0]);
        i += 16;
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    let mut s = _mm512_reduce_add_ps(sum);
    while i < n {
        s += f32::from_bits((w[i] as u32) << 16) * x[i];
        i += 1;
    }
    s
}

/// Σ w[i]·x[i] with f16 weights (raw bits).
///
/// # Safety
/// The CPU must support AVX-512F (which implies the F16C conversions used).
#[target_feature(enable = "avx512f,f16c")]
pub unsafe fn dot_f16_avx512(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: as in `dot_bf16_avx512`, every load ends at or before n.
    while i + 64 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            let wf = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(i + 16 * k) as *const __m256i));
            *a = _mm512_fmadd_ps(wf, _mm512_loadu_ps(xp.add(i + 16 * k)), *a);
        }
        i += 64;
    }
    while i + 16 <= n {
        let wf = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(i) as *const __m256i));
        acc[0] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(xp.add(i)), acc[0]);
        i += 16;
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    let mut s = _mm512_reduce_add_ps(sum);
    while i < n {
        s += half::f16::from_bits(w[i]).to_f32() * x[i];
        i += 1;
    }
    s
}

/// Σ w[i]·x[i] with bf16 weights, AVX2.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_bf16_avx2(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load ends at or before n.
    while i + 32 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            let raw = _mm_loadu_si128(wp.add(i + 8 * k) as *const __m128i);
            let wf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
            *a = _mm256_fmadd_ps(wf, _mm256_loadu_ps(xp.add(i + 8 * k)), *a);
        }
        i += 32;
    }
    let mut s = hsum256(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while i < n {
        s += f32::from_bits((w[i] as u32) << 16) * x[i];
        i += 1;
    }
    s
}

/// Σ w[i]·x[i] with f16 weights, AVX2 + F16C.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16_avx2(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load ends at or before n.
    while i + 32 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            let wf = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i + 8 * k) as *const __m128i));
            *a = _mm256_fmadd_ps(wf, _mm256_loadu_ps(xp.add(i + 8 * k)), *a);
        }
        i += 32;
    }
    let mut s = hsum256(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while i < n {
        s += half::f16::from_bits(w[i]).to_f32() * x[i];
        i += 1;
    }
    s
}

#[target_feature(enable = "avx2")]
unsafe fn hsum256(v: __m256) -> f32 {
    let hi = _mm256_extractf128_ps(v, 1);
    let lo = _mm256_castps256_ps128(v);
    let s = _mm_add_ps(hi, lo);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// The 4×4 block of dot products `out[r][t] = Σ w[r][i]·x[t][i]` (f32), AVX-512: eight loads
/// feed sixteen FMAs, so prefill runs near the FMA units' rate instead of the load ports'.
///
/// # Safety
/// The CPU must support AVX-512F; all eight slices must have length `n`.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_4x4_avx512(w: [&[f32]; 4], x: [&[f32]; 4], n: usize) -> [[f32; 4]; 4] {
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let mut i = 0;
    // SAFETY: i + 16 <= n and every slice has length n.
    while i + 16 <= n {
        let xs = [
            _mm512_loadu_ps(x[0].as_ptr().add(i)),
            _mm512_loadu_ps(x[1].as_ptr().add(i)),
            _mm512_loadu_ps(x[2].as_ptr().add(i)),
            _mm512_loadu_ps(x[3].as_ptr().add(i)),
        ];
        for r in 0..4 {
            let wv = _mm512_loadu_ps(w[r].as_ptr().add(i));
            for t in 0..4 {
                acc[r][t] = _mm512_fmadd_ps(wv, xs[t], acc[r][t]);
            }
        }
        i += 16;
    }
    let mut out = [[0f32; 4]; 4];
    for r in 0..4 {
        for t in 0..4 {
            let mut s = _mm512_reduce_add_ps(acc[r][t]);
            for j in i..n {
                s += w[r][j] * x[t][j];
            }
            out[r][t] = s;
        }
    }
    out
}

/// The GEMM micro-kernel (`gemm.rs` `micro_tile_portable`, bit for bit): an MR × 16·NV tile
/// `c[r][j] += Σ_k w[r·stride + k] · b[k][j]`, the block's sums held in registers (NV per
/// row); each step loads NV activation vectors and broadcasts MR weights into NV·MR FMAs.
///
/// # Safety
/// The CPU must support AVX-512F; `kc <= stride`, `w.len() >= (MR − 1)·stride + kc`,
/// `b.len() == kc·16·NV`, `c.len() == MR·16·NV`.
#[target_feature(enable = "avx512f")]
pub unsafe fn micro_tile_avx512<const NV: usize>(
    w: &[f32],
    stride: usize,
    b: &[f32],
    kc: usize,
    c: &mut [f32],
) {
    use super::gemm::MR;
    let width = 16 * NV;
    let (wp, bp, cp) = (w.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    // SAFETY (every access below): r < MR, k < kc, v < NV and the lengths the caller
    // guarantees.
    for k in 0..kc {
        let mut bv = [_mm512_setzero_ps(); NV];
        for (v, b) in bv.iter_mut().enumerate() {
            *b = _mm512_loadu_ps(bp.add(k * width + 16 * v));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let wv = _mm512_set1_ps(*wp.add(r * stride + k));
            for (a, &b) in row.iter_mut().zip(&bv) {
                *a = _mm512_fmadd_ps(wv, b, *a);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, &a) in row.iter().enumerate() {
            let at = cp.add(r * width + 16 * v);
            _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), a));
        }
    }
}

/// Σ over groups g of scale[g] · Σ q[i]·x[i] (Q8 row, groups of 32), AVX-512.
///
/// # Safety
/// The CPU must support AVX-512F; `q.len() == x.len()` and `scales.len() == ⌈q.len()/32⌉`.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_q8_avx512(scales: &[f32], q: &[i8], x: &[f32]) -> f32 {
    let n = q.len().min(x.len());
    let full = n / 32;
    let (qp, xp) = (q.as_ptr(), x.as_ptr());
    let mut total = _mm512_setzero_ps();
    // SAFETY: group g reads q/x elements 32g .. 32g+32 <= n.
    for (g, &scale) in scales.iter().enumerate().take(full) {
        let i = g * 32;
        let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qp.add(i) as *const __m128i)));
        let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
            qp.add(i + 16) as *const __m128i
        )));
        let s = _mm512_fmadd_ps(
            q1,
            _mm512_loadu_ps(xp.add(i + 16)),
            _mm512_mul_ps(q0, _mm512_loadu_ps(xp.add(i))),
        );
        total = _mm512_fmadd_ps(_mm512_set1_ps(scale), s, total);
    }
    let mut sum = _mm512_reduce_add_ps(total);
    if full * 32 < n {
        let part: f32 = (full * 32..n).map(|i| q[i] as f32 * x[i]).sum();
        sum += scales[full] * part;
    }
    sum
}

/// True when AVX-512BW is available too (16-bit unpacks).
pub fn has_avx512bw() -> bool {
    use std::sync::OnceLock;
    static BW: OnceLock<bool> = OnceLock::new();
    *BW.get_or_init(|| level() == Level::Avx512 && is_x86_feature_detected!("avx512bw"))
}

/// True when AVX-512 VNNI is available as well (int8 dot products).
pub fn has_avx512vnni() -> bool {
    use std::sync::OnceLock;
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| has_avx512bw() && is_x86_feature_detected!("avx512vnni"))
}

/// Reorders `x` for the eight-row bf16 kernel in `gemv.rs`: within each block of 32, the order in which
/// `unpacklo/hi(0, w)` leaves bf16 weights widened to f32 (lane L of the low half holds
/// elements 8L..8L+4, of the high half 8L+4..8L+8). A tail shorter than 32 keeps its order.
pub fn permute_for_unpack(x: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.extend_from_slice(x);
    for (dst, src) in out.chunks_exact_mut(32).zip(x.chunks_exact(32)) {
        for j in 0..16 {
            let (lane, k) = (j / 4, j % 4);
            dst[j] = src[lane * 8 + k];
            dst[16 + j] = src[lane * 8 + 4 + k];
        }
    }
}

/// Σ over groups of 32: scale · Σ (nibble − 8)·x, AVX-512 (layout in `tensor::quant`).
///
/// # Safety
/// The CPU must support AVX-512F; `values.len() == 16·scales.len()` and
/// `x.len() <= 32·scales.len()`.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_q4_avx512(scales: &[f32], values: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let full = n / 32;
    let (vp, xp) = (values.as_ptr(), x.as_ptr());
    let low = _mm_set1_epi8(0x0F);
    let eight = _mm512_set1_epi32(8);
    let mut total = _mm512_setzero_ps();
    // SAFETY: group g reads value bytes 16g .. 16g+16 and x elements 32g .. 32g+32 <= n.
    for (g, &scale) in scales.iter().enumerate().take(full) {
        let b = _mm_loadu_si128(vp.add(16 * g) as *const __m128i);
        let lo = _mm_and_si128(b, low);
        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        let q0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(lo), eight));
        let q1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(hi), eight));
        let i = 32 * g;
        let s = _mm512_fmadd_ps(
            q1,
            _mm512_loadu_ps(xp.add(i + 16)),
            _mm512_mul_ps(q0, _mm512_loadu_ps(xp.add(i))),
        );
        total = _mm512_fmadd_ps(_mm512_set1_ps(scale), s, total);
    }
    let mut sum = _mm512_reduce_add_ps(total);
    if full * 32 < n {
        let b = &values[16 * full..16 * full + 16];
        let part: f32 = (full * 32..n)
            .map(|i| {
                let j = i - full * 32;
                let q = if j < 16 { b[j] & 0x0F } else { b[j - 16] >> 4 };
                (q as f32 - 8.0) * x[i]
            })
            .sum();
        sum += scales[full] * part;
    }
    sum
}
