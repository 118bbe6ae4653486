//! Llama-2 / Mistral / SOLAR on a CUDA device: the math of `models/llama.rs`, with q/k/v
//! and gate/up fused into one product each.

use std::sync::Arc;

use anyhow::Result;

use super::{upload, upload_fused, DeviceBatch, DeviceModel, Output, Outputs, Runner, StateLayout};
use crate::kernels::cuda::{AttnArgs, DevBuf, DevMatrix, Epilogue, Gpu, Product};
use crate::models::llama::Llama;
use crate::models::{ModelInfo, SeqInput};
use crate::state::{KvCache, State};
use crate::tensor::DType;

struct Layer {
    attn_norm: DevBuf,
    /// [H·hd + 2·KV·hd, C]: q, k, v
    qkv: DevMatrix,
    /// [C, H·hd]
    o: DevMatrix,
    mlp_norm: DevBuf,
    /// [2F, C]: gate, up
    gate_up: DevMatrix,
    /// [C, F]
    down: DevMatrix,
}

/// A Llama-architecture model on a CUDA device.
pub struct CudaLlama {
    run: Runner,
    info: ModelInfo,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    window: Option<usize>,
    inv_freq: DevBuf,
    /// embed_tokens [V, C], unless tied to the head
    embed: Option<DevBuf>,
    embed_dtype: DType,
    layers: Vec<Layer>,
    norm: DevBuf,
    lm_head: DevMatrix,
}

impl CudaLlama {
    /// Uploads a loaded model's weights.
    pub fn new(m: Llama, gpu: &Arc<Gpu>) -> Result<CudaLlama> {
        let mut layers = Vec::with_capacity(m.layers.len());
        for (i, l) in m.layers.iter().enumerate() {
            let what = |n: &str| format!("model.layers.{i}.{n}");
            layers.push(Layer {
                attn_norm: gpu.upload(&l.attn_norm)?,
                qkv: upload_fused(gpu, &[&l.q, &l.k, &l.v], &what("self_attn.q/k/v_proj"))?,
                o: upload(gpu, &l.o, &what("self_attn.o_proj"))?,
                mlp_norm: gpu.upload(&l.mlp_norm)?,
                gate_up: upload_fused(gpu, &[&l.gate, &l.up], &what("mlp.gate/up_proj"))?,
                down: upload(gpu, &l.down, &what("mlp.down_proj"))?,
            });
        }
        let lm_head = upload(gpu, &m.lm_head, "lm_head")?;
        let embed_table = m.embed_tensor()?;
        let tied = matches!(&m.lm_head, crate::tensor::Matrix::Dense(t) if t.raw().as_ptr() == embed_table.raw().as_ptr());
        let embed = if tied {
            None
        } else {
            Some(gpu.upload(embed_table.raw())?)
        };
        let embed_dtype = embed_table.dtype();
        let layout = state_layout(&m)?;
        Ok(CudaLlama {
            run: Runner::new(gpu, layout),
            info: m.info.clone(),
            heads: m.heads,
            kv_heads: m.kv_heads,
            head_dim: m.head_dim,
            eps: m.eps,
            window: m.window,
            inv_freq: gpu.upload(&m.inv_freq)?,
            embed,
            embed_dtype,
            layers,
            norm: gpu.upload(&m.norm)?,
            lm_head,
        })
    }
}

/// The device state: the CPU cache's parts (keys, values per layer) at `slots` rows each,
/// in the model's dtype (its embedding table's).
pub(super) fn state_layout(m: &Llama) -> Result<StateLayout> {
    let kv_dim = m.kv_heads * m.head_dim;
    let template = State::Kv(KvCache::new(m.layers.len(), kv_dim, m.window));
    let n = 2 * m.layers.len();
    Ok(StateLayout::new(
        template,
        Vec::new(),
        n,
        kv_dim,
        m.embed_tensor()?.dtype(),
        m.window,
    ))
}

impl DeviceModel for CudaLlama {
    fn runner(&self) -> &Runner {
        &self.run
    }

    fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    fn pass(&self, batch: &mut [SeqInput<'_>], out: Output<'_>) -> Result<Outputs> {
        let g = &*self.run.gpu;
        let (c, v) = (self.info.hidden_size, self.info.vocab_size);
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (qd, kvd) = (h * hd, kvh * hd);
        let qkvd = qd + 2 * kvd;
        let f = self.layers.first().map_or(0, |l| l.gate_up.rows / 2);
        let sizes = |b: &DeviceBatch| {
            let (rows, np) = (b.rows, b.n_picked);
            [
                rows * c,
                rows * qkvd,
                rows * qd,
                rows * f,
                Gpu::attention_scratch(rows, h, hd, b.max_keys),
                np * c,
            ]
        };
        self.run.forward(
            v,
            batch,
            out,
            self.window.unwrap_or(0),
            sizes,
            |b, [x, qkv, attn, act, part, px], logits| {
                let (rows, np) = (b.rows, b.n_picked);
                let embed = self.embed.as_ref().map_or(self.lm_head.buf.ptr(), |e| e.ptr());
                g.embed(embed, self.embed_dtype, b.tokens, x, rows, c, 1.0)?;
                let prod = |x, x_stride, y, y_stride| Product::new(x, x_stride, rows, y, y_stride);
                for (li, l) in self.layers.iter().enumerate() {
                    let eps = self.eps;
                    g.linear(&l.qkv, prod(x, c, qkv, qkvd).rms_normed(l.attn_norm.ptr(), eps))?;
                    g.rope(qkv, qkvd, h + kvh, hd, hd / 2, self.inv_freq.ptr(), b.meta)?;
                    let (kv_offset, cache) = (self.run.layout.kv_offset(), self.run.layout.kv_dtype());
                    let span = self.window.unwrap_or(0);
                    let args = AttnArgs::fused_qkv(qkv, h, kvh, hd, kv_offset, li, span);
                    g.attention(args, cache, b.meta, b.max_keys, attn, part)?;
                    g.linear(&l.o, prod(attn, qd, x, c).accumulating())?;

                    let silu = Epilogue::GatedMlp { gelu: false };
                    let gate_up = prod(x, c, act, f).rms_normed(l.mlp_norm.ptr(), eps).then(silu);
                    g.linear(&l.gate_up, gate_up)?;
                    g.linear(&l.down, prod(act, f, x, c).accumulating())?;
                }
                g.gather_rows(x, b.picked, px, np, c)?;
                let head = Product::new(px, c, np, logits, v).rms_normed(self.norm.ptr(), self.eps);
                g.linear(&self.lm_head, head)?;
                Ok(())
            },
        )
    }
}
