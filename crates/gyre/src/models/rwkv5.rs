//! RWKV-5.2 "Eagle" (World models): an attention-free RNN with a per-head matrix state.
//!
//! Paper: Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic
//! Recurrence". Reference: ChatRWKV `rwkv/model.py` (`att_one_v5_1`, `att_seq_v5_2`,
//! `ffn_one`/`ffn_seq`), the `rwkv` pip package, summarised in shared/reference/MODELS.md
//! section B. Per layer, with token shift of the *normalised* inputs:
//!
//! ```text
//! xx = LN₁(x);  m(μ) = xx·μ + prev(xx)·(1 − μ)
//! r, k, v = m(μr)·Wr, m(μk)·Wk, m(μv)·Wv;   g = silu(m(μg)·Wg)
//! per head: y[j] = Σᵢ r[i]·(u[i]·k[i]·v[j] + S[i,j]);   S[i,j] ← k[i]·v[j] + w[i]·S[i,j]
//! x += (GroupNorm_H(y; eps 64e-5) · g)·Wo              w = exp(−exp(time_decay)), u = time_faaaa
//! xx = LN₂(x);  x += sigmoid(m(μr)·Wr) · (relu(m(μk)·Wk)² · Wv)
//! logits = LN_out(x) · head
//! ```
//! `ln0` is applied to each embedding row as it is gathered and rounded to the table's dtype:
//! the reference folds it into the table once, in the stored dtype; doing it per token gives
//! the same values without an f32 copy of the whole table. No fp16 rescaling: activations
//! are f32.

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::layers;
use super::{check_tokens, Arch, LoadOptions, Logits, Model, ModelInfo, SeqInput};
use crate::kernels::cpu::{self as k, linear};
use crate::loader::Checkpoint;
use crate::state::{RwkvState, State};
use crate::tensor::{DType, Matrix, Tensor};
use half::{bf16, f16};

/// LayerNorm eps of ln0/ln1/ln2/ln_out.
pub(super) const LN_EPS: f32 = 1e-5;
/// GroupNorm eps of ln_x (training's GN(x/8, 1e-5) = GN(x, 64e-5)).
pub(super) const GN_EPS: f32 = 64e-5;

pub(super) struct Block {
    /// ln1 / ln2 weight and bias [C]
    pub(super) ln1: (Vec<f32>, Vec<f32>),
    pub(super) ln2: (Vec<f32>, Vec<f32>),
    /// time-mix coefficients of the attention inputs [C]
    pub(super) mix_k: Vec<f32>,
    pub(super) mix_v: Vec<f32>,
    pub(super) mix_r: Vec<f32>,
    pub(super) mix_g: Vec<f32>,
    /// w = exp(−exp(time_decay)) and u = time_faaaa, [H·N] (head-major)
    pub(super) decay: Vec<f32>,
    pub(super) bonus: Vec<f32>,
    /// receptance / key / value / gate [C_att, C], output [C, C_att]
    pub(super) wr: Matrix,
    pub(super) wk: Matrix,
    pub(super) wv: Matrix,
    pub(super) wg: Matrix,
    pub(super) wo: Matrix,
    /// ln_x (GroupNorm) weight and bias [C_att]
    pub(super) ln_x: (Vec<f32>, Vec<f32>),
    /// channel-mix coefficients [C]
    pub(super) ffn_mix_k: Vec<f32>,
    pub(super) ffn_mix_r: Vec<f32>,
    /// ffn key [F, C], receptance [C, C], value [C, F]
    pub(super) ffn_k: Matrix,
    pub(super) ffn_r: Matrix,
    pub(super) ffn_v: Matrix,
}

/// An RWKV-5.2 model with its weights.
pub struct Rwkv5 {
    pub(super) info: ModelInfo,
    pub(super) heads: usize,
    pub(super) head_size: usize,
    /// emb [V, C]
    pub(super) emb: Tensor,
    /// ln0 weight and bias [C], applied to each gathered embedding row
    pub(super) ln0: (Vec<f32>, Vec<f32>),
    pub(super) blocks: Vec<Block>,
    pub(super) ln_out: (Vec<f32>, Vec<f32>),
    /// head [V, C]
    pub(super) head: Matrix,
}

/// Which RWKV generation a checkpoint's tensor names and shapes say it is.
pub fn detect_version(ckpt: &Checkpoint) -> Result<&'static str> {
    let has = |n: &str| ckpt.has(n);
    if has("blocks.0.att.w0") || has("blocks.0.att.r_k") {
        return Ok("7");
    }
    if has("blocks.0.att.time_maa_x") || has("blocks.0.att.time_decay_w1") {
        return Ok("6");
    }
    if !has("blocks.0.att.ln_x.weight") {
        return Ok("4");
    }
    if !has("blocks.0.att.gate.weight") {
        return Ok("5.0");
    }
    let decay = ckpt.get("blocks.0.att.time_decay")?;
    if decay.shape().len() == 2 && decay.shape()[1] > 1 {
        Ok("5.2")
    } else {
        Ok("5.1")
    }
}

impl Rwkv5 {
    /// Builds the model from an RWKV checkpoint (`.pth` or `.safetensors`, ChatRWKV names).
    pub fn load(ckpt: &Checkpoint, opts: LoadOptions) -> Result<Rwkv5> {
        let version = detect_version(ckpt)?;
        if version != "5.2" {
            bail!(
                "{}: unsupported RWKV version {version} (detected from its tensor names); gyre runs RWKV-5.2",
                ckpt.source
            );
        }
        let emb = ckpt.get("emb.weight")?.clone();
        if emb.shape().len() != 2 {
            bail!(
                "{}: emb.weight must be 2-D, has shape {:?}",
                ckpt.source,
                emb.shape()
            );
        }
        let (v, c) = (emb.shape()[0], emb.shape()[1]);
        let decay0 = ckpt.get("blocks.0.att.time_decay")?;
        let (heads, n) = (decay0.shape()[0], decay0.shape()[1]);
        let c_att = heads * n;
        let f = ckpt.get("blocks.0.ffn.key.weight")?.shape()[0];
        let mut n_layers = 0;
        while ckpt.has(&format!("blocks.{n_layers}.ln1.weight")) {
            n_layers += 1;
        }
        let vec = |name: &str, len: usize| -> Result<Vec<f32>> {
            let t = ckpt.get(name)?;
            if t.numel() != len || t.shape().iter().filter(|&&d| d != 1).count() > 1 {
                bail!(
                    "tensor '{name}' in {} has shape {:?}, expected {len} values",
                    ckpt.source,
                    t.shape()
                );
            }
            Ok(t.to_f32_vec())
        };
        let ln = |p: &str| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((vec(&format!("{p}.weight"), c)?, vec(&format!("{p}.bias"), c)?))
        };
        let mat = |name: &str, rows: usize, cols: usize| -> Result<Matrix> {
            ckpt.matrix(name, rows, cols, opts.quant)
        };
        let mut blocks = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let a = format!("blocks.{i}.att");
            let fm = format!("blocks.{i}.ffn");
            let heads_mat = |name: &str| -> Result<Vec<f32>> {
                Ok(ckpt.get_shaped(&format!("{a}.{name}"), &[heads, n])?.to_f32_vec())
            };
            blocks.push(Block {
                ln1: ln(&format!("blocks.{i}.ln1"))?,
                ln2: ln(&format!("blocks.{i}.ln2"))?,
                mix_k: vec(&format!("{a}.time_mix_k"), c)?,
                mix_v: vec(&format!("{a}.time_mix_v"), c)?,
                mix_r: vec(&format!("{a}.time_mix_r"), c)?,
                mix_g: vec(&format!("{a}.time_mix_g"), c)?,
                decay: heads_mat("time_decay")?
                    .iter()
                    .map(|&d| (-d.exp()).exp())
                    .collect(),
                bonus: heads_mat("time_faaaa")?,
                wr: mat(&format!("{a}.receptance.weight"), c_att, c)?,
                wk: mat(&format!("{a}.key.weight"), c_att, c)?,
                wv: mat(&format!("{a}.value.weight"), c_att, c)?,
                wg: mat(&format!("{a}.gate.weight"), c_att, c)?,
                wo: mat(&format!("{a}.output.weight"), c, c_att)?,
                ln_x: (
                    vec(&format!("{a}.ln_x.weight"), c_att)?,
                    vec(&format!("{a}.ln_x.bias"), c_att)?,
                ),
                ffn_mix_k: vec(&format!("{fm}.time_mix_k"), c)?,
                ffn_mix_r: vec(&format!("{fm}.time_mix_r"), c)?,
                ffn_k: mat(&format!("{fm}.key.weight"), f, c)?,
                ffn_r: mat(&format!("{fm}.receptance.weight"), c, c)?,
                ffn_v: mat(&format!("{fm}.value.weight"), c, f)?,
            });
        }
        let (params, weight_bytes, dtypes) = ckpt.summary();
        Ok(Rwkv5 {
            info: ModelInfo {
                arch: Arch::Rwkv5,
                vocab_size: v,
                hidden_size: c,
                n_layers,
                params,
                weight_bytes,
                dtypes,
                context_length: None,
                fingerprint: ckpt.fingerprint(),
            },
            heads,
            head_size: n,
            ln0: ln("blocks.0.ln0")?,
            ln_out: ln("ln_out")?,
            head: mat("head.weight", v, c)?,
            emb,
            blocks,
        })
    }

    fn rwkv_state<'s>(&self, state: &'s mut State) -> Result<&'s mut RwkvState> {
        match state {
            State::Rwkv(s)
                if s.fits(
                    self.blocks.len(),
                    self.info.hidden_size,
                    self.heads,
                    self.head_size,
                ) =>
            {
                Ok(s)
            }
            _ => bail!("this state does not belong to an RWKV-5 model of this shape"),
        }
    }

    /// Token-shift mixes for one sequence's rows: `out_μ[t] = xx[t]·μ + xx[t−1]·(1 − μ)`, with
    /// `prev` standing for xx[−1]. Shapes: `xx` [len, C], each output [len, C].
    fn shift_mix(xx: &[f32], prev: &[f32], mixes: &[&[f32]], outs: &mut [&mut [f32]]) {
        let c = prev.len();
        for t in 0..xx.len() / c {
            let cur = &xx[t * c..(t + 1) * c];
            let before = if t == 0 { prev } else { &xx[(t - 1) * c..t * c] };
            for (mix, out) in mixes.iter().zip(outs.iter_mut()) {
                let o = &mut out[t * c..(t + 1) * c];
                for i in 0..c {
                    o[i] = cur[i] * mix[i] + before[i] * (1.0 - mix[i]);
                }
            }
        }
    }
}

/// Runs the WKV recurrence of one head over `len` tokens. `r`, `k`, `v`: the sequence's rows
/// [len, C_att]; `s`: the head's state [N (key i), N (value j)]; writes `y` [len, N].
#[allow(clippy::too_many_arguments)]
fn wkv_head(
    h: usize,
    n: usize,
    c_att: usize,
    r: &[f32],
    kk: &[f32],
    v: &[f32],
    w: &[f32],
    u: &[f32],
    s: &mut [f32],
    y: &mut [f32],
) {
    let len = r.len() / c_att;
    let (w, u) = (&w[h * n..(h + 1) * n], &u[h * n..(h + 1) * n]);
    for t in 0..len {
        let base = t * c_att + h * n;
        let (rt, kt, vt) = (&r[base..base + n], &kk[base..base + n], &v[base..base + n]);
        let yt = &mut y[t * n..(t + 1) * n];
        let bonus: f32 = (0..n).map(|i| rt[i] * u[i] * kt[i]).sum();
        for j in 0..n {
            yt[j] = bonus * vt[j];
        }
        for i in 0..n {
            let row = &mut s[i * n..(i + 1) * n];
            let (ri, ki, wi) = (rt[i], kt[i], w[i]);
            for j in 0..n {
                yt[j] += ri * row[j];
                row[j] = ki * vt[j] + wi * row[j];
            }
        }
    }
}

impl Model for Rwkv5 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn new_state(&self) -> State {
        State::Rwkv(RwkvState::new(
            self.blocks.len(),
            self.info.hidden_size,
            self.heads,
            self.head_size,
        ))
    }

    fn state_bytes(&self, _tokens: usize) -> usize {
        RwkvState::bytes_for(
            self.blocks.len(),
            self.info.hidden_size,
            self.heads,
            self.head_size,
        )
    }

    fn forward(&self, batch: &mut [SeqInput<'_>], which: Logits) -> Result<Vec<Vec<f32>>> {
        layers::on_pool(|| {
            check_tokens(batch, self.info.vocab_size)?;
            let mut positions = Vec::with_capacity(batch.len());
            for seq in batch.iter_mut() {
                positions.push(self.rwkv_state(seq.state)?.pos);
            }
            let (segs, rows) = layers::segments(batch, |i| positions[i]);
            let c = self.info.hidden_size;
            let (h, n) = (self.heads, self.head_size);
            let c_att = h * n;
            let mut x = vec![0f32; rows * c];
            layers::gather_embeddings(batch, &self.emb, 1.0, &mut x);
            let raw = x.clone();
            k::layernorm(&raw, &self.ln0.0, &self.ln0.1, LN_EPS, &mut x);
            // The reference folds ln0 into the table in the table's dtype: round as it does.
            match self.emb.dtype() {
                DType::BF16 => x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
                DType::F16 => x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
                DType::F32 => {}
            }

            let mut xx = vec![0f32; rows * c];
            let mix_bufs = || {
                [
                    vec![0f32; rows * c],
                    vec![0f32; rows * c],
                    vec![0f32; rows * c],
                    vec![0f32; rows * c],
                ]
            };
            let [mut mk, mut mv, mut mr, mut mg] = mix_bufs();
            let (mut r, mut kk, mut vv, mut g) = (
                vec![0f32; rows * c_att],
                vec![0f32; rows * c_att],
                vec![0f32; rows * c_att],
                vec![0f32; rows * c_att],
            );
            let mut y = vec![0f32; rows * c_att];
            let mut out = vec![0f32; rows * c];
            let f = self.blocks.first().map_or(0, |b| b.ffn_k.rows());
            let mut fk = vec![0f32; rows * f];

            for (li, b) in self.blocks.iter().enumerate() {
                // Time mixing.
                k::layernorm(&x, &b.ln1.0, &b.ln1.1, LN_EPS, &mut xx);
                for (seg, seq) in segs.iter().zip(batch.iter_mut()) {
                    let st = self.rwkv_state(seq.state)?;
                    let span = seg.row * c..(seg.row + seg.len) * c;
                    let shift = &mut st.att_shift[li];
                    Self::shift_mix(
                        &xx[span.clone()],
                        shift,
                        &[&b.mix_k, &b.mix_v, &b.mix_r, &b.mix_g],
                        &mut [
                            &mut mk[span.clone()],
                            &mut mv[span.clone()],
                            &mut mr[span.clone()],
                            &mut mg[span.clone()],
                        ],
                    );
                    shift.copy_from_slice(&xx[span.end - c..span.end]);
                }
                k::linear_group(
                    rows,
                    &mut [
                        (&mr, &b.wr, &mut r),
                        (&mk, &b.wk, &mut kk),
                        (&mv, &b.wv, &mut vv),
                        (&mg, &b.wg, &mut g),
                    ],
                );
                g.iter_mut().for_each(|v| *v = k::silu(*v));
                for (seg, seq) in segs.iter().zip(batch.iter_mut()) {
                    let st = self.rwkv_state(seq.state)?;
                    let span = seg.row * c_att..(seg.row + seg.len) * c_att;
                    let (rs, ks, vs) = (&r[span.clone()], &kk[span.clone()], &vv[span.clone()]);
                    let mut per_head = vec![0f32; h * seg.len * n];
                    st.wkv[li]
                        .par_chunks_mut(n * n)
                        .zip(per_head.par_chunks_mut(seg.len * n))
                        .enumerate()
                        .for_each(|(hi, (s, yh))| {
                            wkv_head(hi, n, c_att, rs, ks, vs, &b.decay, &b.bonus, s, yh)
                        });
                    for t in 0..seg.len {
                        for hi in 0..h {
                            let dst = (seg.row + t) * c_att + hi * n;
                            y[dst..dst + n].copy_from_slice(
                                &per_head[(hi * seg.len + t) * n..(hi * seg.len + t + 1) * n],
                            );
                        }
                    }
                }
                // GroupNorm per head, then the gate.
                for (yr, gr) in y.chunks_exact_mut(c_att).zip(g.chunks_exact(c_att)) {
                    for hi in 0..h {
                        let (w, bias) = (&b.ln_x.0[hi * n..(hi + 1) * n], &b.ln_x.1[hi * n..(hi + 1) * n]);
                        k::layernorm_in_place(&mut yr[hi * n..(hi + 1) * n], w, bias, GN_EPS);
                    }
                    for (v, &gv) in yr.iter_mut().zip(gr) {
                        *v *= gv;
                    }
                }
                linear(&y, rows, &b.wo, &mut out);
                k::add_assign(&mut x, &out);

                // Channel mixing.
                k::layernorm(&x, &b.ln2.0, &b.ln2.1, LN_EPS, &mut xx);
                for (seg, seq) in segs.iter().zip(batch.iter_mut()) {
                    let st = self.rwkv_state(seq.state)?;
                    let span = seg.row * c..(seg.row + seg.len) * c;
                    let shift = &mut st.ffn_shift[li];
                    Self::shift_mix(
                        &xx[span.clone()],
                        shift,
                        &[&b.ffn_mix_k, &b.ffn_mix_r],
                        &mut [&mut mk[span.clone()], &mut mr[span.clone()]],
                    );
                    shift.copy_from_slice(&xx[span.end - c..span.end]);
                }
                k::linear_group(rows, &mut [(&mk, &b.ffn_k, &mut fk), (&mr, &b.ffn_r, &mut mv)]);
                fk.iter_mut().for_each(|v| {
                    let relu = v.max(0.0);
                    *v = relu * relu;
                });
                linear(&fk, rows, &b.ffn_v, &mut out);
                for ((xv, &o), &rv) in x.iter_mut().zip(&out).zip(&mv) {
                    *xv += o / (1.0 + (-rv).exp());
                }
            }
            for (seg, seq) in segs.iter().zip(batch.iter_mut()) {
                self.rwkv_state(seq.state)?.pos += seg.len;
            }
            let norm =
                |x: &[f32], out: &mut [f32]| k::layernorm(x, &self.ln_out.0, &self.ln_out.1, LN_EPS, out);
            Ok(layers::head_logits(&x, c, &segs, which, norm, &self.head))
        })
    }
}
