//! RecurrentGemma (Griffin) on a CUDA device: the math of `models/griffin.rs`, with
//! linear_x/linear_y, q/k/v and gate/up fused into one product each, and the RG-LRU gates,
//! recurrence and output gate fused into one scan kernel.

use std::sync::Arc;

use anyhow::Result;

use super::{upload, upload_fused, DeviceBatch, DeviceModel, Output, Outputs, Runner, StateLayout};
use crate::kernels::cuda::{AttnArgs, DevBuf, DevMatrix, Epilogue, Gpu, Product};
use crate::models::griffin::{Griffin, Temporal};
use crate::models::{ModelInfo, SeqInput};
use crate::state::{GriffinState, KvCache, State};
use crate::tensor::DType;

struct Recurrent {
    /// [2·lru, C]: linear_x, linear_y; bias [2·lru]
    xy: DevMatrix,
    xy_b: DevBuf,
    /// [width, lru], [lru]
    conv_w: DevBuf,
    conv_b: DevBuf,
    /// The block-diagonal gates as H groups of [2·bw, bw]: head h's input gate rows, then
    /// its recurrence gate rows; biases [H, 2, bw] alike. One product gives both gates.
    gates: DevMatrix,
    gates_b: DevBuf,
    log_a_scale: DevBuf,
    /// [C, lru], [C]
    out: DevMatrix,
    out_b: DevBuf,
    /// Index among the recurrent layers (its conv history and RG-LRU state)
    index: usize,
}

struct Attention {
    /// [H·hd + 2·KV·hd, C]
    qkv: DevMatrix,
    /// [C, H·hd], [C]
    o: DevMatrix,
    o_b: DevBuf,
    kv_index: usize,
}

enum Block {
    Recurrent(Box<Recurrent>),
    Attention(Box<Attention>),
}

/// RMSNorm weights are stored as Gemma applies them, `1 + w`.
struct Layer {
    temporal_norm: DevBuf,
    channel_norm: DevBuf,
    block: Block,
    /// [2F, C] gate, up; bias [2F]
    gate_up: DevMatrix,
    gate_up_b: DevBuf,
    /// [C, F], [C]
    down: DevMatrix,
    down_b: DevBuf,
}

/// A RecurrentGemma model on a CUDA device.
pub struct CudaGriffin {
    run: Runner,
    info: ModelInfo,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    lru: usize,
    conv_width: usize,
    window: usize,
    eps: f32,
    soft_cap: f32,
    embed_scale: f32,
    inv_freq: DevBuf,
    rot_half: usize,
    /// the tied embedding / output head [V, C]
    head: DevMatrix,
    embed_dtype: DType,
    layers: Vec<Layer>,
    n_recurrent: usize,
    final_norm: DevBuf,
}

fn concat(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().chain(b).copied().collect()
}

/// Gemma's RMSNorm weight as applied: `1 + w` (models/griffin.rs, rmsnorm_gemma).
fn plus_one(w: &[f32]) -> Vec<f32> {
    w.iter().map(|v| 1.0 + v).collect()
}

impl CudaGriffin {
    /// Uploads a loaded model's weights.
    pub fn new(m: Griffin, gpu: &Arc<Gpu>) -> Result<CudaGriffin> {
        let mut layers = Vec::with_capacity(m.layers.len());
        let mut r_index = 0;
        for (i, l) in m.layers.iter().enumerate() {
            let what = |n: &str| format!("model.layers.{i}.{n}");
            let block = match &l.temporal {
                Temporal::Recurrent(r) => {
                    let heads = r.input_gate.len();
                    let bw = r.input_gate_b.len() / heads;
                    let per_head: Vec<&crate::tensor::Matrix> = r
                        .input_gate
                        .iter()
                        .zip(&r.a_gate)
                        .flat_map(|(i, a)| [i, a])
                        .collect();
                    let mut gates = upload_fused(gpu, &per_head, &what("temporal_block.rg_lru gates"))?;
                    gates.groups = heads;
                    let gates_b: Vec<f32> = (0..heads)
                        .flat_map(|h| {
                            let span = h * bw..(h + 1) * bw;
                            r.input_gate_b[span.clone()]
                                .iter()
                                .chain(&r.a_gate_b[span])
                                .copied()
                        })
                        .collect();
                    r_index += 1;
                    Block::Recurrent(Box::new(Recurrent {
                        xy: upload_fused(
                            gpu,
                            &[&r.linear_x, &r.linear_y],
                            &what("temporal_block.linear_x/y"),
                        )?,
                        xy_b: gpu.upload(&concat(&r.linear_x_b, &r.linear_y_b))?,
                        conv_w: gpu.upload(&r.conv_w)?,
                        conv_b: gpu.upload(&r.conv_b)?,
                        gates,
                        gates_b: gpu.upload(&gates_b)?,
                        log_a_scale: gpu.upload(&r.log_a_scale)?,
                        out: upload(gpu, &r.linear_out, &what("temporal_block.linear_out"))?,
                        out_b: gpu.upload(&r.linear_out_b)?,
                        index: r_index - 1,
                    }))
                }
                Temporal::Attention(a) => Block::Attention(Box::new(Attention {
                    qkv: upload_fused(gpu, &[&a.q, &a.k, &a.v], &what("temporal_block.q/k/v_proj"))?,
                    o: upload(gpu, &a.o, &what("temporal_block.o_proj"))?,
                    o_b: gpu.upload(&a.o_b)?,
                    kv_index: a.kv_index,
                })),
            };
            layers.push(Layer {
                temporal_norm: gpu.upload(&plus_one(&l.temporal_norm))?,
                channel_norm: gpu.upload(&plus_one(&l.channel_norm))?,
                block,
                gate_up: upload_fused(gpu, &[&l.gate, &l.up], &what("mlp_block.gate/up_proj"))?,
                gate_up_b: gpu.upload(&concat(&l.gate_b, &l.up_b))?,
                down: upload(gpu, &l.down, &what("mlp_block.down_proj"))?,
                down_b: gpu.upload(&l.down_b)?,
            });
        }
        let (nr, lru, w) = (m.n_recurrent, m.lru, m.conv_width);
        let layout = state_layout(&m);
        Ok(CudaGriffin {
            run: Runner::new(gpu, layout),
            info: m.info.clone(),
            heads: m.heads,
            kv_heads: m.kv_heads,
            head_dim: m.head_dim,
            lru,
            conv_width: w,
            window: m.window,
            eps: m.eps,
            soft_cap: m.soft_cap,
            embed_scale: m.embed_scale,
            inv_freq: gpu.upload(&m.inv_freq)?,
            rot_half: m.inv_freq.len(),
            head: upload(gpu, &m.head, "model.embed_tokens")?,
            embed_dtype: m.embed.dtype(),
            layers,
            n_recurrent: nr,
            final_norm: gpu.upload(&plus_one(&m.final_norm))?,
        })
    }
}

/// The device state: conv histories and RG-LRU states per recurrent layer, then the key and
/// value rings per attention layer, as the CPU state lists them.
pub(super) fn state_layout(m: &Griffin) -> StateLayout {
    let kv_dim = m.kv_heads * m.head_dim;
    let (nr, lru, w) = (m.n_recurrent, m.lru, m.conv_width);
    let template = State::Griffin(GriffinState::new(
        nr,
        lru,
        w,
        KvCache::ring(m.n_attention, kv_dim, m.window),
    ));
    let mut fixed = vec![(w - 1) * lru; nr];
    fixed.extend(std::iter::repeat_n(lru, nr));
    let n = 2 * m.n_attention;
    StateLayout::new(template, fixed, n, kv_dim, m.embed.dtype(), Some(m.window))
}

impl DeviceModel for CudaGriffin {
    fn runner(&self) -> &Runner {
        &self.run
    }

    fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    fn pass(&self, batch: &mut [SeqInput<'_>], out: Output<'_>) -> Result<Outputs> {
        let g = &*self.run.gpu;
        let (c, v, lru, w) = (
            self.info.hidden_size,
            self.info.vocab_size,
            self.lru,
            self.conv_width,
        );
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (qd, kvd) = (h * hd, kvh * hd);
        let qkvd = qd + 2 * kvd;
        let f = self.layers.first().map_or(0, |l| l.gate_up.rows / 2);
        let wide = (2 * lru).max(qkvd);
        let sizes = |b: &DeviceBatch| {
            let (rows, np) = (b.rows, b.n_picked);
            [
                rows * c,
                rows * wide,
                rows * lru,
                rows * 2 * lru,
                rows * lru.max(qd).max(f),
                Gpu::attention_scratch(rows, h, hd, b.max_keys),
                np * c,
            ]
        };
        self.run.forward(
            v,
            batch,
            out,
            self.window + 1,
            sizes,
            |b, [x, xy, conv, gates, tmp, part, px], logits| {
                let (rows, np) = (b.rows, b.n_picked);
                g.embed(
                    self.head.buf.ptr(),
                    self.embed_dtype,
                    b.tokens,
                    x,
                    rows,
                    c,
                    self.embed_scale,
                )?;
                let prod = |x, x_stride, y, y_stride| Product::new(x, x_stride, rows, y, y_stride);
                let (hist_base, h_base) = (0, self.n_recurrent * (w - 1) * lru);
                for l in &self.layers {
                    let normed =
                        |y, y_stride| prod(x, c, y, y_stride).rms_normed(l.temporal_norm.ptr(), self.eps);
                    match &l.block {
                        Block::Recurrent(r) => {
                            // xy [rows, 2·lru]: linear_x | linear_y
                            g.linear(&r.xy, normed(xy, 2 * lru).with_bias(r.xy_b.ptr()))?;
                            let hist_off = hist_base + r.index * (w - 1) * lru;
                            let (cw, cb) = (r.conv_w.ptr(), r.conv_b.ptr());
                            g.conv1d(xy, 2 * lru, conv, cw, cb, lru, w, hist_off, b.meta)?;
                            g.linear(
                                &r.gates,
                                prod(conv, lru, gates, 2 * lru).with_bias(r.gates_b.ptr()),
                            )?;
                            let (y, h_off) = (xy.f32_at(lru), h_base + r.index * lru);
                            let (bw, a_scale) = (lru / h, r.log_a_scale.ptr());
                            g.rglru_scan(conv, gates, y, 2 * lru, a_scale, tmp, lru, bw, h_off, b.meta)?;
                            g.linear(
                                &r.out,
                                prod(tmp, lru, x, c).with_bias(r.out_b.ptr()).accumulating(),
                            )?;
                        }
                        Block::Attention(a) => {
                            g.linear(&a.qkv, normed(xy, qkvd))?;
                            g.rope(xy, qkvd, h + kvh, hd, self.rot_half, self.inv_freq.ptr(), b.meta)?;
                            let layout = &self.run.layout;
                            let (kv_offset, cache) = (layout.kv_offset(), layout.kv_dtype());
                            let span = self.window + 1;
                            let args = AttnArgs::fused_qkv(xy, h, kvh, hd, kv_offset, a.kv_index, span);
                            g.attention(args, cache, b.meta, b.max_keys, tmp, part)?;
                            g.linear(&a.o, prod(tmp, qd, x, c).with_bias(a.o_b.ptr()).accumulating())?;
                        }
                    }
                    let gelu = Epilogue::GatedMlp { gelu: true };
                    let gate_up = prod(x, c, tmp, f)
                        .rms_normed(l.channel_norm.ptr(), self.eps)
                        .with_bias(l.gate_up_b.ptr())
                        .then(gelu);
                    g.linear(&l.gate_up, gate_up)?;
                    g.linear(
                        &l.down,
                        prod(tmp, f, x, c).with_bias(l.down_b.ptr()).accumulating(),
                    )?;
                }
                g.gather_rows(x, b.picked, px, np, c)?;
                let head = Product::new(px, c, np, logits, v).rms_normed(self.final_norm.ptr(), self.eps);
                g.linear(&self.head, head)?;
                if self.soft_cap > 0.0 {
                    g.soft_cap(logits, np * v, self.soft_cap)?;
                }
                Ok(())
            },
        )
    }
}
