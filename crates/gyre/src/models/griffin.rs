//! RecurrentGemma (Griffin): RG-LRU recurrence blocks and local sliding-window MQA blocks.
//!
//! Paper: De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention";
//! Botev et al. 2024, "RecurrentGemma". Reference: the DeepMind `recurrentgemma` package
//! (`torch/griffin.py`, `modules.py`, `layers.py`), summarised in shared/reference/MODELS.md
//! section A; tensor names are the Hugging Face ones (A.9).
//!
//! ```text
//! x = E[tokens] · bf16(sqrt(C))
//! per layer:  h = x + temporal(rmsnorm₁₊w(x))      temporal = recurrent or local attention
//!             x = h + mlp(rmsnorm₁₊w(h))            mlp = down(gelu_tanh(gate(·)) · up(·))
//! logits = 30 · tanh((rmsnorm₁₊w(x) · Eᵀ) / 30)
//! recurrent:  y = gelu_tanh(linear_y(x));  u = rg_lru(conv1d(linear_x(x)));  out = linear_out(u · y)
//! ```
//!
//! Attention window: this follows the DeepMind reference, where a query at position q sees
//! the keys q − window ..= q (window + 1 keys), kept in a ring of `window` slots. HF
//! transformers differs beyond the window (its decode cache keeps `window` keys including the
//! current one, and its prefill applies the mask differently), so outputs agree with
//! transformers only below `attention_window_size` tokens; parity tests use DeepMind logits.
//!
//! State per sequence is fixed-size: per recurrent layer the last `conv1d_width − 1` conv
//! inputs and the f32 RG-LRU state; per attention layer a preallocated ring of `window` slots.

use anyhow::{bail, Context, Result};
use half::bf16;

use super::layers::{self, AttnDims, Segment};
use super::{check_tokens, Arch, LoadOptions, Logits, Model, ModelInfo, SeqInput};
use crate::kernels::cpu as k;
use crate::loader::config::{BlockKind, GriffinConfig};
use crate::loader::Checkpoint;
use crate::state::{GriffinState, KvCache, State};
use crate::tensor::{DType, Matrix, Tensor};

/// The recurrent temporal block (HF `RecurrentGemmaRecurrentBlock`).
pub(super) struct Recurrent {
    /// linear_x / linear_y [lru, C] with biases [lru]
    pub(super) linear_x: Matrix,
    pub(super) linear_x_b: Vec<f32>,
    pub(super) linear_y: Matrix,
    pub(super) linear_y_b: Vec<f32>,
    /// linear_out [C, lru], bias [C]
    pub(super) linear_out: Matrix,
    pub(super) linear_out_b: Vec<f32>,
    /// conv_1d weight as [width, lru] (tap w−1 multiplies the current token), bias [lru]
    pub(super) conv_w: Vec<f32>,
    pub(super) conv_b: Vec<f32>,
    /// Block-diagonal gates, one [bw_out, bw_in] matrix per head (transposed from the
    /// checkpoint's input-major [H, bw_in, bw_out]), biases [H·bw]
    pub(super) input_gate: Vec<Matrix>,
    pub(super) input_gate_b: Vec<f32>,
    pub(super) a_gate: Vec<Matrix>,
    pub(super) a_gate_b: Vec<f32>,
    /// −8 · softplus(recurrent_param) [lru]: log a = this · recurrence gate
    pub(super) log_a_scale: Vec<f32>,
}

/// The local attention temporal block (HF `RecurrentGemmaSdpaAttention`).
pub(super) struct Attention {
    /// q_proj [H·hd, C], k_proj / v_proj [KV·hd, C], o_proj [C, H·hd] with bias [C]
    pub(super) q: Matrix,
    pub(super) k: Matrix,
    pub(super) v: Matrix,
    pub(super) o: Matrix,
    pub(super) o_b: Vec<f32>,
    /// Index of this layer among the attention layers (its slot in the KV ring set)
    pub(super) kv_index: usize,
}

pub(super) enum Temporal {
    Recurrent(Box<Recurrent>),
    Attention(Box<Attention>),
}

pub(super) struct Layer {
    /// temporal_pre_norm / channel_pre_norm [C] (applied as 1 + w)
    pub(super) temporal_norm: Vec<f32>,
    pub(super) channel_norm: Vec<f32>,
    pub(super) temporal: Temporal,
    /// mlp gate_proj / up_proj [F, C] + [F], down_proj [C, F] + [C]
    pub(super) gate: Matrix,
    pub(super) gate_b: Vec<f32>,
    pub(super) up: Matrix,
    pub(super) up_b: Vec<f32>,
    pub(super) down: Matrix,
    pub(super) down_b: Vec<f32>,
}

/// A RecurrentGemma model with its weights.
pub struct Griffin {
    pub(super) info: ModelInfo,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) lru: usize,
    pub(super) conv_width: usize,
    pub(super) window: usize,
    pub(super) eps: f32,
    pub(super) soft_cap: f32,
    /// bf16-rounded sqrt(C) (or 1 when the config turns scaling off)
    pub(super) embed_scale: f32,
    pub(super) inv_freq: Vec<f32>,
    /// embed_tokens [V, C] (rows gathered as stored)
    pub(super) embed: Tensor,
    /// the tied output head: the same tensor, quantized when asked
    pub(super) head: Matrix,
    pub(super) layers: Vec<Layer>,
    pub(super) n_attention: usize,
    pub(super) n_recurrent: usize,
    /// final_norm [C]
    pub(super) final_norm: Vec<f32>,
}

/// Splits an input-major block-diagonal gate [H, bw, bw] into H [out, in] matrices, keeping
/// the stored dtype.
fn split_gate(t: &Tensor, heads: usize, bw: usize) -> Vec<Matrix> {
    let vals = t.to_f32_vec();
    (0..heads)
        .map(|h| {
            let mut m = vec![0f32; bw * bw];
            for i in 0..bw {
                for j in 0..bw {
                    m[j * bw + i] = vals[h * bw * bw + i * bw + j];
                }
            }
            Matrix::Dense(match t.dtype() {
                DType::F32 => Tensor::from_f32(&m, vec![bw, bw]),
                DType::F16 => Tensor::from_f32_as_f16(&m, vec![bw, bw]),
                DType::BF16 => Tensor::from_f32_as_bf16(&m, vec![bw, bw]),
            })
        })
        .collect()
}

fn softplus(x: f32) -> f32 {
    // torch.nn.functional.softplus with beta 1, threshold 20
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

impl Griffin {
    /// Builds the model from a `RecurrentGemmaForCausalLM` checkpoint.
    pub fn load(ckpt: &Checkpoint, opts: LoadOptions) -> Result<Griffin> {
        let source = format!("{}/config.json", ckpt.dir.display());
        let cfg = GriffinConfig::from_value(ckpt.config()?, &source)?;
        let (c, v, lru) = (cfg.hidden_size, cfg.vocab_size, cfg.lru_width());
        let (heads, kv_heads, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let bw = lru / heads;
        let width = cfg.conv1d_width;
        let vec =
            |name: &str, n: usize| -> Result<Vec<f32>> { Ok(ckpt.get_shaped(name, &[n])?.to_f32_vec()) };
        let mat = |name: &str, rows: usize, cols: usize| -> Result<Matrix> {
            ckpt.matrix(name, rows, cols, opts.quant)
        };
        let embed = ckpt.get_shaped("model.embed_tokens.weight", &[v, c])?;
        let f_name = "model.layers.0.mlp_block.gate_proj.weight";
        let f = ckpt
            .get(f_name)?
            .shape()
            .first()
            .copied()
            .context("empty MLP shape")?;
        if let Some(i) = cfg.intermediate_size {
            if i / 2 != f {
                bail!(
                    "{source}: intermediate_size {i} implies an MLP width of {} (transformers halves it), \
                     but tensor '{f_name}' has {f} rows",
                    i / 2
                );
            }
        }
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let (mut n_attention, mut n_recurrent) = (0, 0);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let t = format!("{p}.temporal_block");
            let temporal = match cfg.block(i) {
                BlockKind::Recurrent => {
                    n_recurrent += 1;
                    let conv = ckpt
                        .get_shaped(&format!("{t}.conv_1d.weight"), &[lru, 1, width])?
                        .to_f32_vec();
                    let mut conv_w = vec![0f32; width * lru];
                    for ch in 0..lru {
                        for tap in 0..width {
                            conv_w[tap * lru + ch] = conv[ch * width + tap];
                        }
                    }
                    let gate = |name: &str| -> Result<Vec<Matrix>> {
                        Ok(split_gate(
                            &ckpt.get_shaped(&format!("{t}.rg_lru.{name}"), &[heads, bw, bw])?,
                            heads,
                            bw,
                        ))
                    };
                    let gate_b = |name: &str| -> Result<Vec<f32>> {
                        Ok(ckpt
                            .get_shaped(&format!("{t}.rg_lru.{name}"), &[heads, bw])?
                            .to_f32_vec())
                    };
                    let a_param = vec(&format!("{t}.rg_lru.recurrent_param"), lru)?;
                    Temporal::Recurrent(Box::new(Recurrent {
                        linear_x: mat(&format!("{t}.linear_x.weight"), lru, c)?,
                        linear_x_b: vec(&format!("{t}.linear_x.bias"), lru)?,
                        linear_y: mat(&format!("{t}.linear_y.weight"), lru, c)?,
                        linear_y_b: vec(&format!("{t}.linear_y.bias"), lru)?,
                        linear_out: mat(&format!("{t}.linear_out.weight"), c, lru)?,
                        linear_out_b: vec(&format!("{t}.linear_out.bias"), c)?,
                        conv_w,
                        conv_b: vec(&format!("{t}.conv_1d.bias"), lru)?,
                        input_gate: gate("input_gate_weight")?,
                        input_gate_b: gate_b("input_gate_bias")?,
                        a_gate: gate("recurrent_gate_weight")?,
                        a_gate_b: gate_b("recurrent_gate_bias")?,
                        log_a_scale: a_param.iter().map(|&a| -8.0 * softplus(a)).collect(),
                    }))
                }
                BlockKind::Attention => {
                    n_attention += 1;
                    Temporal::Attention(Box::new(Attention {
                        q: mat(&format!("{t}.q_proj.weight"), heads * hd, c)?,
                        k: mat(&format!("{t}.k_proj.weight"), kv_heads * hd, c)?,
                        v: mat(&format!("{t}.v_proj.weight"), kv_heads * hd, c)?,
                        o: mat(&format!("{t}.o_proj.weight"), c, heads * hd)?,
                        o_b: vec(&format!("{t}.o_proj.bias"), c)?,
                        kv_index: n_attention - 1,
                    }))
                }
            };
            let m = format!("{p}.mlp_block");
            layers.push(Layer {
                temporal_norm: vec(&format!("{p}.temporal_pre_norm.weight"), c)?,
                channel_norm: vec(&format!("{p}.channel_pre_norm.weight"), c)?,
                temporal,
                gate: mat(&format!("{m}.gate_proj.weight"), f, c)?,
                gate_b: vec(&format!("{m}.gate_proj.bias"), f)?,
                up: mat(&format!("{m}.up_proj.weight"), f, c)?,
                up_b: vec(&format!("{m}.up_proj.bias"), f)?,
                down: mat(&format!("{m}.down_proj.weight"), c, f)?,
                down_b: vec(&format!("{m}.down_proj.bias"), c)?,
            });
        }
        let (params, weight_bytes, dtypes) = ckpt.summary();
        let embed_scale = if cfg.embeddings_scale_by_sqrt_dim {
            bf16::from_f32((c as f64).sqrt() as f32).to_f32()
        } else {
            1.0
        };
        Ok(Griffin {
            info: ModelInfo {
                arch: Arch::RecurrentGemma,
                vocab_size: v,
                hidden_size: c,
                n_layers: cfg.num_hidden_layers,
                params,
                weight_bytes,
                dtypes,
                context_length: None,
                fingerprint: ckpt.fingerprint(),
            },
            heads,
            kv_heads,
            head_dim: hd,
            lru,
            conv_width: width,
            window: cfg.attention_window_size,
            eps: cfg.rms_norm_eps as f32,
            soft_cap: cfg.logits_soft_cap as f32,
            embed_scale,
            inv_freq: k::rope_inv_freq(cfg.theta(), cfg.rot_dim()),
            head: Matrix::new(embed.clone(), opts.quant),
            embed,
            layers,
            n_attention,
            n_recurrent,
            final_norm: vec("model.final_norm.weight", c)?,
        })
    }

    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    fn griffin_state<'s>(&self, state: &'s mut State) -> Result<&'s mut GriffinState> {
        match state {
            State::Griffin(s)
                if s.conv.len() == self.n_recurrent
                    && s.lru.first().is_none_or(|h| h.len() == self.lru)
                    && s.kv
                        .shape_matches(self.n_attention, self.kv_dim(), Some(self.window)) =>
            {
                Ok(s)
            }
            _ => bail!("this state does not belong to a RecurrentGemma model of this shape"),
        }
    }

    /// Recurrent block over the batch: `normed` [rows, C] → `out` [rows, C].
    #[allow(clippy::too_many_arguments)]
    fn recurrent(
        &self,
        rec: &Recurrent,
        r_index: usize,
        normed: &[f32],
        rows: usize,
        segs: &[Segment],
        batch: &mut [SeqInput<'_>],
        out: &mut [f32],
    ) -> Result<()> {
        let lru = self.lru;
        let (mut y, mut xb) = (vec![0f32; rows * lru], vec![0f32; rows * lru]);
        k::linear_group(
            rows,
            &mut [(normed, &rec.linear_y, &mut y), (normed, &rec.linear_x, &mut xb)],
        );
        layers::add_bias(&mut y, &rec.linear_y_b);
        y.iter_mut().for_each(|v| *v = k::gelu_tanh(*v));
        layers::add_bias(&mut xb, &rec.linear_x_b);

        // Causal depthwise conv1d, carrying the last width−1 inputs in the state.
        let w = self.conv_width;
        let mut conv = vec![0f32; rows * lru];
        for (seg, seq) in segs.iter().zip(batch.iter_mut()) {
            let st = self.griffin_state(seq.state)?;
            let hist = &mut st.conv[r_index];
            for t in 0..seg.len {
                let o = &mut conv[(seg.row + t) * lru..(seg.row + t + 1) * lru];
                o.copy_from_slice(&rec.conv_b);
                for s in 0..w {
                    let taps = &rec.conv_w[(w - 1 - s) * lru..(w - s) * lru];
                    let input = if t >= s {
                        &xb[(seg.row + t - s) * lru..(seg.row + t - s + 1) * lru]
                    } else {
                        let r = w - 1 + t - s; // hist row of relative time t − s < 0
                        &hist[r * lru..(r + 1) * lru]
                    };
                    for ((o, &x), &k) in o.iter_mut().zip(input).zip(taps) {
                        *o += x * k;
                    }
                }
            }
            // Keep the last w−1 inputs, oldest first.
            let keep = w - 1;
            let mut new_hist = vec![0f32; keep * lru];
            for r in 0..keep {
                let back = keep - r; // how many tokens before the end
                let src = if back <= seg.len {
                    &xb[(seg.row + seg.len - back) * lru..(seg.row + seg.len - back + 1) * lru]
                } else {
                    let hr = keep - (back - seg.len);
                    &hist[hr * lru..(hr + 1) * lru]
                };
                new_hist[r * lru..(r + 1) * lru].copy_from_slice(src);
            }
            *hist = new_hist;
        }

        // RG-LRU gates: block-diagonal linear maps, one block per head.
        let (heads, bw) = (self.heads, lru / self.heads);
        // Each head's input block [rows, bw]; both gates of every head as one product group.
        let block_in: Vec<Vec<f32>> = (0..heads)
            .map(|h| {
                (0..rows)
                    .flat_map(|r| &conv[r * lru + h * bw..r * lru + (h + 1) * bw])
                    .copied()
                    .collect()
            })
            .collect();
        let mut block_out = vec![vec![0f32; rows * bw]; 2 * heads];
        let mut products: Vec<(&[f32], &Matrix, &mut [f32])> = block_out
            .iter_mut()
            .enumerate()
            .map(|(i, out)| {
                let (h, gates) = (i / 2, [&rec.input_gate, &rec.a_gate][i % 2]);
                (&block_in[h][..], &gates[h], &mut out[..])
            })
            .collect();
        k::linear_group(rows, &mut products);
        let mut gx = vec![0f32; rows * lru];
        let mut ga = vec![0f32; rows * lru];
        for (i, out) in block_out.iter().enumerate() {
            let (h, (bias, dst)) = match i % 2 {
                0 => (i / 2, (&rec.input_gate_b, &mut gx)),
                _ => (i / 2, (&rec.a_gate_b, &mut ga)),
            };
            for r in 0..rows {
                for j in 0..bw {
                    let pre = out[r * bw + j] + bias[h * bw + j];
                    dst[r * lru + h * bw + j] = 1.0 / (1.0 + (-pre).exp());
                }
            }
        }

        // The scan: h_t = a_t · h_{t−1} + sqrt(1 − a_t²) · (x_t · gx_t), reset at position 0.
        for (seg, seq) in segs.iter().zip(batch.iter_mut()) {
            let st = self.griffin_state(seq.state)?;
            let hstate = &mut st.lru[r_index];
            for t in 0..seg.len {
                let r = seg.row + t;
                let first = seg.pos + t == 0;
                for i in 0..lru {
                    let log_a = rec.log_a_scale[i] * ga[r * lru + i];
                    let a = log_a.exp();
                    let mult = if first {
                        1.0
                    } else {
                        (1.0 - (2.0 * log_a).exp()).sqrt()
                    };
                    let xn = conv[r * lru + i] * gx[r * lru + i] * mult;
                    let prev = if first { 0.0 } else { a * hstate[i] };
                    hstate[i] = prev + xn;
                    conv[r * lru + i] = hstate[i] * y[r * lru + i];
                }
            }
        }
        layers::linear_bias(&conv, rows, &rec.linear_out, Some(&rec.linear_out_b), out);
        Ok(())
    }

    /// Local attention block over the batch: `normed` [rows, C] → `out` [rows, C].
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        att: &Attention,
        normed: &[f32],
        rows: usize,
        segs: &[Segment],
        batch: &mut [SeqInput<'_>],
        out: &mut [f32],
    ) -> Result<()> {
        let (h, hd) = (self.heads, self.head_dim);
        let dims = AttnDims::scaled(h, self.kv_heads, hd);
        let window = self.window;
        let mut caches = Vec::with_capacity(batch.len());
        for seq in batch.iter_mut() {
            caches.push(&mut self.griffin_state(seq.state)?.kv);
        }
        let mut attn = vec![0f32; rows * h * hd];
        let w = layers::QkvWeights {
            q: &att.q,
            k: &att.k,
            v: &att.v,
        };
        let first_visible = |p: usize| p.saturating_sub(window);
        layers::rope_attention(
            dims,
            w,
            &self.inv_freq,
            normed,
            segs,
            &mut caches,
            att.kv_index,
            first_visible,
            &mut attn,
        );
        layers::linear_bias(&attn, rows, &att.o, Some(&att.o_b), out);
        Ok(())
    }
}

impl Model for Griffin {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn new_state(&self) -> State {
        State::Griffin(GriffinState::new(
            self.n_recurrent,
            self.lru,
            self.conv_width,
            KvCache::ring(self.n_attention, self.kv_dim(), self.window),
        ))
    }

    fn state_bytes(&self, _tokens: usize) -> usize {
        GriffinState::bytes_for(self.n_recurrent, self.lru, self.conv_width)
            + KvCache::bytes_at(self.n_attention, self.kv_dim(), Some(self.window), self.window)
    }

    fn forward(&self, batch: &mut [SeqInput<'_>], which: Logits) -> Result<Vec<Vec<f32>>> {
        layers::on_pool(|| {
            check_tokens(batch, self.info.vocab_size)?;
            let mut positions = Vec::with_capacity(batch.len());
            for seq in batch.iter_mut() {
                positions.push(self.griffin_state(seq.state)?.pos);
            }
            let (segs, rows) = layers::segments(batch, |i| positions[i]);
            let c = self.info.hidden_size;
            let mut x = vec![0f32; rows * c];
            layers::gather_embeddings(batch, &self.embed, self.embed_scale, &mut x);
            let mut normed = vec![0f32; rows * c];
            let mut out = vec![0f32; rows * c];
            let mut r_index = 0;
            for layer in &self.layers {
                k::rmsnorm_gemma(&x, &layer.temporal_norm, self.eps, &mut normed);
                match &layer.temporal {
                    Temporal::Recurrent(rec) => {
                        self.recurrent(rec, r_index, &normed, rows, &segs, batch, &mut out)?;
                        r_index += 1;
                    }
                    Temporal::Attention(att) => self.attention(att, &normed, rows, &segs, batch, &mut out)?,
                }
                k::add_assign(&mut x, &out);

                k::rmsnorm_gemma(&x, &layer.channel_norm, self.eps, &mut normed);
                let f = layer.gate.rows();
                let (mut gate, mut up) = (vec![0f32; rows * f], vec![0f32; rows * f]);
                k::linear_group(
                    rows,
                    &mut [(&normed, &layer.gate, &mut gate), (&normed, &layer.up, &mut up)],
                );
                layers::add_bias(&mut gate, &layer.gate_b);
                layers::add_bias(&mut up, &layer.up_b);
                for (g, &u) in gate.iter_mut().zip(&up) {
                    *g = k::gelu_tanh(*g) * u;
                }
                layers::linear_bias(&gate, rows, &layer.down, Some(&layer.down_b), &mut out);
                k::add_assign(&mut x, &out);
            }
            for (seg, seq) in segs.iter().zip(batch.iter_mut()) {
                let st = self.griffin_state(seq.state)?;
                st.pos += seg.len;
                st.kv.advance(seg.len);
            }
            let norm = |x: &[f32], out: &mut [f32]| k::rmsnorm_gemma(x, &self.final_norm, self.eps, out);
            let mut logits = layers::head_logits(&x, c, &segs, which, norm, &self.head);
            let cap = self.soft_cap;
            if cap > 0.0 {
                logits
                    .iter_mut()
                    .flatten()
                    .for_each(|l| *l = cap * (*l / cap).tanh());
            }
            Ok(logits)
        })
    }
}
