//! Pieces shared by the model families: batch bookkeeping, embedding gather, windowed
//! attention over a [`KvCache`] plus the current chunk, and row picking for the head.

use rayon::prelude::*;

use super::{Logits, SeqInput};
use crate::kernels::cpu as k;
use crate::state::KvCache;
use crate::tensor::{Matrix, Tensor};

/// Rows of the batch matrices that belong to one sequence.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    /// First row in the batch matrices.
    pub row: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Absolute position of the first new token.
    pub pos: usize,
}

/// Lays the sequences of a batch out as consecutive rows; `pos_of` gives each one's
/// current position. Returns the segments and the total number of rows.
pub fn segments(batch: &[SeqInput<'_>], pos_of: impl Fn(usize) -> usize) -> (Vec<Segment>, usize) {
    let mut rows = 0;
    let segs = batch
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let seg = Segment {
                row: rows,
                len: s.tokens.len(),
                pos: pos_of(i),
            };
            rows += s.tokens.len();
            seg
        })
        .collect();
    (segs, rows)
}

/// `out[r] = scale · embed[token_r]` for every token of the batch, in row order.
/// Shapes: `embed` [V, C], `out` [rows, C].
pub fn gather_embeddings(batch: &[SeqInput<'_>], embed: &Tensor, scale: f32, out: &mut [f32]) {
    let c = embed.shape()[1];
    let data = embed.data();
    gather(batch, c, |t, row| data.row_to_f32(t * c, row), scale, out);
}

/// [`gather_embeddings`] from a table in any matrix format (a GGUF file's block formats are
/// dequantized row by row).
pub fn gather_embedding_rows(batch: &[SeqInput<'_>], embed: &Matrix, scale: f32, out: &mut [f32]) {
    gather(batch, embed.cols(), |t, row| embed.row_to_f32(t, row), scale, out);
}

fn gather(batch: &[SeqInput<'_>], c: usize, row_of: impl Fn(usize, &mut [f32]), scale: f32, out: &mut [f32]) {
    for (r, &t) in batch.iter().flat_map(|s| s.tokens).enumerate() {
        let row = &mut out[r * c..(r + 1) * c];
        row_of(t as usize, row);
        if scale != 1.0 {
            row.iter_mut().for_each(|v| *v *= scale);
        }
    }
}

/// Multi-head attention dimensions.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Score multiplier (usually head_dim^-0.5).
    pub scale: f32,
}

impl AttnDims {
    /// Dimensions with the usual score scale head_dim^-0.5 (Llama, Mistral, RecurrentGemma).
    pub fn scaled(heads: usize, kv_heads: usize, head_dim: usize) -> AttnDims {
        AttnDims {
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
}

/// Causal attention for one sequence's chunk of new tokens.
///
/// `q` [rows, heads·hd], `kk`/`vv` [rows, kv_heads·hd] are the whole batch's projections
/// (after RoPE); the chunk is `seg`. Keys before the chunk come from `cache` (`layer`). A query
/// at position p sees keys `first_visible(p) ..= p`. Writes `out` [seg.len, heads·hd].
#[allow(clippy::too_many_arguments)]
pub fn attend_chunk(
    dims: AttnDims,
    q: &[f32],
    kk: &[f32],
    vv: &[f32],
    seg: Segment,
    cache: &KvCache,
    layer: usize,
    first_visible: impl Fn(usize) -> usize + Sync,
    out: &mut [f32],
) {
    let AttnDims {
        heads: h,
        kv_heads,
        head_dim: hd,
        scale,
    } = dims;
    let kvd = kv_heads * hd;
    let group = h / kv_heads;
    // One job per (position, KV head): the group's query heads attend together, so each key
    // and value is read once per group rather than once per head.
    let one = |scores: &mut Vec<f32>, (idx, o): (usize, &mut [f32])| {
        let (i, g) = (idx / kv_heads, idx % kv_heads);
        let pos = seg.pos + i;
        let lo = first_visible(pos);
        let qs = &q[(seg.row + i) * h * hd + g * group * hd..][..group * hd];
        let kv = |j: usize| {
            let p = lo + j;
            if p >= seg.pos {
                let r = (seg.row + p - seg.pos) * kvd + g * hd;
                (&kk[r..r + hd], &vv[r..r + hd])
            } else {
                let (ck, cv) = cache.get(layer, p);
                (&ck[g * hd..(g + 1) * hd], &cv[g * hd..(g + 1) * hd])
            }
        };
        k::attend_shared(qs, hd, pos + 1 - lo, kv, scale, scores, o);
    };
    // Parallel over (position, KV head) pairs, unless the chunk is too little work to repay
    // a fork-join (short decode steps). Either way each pair is computed the same way.
    let last = seg.pos + seg.len - 1;
    let keys = last + 1 - first_visible(last);
    if seg.len * h * keys * hd < SMALL_ATTENTION {
        let mut scores = Vec::new();
        out.chunks_mut(group * hd)
            .enumerate()
            .for_each(|job| one(&mut scores, job));
    } else {
        out.par_chunks_mut(group * hd)
            .enumerate()
            .for_each_init(Vec::new, one);
    }
}

/// Multiply-adds below which [`attend_chunk`] stays on one thread.
const SMALL_ATTENTION: usize = 1 << 16;

/// The rows whose logits are wanted, copied out of `x` [rows, C].
pub fn pick_rows(x: &[f32], c: usize, segs: &[Segment], which: Logits) -> Vec<f32> {
    match which {
        Logits::All => x.to_vec(),
        Logits::Last => segs
            .iter()
            .flat_map(|s| x[(s.row + s.len - 1) * c..(s.row + s.len) * c].iter().copied())
            .collect(),
    }
}

/// Splits head output [picked rows, V] back into one vector per sequence.
pub fn split_logits(logits: Vec<f32>, v: usize, segs: &[Segment], which: Logits) -> Vec<Vec<f32>> {
    match which {
        Logits::Last => logits.chunks_exact(v).map(<[f32]>::to_vec).collect(),
        Logits::All => segs
            .iter()
            .map(|s| logits[s.row * v..(s.row + s.len) * v].to_vec())
            .collect(),
    }
}

/// `out = x·Wᵀ + b` for every row (`b` optional): [`k::linear`] plus a bias.
pub fn linear_bias(x: &[f32], rows: usize, w: &Matrix, b: Option<&[f32]>, out: &mut [f32]) {
    k::linear(x, rows, w, out);
    if let Some(b) = b {
        add_bias(out, b);
    }
}

/// Adds the bias `b` [n] to every row of `out` [rows, n].
pub fn add_bias(out: &mut [f32], b: &[f32]) {
    for row in out.chunks_exact_mut(b.len()) {
        k::add_assign(row, b);
    }
}

/// The projections of one attention layer (nn.Linear layout): q [H·hd, C], k / v [KV·hd, C].
pub struct QkvWeights<'a> {
    pub q: &'a Matrix,
    pub k: &'a Matrix,
    pub v: &'a Matrix,
}

/// One rotary attention layer over a batch: projects q/k/v from `normed` [rows, C], rotates
/// the first `2·inv_freq.len()` dims of each head at every row's position (half-split RoPE),
/// attends each sequence's chunk over its cache (keys `first_visible(p) ..= p`), then appends
/// the chunk's keys/values to the caches. `caches[i]` belongs to `segs[i]`; `attn` is
/// [rows, H·hd].
#[allow(clippy::too_many_arguments)]
pub fn rope_attention(
    dims: AttnDims,
    w: QkvWeights<'_>,
    inv_freq: &[f32],
    normed: &[f32],
    segs: &[Segment],
    caches: &mut [&mut KvCache],
    layer: usize,
    first_visible: impl Fn(usize) -> usize + Sync + Copy,
    attn: &mut [f32],
) {
    let rows = normed.len() / w.q.cols();
    let (h, hd) = (dims.heads, dims.head_dim);
    let kvd = dims.kv_heads * hd;
    let (mut q, mut kk, mut vv) = (
        vec![0f32; rows * h * hd],
        vec![0f32; rows * kvd],
        vec![0f32; rows * kvd],
    );
    k::linear_group(
        rows,
        &mut [
            (normed, w.q, &mut q),
            (normed, w.k, &mut kk),
            (normed, w.v, &mut vv),
        ],
    );
    for seg in segs {
        for i in 0..seg.len {
            let r = seg.row + i;
            k::rope_half_split(&mut q[r * h * hd..(r + 1) * h * hd], hd, seg.pos + i, inv_freq);
            k::rope_half_split(&mut kk[r * kvd..(r + 1) * kvd], hd, seg.pos + i, inv_freq);
        }
    }
    for (seg, cache) in segs.iter().zip(caches.iter()) {
        let out = &mut attn[seg.row * h * hd..(seg.row + seg.len) * h * hd];
        attend_chunk(dims, &q, &kk, &vv, *seg, cache, layer, first_visible, out);
    }
    for (seg, cache) in segs.iter().zip(caches.iter_mut()) {
        let span = seg.row * kvd..(seg.row + seg.len) * kvd;
        cache.write(layer, &kk[span.clone()], &vv[span]);
    }
}

/// Final norm and output head over the rows whose logits are wanted, split per sequence.
pub fn head_logits(
    x: &[f32],
    c: usize,
    segs: &[Segment],
    which: Logits,
    norm: impl Fn(&[f32], &mut [f32]),
    head: &Matrix,
) -> Vec<Vec<f32>> {
    let sel = pick_rows(x, c, segs, which);
    let n = sel.len() / c;
    let mut normed = vec![0f32; sel.len()];
    norm(&sel, &mut normed);
    let v = head.rows();
    let mut logits = vec![0f32; n * v];
    k::linear(&normed, n, head, &mut logits);
    split_logits(logits, v, segs, which)
}

/// Runs a forward pass on a worker of the global thread pool (the caller blocks until it is
/// done). Every matrix product inside then forks from a pool thread, which does its share
/// itself and needs no wake-up to start; from outside the pool each product would cost a
/// cross-thread wake-up — measured 25–85 µs per product on this project's machine against
/// 3–25 µs from inside (`linear` on 32–256 × 2048 bf16 matrices with idle gaps between).
pub fn on_pool<R: Send>(forward: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| forward())
}
