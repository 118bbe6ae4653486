//! ggml's block-quantized weight formats, as GGUF files store them (llama.cpp
//! `ggml/src/ggml-common.h` for the layouts, `ggml-quants.c` `dequantize_row_*` for the values).
//!
//! A row of `cols` weights is `cols / block_size` blocks stored back to back; a matrix is its
//! rows back to back, so a [`GgmlMatrix`] is a view of the memory-mapped file, never a copy.
//!
//! | type | elements | bytes | weight |
//! |---|---|---|---|
//! | Q4_0 | 32 | 18 | `d·(q − 8)`, q 4-bit |
//! | Q4_1 | 32 | 20 | `d·q + m` |
//! | Q5_0 | 32 | 22 | `d·(q − 16)`, q 5-bit |
//! | Q5_1 | 32 | 24 | `d·q + m` |
//! | Q8_0 | 32 | 34 | `d·q`, q int8 |
//! | Q2_K | 256 | 84 | `d·sc·q − dmin·m`, 16 sub-blocks of 16, q 2-bit, sc/m 4-bit |
//! | Q3_K | 256 | 110 | `d·(sc − 32)·q`, 16 × 16, q ∈ [−4, 3], sc 6-bit |
//! | Q4_K | 256 | 144 | `d·sc·q − dmin·m`, 8 × 32, q 4-bit, sc/m 6-bit |
//! | Q5_K | 256 | 176 | as Q4_K with q 5-bit |
//! | Q6_K | 256 | 210 | `d·sc·(q − 32)`, 16 × 16, q 6-bit, sc int8 |
//!
//! Every format is seen here as integers: per block, integer weights `w` (the stored values,
//! offset to be signed where the format says so), integer sub-block scales and mins, and the
//! block's f16 factors `d` and `dmin` ([`IntBlock`]). A product multiplies them with the
//! activation rounded to int16 with one scale per weight block ([`Activation16`]: the error of
//! that rounding is at most 1/65534 of the block's largest activation, where llama.cpp's int8
//! activations (Q8_0, Q8_K) are 1/254), sums in exact integers per sub-block, and applies the
//! f32 factors once per block. [`dot_row`] is the scalar statement of that product, which the
//! SIMD kernels (`kernels::cpu::ggml`) reproduce.

use std::sync::Arc;

use anyhow::{bail, Result};
use half::f16;
use rayon::prelude::*;

use super::{Bytes, DType, Tensor};

/// Elements per k-quant super-block.
pub const QK_K: usize = 256;

/// The tensor types gyre reads from GGUF files (ggml type ids).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// ggml's type ids and names that gyre does not run, for error messages.
const UNSUPPORTED: &[(u32, &str)] = &[
    (4, "Q4_2 (removed from ggml)"),
    (5, "Q4_3 (removed from ggml)"),
    (9, "Q8_1"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (31, "Q4_0_4_4 (removed from GGUF)"),
    (32, "Q4_0_4_8 (removed from GGUF)"),
    (33, "Q4_0_8_8 (removed from GGUF)"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (36, "IQ4_NL_4_4 (removed from GGUF)"),
    (37, "IQ4_NL_4_8 (removed from GGUF)"),
    (38, "IQ4_NL_8_8 (removed from GGUF)"),
    (39, "MXFP4"),
    (40, "NVFP4"),
    (41, "Q1_0"),
    (42, "Q2_0"),
];

impl GgmlType {
    /// Every supported type.
    pub const ALL: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// The block-quantized types (every type but F32, F16 and BF16).
    pub const QUANTIZED: [GgmlType; 10] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// The type with ggml id `id`; an unsupported or unknown id is an error naming it.
    pub fn from_id(id: u32) -> Result<GgmlType> {
        if let Some(t) = Self::ALL.iter().find(|t| t.id() == id) {
            return Ok(*t);
        }
        match UNSUPPORTED.iter().find(|(i, _)| *i == id) {
            Some((_, name)) => bail!(
                "has ggml type {name}, which gyre does not run (it runs F32, F16, BF16, Q4_0, Q4_1, \
                 Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K; pick another quantization of the model)"
            ),
            None => bail!("has unknown ggml type id {id} (a newer llama.cpp may have written it)"),
        }
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The name llama.cpp prints (`Q4_K`, `F16`, …).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// The type named `name`, case-insensitively (`q4_k`, `Q8_0`).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            _ => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2_K => 84,
            GgmlType::Q3_K => 110,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
        }
    }

    /// The dense dtype of F32, F16 and BF16; `None` for the block formats.
    pub fn dense(self) -> Option<DType> {
        match self {
            GgmlType::F32 => Some(DType::F32),
            GgmlType::F16 => Some(DType::F16),
            GgmlType::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// Bytes of a row of `cols` elements (`cols` a multiple of the block size).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_size() * self.block_bytes()
    }

    /// Bits per weight, scales included.
    pub fn bits_per_weight(self) -> f64 {
        8.0 * self.block_bytes() as f64 / self.block_size() as f64
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Q4_K / Q5_K: the 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes
/// (ggml `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q3_K: the 16 6-bit scales (0..64, stored +32) from the 12 packed bytes.
fn scales_q3_k(raw: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 { raw[i] & 0xF } else { raw[i - 8] >> 4 };
        let high = (raw[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = low | (high << 4);
    }
    out
}

/// One block of any format as integers (module docs): the weight of element `i` is
/// `d · scales[i / sub] · w[i] − dmin · mins[i / sub]`.
#[derive(Clone, Debug)]
pub struct IntBlock {
    /// Integer weights [block_size].
    pub w: [i16; QK_K],
    /// Elements per sub-block (16 or 32; the whole block for the 32-element formats).
    pub sub: usize,
    /// Integer scale per sub-block [block_size / sub].
    pub scales: [i16; 16],
    /// Integer min per sub-block [block_size / sub] (zero where the format has none).
    pub mins: [i16; 16],
    pub d: f32,
    pub dmin: f32,
}

impl IntBlock {
    fn new(sub: usize, d: f32, dmin: f32) -> IntBlock {
        IntBlock {
            w: [0; QK_K],
            sub,
            scales: [1; 16],
            mins: [0; 16],
            d,
            dmin,
        }
    }
}

/// Block `b` (its bytes) of type `ty` as integers. F32, F16 and BF16 have no integer view.
#[inline(always)]
pub fn int_block(ty: GgmlType, b: &[u8]) -> IntBlock {
    debug_assert_eq!(b.len(), ty.block_bytes());
    match ty {
        GgmlType::Q4_0 => {
            let mut k = IntBlock::new(32, f16_at(b, 0), 0.0);
            for j in 0..16 {
                k.w[j] = (b[2 + j] & 0xF) as i16 - 8;
                k.w[j + 16] = (b[2 + j] >> 4) as i16 - 8;
            }
            k
        }
        GgmlType::Q4_1 => {
            // d·q + m: a min of −m with integer 1 on the activation sum.
            let mut k = IntBlock::new(32, f16_at(b, 0), -f16_at(b, 2));
            k.mins[0] = 1;
            for j in 0..16 {
                k.w[j] = (b[4 + j] & 0xF) as i16;
                k.w[j + 16] = (b[4 + j] >> 4) as i16;
            }
            k
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let one = ty == GgmlType::Q5_1;
            let (qh_at, qs_at) = if one { (4, 8) } else { (2, 6) };
            let mut k = IntBlock::new(32, f16_at(b, 0), if one { -f16_at(b, 2) } else { 0.0 });
            let qh = u32::from_le_bytes([b[qh_at], b[qh_at + 1], b[qh_at + 2], b[qh_at + 3]]);
            let offset = if one { 0 } else { 16 };
            if one {
                k.mins[0] = 1;
            }
            for j in 0..16 {
                let lo = (b[qs_at + j] & 0xF) as u32 | ((qh >> j) & 1) << 4;
                let hi = (b[qs_at + j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                k.w[j] = lo as i16 - offset;
                k.w[j + 16] = hi as i16 - offset;
            }
            k
        }
        GgmlType::Q8_0 => {
            let mut k = IntBlock::new(32, f16_at(b, 0), 0.0);
            for j in 0..32 {
                k.w[j] = b[2 + j] as i8 as i16;
            }
            k
        }
        GgmlType::Q2_K => {
            // scales[16], qs[64], d, dmin
            let mut k = IntBlock::new(16, f16_at(b, 80), f16_at(b, 82));
            for (j, &s) in b[..16].iter().enumerate() {
                k.scales[j] = (s & 0xF) as i16;
                k.mins[j] = (s >> 4) as i16;
            }
            for h in 0..2 {
                let q = &b[16 + 32 * h..16 + 32 * h + 32];
                for j in 0..4 {
                    for (l, &v) in q.iter().enumerate() {
                        k.w[128 * h + 32 * j + l] = ((v >> (2 * j)) & 3) as i16;
                    }
                }
            }
            k
        }
        GgmlType::Q3_K => {
            // hmask[32], qs[64], scales[12], d
            let mut k = IntBlock::new(16, f16_at(b, 108), 0.0);
            for (j, s) in scales_q3_k(&b[96..108]).iter().enumerate() {
                k.scales[j] = *s as i16 - 32;
            }
            let hm = &b[..32];
            for h in 0..2 {
                let q = &b[32 + 32 * h..32 + 32 * h + 32];
                for j in 0..4 {
                    let bit = 1u8 << (4 * h + j);
                    for l in 0..32 {
                        let low = ((q[l] >> (2 * j)) & 3) as i16;
                        k.w[128 * h + 32 * j + l] = low - if hm[l] & bit != 0 { 0 } else { 4 };
                    }
                }
            }
            k
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            // d, dmin, scales[12], (Q5_K: qh[32]), qs[128]
            let mut k = IntBlock::new(32, f16_at(b, 0), f16_at(b, 2));
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, &b[4..16]);
                k.scales[j] = sc as i16;
                k.mins[j] = m as i16;
            }
            let five = ty == GgmlType::Q5_K;
            let (qh, qs) = if five {
                (&b[16..48], &b[48..176])
            } else {
                (&b[..0], &b[16..144])
            };
            for c in 0..4 {
                for l in 0..32 {
                    let v = qs[32 * c + l];
                    let (mut lo, mut hi) = ((v & 0xF) as i16, (v >> 4) as i16);
                    if five {
                        lo |= (((qh[l] >> (2 * c)) & 1) as i16) << 4;
                        hi |= (((qh[l] >> (2 * c + 1)) & 1) as i16) << 4;
                    }
                    k.w[64 * c + l] = lo;
                    k.w[64 * c + 32 + l] = hi;
                }
            }
            k
        }
        GgmlType::Q6_K => {
            // ql[128], qh[64], scales[16] (int8), d
            let mut k = IntBlock::new(16, f16_at(b, 208), 0.0);
            for j in 0..16 {
                k.scales[j] = b[192 + j] as i8 as i16;
            }
            for h in 0..2 {
                let (ql, qh) = (&b[64 * h..64 * h + 64], &b[128 + 32 * h..128 + 32 * h + 32]);
                for l in 0..32 {
                    let q = |low: u8, shift: u32| (low as i16 | (((qh[l] >> shift) & 3) as i16) << 4) - 32;
                    k.w[128 * h + l] = q(ql[l] & 0xF, 0);
                    k.w[128 * h + 32 + l] = q(ql[l + 32] & 0xF, 2);
                    k.w[128 * h + 64 + l] = q(ql[l] >> 4, 4);
                    k.w[128 * h + 96 + l] = q(ql[l + 32] >> 4, 6);
                }
            }
            k
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            unreachable!("int_block: {} is not a block format", ty.name())
        }
    }
}

/// Dequantizes a row (whole blocks of `ty`) into `out` [elements], as ggml's
/// `dequantize_row_*` computes it in f32: `(d·sc)·q − dmin·m`.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    dequantize_row_inline(ty, bytes, out)
}

/// [`dequantize_row`], inlined into the kernels that compile it for wider instruction sets.
#[inline(always)]
pub(crate) fn dequantize_row_inline(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        bytes.len(),
        ty.row_bytes(out.len()),
        "dequantize_row: {} bytes",
        ty.name()
    );
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        // The 32-element formats directly (the integer view's 256-wide arrays would cost more
        // than the arithmetic).
        GgmlType::Q8_0 => {
            for (b, o) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                for (v, &q) in o.iter_mut().zip(&b[2..34]) {
                    *v = (q as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_0 => dequantize_nibbles::<false, false>(bytes, out),
        GgmlType::Q4_1 => dequantize_nibbles::<true, false>(bytes, out),
        GgmlType::Q5_0 => dequantize_nibbles::<false, true>(bytes, out),
        GgmlType::Q5_1 => dequantize_nibbles::<true, true>(bytes, out),
        _ => {
            let n = ty.block_size();
            for (b, o) in bytes.chunks_exact(ty.block_bytes()).zip(out.chunks_exact_mut(n)) {
                let k = int_block(ty, b);
                for (j, (o, w)) in o.chunks_exact_mut(k.sub).zip(k.w.chunks_exact(k.sub)).enumerate() {
                    // The order of ggml's f32 arithmetic: scale first, then the weight.
                    let dl = k.d * k.scales[j] as f32;
                    let ml = k.dmin * k.mins[j] as f32;
                    for (v, &w) in o.iter_mut().zip(w) {
                        *v = dl * w as f32 - ml;
                    }
                }
            }
        }
    }
}

/// Q4_0 / Q4_1 / Q5_0 / Q5_1 rows: `(q − offset)·d (+ m)`.
#[inline(always)]
fn dequantize_nibbles<const MIN: bool, const FIVE: bool>(bytes: &[u8], out: &mut [f32]) {
    let bb = 18 + 2 * MIN as usize + 4 * FIVE as usize;
    let qs_at = bb - 16;
    let offset = if MIN {
        0
    } else if FIVE {
        16
    } else {
        8
    };
    for (b, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let m = if MIN { f16_at(b, 2) } else { 0.0 };
        let qh = if FIVE {
            u32::from_le_bytes([b[qs_at - 4], b[qs_at - 3], b[qs_at - 2], b[qs_at - 1]])
        } else {
            0
        };
        let (lo, hi) = o.split_at_mut(16);
        for (j, &q) in b[qs_at..qs_at + 16].iter().enumerate() {
            let (mut a, mut c) = ((q & 0xF) as i32, (q >> 4) as i32);
            if FIVE {
                a |= (((qh >> j) & 1) << 4) as i32;
                c |= (((qh >> (j + 16)) & 1) << 4) as i32;
            }
            lo[j] = (a - offset) as f32 * d + m;
            hi[j] = (c - offset) as f32 * d + m;
        }
    }
}

/// An activation row rounded to int16, one scale per block of the weights' format.
#[derive(Clone, Debug, Default)]
pub struct Activation16 {
    /// Elements per scale (the weight format's block size).
    pub block: usize,
    /// The integers [n].
    pub q: Vec<i16>,
    /// `max|x| / 32767` per block [n / block].
    pub scales: Vec<f32>,
    /// Σ q per 16 elements [n / 16] (for the formats' min and offset terms).
    pub sums16: Vec<i32>,
    /// Σ q per 32 elements [n / 32].
    pub sums32: Vec<i32>,
}

impl Activation16 {
    /// Rounds `x` (its length a multiple of `block`) per block of `block` elements, ties to
    /// even; the dequantized values `q · scale` go to `x_hat`.
    pub fn new(x: &[f32], block: usize, x_hat: &mut Vec<f32>) -> Activation16 {
        let mut a = Activation16 {
            block,
            q: Vec::with_capacity(x.len()),
            scales: Vec::new(),
            sums16: Vec::new(),
            sums32: Vec::new(),
        };
        super::quant::round_activation_by(x, block, 32767.0, |i| a.q.push(i as i16), &mut a.scales, x_hat);
        a.sums16 =
            a.q.chunks(16)
                .map(|c| c.iter().map(|&v| v as i32).sum())
                .collect();
        a.sums32 = a.sums16.chunks(2).map(|p| p.iter().sum()).collect();
        a
    }
}

/// The scalar product of one row of `ty` (whole blocks) with the rounded activation: per
/// block, `s · (d · Σ_j sc_j Σ w·q − dmin · Σ_j m_j Σ q)`, the integer sums exact (i64).
pub fn dot_row(ty: GgmlType, row: &[u8], a: &Activation16) -> f32 {
    dot_row_inline(ty, row, a)
}

/// [`dot_row`], inlined into the kernels that compile it for wider instruction sets.
#[inline(always)]
pub(crate) fn dot_row_inline(ty: GgmlType, row: &[u8], a: &Activation16) -> f32 {
    let n = ty.block_size();
    debug_assert_eq!(a.block, n);
    let mut acc = 0f32;
    for (bi, b) in row.chunks_exact(ty.block_bytes()).enumerate() {
        let k = int_block(ty, b);
        let xq = &a.q[bi * n..(bi + 1) * n];
        let (mut dot, mut min) = (0i64, 0i64);
        for (j, (w, x)) in k.w[..n].chunks(k.sub).zip(xq.chunks(k.sub)).enumerate() {
            // |w| ≤ 128 and |x| ≤ 32767 over at most 32 elements: the sum fits an i32.
            let part: i32 = w.iter().zip(x).map(|(&w, &x)| w as i32 * x as i32).sum();
            dot += k.scales[j] as i64 * part as i64;
            let first16 = (bi * n + j * k.sub) / 16;
            let sum: i64 = a.sums16[first16..first16 + k.sub / 16]
                .iter()
                .map(|&s| s as i64)
                .sum();
            min += k.mins[j] as i64 * sum;
        }
        acc += a.scales[bi] * (k.d * dot as f32 - k.dmin * min as f32);
    }
    acc
}

/// A row-major `[rows, cols]` matrix of one block format, over a GGUF file's bytes.
pub struct GgmlMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    bytes: Bytes,
}

impl std::fmt::Debug for GgmlMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GgmlMatrix({}, [{}, {}])", self.ty, self.rows, self.cols)
    }
}

impl GgmlMatrix {
    /// A matrix over `len` bytes of `map` at `start` (checked to be exactly the matrix).
    pub fn from_mmap(
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
        ty: GgmlType,
        rows: usize,
        cols: usize,
    ) -> Result<GgmlMatrix> {
        if ty.dense().is_some() {
            bail!("{} is not a block format", ty.name());
        }
        if !cols.is_multiple_of(ty.block_size()) || rows.checked_mul(ty.row_bytes(cols)) != Some(len) {
            bail!(
                "{len} bytes do not hold a {} matrix of shape [{rows}, {cols}]",
                ty.name()
            );
        }
        if start.checked_add(len).is_none_or(|end| end > map.len()) {
            bail!("byte range {start}..{} is past the end of the file", start + len);
        }
        Ok(GgmlMatrix {
            ty,
            rows,
            cols,
            bytes: Bytes::Mapped { map, start, len },
        })
    }

    /// A matrix owning a copy of `raw`.
    pub fn from_bytes(raw: &[u8], ty: GgmlType, rows: usize, cols: usize) -> Result<GgmlMatrix> {
        if ty.dense().is_some()
            || !cols.is_multiple_of(ty.block_size())
            || raw.len() != rows * ty.row_bytes(cols)
        {
            bail!(
                "{} bytes do not hold a {} matrix of shape [{rows}, {cols}]",
                raw.len(),
                ty.name()
            );
        }
        Ok(GgmlMatrix {
            ty,
            rows,
            cols,
            bytes: Bytes::copy_of(raw),
        })
    }

    /// Quantizes a 2-D tensor to `ty` by round-to-nearest ([`quantize_row`]): for timing the
    /// formats at real shapes and for tests, not for making model files (llama.cpp's quantizer
    /// searches for better scales).
    pub fn quantize(t: &Tensor, ty: GgmlType) -> GgmlMatrix {
        let (rows, cols) = (t.shape()[0], t.shape()[1]);
        assert!(
            cols.is_multiple_of(ty.block_size()),
            "quantize: {cols} columns for {}",
            ty.name()
        );
        let rb = ty.row_bytes(cols);
        let mut raw = vec![0u8; rows * rb];
        let data = t.data();
        raw.par_chunks_mut(rb.max(1)).enumerate().for_each_init(
            || vec![0f32; cols],
            |row, (r, out)| {
                data.row_to_f32(r * cols, row);
                quantize_row(ty, row, out);
            },
        );
        GgmlMatrix {
            ty,
            rows,
            cols,
            bytes: Bytes::copy_of(&raw),
        }
    }

    /// The format.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of storage.
    pub fn nbytes(&self) -> usize {
        self.rows * self.ty.row_bytes(self.cols)
    }

    /// All rows' bytes.
    pub fn raw(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Row `r`'s blocks.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.ty.row_bytes(self.cols);
        &self.raw()[r * rb..(r + 1) * rb]
    }

    /// Row `r` dequantized into `out` [cols].
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        dequantize_row(self.ty, self.row(r), out);
    }

    /// The matrix with its rows reordered: row `r` of the result is row `source(r)` of this
    /// one (a lossless move of whole rows; the blocks are untouched).
    pub fn permute_rows(&self, source: impl Fn(usize) -> usize) -> GgmlMatrix {
        let mut raw = Vec::with_capacity(self.nbytes());
        for r in 0..self.rows {
            raw.extend_from_slice(self.row(source(r)));
        }
        GgmlMatrix {
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            bytes: Bytes::copy_of(&raw),
        }
    }

    /// The whole matrix dequantized and rounded to f16 (for devices without the block kernels).
    pub fn to_f16_tensor(&self) -> Tensor {
        let mut out = vec![f16::ZERO; self.rows * self.cols];
        out.par_chunks_mut(self.cols.max(1)).enumerate().for_each_init(
            || vec![0f32; self.cols],
            |row, (r, o)| {
                self.row_to_f32(r, row);
                for (h, &v) in o.iter_mut().zip(row.iter()) {
                    *h = f16::from_f32(v);
                }
            },
        );
        Tensor::from_bytes(bytemuck::cast_slice(&out), DType::F16, vec![self.rows, self.cols])
    }
}

/// Round-to-nearest quantization of `x` [whole blocks] into `out` [row bytes] (see
/// [`GgmlMatrix::quantize`]). Scales follow ggml's reference quantizers where those are plain
/// (`quantize_row_q4_0_ref` and its kin); the k-quants take each sub-block's range as its
/// scale and min, without ggml's search.
pub fn quantize_row(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    assert_eq!(out.len(), ty.row_bytes(x.len()));
    let put16 = |o: &mut [u8], at: usize, v: f32| {
        o[at..at + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes())
    };
    let n = ty.block_size();
    let bb = ty.block_bytes();
    match ty {
        GgmlType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
            return;
        }
        GgmlType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
            return;
        }
        GgmlType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
            }
            return;
        }
        _ => {}
    }
    // The signed value of largest magnitude (ggml's `max` in the symmetric formats).
    let signed_max = |v: &[f32]| v.iter().fold(0f32, |m, &a| if a.abs() > m.abs() { a } else { m });
    let range = |v: &[f32]| {
        let lo = v.iter().fold(f32::INFINITY, |m, &a| m.min(a));
        let hi = v.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a));
        (lo, hi)
    };
    let inv = |d: f32| if d != 0.0 { 1.0 / d } else { 0.0 };
    for (xb, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(bb)) {
        o.fill(0);
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 => {
                let five = ty == GgmlType::Q5_0;
                let (half_range, top) = if five { (-16.0, 31) } else { (-8.0, 15) };
                let d = signed_max(xb) / half_range;
                put16(o, 0, d);
                let id = inv(f16::from_f32(d).to_f32());
                let q = |v: f32| ((v * id - half_range + 0.5) as i32).clamp(0, top) as u32;
                let qs_at = if five { 6 } else { 2 };
                let mut qh = 0u32;
                for j in 0..16 {
                    let (a, b) = (q(xb[j]), q(xb[j + 16]));
                    o[qs_at + j] = (a & 0xF) as u8 | ((b & 0xF) as u8) << 4;
                    qh |= ((a >> 4) & 1) << j | ((b >> 4) & 1) << (j + 16);
                }
                if five {
                    o[2..6].copy_from_slice(&qh.to_le_bytes());
                }
            }
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                let five = ty == GgmlType::Q5_1;
                let top = if five { 31.0 } else { 15.0 };
                let (lo, hi) = range(xb);
                let d = (hi - lo) / top;
                put16(o, 0, d);
                put16(o, 2, lo);
                let (id, m) = (inv(f16::from_f32(d).to_f32()), f16::from_f32(lo).to_f32());
                let q = |v: f32| ((v - m) * id + 0.5).clamp(0.0, top) as u32;
                let qs_at = if five { 8 } else { 4 };
                let mut qh = 0u32;
                for j in 0..16 {
                    let (a, b) = (q(xb[j]), q(xb[j + 16]));
                    o[qs_at + j] = (a & 0xF) as u8 | ((b & 0xF) as u8) << 4;
                    qh |= ((a >> 4) & 1) << j | ((b >> 4) & 1) << (j + 16);
                }
                if five {
                    o[4..8].copy_from_slice(&qh.to_le_bytes());
                }
            }
            GgmlType::Q8_0 => {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                put16(o, 0, d);
                let id = inv(f16::from_f32(d).to_f32());
                for j in 0..32 {
                    o[2 + j] = (xb[j] * id).round().clamp(-127.0, 127.0) as i8 as u8;
                }
            }
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q2_K => {
                // Unsigned q with per-sub-block scale and min: w = d·sc·q − dmin·m.
                let (sub, top, sc_max) = match ty {
                    GgmlType::Q4_K => (32, 15.0, 63.0),
                    GgmlType::Q5_K => (32, 31.0, 63.0),
                    _ => (16, 3.0, 15.0),
                };
                let subs = QK_K / sub;
                let mut scale = [0f32; 16];
                let mut min = [0f32; 16];
                for j in 0..subs {
                    let (lo, hi) = range(&xb[j * sub..(j + 1) * sub]);
                    let lo = lo.min(0.0);
                    scale[j] = (hi - lo) / top;
                    min[j] = -lo;
                }
                let d = scale[..subs].iter().fold(0f32, |m, &v| m.max(v)) / sc_max;
                let dmin = min[..subs].iter().fold(0f32, |m, &v| m.max(v)) / sc_max;
                let (d16, dmin16) = (f16::from_f32(d).to_f32(), f16::from_f32(dmin).to_f32());
                let mut sc = [0u8; 16];
                let mut mq = [0u8; 16];
                for j in 0..subs {
                    sc[j] = (scale[j] * inv(d16)).round().clamp(0.0, sc_max) as u8;
                    mq[j] = (min[j] * inv(dmin16)).round().clamp(0.0, sc_max) as u8;
                }
                let q = |j: usize, v: f32| {
                    let step = d16 * sc[j] as f32;
                    ((v + dmin16 * mq[j] as f32) * inv(step)).round().clamp(0.0, top) as u8
                };
                match ty {
                    GgmlType::Q2_K => {
                        for j in 0..16 {
                            o[j] = sc[j] | mq[j] << 4;
                        }
                        for (i, &v) in xb.iter().enumerate() {
                            let (h, rest) = (i / 128, i % 128);
                            let (shift, l) = (rest / 32, rest % 32);
                            o[16 + 32 * h + l] |= q(i / 16, v) << (2 * shift);
                        }
                        put16(o, 80, d);
                        put16(o, 82, dmin);
                    }
                    _ => {
                        put16(o, 0, d);
                        put16(o, 2, dmin);
                        for j in 0..4 {
                            o[4 + j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
                            o[8 + j] = (mq[j] & 63) | ((mq[j + 4] >> 4) << 6);
                            o[12 + j] = (sc[j + 4] & 0xF) | ((mq[j + 4] & 0xF) << 4);
                        }
                        let five = ty == GgmlType::Q5_K;
                        let qs_at = if five { 48 } else { 16 };
                        for c in 0..4 {
                            for l in 0..32 {
                                let (lo, hi) = (q(2 * c, xb[64 * c + l]), q(2 * c + 1, xb[64 * c + 32 + l]));
                                o[qs_at + 32 * c + l] = (lo & 0xF) | (hi & 0xF) << 4;
                                if five {
                                    o[16 + l] |= ((lo >> 4) & 1) << (2 * c) | ((hi >> 4) & 1) << (2 * c + 1);
                                }
                            }
                        }
                    }
                }
            }
            GgmlType::Q3_K | GgmlType::Q6_K => {
                // Signed q with a signed per-16 scale: w = d·sc·q.
                let six = ty == GgmlType::Q6_K;
                let (lo_q, hi_q, sc_lim) = if six { (-32, 31, 127.0) } else { (-4, 3, 31.0) };
                let mut scale = [0f32; 16];
                for (j, s) in scale.iter_mut().enumerate() {
                    *s = signed_max(&xb[16 * j..16 * j + 16]) / lo_q as f32;
                }
                let big = signed_max(&scale);
                let d = big / -sc_lim;
                let d16 = f16::from_f32(d).to_f32();
                let mut sc = [0i32; 16];
                for j in 0..16 {
                    sc[j] = (scale[j] * inv(d16)).round().clamp(-sc_lim - 1.0, sc_lim) as i32;
                }
                let q = |i: usize| {
                    let step = d16 * sc[i / 16] as f32;
                    (xb[i] * inv(step)).round().clamp(lo_q as f32, hi_q as f32) as i32
                };
                if six {
                    for i in 0..QK_K {
                        let v = (q(i) + 32) as u8;
                        let (h, rest) = (i / 128, i % 128);
                        let (part, l) = (rest / 32, rest % 32);
                        let ql_at = 64 * h + l + if part % 2 == 1 { 32 } else { 0 };
                        o[ql_at] |= if part < 2 { v & 0xF } else { (v & 0xF) << 4 };
                        o[128 + 32 * h + l] |= (v >> 4) << (2 * part);
                    }
                    for j in 0..16 {
                        o[192 + j] = sc[j] as i8 as u8;
                    }
                    put16(o, 208, d);
                } else {
                    let stored: Vec<u8> = sc.iter().map(|&s| (s + 32) as u8).collect();
                    for i in 0..16 {
                        if i < 8 {
                            o[96 + i] |= stored[i] & 0xF;
                        } else {
                            o[96 + i - 8] |= (stored[i] & 0xF) << 4;
                        }
                        o[96 + 8 + i % 4] |= (stored[i] >> 4) << (2 * (i / 4));
                    }
                    for i in 0..QK_K {
                        let v = q(i) + 4; // 0..8: low two bits, and the high bit set when ≥ 4
                        let (h, rest) = (i / 128, i % 128);
                        let (j, l) = (rest / 32, rest % 32);
                        o[32 + 32 * h + l] |= ((v & 3) as u8) << (2 * j);
                        if v >= 4 {
                            o[l] |= 1 << (4 * h + j);
                        }
                    }
                    put16(o, 108, d);
                }
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::tests::pseudo;

    #[test]
    fn type_ids_names_and_sizes_agree_with_ggml() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()).unwrap(), t);
            assert_eq!(GgmlType::from_name(&t.name().to_lowercase()), Some(t));
        }
        assert!((GgmlType::Q4_K.bits_per_weight() - 4.5).abs() < 1e-9);
        assert!((GgmlType::Q6_K.bits_per_weight() - 6.5625).abs() < 1e-9);
        let msg = format!("{:#}", GgmlType::from_id(23).unwrap_err());
        assert!(msg.contains("IQ4_XS"), "{msg}");
        assert!(format!("{:#}", GgmlType::from_id(77).unwrap_err()).contains("77"));
    }

    /// Round-to-nearest quantization lands within one step of every weight, and the integer
    /// view, the dequantization and the product agree.
    #[test]
    fn quantize_dequantize_and_the_integer_product_agree() {
        let cols = 512;
        let x = pseudo(cols, 3);
        let act = pseudo(cols, 9);
        for ty in GgmlType::QUANTIZED {
            let mut raw = vec![0u8; ty.row_bytes(cols)];
            quantize_row(ty, &x, &mut raw);
            let mut back = vec![0f32; cols];
            dequantize_row(ty, &raw, &mut back);
            let bits = ty.bits_per_weight();
            // Each weight is within about one quantization step of a [-1, 1] range.
            let step = 2.0 / 2f32.powf((bits - 1.0).floor() as f32 - 0.5);
            let worst = x
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= step, "{ty}: worst error {worst} against step {step}");

            let mut x_hat = Vec::new();
            let a = Activation16::new(&act, ty.block_size(), &mut x_hat);
            let exact: f64 = back.iter().zip(&x_hat).map(|(&w, &v)| w as f64 * v as f64).sum();
            let got = dot_row(ty, &raw, &a) as f64;
            let scale: f64 = back
                .iter()
                .zip(&x_hat)
                .map(|(&w, &v)| (w as f64 * v as f64).abs())
                .sum();
            assert!((got - exact).abs() <= 1e-5 * scale, "{ty}: {got} vs {exact}");
        }
    }

    #[test]
    fn the_activation_rounds_per_block_within_half_a_step() {
        let x: Vec<f32> = pseudo(512, 5)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1 + i / 256 * 100) as f32)
            .collect();
        for block in [32, 256] {
            let mut x_hat = Vec::new();
            let a = Activation16::new(&x, block, &mut x_hat);
            assert_eq!(a.scales.len(), 512 / block);
            for (i, (&v, &h)) in x.iter().zip(&x_hat).enumerate() {
                let s = a.scales[i / block];
                assert!(
                    (v - h).abs() <= 0.5 * s * (1.0 + 1e-5),
                    "block {block} element {i}"
                );
                assert_eq!(h, a.q[i] as f32 * s);
            }
            for (j, &s) in a.sums16.iter().enumerate() {
                assert_eq!(s, a.q[16 * j..16 * j + 16].iter().map(|&v| v as i32).sum::<i32>());
            }
        }
    }
}
