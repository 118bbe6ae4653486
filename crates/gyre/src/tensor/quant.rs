//! Quantized weight matrices, made at load time from a stored-dtype [`Tensor`].
//!
//! Both formats split each row into groups of [`GROUP`] columns with one f16 scale per group
//! (the scale `max|w| / qmax` rounded to f16, as llama.cpp's Q8_0/Q4_0 store it; values are
//! rounded against that rounded scale) and round to nearest (half away from zero); products
//! dequantize in registers and accumulate in f32.
//!
//! - **Q8**: `s = max|w| / 127`, values `q = round(w / s)` as int8 (one byte each):
//!   1.0625 bytes per weight, as Q8_0.
//! - **Q4**: `s = max|w| / 7`, values `q = round(w / s) ∈ [−7, 7]` stored as `q + 8` in a
//!   nibble; byte j of a group holds element j in its low nibble and element j + 16 in its
//!   high nibble: 0.5625 bytes per weight, as Q4_0.
//!
//! Both are stored by tiles of [`TILE`] rows, so a kernel reading eight rows at once reads
//! each tile as two sequential streams (values, scales) instead of sixteen short ones:
//! - scales group-major within a tile (`[tile][group][row in tile]`);
//! - values in 64-byte blocks, row-interleaved: a full tile holds block 0 of rows 0–7, then
//!   block 1 of rows 0–7, …, then each row's bytes past its last whole block, row by row
//!   ([`tile_value_offset`]). Rows of a last partial tile stay row-major. (llama.cpp's
//!   "repack" of Q8_0/Q4_0 interleaves rows for the same reason.)
//!
//! Quantized matrices multiply a rounded activation, so that decode can use integer dot
//! products (AVX-512 VNNI), which on the project's machine keep up with the memory stream
//! where the f32 kernels, widening every weight, were compute-bound:
//! - a Q8 matrix multiplies the activation rounded to int16 per group of 32
//!   ([`quantize_activation_i16`]; `vpdpwssd`): an error of at most 1/65534 of the group's
//!   largest activation, far below the weights' own 1/254;
//! - a Q4 matrix multiplies it rounded to int8 ([`quantize_activation`], as llama.cpp does
//!   for Q4_0 and Q8_0; `vpdpbusd`).
//!
//! Every path (decode, prefill, batched, SIMD or portable) sees the same rounded activation
//! ([`Quant::rounded_activation`]); prefill and decode still differ where a value sitting
//! on a rounding boundary is computed 1e-6 apart by the two paths and rounds the other way:
//! a step of 1/32767 of the group's range for Q8 (below the stored dtypes' own prefill
//! differences), 1/127 for Q4 (tests/quant.rs bounds both).

use std::sync::Arc;

use rayon::prelude::*;

use super::{Bytes, GgmlMatrix, Tensor};

/// Columns per scale.
pub const GROUP: usize = 32;

/// Rows whose scales are stored together (the decode kernels' row count).
pub const TILE: usize = 8;

/// Quantization applied to weight matrices at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    /// Group-wise int8 (see the module docs).
    Q8,
    /// Group-wise 4-bit (see the module docs).
    Q4,
}

impl Quant {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Quant::Q8 => "q8",
            Quant::Q4 => "q4",
        }
    }

    /// Largest quantized magnitude.
    fn qmax(self) -> f32 {
        match self {
            Quant::Q8 => 127.0,
            Quant::Q4 => 7.0,
        }
    }

    /// Bytes of values (without scales) for a row of `cols` columns.
    pub fn value_bytes(self, cols: usize) -> usize {
        match self {
            Quant::Q8 => cols,
            Quant::Q4 => cols.div_ceil(GROUP) * GROUP / 2,
        }
    }

    /// Bytes of a quantized R×C matrix, scales included.
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> usize {
        rows * (self.value_bytes(cols) + 2 * cols.div_ceil(GROUP))
    }

    /// The stored scale for a group whose largest magnitude is `amax`: `amax / qmax` rounded
    /// to f16 (saturating at f16's largest finite value).
    fn scale_for(self, amax: f32) -> half::f16 {
        half::f16::from_f32((amax / self.qmax()).min(f32::from(half::f16::MAX)))
    }
}

/// Rounds `x` per group of [`GROUP`] to integers in `[−qmax, qmax]` (scale `max|x| / qmax`,
/// ties to even), handing each integer to `push` and writing the scales [⌈n/32⌉] to `scales`
/// and the dequantized values `q · scale` to `x_hat`.
fn round_activation(
    x: &[f32],
    qmax: f32,
    push: impl FnMut(f32),
    scales: &mut Vec<f32>,
    x_hat: &mut Vec<f32>,
) {
    round_activation_by(x, GROUP, qmax, push, scales, x_hat);
}

/// As [`round_activation`] with groups of `group` elements (the GGUF formats' blocks).
pub(crate) fn round_activation_by(
    x: &[f32],
    group: usize,
    qmax: f32,
    mut push: impl FnMut(f32),
    scales: &mut Vec<f32>,
    x_hat: &mut Vec<f32>,
) {
    scales.clear();
    x_hat.clear();
    for g in x.chunks(group) {
        let amax = g.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / qmax;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        scales.push(scale);
        for &v in g {
            // Adding and removing 1.5·2²³ rounds to the nearest integer, ties to even, for
            // |v·inv| ≤ 2²² (what `round_ties_even` does, but it vectorises on baseline x86-64,
            // where `round_ties_even` is a libm call per element).
            const MAGIC: f32 = 12_582_912.0;
            let i = ((v * inv).clamp(-qmax, qmax) + MAGIC) - MAGIC;
            push(i);
            x_hat.push(i * scale);
        }
    }
}

/// Rounds `x` to int8 per group of [`GROUP`] (scale `max|x| / 127`, ties to even), writing
/// the ints to `q`, the scales to `scales` [⌈n/32⌉] and the dequantized values `q · scale` —
/// the activation every Q4 product uses — to `x_hat`.
pub fn quantize_activation(x: &[f32], q: &mut Vec<i8>, scales: &mut Vec<f32>, x_hat: &mut Vec<f32>) {
    q.clear();
    round_activation(x, 127.0, |i| q.push(i as i8), scales, x_hat);
}

/// As [`quantize_activation`] with int16 (scale `max|x| / 32767`): the activation every Q8
/// product uses.
pub fn quantize_activation_i16(x: &[f32], q: &mut Vec<i16>, scales: &mut Vec<f32>, x_hat: &mut Vec<f32>) {
    q.clear();
    round_activation(x, 32767.0, |i| q.push(i as i16), scales, x_hat);
}

impl Quant {
    /// The activation a matrix of this format multiplies, `x` rounded per group of 32
    /// (int16 for Q8, int8 for Q4), into `x_hat`.
    pub fn rounded_activation(self, x: &[f32], x_hat: &mut Vec<f32>) {
        let qmax = match self {
            Quant::Q8 => 32767.0,
            Quant::Q4 => 127.0,
        };
        round_activation(x, qmax, |_| {}, &mut Vec::new(), x_hat);
    }
}

/// Bytes per interleaved block of one row.
pub const BLOCK_BYTES: usize = 64;

/// Offset of byte `j` of row `r` (0 ≤ r < TILE) within a full tile whose rows have `vpr`
/// value bytes each (layout in the module docs).
#[inline]
pub fn tile_value_offset(vpr: usize, r: usize, j: usize) -> usize {
    let blocks = vpr / BLOCK_BYTES;
    if j < blocks * BLOCK_BYTES {
        (j / BLOCK_BYTES * TILE + r) * BLOCK_BYTES + j % BLOCK_BYTES
    } else {
        let rem = vpr - blocks * BLOCK_BYTES;
        blocks * BLOCK_BYTES * TILE + r * rem + (j - blocks * BLOCK_BYTES)
    }
}

/// Row-major values [rows, vpr] with every full tile rearranged as [`tile_value_offset`] says.
fn interleaved(values: &[u8], rows: usize, vpr: usize) -> Vec<u8> {
    let mut out = values.to_vec();
    for first in (0..rows / TILE * TILE).step_by(TILE) {
        let tile = &mut out[first * vpr..(first + TILE) * vpr];
        for r in 0..TILE {
            for (j, &b) in values[(first + r) * vpr..(first + r + 1) * vpr]
                .iter()
                .enumerate()
            {
                tile[tile_value_offset(vpr, r, j)] = b;
            }
        }
    }
    out
}

/// Row-major scales [rows, gpr] rearranged into tiles of [`TILE`] rows, group-major inside
/// each tile (the last tile may have fewer rows).
fn tiled(scales: &[u16], rows: usize, gpr: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(scales.len());
    for first in (0..rows).step_by(TILE) {
        let tile_rows = TILE.min(rows - first);
        for g in 0..gpr {
            out.extend((first..first + tile_rows).map(|r| scales[r * gpr + g]));
        }
    }
    out
}

/// A row-major R×C matrix in one of the [`Quant`] formats.
pub struct QMatrix {
    quant: Quant,
    rows: usize,
    cols: usize,
    /// ⌈cols/32⌉ f16 scales (raw bits) per row, in tiles (module docs); huge-page memory
    /// when large, like owned tensors
    scales: Bytes,
    /// [rows, value_bytes(cols)] quantized values
    values: Bytes,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QMatrix({}, [{}, {}])",
            self.quant.name(),
            self.rows,
            self.cols
        )
    }
}

impl QMatrix {
    /// Quantizes a 2-D tensor, row by row in parallel.
    pub fn quantize(t: &Tensor, quant: Quant) -> QMatrix {
        let (rows, cols) = (t.shape()[0], t.shape()[1]);
        let (gpr, vpr) = (cols.div_ceil(GROUP), quant.value_bytes(cols));
        let mut scales = vec![0u16; rows * gpr];
        let mut values = vec![0u8; rows * vpr];
        let data = t.data();
        values
            .par_chunks_mut(vpr.max(1))
            .zip(scales.par_chunks_mut(gpr.max(1)))
            .enumerate()
            .for_each_init(
                || vec![0f32; cols],
                |row, (r, (v, s))| {
                    data.row_to_f32(r * cols, row);
                    for (g, wg) in row.chunks(GROUP).enumerate() {
                        let amax = wg.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let stored = quant.scale_for(amax);
                        let scale = stored.to_f32();
                        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                        s[g] = stored.to_bits();
                        let q = |w: f32| (w * inv).round().clamp(-quant.qmax(), quant.qmax()) as i32;
                        match quant {
                            Quant::Q8 => {
                                for (j, &w) in wg.iter().enumerate() {
                                    v[g * GROUP + j] = q(w) as i8 as u8;
                                }
                            }
                            Quant::Q4 => {
                                let bytes = &mut v[g * GROUP / 2..(g + 1) * GROUP / 2];
                                for (j, &w) in wg.iter().enumerate() {
                                    let nib = (q(w) + 8) as u8;
                                    bytes[j % 16] |= if j < 16 { nib } else { nib << 4 };
                                }
                                // Missing elements of a partial group decode to 0 (nibble 8).
                                for j in wg.len()..GROUP {
                                    bytes[j % 16] |= if j < 16 { 8 } else { 8 << 4 };
                                }
                            }
                        }
                    }
                },
            );
        QMatrix {
            quant,
            rows,
            cols,
            scales: Bytes::copy_of(bytemuck::cast_slice(&tiled(&scales, rows, gpr))),
            values: Bytes::copy_of(&interleaved(&values, rows, vpr)),
        }
    }

    /// The format.
    pub fn quant(&self) -> Quant {
        self.quant
    }

    fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(GROUP)
    }

    /// Rows (output features).
    pub fn rows_len(&self) -> usize {
        self.rows
    }

    /// Index of row `r`'s scale for group `g` in the tiled layout.
    fn scale_index(&self, r: usize, g: usize) -> usize {
        let first = r / TILE * TILE;
        let tile_rows = TILE.min(self.rows - first);
        first * self.groups_per_row() + g * tile_rows + (r - first)
    }

    /// The tiled scales as raw f16 bits.
    fn scale_bits(&self) -> &[u16] {
        bytemuck::cast_slice(self.scales.as_slice())
    }

    /// Row `r`'s scale for group `g`.
    pub fn scale(&self, r: usize, g: usize) -> f32 {
        half::f16::from_bits(self.scale_bits()[self.scale_index(r, g)]).to_f32()
    }

    /// Row `r`'s scales [⌈cols/32⌉], gathered from the tiled layout into `out`.
    pub fn row_scales(&self, r: usize, out: &mut Vec<f32>) {
        out.clear();
        out.extend((0..self.groups_per_row()).map(|g| self.scale(r, g)));
    }

    /// Row `r`'s value bytes as `(first byte index, bytes)` pieces in row order: its whole
    /// 64-byte blocks then its remainder when it lies in a full tile, else one piece.
    fn row_pieces(&self, r: usize) -> impl Iterator<Item = (usize, &[u8])> {
        let vpr = self.quant.value_bytes(self.cols);
        let first = r / TILE * TILE;
        let all = self.values.as_slice();
        let tiled = first + TILE <= self.rows;
        let (blocks, base, in_tile) = match tiled {
            true => (vpr / BLOCK_BYTES, first * vpr, r - first),
            false => (0, r * vpr, 0),
        };
        let rem = vpr - blocks * BLOCK_BYTES;
        let rem_at = base + blocks * BLOCK_BYTES * TILE + in_tile * rem;
        (0..blocks)
            .map(move |k| {
                let at = base + (k * TILE + in_tile) * BLOCK_BYTES;
                (k * BLOCK_BYTES, &all[at..at + BLOCK_BYTES])
            })
            .chain(std::iter::once((
                blocks * BLOCK_BYTES,
                &all[rem_at..rem_at + rem],
            )))
    }

    /// Value bytes of row `r` (row-major), gathered from the tiled layout into `out`.
    pub fn row_values(&self, r: usize, out: &mut Vec<u8>) {
        out.clear();
        for (_, piece) in self.row_pieces(r) {
            out.extend_from_slice(piece);
        }
    }

    /// The full tile of [`TILE`] rows starting at `first` (a multiple of `TILE`, with
    /// `first + TILE <= rows`): its scales `[group][row]` (f16 bits) and its value bytes
    /// (interleaved, see [`tile_value_offset`]).
    pub fn tile(&self, first: usize) -> (&[u16], &[u8]) {
        assert!(
            first.is_multiple_of(TILE) && first + TILE <= self.rows,
            "QMatrix::tile({first})"
        );
        let (gpr, vpr) = (self.groups_per_row(), self.quant.value_bytes(self.cols));
        (
            &self.scale_bits()[first * gpr..(first + TILE) * gpr],
            &self.values.as_slice()[first * vpr..(first + TILE) * vpr],
        )
    }

    /// Row `r` dequantized into `out` [cols].
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let first = r / TILE * TILE;
        let tile_rows = TILE.min(self.rows - first);
        // Row r's scale for group g sits at (r − first) + g · tile_rows of its tile.
        let row_scales = (
            &self.scale_bits()[first * self.groups_per_row()..],
            r - first,
            tile_rows,
        );
        for (start, piece) in self.row_pieces(r) {
            self.dequantize(row_scales, start, piece, out);
        }
    }

    /// Dequantizes a row's value bytes `start .. start + bytes.len()` (whole groups) into the
    /// columns of `out` they hold; `(tile_scales, base, stride)` locate the row's scales.
    fn dequantize(
        &self,
        (tile_scales, base, stride): (&[u16], usize, usize),
        start: usize,
        bytes: &[u8],
        out: &mut [f32],
    ) {
        let group_bytes = self.quant.value_bytes(GROUP);
        for (i, b) in bytes.chunks(group_bytes).enumerate() {
            let g = start / group_bytes + i;
            let s = half::f16::from_bits(tile_scales[base + g * stride]).to_f32();
            let cols = &mut out[g * GROUP..((g + 1) * GROUP).min(self.cols)];
            match self.quant {
                Quant::Q8 => {
                    for (o, &v) in cols.iter_mut().zip(b) {
                        *o = v as i8 as f32 * s;
                    }
                }
                Quant::Q4 if cols.len() == GROUP => {
                    let (lo, hi) = cols.split_at_mut(16);
                    for ((l, h), &v) in lo.iter_mut().zip(hi).zip(b) {
                        *l = ((v & 0x0F) as f32 - 8.0) * s;
                        *h = ((v >> 4) as f32 - 8.0) * s;
                    }
                }
                Quant::Q4 => {
                    for (j, o) in cols.iter_mut().enumerate() {
                        let v = b[j % 16];
                        *o = ((if j < 16 { v & 0x0F } else { v >> 4 }) as f32 - 8.0) * s;
                    }
                }
            }
        }
    }

    /// Bytes of storage.
    pub fn nbytes(&self) -> usize {
        self.values.as_slice().len() + self.scales.as_slice().len()
    }
}

/// A weight matrix as the kernels read it: stored dtype, or quantized.
#[derive(Clone, Debug)]
pub enum Matrix {
    /// F32 / F16 / BF16 as stored (memory-mapped).
    Dense(Tensor),
    /// Quantized at load.
    Quantized(Arc<QMatrix>),
    /// A GGUF file's block format, as stored (memory-mapped).
    Ggml(Arc<GgmlMatrix>),
}

impl Matrix {
    /// Wraps a 2-D tensor, quantizing it when `quant` says so.
    pub fn new(t: Tensor, quant: Option<Quant>) -> Matrix {
        match quant {
            None => Matrix::Dense(t),
            Some(q) => Matrix::Quantized(Arc::new(QMatrix::quantize(&t, q))),
        }
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        match self {
            Matrix::Dense(t) => t.shape()[0],
            Matrix::Quantized(q) => q.rows,
            Matrix::Ggml(g) => g.rows(),
        }
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        match self {
            Matrix::Dense(t) => t.shape()[1],
            Matrix::Quantized(q) => q.cols,
            Matrix::Ggml(g) => g.cols(),
        }
    }

    /// Bytes read by one pass over the matrix.
    pub fn nbytes(&self) -> usize {
        match self {
            Matrix::Dense(t) => t.nbytes(),
            Matrix::Quantized(q) => q.nbytes(),
            Matrix::Ggml(g) => g.nbytes(),
        }
    }

    /// Row `r` as f32 into `out` [cols] (widened or dequantized).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        match self {
            Matrix::Dense(t) => t.data().row_to_f32(r * out.len(), out),
            Matrix::Quantized(q) => q.row_to_f32(r, out),
            Matrix::Ggml(g) => g.row_to_f32(r, out),
        }
    }

    /// The storage format's name (`bf16`, `q8`, `Q4_K`, …).
    pub fn format_name(&self) -> &'static str {
        match self {
            Matrix::Dense(t) => t.dtype().name(),
            Matrix::Quantized(q) => q.quant().name(),
            Matrix::Ggml(g) => g.ty().name(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_rounding_is_round_ties_even_per_group() {
        // Group 0 has max 127 (scale 1): exact halves must round to even; group 1 is all
        // zeros (scale 0); group 2 is partial.
        let mut x: Vec<f32> = (0..32).map(|i| i as f32 * 4.0 - 0.5 - 64.0).collect();
        x[31] = 127.0;
        x[0] = 2.5;
        x[1] = -3.5;
        x.extend([0.0; 32]);
        x.extend((0..7).map(|i| (i as f32 - 3.0) * 0.37));
        let (mut q, mut scales, mut x_hat) = (Vec::new(), Vec::new(), Vec::new());
        quantize_activation(&x, &mut q, &mut scales, &mut x_hat);
        assert_eq!(scales.len(), 3);
        assert_eq!((q[0], q[1]), (2, -4));
        assert_eq!(scales[0], 1.0);
        for (i, &v) in x[..GROUP].iter().enumerate() {
            assert_eq!(q[i] as f32, v.round_ties_even(), "element {i}");
        }
        assert!(q[GROUP..2 * GROUP].iter().all(|&v| v == 0) && scales[1] == 0.0);
        for (j, &v) in x[2 * GROUP..].iter().enumerate() {
            let i = 2 * GROUP + j;
            assert!((q[i] as f32 - v / scales[2]).abs() <= 0.5 + 1e-4, "element {i}");
        }
        for (i, (&h, &qi)) in x_hat.iter().zip(&q).enumerate() {
            assert_eq!(h, qi as f32 * scales[i / GROUP]);
        }

        // int16: scale max/32767, every value within half a step, and the same `x_hat` as
        // the rounding that prefill uses.
        let mut q16 = Vec::new();
        quantize_activation_i16(&x, &mut q16, &mut scales, &mut x_hat);
        assert_eq!((scales[0], q16[31]), (127.0 / 32767.0, 32767));
        for (i, (&v, &qi)) in x.iter().zip(&q16).enumerate() {
            let s = scales[i / GROUP];
            assert!((qi as f32 * s - v).abs() <= 0.5 * s * (1.0 + 1e-5), "element {i}");
        }
        let mut rounded = Vec::new();
        Quant::Q8.rounded_activation(&x, &mut rounded);
        assert_eq!(rounded, x_hat);
    }

    #[test]
    fn round_trip_error_is_within_half_a_step_for_both_formats() {
        let (rows, cols) = (11, 70); // a partial last group and a partial last tile
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        for quant in [Quant::Q8, Quant::Q4] {
            let q = QMatrix::quantize(&Tensor::from_f32(&v, vec![rows, cols]), quant);
            assert_eq!(q.nbytes(), quant.matrix_bytes(rows, cols));
            let mut back = vec![0f32; cols];
            for r in 0..rows {
                q.row_to_f32(r, &mut back);
                for (c, &b) in back.iter().enumerate() {
                    let step = q.scale(r, c / GROUP);
                    assert!(
                        (b - v[r * cols + c]).abs() <= step * 0.5 + 1e-6,
                        "{quant:?} r={r} c={c}"
                    );
                }
            }
            let zeros = QMatrix::quantize(&Tensor::from_f32(&[0.0; 40], vec![1, 40]), quant);
            zeros.row_to_f32(0, &mut back[..40]);
            assert!(back[..40].iter().all(|&x| x == 0.0));
        }
        assert_eq!(Quant::Q4.matrix_bytes(1, 64), 32 + 4);
        assert_eq!(Quant::Q8.matrix_bytes(3, 64), 3 * (64 + 4));
    }
}
