//! Products of many activation rows (a prefill chunk, a large decode batch) with one weight
//! matrix: `out[t, o] = Σ_i x[t, i] · w[o, i]`, as a packed GEMM in the manner of BLIS
//! (Goto & van de Geijn, "Anatomy of High-Performance Matrix Multiplication", 2008).
//!
//! - The activations are packed once per product, transposed into panels of [`NR`] rows,
//!   `[i][NR]` (a last panel of at most NR/2 rows is NR/2 wide, and a one-vector variant of
//!   the micro-kernel takes it); every weight strip reuses them.
//! - The weights are cut into strips of [`MR`] output features, widened to f32 in their own
//!   row-major layout (sequential, no transposition); a parallel task takes [`GROUP`] strips.
//! - The micro-kernel keeps an `MR × NR` tile of sums in registers (24 of the 32); per inner
//!   index it loads the panel's [`NR`] activations as two vectors and broadcasts each of the
//!   strip's [`MR`] weights into two FMAs: fourteen loads feed 24 FMAs, where a dot-product
//!   tile needs a vector load per FMA or two. The inner dimension runs in blocks of [`KC`];
//!   a task walks the blocks and panels with its strips innermost, so the panel block (KC ×
//!   NR f32, 16 KB) stays in L1 while the strips' blocks (MR × KC, 6 KB each) come from L2.
//!
//! Measured by `cargo run --release --example prefill_gemm`: 55–73% of the machine's f32 FMA
//! peak at 256 rows, against about 30% for the dot-product tiles it replaces (BENCHMARKS.md).
//!
//! Each sum is accumulated block by block: a block's terms in index order, one f32 FMA each,
//! from zero, then the block's sum added to the total. Summing blocks of [`KC`] terms apart
//! keeps the rounding error near the decode products' (which split each sum over 16 lanes),
//! so a prefill equals token-by-token decoding within f32 rounding; the order is the same
//! whatever the thread count.

use rayon::prelude::*;

/// Output features (weight rows) per micro-tile (8 measured slower; 14 no faster).
pub const MR: usize = 12;
/// Activation rows per micro-tile (two AVX-512 vectors).
pub const NR: usize = 32;
/// Inner-dimension block (64 and 256 measured slower).
const KC: usize = 128;
/// Strips of [`MR`] features per parallel task.
const GROUP: usize = 8;

/// Activations transposed into panels of [`NR`] rows, each `[n_in][NR]`; rows past `n_rows`
/// are zero.
pub struct PackedRows {
    data: Vec<f32>,
    n_rows: usize,
    n_in: usize,
}

impl PackedRows {
    /// Packs `x` [n_rows, n_in].
    pub fn new(x: &[f32], n_rows: usize, n_in: usize) -> PackedRows {
        assert_eq!(x.len(), n_rows * n_in, "gemm: activation length");
        let mut packed = PackedRows {
            data: Vec::new(),
            n_rows,
            n_in,
        };
        let padded = (0..packed.panels()).map(|p| packed.width(p)).sum::<usize>();
        packed.data = vec![0f32; padded * n_in];
        // Every panel but the last is NR wide, so panel p starts at row p·NR.
        packed
            .data
            .par_chunks_mut((n_in * NR).max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                let width = panel.len() / n_in.max(1);
                for j in 0..width.min(n_rows - p * NR) {
                    let row = &x[(p * NR + j) * n_in..(p * NR + j + 1) * n_in];
                    for (i, &v) in row.iter().enumerate() {
                        panel[i * width + j] = v;
                    }
                }
            });
        packed
    }

    fn panels(&self) -> usize {
        self.n_rows.div_ceil(NR)
    }

    /// Rows in panel `p`: [`NR`], or half that for a last panel of at most NR/2 rows (a
    /// 16-to-31-row product is one panel of 32; 40 rows are 32 + 16).
    fn width(&self, p: usize) -> usize {
        if self.n_rows - p * NR <= NR / 2 {
            NR / 2
        } else {
            NR
        }
    }

    /// Panel `p`, inner indices `k0..k0 + kc`: [kc][width(p)].
    fn block(&self, p: usize, k0: usize, kc: usize) -> &[f32] {
        let width = self.width(p);
        let start = p * NR * self.n_in + k0 * width;
        &self.data[start..start + kc * width]
    }
}

/// `out[t, o] = Σ_i x[t, i] · w[o, i]` for `t < n_rows`, `o < n_out`; `weight_row(o, buf)`
/// writes weight row `o` as f32 into `buf` (length n_in). Shapes: `out` [n_rows, n_out].
pub fn matmul(
    x: &PackedRows,
    n_out: usize,
    weight_row: &(dyn Fn(usize, &mut [f32]) + Sync),
    out: &mut [f32],
) {
    let (n_rows, n_in) = (x.n_rows, x.n_in);
    assert_eq!(out.len(), n_rows * n_out, "gemm: output length");
    if n_in == 0 {
        out.fill(0.0);
        return;
    }
    let panels = x.panels();
    // The widened rows are a multiple of 64 bytes plus one cache line apart, so the strip's
    // rows at one inner index fall in different L1 sets (a power-of-two row length would put
    // all of them in one).
    let stride = n_in.next_multiple_of(16) + 16;
    // Each task widens GROUP strips, then walks the inner blocks and panels with the
    // strips innermost (see the module docs). Sums: [strip][panel][MR][width(panel)].
    let strips = n_out.div_ceil(MR);
    let padded: usize = (0..panels).map(|p| x.width(p)).sum();
    let tile = MR * padded;
    let groups: Vec<Vec<f32>> = (0..strips.div_ceil(GROUP))
        .into_par_iter()
        .map_init(
            || vec![0f32; GROUP * MR * stride],
            |rows, g| {
                let first = g * GROUP * MR;
                let width = (GROUP * MR).min(strips * MR - first);
                for (r, row) in rows.chunks_exact_mut(stride).take(width).enumerate() {
                    let row = &mut row[..n_in];
                    if first + r < n_out {
                        weight_row(first + r, row);
                    } else {
                        row.fill(0.0);
                    }
                }
                let mut sums = vec![0f32; width / MR * tile];
                for k0 in (0..n_in).step_by(KC) {
                    let kc = KC.min(n_in - k0);
                    for p in 0..panels {
                        let b = x.block(p, k0, kc);
                        let c = p * MR * NR..p * MR * NR + MR * x.width(p);
                        for (s, strip) in sums.chunks_exact_mut(tile).enumerate() {
                            let w = &rows[s * MR * stride + k0..];
                            micro_tile(w, stride, b, kc, &mut strip[c.clone()]);
                        }
                    }
                }
                sums
            },
        )
        .collect();
    out.par_chunks_mut(n_out).enumerate().for_each(|(t, row)| {
        let (at, width) = ((t / NR) * MR * NR + t % NR, x.width(t / NR));
        for (s, o0) in (0..n_out).step_by(MR).enumerate() {
            let sums = &groups[s / GROUP][(s % GROUP) * tile..];
            for (r, o) in row[o0..(o0 + MR).min(n_out)].iter_mut().enumerate() {
                *o = sums[at + r * width];
            }
        }
    });
}

/// `c[r][j] += Σ_{k < kc} w[r·stride + k] · b[k][j]` for an `MR × width` tile `c`
/// (row-major, width [`NR`] or NR/2): `w` holds the strip's rows `stride` apart, `b` a
/// panel block `[kc][width]`.
fn micro_tile(w: &[f32], stride: usize, b: &[f32], kc: usize, c: &mut [f32]) {
    let width = c.len() / MR;
    assert!(kc <= stride && w.len() >= (MR - 1) * stride + kc);
    assert!((width == NR || width == NR / 2) && c.len() == MR * width && b.len() == kc * width);
    if super::simd::level() == super::simd::Level::Avx512 {
        // SAFETY: AVX-512F is supported (checked) and the lengths were asserted above.
        unsafe {
            if width == NR {
                super::simd::micro_tile_avx512::<2>(w, stride, b, kc, c)
            } else {
                super::simd::micro_tile_avx512::<1>(w, stride, b, kc, c)
            }
        };
        return;
    }
    micro_tile_portable(w, stride, b, kc, c);
}

/// The portable micro-kernel (and the AVX-512 one's reference): the block's sum from zero,
/// one fused multiply-add per term in index order, then added to `c` [MR, width].
pub fn micro_tile_portable(w: &[f32], stride: usize, b: &[f32], kc: usize, c: &mut [f32]) {
    let width = c.len() / MR;
    let mut acc = [0f32; MR * NR];
    let acc = &mut acc[..MR * width];
    for k in 0..kc {
        let bk = &b[k * width..(k + 1) * width];
        for (r, row) in acc.chunks_exact_mut(width).enumerate() {
            let wv = w[r * stride + k];
            for (a, &bj) in row.iter_mut().zip(bk) {
                *a = wv.mul_add(bj, *a);
            }
        }
    }
    for (c, a) in c.iter_mut().zip(acc.iter()) {
        *c += a;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::dot_scalar;
    use crate::kernels::cpu::tests::pseudo;

    #[test]
    fn matmul_matches_scalar_dots_at_ragged_shapes() {
        // Rows and features that do not fill a tile, inner sizes around the block.
        for &(n_rows, n_out, n_in) in &[
            (1, 1, 1),
            (3, 5, 7),
            (8, 32, 256),
            (9, 33, 257),
            (17, 70, 600),
            (4, 3, 0),
        ] {
            let x = pseudo(n_rows * n_in, 3);
            let w = pseudo(n_out * n_in, 5);
            let mut got = vec![f32::NAN; n_rows * n_out];
            let row = |o: usize, buf: &mut [f32]| buf.copy_from_slice(&w[o * n_in..(o + 1) * n_in]);
            matmul(&PackedRows::new(&x, n_rows, n_in), n_out, &row, &mut got);
            for t in 0..n_rows {
                for o in 0..n_out {
                    let want = dot_scalar(&x[t * n_in..(t + 1) * n_in], &w[o * n_in..(o + 1) * n_in]);
                    let g = got[t * n_out + o];
                    assert!(
                        (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{t},{o}: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_dispatched_micro_kernel_equals_the_portable_one_bit_for_bit() {
        for (kc, stride, width) in [
            (1, 1, NR),
            (5, 9, NR),
            (128, 300, NR),
            (5, 9, NR / 2),
            (128, 300, NR / 2),
        ] {
            let w = pseudo(MR * stride, 7);
            let b = pseudo(kc * width, 9);
            let start = pseudo(MR * width, 11);
            let (mut got, mut want) = (start.clone(), start);
            micro_tile(&w, stride, &b, kc, &mut got);
            micro_tile_portable(&w, stride, &b, kc, &mut want);
            assert_eq!(got, want, "kc {kc}");
        }
    }
}
