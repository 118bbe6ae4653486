//! Decode products of GGUF block-quantized rows with the int16 activation
//! (`tensor::ggml`): `out[j] = row(first + j) · x`.
//!
//! The scalar statement of each product is `tensor::ggml::dot_row`; the versions here compute
//! the same integer sums, compiled for AVX-512 (BW + VNNI) and AVX2 where the CPU has them and
//! chosen at run time.

use crate::tensor::ggml::{dot_row, Activation16, GgmlMatrix};

/// `out[j] = row(first + j) · a` for every `j < out.len()`.
pub fn rows_times(m: &GgmlMatrix, a: &Activation16, first: usize, out: &mut [f32]) {
    assert_eq!(a.q.len(), m.cols(), "ggml rows_times: activation length");
    let ty = m.ty();
    for (j, o) in out.iter_mut().enumerate() {
        let row = m.row(first + j);
        *o = dot(ty, row, a);
    }
}

/// Row `bytes` (whole blocks of `ty`) dequantized into `out`, as `tensor::ggml::dequantize_row`
/// computes it, compiled for the widest instruction set this CPU has (prefill widens every
/// weight row this way for the packed GEMM).
pub fn dequantize(ty: crate::tensor::GgmlType, bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd;
        if simd::level() == simd::Level::Avx512 {
            // SAFETY: AVX-512F was detected at run time.
            return unsafe { generic::dequantize_avx512(ty, bytes, out) };
        }
        if simd::level() == simd::Level::Avx2 {
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { generic::dequantize_avx2(ty, bytes, out) };
        }
    }
    crate::tensor::ggml::dequantize_row(ty, bytes, out)
}

/// One row's product through the best version for this CPU.
fn dot(ty: crate::tensor::GgmlType, row: &[u8], a: &Activation16) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd;
        if simd::has_avx512vnni() && is_x86_feature_detected!("f16c") {
            // SAFETY: AVX-512F/BW/VNNI and F16C were detected at run time; the kernels check
            // the row and activation lengths they are given.
            return unsafe { avx512::dot(ty, row, a) };
        }
        if simd::level() == simd::Level::Avx2 || simd::level() == simd::Level::Avx512 {
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { generic::dot_avx2(ty, row, a) };
        }
    }
    dot_row(ty, row, a)
}

/// [`dot_row`] compiled with wider instruction sets (the compiler vectorises its loops).
#[cfg(target_arch = "x86_64")]
mod generic {
    use crate::tensor::ggml::{dot_row_inline, Activation16};
    use crate::tensor::GgmlType;

    /// # Safety
    /// AVX-512F and AVX-512BW must be present.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn dequantize_avx512(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
        crate::tensor::ggml::dequantize_row_inline(ty, bytes, out)
    }

    /// # Safety
    /// AVX2 and FMA must be present.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dequantize_avx2(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
        crate::tensor::ggml::dequantize_row_inline(ty, bytes, out)
    }

    /// # Safety
    /// AVX2 and FMA must be present.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(ty: GgmlType, row: &[u8], a: &Activation16) -> f32 {
        dot_row_inline(ty, row, a)
    }
}

/// Hand-written AVX-512 (BW + VNNI) products, one per format. Each unpacks a block's integer
/// weights into 16-bit lanes in their natural order, multiplies them by their sub-block scales
/// (`vpmullw`: every product stays within 16 bits, at most 32·128), and sums them against the
/// int16 activation with `vpdpwssd` into 32-bit lanes. Each lane sums at most 16 products of
/// at most 4096·32767 (Q6_K, the largest), below 2³¹. The block's f32 factors apply once per
/// block; min and offset terms go through the activation's per-16/32 sums.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::tensor::ggml::{Activation16, QK_K};
    use crate::tensor::GgmlType;

    /// # Safety
    /// AVX-512F, AVX-512BW, AVX-512 VNNI and F16C must be present.
    pub unsafe fn dot(ty: GgmlType, row: &[u8], a: &Activation16) -> f32 {
        assert_eq!(row.len(), ty.row_bytes(a.q.len()), "{ty}: row bytes");
        assert_eq!(a.block, ty.block_size(), "{ty}: activation block");
        match ty {
            GgmlType::Q4_0 => legacy::<false, false>(row, a),
            GgmlType::Q4_1 => legacy::<true, false>(row, a),
            GgmlType::Q5_0 => legacy::<false, true>(row, a),
            GgmlType::Q5_1 => legacy::<true, true>(row, a),
            GgmlType::Q8_0 => q8_0(row, a),
            GgmlType::Q2_K => q2_k(row, a),
            GgmlType::Q3_K => q3_k(row, a),
            GgmlType::Q4_K => q45_k::<false>(row, a),
            GgmlType::Q5_K => q45_k::<true>(row, a),
            GgmlType::Q6_K => q6_k(row, a),
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                unreachable!("dense rows take the dense kernels")
            }
        }
    }

    /// How far ahead of the block being multiplied its row is prefetched. A product is
    /// compute-bound enough that the hardware prefetchers alone leave the stream waiting on
    /// memory between bursts of work; asking for the lines this far ahead overlaps the two.
    const PREFETCH: usize = 2048;

    /// Prefetches `bytes` bytes (one block) starting at `p + PREFETCH`, one request per cache
    /// line. Prefetches never fault, so addresses past the row's end are harmless.
    #[inline(always)]
    unsafe fn prefetch(p: *const u8, bytes: usize) {
        let mut off = 0;
        while off < bytes {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + off) as *const i8);
            off += 64;
        }
    }

    /// `acc + Σ pairs a·b` (`vpdpwssd`). Written out because the compiler otherwise splits
    /// most of these into `vpmaddwd` + `vpaddd`, two instructions on the ports the kernels are
    /// bound by.
    #[target_feature(enable = "avx512f,avx512vnni")]
    #[inline]
    unsafe fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
        let mut acc = acc;
        // SAFETY: a register-only instruction of a feature the function requires.
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
        acc
    }

    /// The two f16 at `p` (a block's d and dmin) as f32, times `s`. One 32-bit load and a
    /// zero-extending move: no merge into an older register, so no false dependency.
    #[inline(always)]
    unsafe fn two_halves(p: *const u8, s: f32) -> (f32, f32) {
        let bits = u32::from_le_bytes(*(p as *const [u8; 4]));
        let v = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)), _mm_set1_ps(s));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    }

    /// Blocks whose f32 factors are computed together ahead of their products (one vector
    /// conversion for all), so that the products read them with broadcast loads.
    const CHUNK: usize = 16;

    /// For the 32-element formats (`EIGHT`: Q8_0): per block of a chunk, `f = d·s` (s the
    /// activation's block scale) and the part of the product that goes through the
    /// activation's block sum, `Σ_k g_k · sum_k` with `g = m·s` (`_1` formats) or `−offset·d·s`
    /// (zero for Q8_0, which has no offset).
    #[inline(always)]
    unsafe fn legacy_factors<const MIN: bool, const FIVE: bool, const EIGHT: bool>(
        rp: *const u8,
        a: &Activation16,
        first: usize,
        n: usize,
        f: &mut [f32; CHUNK],
    ) -> __m512 {
        let bb = if EIGHT {
            34
        } else {
            18 + 2 * MIN as usize + 4 * FIVE as usize
        };
        let min = MIN;
        let offset = if MIN || EIGHT {
            0.0
        } else if FIVE {
            16.0
        } else {
            8.0
        };
        let (mut d, mut m) = ([0u16; CHUNK], [0u16; CHUNK]);
        prefetch(rp.add(first * bb), n * bb);
        for k in 0..n {
            let blk = rp.add((first + k) * bb);
            d[k] = u16::from_le_bytes([*blk, *blk.add(1)]);
            if min {
                m[k] = u16::from_le_bytes([*blk.add(2), *blk.add(3)]);
            }
        }
        let valid = ((1u32 << n) - 1) as u16;
        let s = _mm512_maskz_loadu_ps(valid, a.scales.as_ptr().add(first));
        let sums = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(valid, a.sums32.as_ptr().add(first)));
        let fd = _mm512_mul_ps(
            _mm512_cvtph_ps(_mm256_loadu_si256(d.as_ptr() as *const __m256i)),
            s,
        );
        _mm512_storeu_ps(f.as_mut_ptr(), fd);
        let g = if min {
            _mm512_mul_ps(
                _mm512_cvtph_ps(_mm256_loadu_si256(m.as_ptr() as *const __m256i)),
                s,
            )
        } else {
            _mm512_mul_ps(fd, _mm512_set1_ps(-offset))
        };
        _mm512_mul_ps(g, sums)
    }

    /// Q8_0: 32 int8 weights and an f16 scale per block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn q8_0(row: &[u8], a: &Activation16) -> f32 {
        const BB: usize = 34;
        let nb = row.len() / BB;
        let (rp, xp) = (row.as_ptr(), a.q.as_ptr());
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut f = [0f32; CHUNK];
        let product = |b: usize| {
            // SAFETY (loads): block b's 32 weights sit at 34b + 2 .. 34b + 34 <= row.len(),
            // its activation at 32b .. 32b + 32 <= n.
            let w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(rp.add(b * BB + 2) as *const __m256i));
            _mm512_cvtepi32_ps(_mm512_madd_epi16(
                w,
                _mm512_loadu_si512(xp.add(32 * b) as *const _),
            ))
        };
        for first in (0..nb).step_by(CHUNK) {
            let n = CHUNK.min(nb - first);
            legacy_factors::<false, false, true>(rp, a, first, n, &mut f);
            let mut k = 0;
            while k + 2 <= n {
                acc0 = _mm512_fmadd_ps(product(first + k), _mm512_set1_ps(f[k]), acc0);
                acc1 = _mm512_fmadd_ps(product(first + k + 1), _mm512_set1_ps(f[k + 1]), acc1);
                k += 2;
            }
            if k < n {
                acc0 = _mm512_fmadd_ps(product(first + k), _mm512_set1_ps(f[k]), acc0);
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }

    /// Q4_0 / Q4_1 / Q5_0 / Q5_1: 16 bytes of nibbles per block (element j in the low nibble of
    /// byte j, element j + 16 in the high one), for Q5 a 32-bit mask of fifth bits, an f16
    /// scale and for the `_1` formats an f16 min. The offset (8 or 16) and the min go through
    /// the activation's per-block sums.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn legacy<const MIN: bool, const FIVE: bool>(row: &[u8], a: &Activation16) -> f32 {
        let bb = 18 + 2 * MIN as usize + 4 * FIVE as usize;
        let qs_at = bb - 16;
        let nb = row.len() / bb;
        let (rp, xp) = (row.as_ptr(), a.q.as_ptr());
        let low = _mm512_set1_epi16(0x0F);
        let sixteen = _mm512_set1_epi16(16);
        // Lanes 0–15 keep the low nibbles, lanes 16–31 shift the high ones down.
        let shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
        let (mut acc0, mut acc1, mut corr) = (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
        let mut f = [0f32; CHUNK];
        let product = |b: usize| {
            // SAFETY (loads): block b's bytes are bb·b .. bb·(b + 1) <= row.len(), its
            // activation 32b .. 32b + 32 <= n.
            let blk = rp.add(b * bb);
            let bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(blk.add(qs_at) as *const __m128i));
            let mut w = _mm512_and_si512(_mm512_srlv_epi16(_mm512_cvtepu8_epi16(bytes), shifts), low);
            if FIVE {
                let qh = u32::from_le_bytes(*(blk.add(qs_at - 4) as *const [u8; 4]));
                w = _mm512_mask_add_epi16(w, qh, w, sixteen);
            }
            _mm512_cvtepi32_ps(_mm512_madd_epi16(
                w,
                _mm512_loadu_si512(xp.add(32 * b) as *const _),
            ))
        };
        for first in (0..nb).step_by(CHUNK) {
            let n = CHUNK.min(nb - first);
            corr = _mm512_add_ps(corr, legacy_factors::<MIN, FIVE, false>(rp, a, first, n, &mut f));
            let mut k = 0;
            while k + 2 <= n {
                acc0 = _mm512_fmadd_ps(product(first + k), _mm512_set1_ps(f[k]), acc0);
                acc1 = _mm512_fmadd_ps(product(first + k + 1), _mm512_set1_ps(f[k + 1]), acc1);
                k += 2;
            }
            if k < n {
                acc0 = _mm512_fmadd_ps(product(first + k), _mm512_set1_ps(f[k]), acc0);
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), corr))
    }

    /// The 16-bit lanes [s(2p) × 16, s(2p + 1) × 16] of the 16 sub-block scales in `scales`'
    /// low lanes: the scales of a 32-element chunk made of two 16-element sub-blocks.
    #[inline(always)]
    unsafe fn pair_scales(scales: __m512i, p: usize) -> __m512i {
        let idx = _mm512_mask_blend_epi16(
            0xFFFF_0000,
            _mm512_set1_epi16(2 * p as i16),
            _mm512_set1_epi16(2 * p as i16 + 1),
        );
        _mm512_permutexvar_epi16(idx, scales)
    }

    /// Q4_K / Q5_K: d, dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, (Q5_K:
    /// 32 bytes of fifth bits), 128 bytes of nibbles: byte 32c + l holds element 64c + l low and
    /// 64c + 32 + l high.
    ///
    /// Per chunk of blocks, first every block's factors and scales go to memory, then the
    /// products read the scales back with broadcast loads: computed and used in one pass, the
    /// scales would stay in registers and cost a shuffle each on the port that widens the
    /// weights.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn q45_k<const FIVE: bool>(row: &[u8], a: &Activation16) -> f32 {
        const KC: usize = 8;
        let bb = if FIVE { 176 } else { 144 };
        let qs_at = if FIVE { 48 } else { 16 };
        let nb = row.len() / bb;
        let (rp, xp) = (row.as_ptr(), a.q.as_ptr());
        let low = _mm512_set1_epi16(0x0F);
        let sixteen = _mm512_set1_epi16(16);
        let mut facc = _mm512_setzero_ps();
        let mut fmin = _mm256_setzero_ps();
        // Each sub-block scale twice in a 32-bit word: a broadcast load gives all 32 lanes.
        let mut sc = [[0u32; 8]; KC];
        let mut f = [0f32; KC];
        for first in (0..nb).step_by(KC) {
            let n = KC.min(nb - first);
            for k in 0..n {
                let b = first + k;
                let blk = rp.add(b * bb);
                let (d, dmin) = two_halves(blk, *a.scales.get_unchecked(b));
                f[k] = d;
                // The 12 bytes as three words: scales 0–3 and mins 0–3 in the low six bits
                // of words 0 and 1, the top two bits of scales/mins 4–7 above them, their low
                // four bits in word 2 (ggml `get_scale_min_k4`).
                let w = *(blk.add(4) as *const [u8; 12]);
                let word =
                    |i: usize| u32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]]);
                let (w0, w1, w2) = (word(0), word(1), word(2));
                let sc_lo = w0 & 0x3F3F_3F3F;
                let m_lo = w1 & 0x3F3F_3F3F;
                let sc_hi = (w2 & 0x0F0F_0F0F) | ((w0 >> 2) & 0x3030_3030);
                let m_hi = ((w2 >> 4) & 0x0F0F_0F0F) | ((w1 >> 2) & 0x3030_3030);
                let pairs = _mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, sc_hi as i32, sc_lo as i32));
                _mm256_storeu_si256(
                    sc[k].as_mut_ptr() as *mut __m256i,
                    _mm256_or_si256(pairs, _mm256_slli_epi32(pairs, 16)),
                );
                let mins = _mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, m_hi as i32, m_lo as i32));
                let sums = _mm256_loadu_si256(a.sums32.as_ptr().add(b * 8) as *const __m256i);
                fmin = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_mullo_epi32(mins, sums)),
                    _mm256_set1_ps(dmin),
                    fmin,
                );
            }
            // Keep the compiler from carrying the scales over in registers.
            std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
            for k in 0..n {
                let b = first + k;
                let blk = rp.add(b * bb);
                let x = xp.add(b * QK_K);
                prefetch(blk, bb);
                let qh = if FIVE {
                    _mm512_cvtepu8_epi16(_mm256_loadu_si256(blk.add(16) as *const __m256i))
                } else {
                    _mm512_setzero_si512()
                };
                let (mut acc0, mut acc1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                // SAFETY (loads): the block's bytes are bb·b .. bb·(b + 1) <= row.len(); its
                // activation 256b .. 256b + 256 <= n; its sums 8b .. 8b + 8 <= n / 32.
                for c in 0..4 {
                    let w =
                        _mm512_cvtepu8_epi16(_mm256_loadu_si256(blk.add(qs_at + 32 * c) as *const __m256i));
                    let (mut lo, mut hi) = (_mm512_and_si512(w, low), _mm512_srli_epi16(w, 4));
                    if FIVE {
                        let bit_lo = _mm512_test_epi16_mask(qh, _mm512_set1_epi16(1 << (2 * c)));
                        let bit_hi = _mm512_test_epi16_mask(qh, _mm512_set1_epi16(2 << (2 * c)));
                        lo = _mm512_mask_add_epi16(lo, bit_lo, lo, sixteen);
                        hi = _mm512_mask_add_epi16(hi, bit_hi, hi, sixteen);
                    }
                    let s0 = _mm512_set1_epi32(sc[k][2 * c] as i32);
                    let s1 = _mm512_set1_epi32(sc[k][2 * c + 1] as i32);
                    acc0 = dpwssd(
                        acc0,
                        _mm512_mullo_epi16(lo, s0),
                        _mm512_loadu_si512(x.add(64 * c) as *const _),
                    );
                    acc1 = dpwssd(
                        acc1,
                        _mm512_mullo_epi16(hi, s1),
                        _mm512_loadu_si512(x.add(64 * c + 32) as *const _),
                    );
                }
                let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(acc0, acc1));
                facc = _mm512_fmadd_ps(sum, _mm512_set1_ps(f[k]), facc);
            }
        }
        let m = _mm_add_ps(_mm256_castps256_ps128(fmin), _mm256_extractf128_ps(fmin, 1));
        let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_add_ss(m, _mm_movehdup_ps(m));
        _mm512_reduce_add_ps(facc) - _mm_cvtss_f32(m)
    }

    /// Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales (sub-blocks of
    /// 16), d. In each half h: element 128h + 32p + l takes nibble p / 2 of byte
    /// 64h + 32(p % 2) + l and bits 2p, 2p + 1 of byte 128 + 32h + l; weight (q − 32)·scale.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn q6_k(row: &[u8], a: &Activation16) -> f32 {
        const BB: usize = 210;
        let nb = row.len() / BB;
        let (rp, xp) = (row.as_ptr(), a.q.as_ptr());
        let low = _mm512_set1_epi16(0x0F);
        let three = _mm512_set1_epi16(3);
        let thirty_two = _mm512_set1_epi16(32);
        let mut facc = [_mm512_setzero_ps(); 2];
        for b in 0..nb {
            let blk = rp.add(b * BB);
            let d = two_halves(blk.add(206), *a.scales.get_unchecked(b)).1;
            let scales = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128(
                blk.add(192) as *const __m128i
            )));
            let x = xp.add(b * QK_K);
            prefetch(blk, BB);
            let (mut acc0, mut acc1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            // SAFETY (loads): bytes 210b .. 210b + 210 <= row.len(); activation 256b .. + 256.
            for h in 0..2 {
                let ql0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(blk.add(64 * h) as *const __m256i));
                let ql1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(blk.add(64 * h + 32) as *const __m256i));
                let qh = _mm512_cvtepu8_epi16(_mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i));
                let high = |shift: u32| {
                    _mm512_slli_epi16(
                        _mm512_and_si512(_mm512_srl_epi16(qh, _mm_cvtsi32_si128(shift as i32)), three),
                        4,
                    )
                };
                let q = [
                    _mm512_or_si512(_mm512_and_si512(ql0, low), high(0)),
                    _mm512_or_si512(_mm512_and_si512(ql1, low), high(2)),
                    _mm512_or_si512(_mm512_srli_epi16(ql0, 4), high(4)),
                    _mm512_or_si512(_mm512_srli_epi16(ql1, 4), high(6)),
                ];
                for (p, q) in q.into_iter().enumerate() {
                    let w =
                        _mm512_mullo_epi16(_mm512_sub_epi16(q, thirty_two), pair_scales(scales, 4 * h + p));
                    let xv = _mm512_loadu_si512(x.add(128 * h + 32 * p) as *const _);
                    if p % 2 == 0 {
                        acc0 = dpwssd(acc0, w, xv);
                    } else {
                        acc1 = dpwssd(acc1, w, xv);
                    }
                }
            }
            let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(acc0, acc1));
            facc[b % 2] = _mm512_fmadd_ps(sum, _mm512_set1_ps(d), facc[b % 2]);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(facc[0], facc[1]))
    }

    /// Q2_K: 16 bytes of 4-bit scales (low) and mins (high) for sub-blocks of 16, 64 bytes of
    /// 2-bit weights (element 128h + 32j + l in bits 2j of byte 16 + 32h + l), d, dmin.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn q2_k(row: &[u8], a: &Activation16) -> f32 {
        const BB: usize = 84;
        let nb = row.len() / BB;
        let (rp, xp) = (row.as_ptr(), a.q.as_ptr());
        let three = _mm512_set1_epi16(3);
        let mut facc = [_mm512_setzero_ps(); 2];
        let mut fmin = 0f32;
        for b in 0..nb {
            let blk = rp.add(b * BB);
            let s = a.scales[b];
            let (d, dmin) = two_halves(blk.add(80), s);
            let raw = _mm_loadu_si128(blk as *const __m128i);
            let scales =
                _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_and_si128(raw, _mm_set1_epi8(0x0F))));
            let mut mins = 0i32;
            for j in 0..16 {
                mins += (*blk.add(j) >> 4) as i32 * a.sums16[b * 16 + j];
            }
            fmin += dmin * mins as f32;
            let x = xp.add(b * QK_K);
            prefetch(blk, BB);
            let (mut acc0, mut acc1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            // SAFETY (loads): bytes 84b .. 84b + 84 <= row.len(); activation 256b .. + 256.
            for h in 0..2 {
                let q = _mm512_cvtepu8_epi16(_mm256_loadu_si256(blk.add(16 + 32 * h) as *const __m256i));
                for j in 0..4 {
                    let w = _mm512_and_si512(_mm512_srl_epi16(q, _mm_cvtsi32_si128(2 * j as i32)), three);
                    let w = _mm512_mullo_epi16(w, pair_scales(scales, 4 * h + j));
                    let xv = _mm512_loadu_si512(x.add(128 * h + 32 * j) as *const _);
                    if j % 2 == 0 {
                        acc0 = dpwssd(acc0, w, xv);
                    } else {
                        acc1 = dpwssd(acc1, w, xv);
                    }
                }
            }
            let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(acc0, acc1));
            facc[b % 2] = _mm512_fmadd_ps(sum, _mm512_set1_ps(d), facc[b % 2]);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(facc[0], facc[1])) - fmin
    }

    /// Q3_K: 32 bytes of high bits (element 128h + 32j + l: bit 4h + j of byte l), 64 bytes of
    /// low bit pairs (bits 2j of byte 32 + 32h + l), 12 bytes of 6-bit scales (+32) for
    /// sub-blocks of 16, d. The weight is (low − 4 where the high bit is clear)·(scale − 32).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn q3_k(row: &[u8], a: &Activation16) -> f32 {
        const BB: usize = 110;
        let nb = row.len() / BB;
        let (rp, xp) = (row.as_ptr(), a.q.as_ptr());
        let three = _mm512_set1_epi16(3);
        let four = _mm512_set1_epi16(4);
        let mut facc = [_mm512_setzero_ps(); 2];
        let mut sc = [0i16; 16];
        for b in 0..nb {
            let blk = rp.add(b * BB);
            let d = two_halves(blk.add(106), *a.scales.get_unchecked(b)).1;
            let raw = std::slice::from_raw_parts(blk.add(96), 12);
            for (i, s) in sc.iter_mut().enumerate() {
                let low = if i < 8 { raw[i] & 0xF } else { raw[i - 8] >> 4 };
                let high = (raw[8 + i % 4] >> (2 * (i / 4))) & 3;
                *s = (low | (high << 4)) as i16 - 32;
            }
            let scales = _mm512_castsi256_si512(_mm256_loadu_si256(sc.as_ptr() as *const __m256i));
            let hm = _mm512_cvtepu8_epi16(_mm256_loadu_si256(blk as *const __m256i));
            let x = xp.add(b * QK_K);
            prefetch(blk, BB);
            let (mut acc0, mut acc1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            // SAFETY (loads): bytes 110b .. 110b + 110 <= row.len(); activation 256b .. + 256.
            for h in 0..2 {
                let q = _mm512_cvtepu8_epi16(_mm256_loadu_si256(blk.add(32 + 32 * h) as *const __m256i));
                for j in 0..4 {
                    let w = _mm512_and_si512(_mm512_srl_epi16(q, _mm_cvtsi32_si128(2 * j as i32)), three);
                    let clear = _mm512_testn_epi16_mask(hm, _mm512_set1_epi16(1 << (4 * h + j)));
                    let w = _mm512_mask_sub_epi16(w, clear, w, four);
                    let w = _mm512_mullo_epi16(w, pair_scales(scales, 4 * h + j));
                    let xv = _mm512_loadu_si512(x.add(128 * h + 32 * j) as *const _);
                    if j % 2 == 0 {
                        acc0 = dpwssd(acc0, w, xv);
                    } else {
                        acc1 = dpwssd(acc1, w, xv);
                    }
                }
            }
            let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(acc0, acc1));
            facc[b % 2] = _mm512_fmadd_ps(sum, _mm512_set1_ps(d), facc[b % 2]);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(facc[0], facc[1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::tests::pseudo;
    use crate::tensor::ggml::quantize_row;
    use crate::tensor::GgmlType;

    /// Every format and path against the scalar product, over several lengths and rows that
    /// start anywhere.
    #[test]
    fn every_format_matches_the_scalar_product() {
        for ty in GgmlType::QUANTIZED {
            for &(rows, cols) in &[(1, 256), (9, 512), (17, 768), (8, 1024)] {
                let rb = ty.row_bytes(cols);
                let mut raw = vec![0u8; rows * rb];
                let w = pseudo(rows * cols, 21);
                for (r, o) in raw.chunks_exact_mut(rb).enumerate() {
                    quantize_row(ty, &w[r * cols..(r + 1) * cols], o);
                }
                let m = GgmlMatrix::from_bytes(&raw, ty, rows, cols).unwrap();
                let x = pseudo(cols, 23);
                let a = Activation16::new(&x, ty.block_size(), &mut Vec::new());
                for first in [0, rows / 2] {
                    let mut got = vec![0f32; rows - first];
                    rows_times(&m, &a, first, &mut got);
                    for (j, g) in got.iter().enumerate() {
                        let want = dot_row(ty, m.row(first + j), &a);
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{ty} {rows}x{cols} row {}: {g} vs {want}",
                            first + j
                        );
                    }
                }
                // Every compiled path this CPU can run, not just the one dispatch picks.
                #[cfg(target_arch = "x86_64")]
                for r in 0..rows {
                    let want = dot_row(ty, m.row(r), &a);
                    let mut paths = Vec::new();
                    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                        // SAFETY: AVX2 and FMA are present.
                        paths.push(("avx2", unsafe { generic::dot_avx2(ty, m.row(r), &a) }));
                    }
                    if crate::kernels::cpu::simd::has_avx512vnni() && is_x86_feature_detected!("f16c") {
                        // SAFETY: AVX-512F/BW/VNNI and F16C are present.
                        paths.push(("avx512", unsafe { avx512::dot(ty, m.row(r), &a) }));
                    }
                    for (path, got) in paths {
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{ty} {path} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod speed {
    use super::*;
    use crate::tensor::ggml::quantize_row;
    use crate::tensor::GgmlType;

    /// One thread, in cache: `cargo test --release -p gyre --lib kernel_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn kernel_speed() {
        let (rows, cols) = (64, 4096);
        let w = crate::kernels::cpu::tests::pseudo(rows * cols, 3);
        let x = crate::kernels::cpu::tests::pseudo(cols, 5);
        for ty in GgmlType::QUANTIZED {
            let rb = ty.row_bytes(cols);
            let mut raw = vec![0u8; rows * rb];
            for (r, o) in raw.chunks_exact_mut(rb).enumerate() {
                quantize_row(ty, &w[r * cols..(r + 1) * cols], o);
            }
            let a = Activation16::new(&x, ty.block_size(), &mut Vec::new());
            let mut sink = 0f32;
            let mut best = f64::MAX;
            for _ in 0..7 {
                let t0 = std::time::Instant::now();
                for _ in 0..50 {
                    for r in raw.chunks_exact(rb) {
                        // SAFETY: the test machine's features are checked by `dot`'s caller in
                        // production; here the speed test only runs where they are present.
                        sink += unsafe { avx512::dot(ty, r, &a) };
                    }
                }
                best = best.min(t0.elapsed().as_secs_f64() / 50.0);
            }
            let blocks = (rows * cols / 256) as f64;
            println!(
                "{ty}: {:.1} ns per 256 weights, {:.1} GB/s ({sink})",
                best * 1e9 / blocks,
                raw.len() as f64 / best / 1e9
            );
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod dequant_speed {
    use crate::tensor::ggml::{dequantize_row, quantize_row};
    use crate::tensor::GgmlType;

    /// `cargo test --release -p gyre --lib dequant_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn dequant_speed() {
        let cols = 4096;
        let w = crate::kernels::cpu::tests::pseudo(cols, 3);
        let mut out = vec![0f32; cols];
        for ty in GgmlType::QUANTIZED {
            let mut raw = vec![0u8; ty.row_bytes(cols)];
            quantize_row(ty, &w, &mut raw);
            let t0 = std::time::Instant::now();
            for _ in 0..2000 {
                super::dequantize(ty, &raw, &mut out);
            }
            let t = t0.elapsed().as_secs_f64() / 2000.0;
            let mut want = vec![0f32; cols];
            dequantize_row(ty, &raw, &mut want);
            assert_eq!(out, want);
            println!("{ty}: {:.2} ns per weight", t * 1e9 / cols as f64);
        }
    }
}
