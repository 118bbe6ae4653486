//! Batch-1 matrix–vector product (decode): `out[o] = Σ_i w[o, i] · x[i]`.
//!
//! With AVX-512 the kernels take eight weight rows per pass over the activation: each
//! activation load (from L1/L2) feeds eight rows, and each core keeps eight weight streams in
//! flight. On this project's Zen 4 machine one row at a time reached 60–70% of the read
//! bandwidth on real bf16 layer shapes, eight rows at a time 80–86%
//! (`cargo run --release --example gemv_bandwidth bf16`; BENCHMARKS.md). Quantized matrices
//! store each tile of eight rows as one stream (`tensor::quant`). Rows that do not fill a
//! tile, and CPUs without AVX-512, use the one-row dots of `dot.rs`.

use super::dot::{dot, dot_bf16, dot_f16, dot_q4, dot_q8};
use crate::tensor::ggml::Activation16;
use crate::tensor::quant::{quantize_activation, quantize_activation_i16, GROUP};
use crate::tensor::{GgmlMatrix, QMatrix, Quant, TensorData};

/// Rows of weights one kernel call reads together.
pub const ROWS: usize = 8;

/// Where a matrix's rows come from.
pub enum Rows<'a> {
    Dense(TensorData<'a>),
    Quantized(&'a QMatrix),
    Ggml(&'a GgmlMatrix),
}

/// The activation vector, prepared once per product for the weight format's kernel.
pub struct Activation<'a> {
    /// What the one-row kernels multiply: `x` itself, or for quantized rows the rounded
    /// activation (`tensor::quant`).
    x: std::borrow::Cow<'a, [f32]>,
    /// `x` reordered for the bf16 unpack kernel (empty when unused).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    permuted: Vec<f32>,
    /// The int8 activation laid out for the Q4 VNNI kernel (on CPUs with AVX-512 VNNI).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    int8: Option<Int8Activation>,
    /// The int16 activation for the Q8 kernel (on CPUs with AVX-512BW).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    int16: Option<Int16Activation>,
    /// The int16 activation for a GGUF block format (one scale per weight block).
    ggml: Option<Activation16>,
    wide: bool,
}

/// An int16 activation for the Q8 integer-dot kernel: the ints [n] and a scale per group.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Int16Activation {
    q: Vec<i16>,
    scales: Vec<f32>,
}

/// An int8 activation for the Q4 integer-dot kernel, covering the first `128·⌊n/128⌋`
/// columns; the rest go through the f32 tail with the dequantized activation.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Int8Activation {
    /// The activation bytes in the order the kernel lays out its weight nibbles.
    q: Vec<i8>,
    /// 16 f32 per block: the activation scale of each i32 lane's group.
    lane_scales: Vec<f32>,
    /// 16 i32 per block: −8 · Σ q of each group, in the group's first lane. The kernel starts
    /// each block's integer dot from it, removing the 8 by which stored nibbles exceed the
    /// signed values.
    lane_offsets: Vec<i32>,
}

impl<'a> Activation<'a> {
    /// Prepares `x` [in] for products with `rows`.
    pub fn new(x: &'a [f32], rows: &Rows) -> Activation<'a> {
        Self::with_integer(x, rows, true)
    }

    /// True when one activation prepared for `a` serves products with `b` as well.
    pub fn shared_by(a: &Rows, b: &Rows) -> bool {
        let kind = |r: &Rows| match r {
            Rows::Dense(TensorData::BF16(_)) => 0,
            Rows::Dense(_) => 1,
            Rows::Quantized(q) => 2 + q.quant() as u8,
            Rows::Ggml(g) => 4 + (g.ty().block_size() / 32) as u8,
        };
        kind(a) == kind(b)
    }

    /// As [`Activation::new`]; `allow_integer: false` keeps the f32 kernels for quantized
    /// rows (so tests can compare both).
    fn with_integer(x: &'a [f32], rows: &Rows, allow_integer: bool) -> Activation<'a> {
        let mut a = Activation {
            x: std::borrow::Cow::Borrowed(x),
            permuted: Vec::new(),
            int8: None,
            int16: None,
            ggml: None,
            wide: false,
        };
        #[cfg(target_arch = "x86_64")]
        {
            a.wide = super::simd::has_avx512bw();
        }
        match rows {
            #[cfg(target_arch = "x86_64")]
            Rows::Dense(TensorData::BF16(_)) if a.wide => super::simd::permute_for_unpack(x, &mut a.permuted),
            Rows::Quantized(q) => {
                let (mut scales, mut x_hat) = (Vec::new(), Vec::with_capacity(x.len()));
                match q.quant() {
                    Quant::Q4 => {
                        let mut ints = Vec::new();
                        quantize_activation(x, &mut ints, &mut scales, &mut x_hat);
                        #[cfg(target_arch = "x86_64")]
                        if allow_integer && super::simd::has_avx512vnni() {
                            a.int8 = Some(Int8Activation::new(&ints, &scales));
                        }
                    }
                    Quant::Q8 => {
                        let mut ints = Vec::new();
                        quantize_activation_i16(x, &mut ints, &mut scales, &mut x_hat);
                        if allow_integer && a.wide {
                            a.int16 = Some(Int16Activation { q: ints, scales });
                        }
                    }
                }
                a.x = std::borrow::Cow::Owned(x_hat);
            }
            Rows::Ggml(g) => {
                let mut x_hat = Vec::with_capacity(x.len());
                a.ggml = Some(Activation16::new(x, g.ty().block_size(), &mut x_hat));
                a.x = std::borrow::Cow::Owned(x_hat);
            }
            _ => {}
        }
        a
    }
}

impl Int8Activation {
    /// Columns per kernel block: four groups.
    const BLOCK: usize = 128;

    /// Lays out the int8 activation `q` (scales per group) for the Q4 kernel: per block,
    /// elements 0–15 of each of the four groups (matching the low nibbles), then elements
    /// 16–31 (the high nibbles); either way lanes 4g..4g + 4 belong to group g.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn new(q: &[i8], scales: &[f32]) -> Int8Activation {
        let blocks = q.len() / Self::BLOCK;
        let mut out = Int8Activation {
            q: Vec::with_capacity(blocks * Self::BLOCK),
            lane_scales: Vec::with_capacity(blocks * 16),
            lane_offsets: Vec::with_capacity(blocks * 16),
        };
        for (block, block_scales) in q.chunks_exact(Self::BLOCK).zip(scales.chunks_exact(4)) {
            for half in [0..16, 16..32] {
                for g in block.chunks_exact(GROUP) {
                    out.q.extend_from_slice(&g[half.clone()]);
                }
            }
            for (g, &s) in block.chunks_exact(GROUP).zip(block_scales) {
                out.lane_scales.extend([s; 4]);
                let sum: i32 = g.iter().map(|&v| v as i32).sum();
                out.lane_offsets.extend([-8 * sum, 0, 0, 0]);
            }
        }
        out
    }
}

/// `out[j] = row(first + j) · x` for every `j < out.len()`.
pub fn rows_times(rows: &Rows, x: &Activation, first: usize, out: &mut [f32]) {
    if let (Rows::Ggml(g), Some(a)) = (rows, &x.ggml) {
        super::ggml::rows_times(g, a, first, out);
        return;
    }
    let xs: &[f32] = &x.x;
    let n = xs.len();
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if x.wide {
        for (k, o) in out.chunks_exact_mut(ROWS).enumerate() {
            let r = first + k * ROWS;
            // SAFETY: `wide` means AVX-512F/BW (and F16C, which AVX-512F implies) are present,
            // an int16 activation exists only when `wide`, an int8 one only with AVX-512 VNNI;
            // each kernel checks the lengths of the slices it is given.
            let v = unsafe {
                match rows {
                    Rows::Dense(TensorData::BF16(s)) => {
                        wide::bf16(bytemuck::cast_slice(&s[r * n..(r + ROWS) * n]), n, &x.permuted)
                    }
                    Rows::Dense(TensorData::F16(s)) => {
                        wide::f16(bytemuck::cast_slice(&s[r * n..(r + ROWS) * n]), n, xs)
                    }
                    Rows::Dense(TensorData::F32(s)) => wide::f32(&s[r * n..(r + ROWS) * n], n, xs),
                    Rows::Quantized(q) if r + ROWS <= q.rows_len() && r.is_multiple_of(ROWS) => {
                        let (scales, values) = q.tile(r);
                        let values8 = bytemuck::cast_slice(values);
                        match (q.quant(), &x.int8, &x.int16) {
                            (Quant::Q8, _, Some(a)) => wide::q8_int16(scales, values8, n, a, xs),
                            (Quant::Q8, _, None) => wide::q8(scales, values8, n, xs),
                            (Quant::Q4, Some(a), _) => wide::q4_vnni(scales, values, n, a, xs),
                            (Quant::Q4, None, _) => wide::q4(scales, values, n, xs),
                        }
                    }
                    // A block not aligned to the scale tiles: one row at a time below.
                    Rows::Quantized(_) | Rows::Ggml(_) => break,
                }
            };
            o.copy_from_slice(&v);
            done += ROWS;
        }
    }
    let (mut scales, mut values) = (Vec::new(), Vec::new());
    for (j, o) in out.iter_mut().enumerate().skip(done) {
        let r = first + j;
        let span = r * n..(r + 1) * n;
        *o = match rows {
            Rows::Dense(TensorData::F32(s)) => dot(&s[span], xs),
            Rows::Dense(TensorData::BF16(s)) => dot_bf16(&s[span], xs),
            Rows::Dense(TensorData::F16(s)) => dot_f16(&s[span], xs),
            Rows::Quantized(q) => {
                q.row_scales(r, &mut scales);
                q.row_values(r, &mut values);
                match q.quant() {
                    Quant::Q8 => dot_q8(&scales, bytemuck::cast_slice(&values), xs),
                    Quant::Q4 => dot_q4(&scales, &values, xs),
                }
            }
            Rows::Ggml(_) => unreachable!("GGUF rows always have their int16 activation"),
        };
    }
}

/// The eight-row AVX-512 kernels. Each takes [`ROWS`] consecutive rows of `n` columns and
/// returns their eight dot products with the activation; accumulation is f32.
#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use super::{Int16Activation, Int8Activation, GROUP, ROWS};
    use crate::tensor::quant::{tile_value_offset, BLOCK_BYTES};

    /// Sum of the eight lanes-vectors, one per row.
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce(acc: [__m512; ROWS]) -> [f32; ROWS] {
        acc.map(|a| _mm512_reduce_add_ps(a))
    }

    /// How far ahead of the bytes being multiplied each weight stream is prefetched. On the
    /// Sapphire Rapids class Xeon the hardware prefetchers alone left the streams waiting on
    /// memory between bursts of arithmetic (as in `kernels/cpu/ggml.rs`).
    const PREFETCH_BYTES: usize = 2048;

    /// Prefetches the cache line `PREFETCH_BYTES` past `p` (never faults, so past the end of
    /// a row is harmless).
    #[inline(always)]
    unsafe fn prefetch_ahead<T>(p: *const T) {
        _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH_BYTES));
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
                prefetch_ahead(wp.add(r * n + i));
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
        rows_by_16(
            w,
            n,
            x,
            |p| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            |v| half::f16::from_bits(v).to_f32(),
        )
    }

    /// f32 rows ([8, n]).
    ///
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32(w: &[f32], n: usize, x: &[f32]) -> [f32; ROWS] {
        rows_by_16(w, n, x, |p| _mm512_loadu_ps(p), |v| v)
    }

    /// The eight-row product for formats that widen 16 weights per load: `load16(p)` reads
    /// and widens the 16 weights at `p`, `widen` one weight (for the tail). Inlined into
    /// its AVX-512 callers, which is where the intrinsics run.
    #[inline(always)]
    unsafe fn rows_by_16<T: Copy>(
        w: &[T],
        n: usize,
        x: &[f32],
        load16: impl Fn(*const T) -> __m512,
        widen: impl Fn(T) -> f32,
    ) -> [f32; ROWS] {
        assert!(w.len() == ROWS * n && x.len() == n);
        let (wp, xptr) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); ROWS];
        let mut i = 0;
        // SAFETY (loads): i + 16 <= n within each row.
        // One prefetch per 64 bytes of each row.
        let every = (64 / std::mem::size_of::<T>()).max(16);
        while i + 16 <= n {
            let xv = _mm512_loadu_ps(xptr.add(i));
            let fetch = i % every == 0;
            for (r, a) in acc.iter_mut().enumerate() {
                if fetch {
                    prefetch_ahead(wp.add(r * n + i));
                }
                *a = _mm512_fmadd_ps(load16(wp.add(r * n + i)), xv, *a);
            }
            i += 16;
        }
        let mut out = reduce(acc);
        for (r, o) in out.iter_mut().enumerate() {
            for j in i..n {
                *o += widen(w[r * n + j]) * x[j];
            }
        }
        out
    }

    /// The eight rows' f16 scales of one group (at `p`), widened.
    #[inline(always)]
    unsafe fn group_scales(p: *const u16) -> [f32; ROWS] {
        let mut out = [0f32; ROWS];
        _mm256_storeu_ps(
            out.as_mut_ptr(),
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        );
        out
    }

    /// An f16 scale (raw bits) as f32, for the scalar tails.
    fn scale_f32(bits: u16) -> f32 {
        half::f16::from_bits(bits).to_f32()
    }

    /// Q8 tile: scales `[⌈n/32⌉][8]` (f16 bits), values [8·n] interleaved in 64-byte blocks
    /// (`tensor::quant::tile_value_offset`).
    ///
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn q8(scales: &[u16], q: &[i8], n: usize, x: &[f32]) -> [f32; ROWS] {
        let gpr = n.div_ceil(GROUP);
        assert!(scales.len() == ROWS * gpr && q.len() == ROWS * n && x.len() == n);
        let (qp, sp, xptr) = (q.as_ptr(), scales.as_ptr(), x.as_ptr());
        let blocks = n / BLOCK_BYTES;
        let mut acc = [_mm512_setzero_ps(); ROWS];
        // SAFETY (loads): group g < 2·blocks covers columns 32g .. 32g + 32 <= n; row r's
        // bytes of it sit at (g/2·8 + r)·64 + (g%2)·32 < 8·64·blocks <= 8n; scale
        // g·8 + r < 8·gpr.
        for g in 0..2 * blocks {
            let i = g * GROUP;
            let x0 = _mm512_loadu_ps(xptr.add(i));
            let x1 = _mm512_loadu_ps(xptr.add(i + 16));
            let ws = group_scales(sp.add(g * ROWS));
            for (r, a) in acc.iter_mut().enumerate() {
                let at = (g / 2 * ROWS + r) * BLOCK_BYTES + g % 2 * GROUP;
                let raw = _mm256_loadu_si256(qp.add(at) as *const __m256i);
                let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
                let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
                let s = _mm512_fmadd_ps(q1, x1, _mm512_mul_ps(q0, x0));
                *a = _mm512_fmadd_ps(_mm512_set1_ps(ws[r]), s, *a);
            }
        }
        let mut out = reduce(acc);
        for (r, o) in out.iter_mut().enumerate() {
            *o += q8_tail(scales, r, q, blocks * BLOCK_BYTES, x);
        }
        out
    }

    /// Σ over columns `from..n` of row `r` of a Q8 tile (the bytes past its whole blocks), in
    /// f32.
    fn q8_tail(scales: &[u16], r: usize, q: &[i8], from: usize, x: &[f32]) -> f32 {
        let n = x.len();
        (from..n)
            .map(|j| scale_f32(scales[j / GROUP * ROWS + r]) * q[tile_value_offset(n, r, j)] as f32 * x[j])
            .sum()
    }

    /// Q8 tile (as [`q8`]) against the int16 activation: per group of 32 and row, the 32
    /// weights widen to int16 in one instruction and `vpmaddwd` sums their products with the
    /// activation in 16 i32 lanes, scaled once by weight scale × activation scale. Exact in
    /// the integers; `x_hat` (the dequantized activation) serves the tail columns.
    ///
    /// # Safety
    /// AVX-512F and AVX-512BW must be present.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn q8_int16(
        scales: &[u16],
        q: &[i8],
        n: usize,
        a: &Int16Activation,
        x_hat: &[f32],
    ) -> [f32; ROWS] {
        let gpr = n.div_ceil(GROUP);
        assert!(scales.len() == ROWS * gpr && q.len() == ROWS * n && x_hat.len() == n);
        assert!(a.q.len() == n && a.scales.len() == gpr);
        let (qp, sp, ap) = (q.as_ptr(), scales.as_ptr(), a.q.as_ptr());
        let blocks = n / BLOCK_BYTES;
        let mut acc = [_mm512_setzero_ps(); ROWS];
        // Weight scale × activation scale for a chunk of groups, computed eight rows at a
        // time before the chunk's products so that those read them with broadcast loads
        // (register shuffles would compete with the int8 widening for the same ports).
        const CHUNK: usize = 64;
        let mut both = [0f32; CHUNK * ROWS];
        let groups = 2 * blocks;
        for first in (0..groups).step_by(CHUNK) {
            let count = CHUNK.min(groups - first);
            for k in 0..count {
                let g = first + k;
                let ws = _mm256_cvtph_ps(_mm_loadu_si128(sp.add(g * ROWS) as *const __m128i));
                let c = _mm256_mul_ps(ws, _mm256_set1_ps(a.scales[g]));
                _mm256_storeu_ps(both.as_mut_ptr().add(k * ROWS), c);
            }
            // SAFETY (loads): as in `q8`; activation ints 32g .. 32g + 32 <= n.
            for k in 0..count {
                let g = first + k;
                let xq = _mm512_loadu_si512(ap.add(g * GROUP) as *const __m512i);
                if g % 2 == 0 {
                    // The tile's 8 × 64 bytes of this block pair are contiguous.
                    for r in 0..ROWS {
                        prefetch_ahead(qp.add((g / 2 * ROWS + r) * BLOCK_BYTES));
                    }
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let at = (g / 2 * ROWS + r) * BLOCK_BYTES + g % 2 * GROUP;
                    let w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(qp.add(at) as *const __m256i));
                    let dots = _mm512_cvtepi32_ps(_mm512_madd_epi16(w, xq));
                    *acc = _mm512_fmadd_ps(dots, _mm512_set1_ps(both[k * ROWS + r]), *acc);
                }
            }
        }
        let mut out = reduce(acc);
        for (r, o) in out.iter_mut().enumerate() {
            *o += q8_tail(scales, r, q, blocks * BLOCK_BYTES, x_hat);
        }
        out
    }

    /// Q4 tile: scales `[⌈n/32⌉][8]` (f16 bits), values [8·16·⌈n/32⌉] interleaved in 64-byte
    /// blocks (four groups; `tensor::quant::tile_value_offset`).
    ///
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn q4(scales: &[u16], values: &[u8], n: usize, x: &[f32]) -> [f32; ROWS] {
        let gpr = n.div_ceil(GROUP);
        let vpr = gpr * GROUP / 2;
        assert!(scales.len() == ROWS * gpr && values.len() == ROWS * vpr && x.len() == n);
        let (vp, sp, xptr) = (values.as_ptr(), scales.as_ptr(), x.as_ptr());
        // Whole groups inside whole blocks.
        let full = (n / GROUP).min(vpr / BLOCK_BYTES * 4);
        let low = _mm_set1_epi8(0x0F);
        let eight = _mm512_set1_ps(8.0);
        let mut acc = [_mm512_setzero_ps(); ROWS];
        // SAFETY (loads): group g < full covers columns 32g .. 32g + 32 <= n; row r's 16
        // bytes of it sit at (g/4·8 + r)·64 + (g%4)·16, inside the tile's whole blocks.
        for g in 0..full {
            let i = g * GROUP;
            let x0 = _mm512_loadu_ps(xptr.add(i));
            let x1 = _mm512_loadu_ps(xptr.add(i + 16));
            let ws = group_scales(sp.add(g * ROWS));
            for (r, a) in acc.iter_mut().enumerate() {
                let at = (g / 4 * ROWS + r) * BLOCK_BYTES + g % 4 * 16;
                let b = _mm_loadu_si128(vp.add(at) as *const __m128i);
                let q0 = _mm512_sub_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low))),
                    eight,
                );
                let q1 = _mm512_sub_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low))),
                    eight,
                );
                let s = _mm512_fmadd_ps(q1, x1, _mm512_mul_ps(q0, x0));
                *a = _mm512_fmadd_ps(_mm512_set1_ps(ws[r]), s, *a);
            }
        }
        let mut out = reduce(acc);
        for (r, o) in out.iter_mut().enumerate() {
            *o += q4_tail(scales, r, values, vpr, full * GROUP, x);
        }
        out
    }

    /// Σ over columns `from..n` of row `r` of a Q4 tile (`from` a multiple of 32), in f32.
    fn q4_tail(scales: &[u16], r: usize, values: &[u8], vpr: usize, from: usize, x: &[f32]) -> f32 {
        (from..x.len())
            .map(|j| {
                let (g, k) = (j / GROUP, j % GROUP);
                let b = values[tile_value_offset(vpr, r, 16 * g + k % 16)];
                let nib = if k < 16 { b & 0x0F } else { b >> 4 };
                scale_f32(scales[g * ROWS + r]) * (nib as f32 - 8.0) * x[j]
            })
            .sum()
    }

    /// Q4 rows with the int8 activation: per 128 columns and row, one 64-byte load split into
    /// low and high nibbles (already unsigned: q + 8), two `vpdpbusd` and one scaled FMA.
    /// Tile scales `[⌈n/32⌉][8]` (f16 bits), `values` [8, 16·⌈n/32⌉]; `x_hat` is the
    /// dequantized activation for the tail columns.
    ///
    /// # Safety
    /// AVX-512F, AVX-512BW and AVX-512 VNNI must be present.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn q4_vnni(
        scales: &[u16],
        values: &[u8],
        n: usize,
        a: &Int8Activation,
        x_hat: &[f32],
    ) -> [f32; ROWS] {
        let gpr = n.div_ceil(GROUP);
        let vpr = gpr * GROUP / 2;
        let blocks = n / 128;
        assert!(scales.len() == ROWS * gpr && values.len() == ROWS * vpr && x_hat.len() == n);
        assert!(
            a.q.len() == 128 * blocks
                && a.lane_scales.len() == 16 * blocks
                && a.lane_offsets.len() == 16 * blocks
        );
        let (vp, sp) = (values.as_ptr(), scales.as_ptr());
        let (qp, lp, op) = (a.q.as_ptr(), a.lane_scales.as_ptr(), a.lane_offsets.as_ptr());
        let low = _mm512_set1_epi8(0x0F);
        // A block's 32 tile scales are four groups × eight rows; row r's lanes 4g..4g + 4
        // take entry 8g + r.
        let spread: [__m512i; ROWS] = std::array::from_fn(|r| {
            let r = r as i32;
            let (a, b, c, d) = (r, 8 + r, 16 + r, 24 + r);
            _mm512_setr_epi32(a, a, a, a, b, b, b, b, c, c, c, c, d, d, d, d)
        });
        let mut acc = [_mm512_setzero_ps(); ROWS];
        // SAFETY (loads): block b covers row r's value bytes at (8b + r)·64 .. + 64 (whole
        // blocks: 64(b + 1) <= vpr),
        // tile scales 32b .. 32b + 32 <= 8·gpr, activation bytes 128b .. 128b + 128 and
        // lanes 16b .. 16b + 16.
        for b in 0..blocks {
            for r in 0..ROWS {
                prefetch_ahead(vp.add((b * ROWS + r) * BLOCK_BYTES));
            }
            let xlo = _mm512_loadu_si512(qp.add(128 * b) as *const __m512i);
            let xhi = _mm512_loadu_si512(qp.add(128 * b + 64) as *const __m512i);
            let xs = _mm512_loadu_ps(lp.add(16 * b));
            let start = _mm512_loadu_si512(op.add(16 * b) as *const __m512i);
            let (s01, s23) = (
                _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(32 * b) as *const __m256i)),
                _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(32 * b + 16) as *const __m256i)),
            );
            for (r, acc) in acc.iter_mut().enumerate() {
                let raw = _mm512_loadu_si512(vp.add((b * ROWS + r) * BLOCK_BYTES) as *const __m512i);
                let lo = _mm512_and_si512(raw, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
                let dots =
                    _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, lo, xlo), hi, xhi));
                let ws = _mm512_permutex2var_ps(s01, spread[r], s23);
                *acc = _mm512_fmadd_ps(_mm512_mul_ps(dots, xs), ws, *acc);
            }
        }
        let mut out = reduce(acc);
        for (r, o) in out.iter_mut().enumerate() {
            *o += q4_tail(scales, r, values, vpr, 128 * blocks, x_hat);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::dot_scalar;
    use crate::kernels::cpu::tests::pseudo;
    use crate::tensor::{Matrix, Tensor};

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
            (8, 250),
            (16, 384),
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
                // Quantized products see the rounded activation (tensor::quant docs).
                let mut x_hat = Vec::new();
                let mut want = vec![0f32; n_out];
                let mut row = vec![0f32; n_in];
                for (r, w) in want.iter_mut().enumerate() {
                    match m {
                        Matrix::Dense(t) => {
                            t.data().row_to_f32(r * n_in, &mut row);
                            *w = dot_scalar(&row, &x);
                        }
                        Matrix::Quantized(q) => {
                            q.row_to_f32(r, &mut row);
                            q.quant().rounded_activation(&x, &mut x_hat);
                            *w = dot_scalar(&row, &x_hat);
                        }
                        Matrix::Ggml(_) => unreachable!("this test has no GGUF matrices"),
                    }
                }
                let rows = match m {
                    Matrix::Dense(t) => Rows::Dense(t.data()),
                    Matrix::Quantized(q) => Rows::Quantized(q),
                    Matrix::Ggml(g) => Rows::Ggml(g),
                };
                for allow_integer in [true, false] {
                    let act = Activation::with_integer(&x, &rows, allow_integer);
                    for first in [0, 1, n_out / 2] {
                        let mut got = vec![0f32; n_out - first];
                        rows_times(&rows, &act, first, &mut got);
                        for (j, (g, e)) in got.iter().zip(&want[first..]).enumerate() {
                            assert!(
                                (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                                "{m:?} {n_out}x{n_in} integer {allow_integer} row {}: {g} vs {e}",
                                first + j
                            );
                        }
                    }
                }
            }
        }
    }
}
