//! RWKV-5.2 on a CUDA device: the math of `models/rwkv5.rs`. A layer is eight launches:
//! LayerNorm with the token shift, the r/k/v/g products as one grouped product, WKV with the
//! gated GroupNorm, the output product; LayerNorm with the shift, and the three channel-mix
//! products (relu² and the sigmoid gate in their epilogues).

use std::sync::Arc;

use anyhow::Result;

use super::{upload, upload_fused, DeviceBatch, DeviceModel, Output, Outputs, Runner, StateLayout};
use crate::kernels::cuda::{DevBuf, DevMatrix, Epilogue, Gpu, Product};
use crate::models::rwkv5::{Rwkv5, GN_EPS, LN_EPS};
use crate::models::{ModelInfo, SeqInput};
use crate::state::{RwkvState, State};
use crate::tensor::DType;

struct Block {
    ln1: (DevBuf, DevBuf),
    ln2: (DevBuf, DevBuf),
    /// time-mix coefficients [4, C]: r, k, v, g
    att_mix: DevBuf,
    decay: DevBuf,
    bonus: DevBuf,
    /// receptance, key, value and gate as 4 groups of [c_att, C]: one grouped product of
    /// the four mixes side by side
    w_rkvg: DevMatrix,
    wo: DevMatrix,
    ln_x: (DevBuf, DevBuf),
    /// channel-mix coefficients [2, C]: k, r
    ffn_mix: DevBuf,
    ffn_k: DevMatrix,
    ffn_r: DevMatrix,
    ffn_v: DevMatrix,
}

/// An RWKV-5.2 model on a CUDA device.
pub struct CudaRwkv5 {
    run: Runner,
    info: ModelInfo,
    heads: usize,
    head_size: usize,
    emb: DevBuf,
    emb_dtype: DType,
    ln0: (DevBuf, DevBuf),
    blocks: Vec<Block>,
    ln_out: (DevBuf, DevBuf),
    head: DevMatrix,
}

fn pair(gpu: &Arc<Gpu>, p: &(Vec<f32>, Vec<f32>)) -> Result<(DevBuf, DevBuf)> {
    Ok((gpu.upload(&p.0)?, gpu.upload(&p.1)?))
}

impl CudaRwkv5 {
    /// Uploads a loaded model's weights.
    pub fn new(m: Rwkv5, gpu: &Arc<Gpu>) -> Result<CudaRwkv5> {
        let mut blocks = Vec::with_capacity(m.blocks.len());
        for (i, b) in m.blocks.iter().enumerate() {
            let what = |n: &str| format!("blocks.{i}.{n}");
            let cat =
                |parts: &[&Vec<f32>]| parts.iter().flat_map(|p| p.iter().copied()).collect::<Vec<f32>>();
            blocks.push(Block {
                ln1: pair(gpu, &b.ln1)?,
                ln2: pair(gpu, &b.ln2)?,
                att_mix: gpu.upload(&cat(&[&b.mix_r, &b.mix_k, &b.mix_v, &b.mix_g]))?,
                decay: gpu.upload(&b.decay)?,
                bonus: gpu.upload(&b.bonus)?,
                w_rkvg: {
                    let mut m = upload_fused(
                        gpu,
                        &[&b.wr, &b.wk, &b.wv, &b.wg],
                        &what("att.receptance/key/value/gate.weight"),
                    )?;
                    m.groups = 4;
                    m
                },
                wo: upload(gpu, &b.wo, &what("att.output.weight"))?,
                ln_x: pair(gpu, &b.ln_x)?,
                ffn_mix: gpu.upload(&cat(&[&b.ffn_mix_k, &b.ffn_mix_r]))?,
                ffn_k: upload(gpu, &b.ffn_k, &what("ffn.key.weight"))?,
                ffn_r: upload(gpu, &b.ffn_r, &what("ffn.receptance.weight"))?,
                ffn_v: upload(gpu, &b.ffn_v, &what("ffn.value.weight"))?,
            });
        }
        let (h, n) = (m.heads, m.head_size);
        let layout = state_layout(&m);
        Ok(CudaRwkv5 {
            run: Runner::new(gpu, layout),
            info: m.info.clone(),
            heads: h,
            head_size: n,
            emb: gpu.upload(m.emb.raw())?,
            emb_dtype: m.emb.dtype(),
            ln0: pair(gpu, &m.ln0)?,
            blocks,
            ln_out: pair(gpu, &m.ln_out)?,
            head: upload(gpu, &m.head, "head.weight")?,
        })
    }
}

/// The device state: token shifts and WKV matrices per layer, as the CPU state lists them.
pub(super) fn state_layout(m: &Rwkv5) -> StateLayout {
    let (l, c, h, n) = (m.blocks.len(), m.info.hidden_size, m.heads, m.head_size);
    let template = State::Rwkv(RwkvState::new(l, c, h, n));
    let fixed = (0..l).flat_map(|_| [c, h * n * n, c]).collect();
    StateLayout::new(template, fixed, 0, 0, DType::F32, Some(0))
}

impl DeviceModel for CudaRwkv5 {
    fn runner(&self) -> &Runner {
        &self.run
    }

    fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    fn pass(&self, batch: &mut [SeqInput<'_>], out: Output<'_>) -> Result<Outputs> {
        let g = &*self.run.gpu;
        let (c, v, h, n) = (
            self.info.hidden_size,
            self.info.vocab_size,
            self.heads,
            self.head_size,
        );
        let c_att = h * n;
        let f = self.blocks.first().map_or(0, |b| b.ffn_k.rows);
        let sizes = |b: &DeviceBatch| {
            let (rows, np) = (b.rows, b.n_picked);
            [
                rows * c,
                rows * c,
                4 * rows * c,
                4 * rows * c_att,
                rows * c_att.max(c),
                rows * f,
                np * c,
                np * c,
            ]
        };
        self.run.forward(
            v,
            batch,
            out,
            0,
            sizes,
            |b, [x, xx, mixes, rkvg, y, fk, px, pn], logits| {
                let (rows, np) = (b.rows, b.n_picked);
                g.embed(self.emb.ptr(), self.emb_dtype, b.tokens, xx, rows, c, 1.0)?;
                g.layernorm(xx, self.ln0.0.ptr(), self.ln0.1.ptr(), x, rows, c, LN_EPS)?;
                // The reference folds ln0 into the table in the table's dtype: round as it does.
                if self.emb_dtype != DType::F32 {
                    g.round_in_place(x, rows * c, self.emb_dtype)?;
                }
                let prod = |x, x_stride, y, y_stride| Product::new(x, x_stride, rows, y, y_stride);
                let per_layer = 2 * c + h * n * n;
                for (li, bl) in self.blocks.iter().enumerate() {
                    let shift_off = li * per_layer;
                    let wkv_off = shift_off + c;
                    // Time mixing: mixes [rows, 4·C] (r | k | v | g inputs), rkvg [rows, 4·c_att].
                    let ln1 = (bl.ln1.0.ptr(), bl.ln1.1.ptr(), LN_EPS);
                    g.ln_shift_mix(x, ln1, mixes, bl.att_mix.ptr(), 4, c, shift_off, b.meta)?;
                    g.linear(&bl.w_rkvg, prod(mixes, 4 * c, rkvg, 4 * c_att))?;
                    let ln_x = (bl.ln_x.0.ptr(), bl.ln_x.1.ptr(), GN_EPS);
                    g.wkv5(
                        rkvg,
                        bl.decay.ptr(),
                        bl.bonus.ptr(),
                        ln_x,
                        y,
                        h,
                        n,
                        wkv_off,
                        b.meta,
                    )?;
                    g.linear(&bl.wo, prod(y, c_att, x, c).accumulating())?;

                    // Channel mixing: mixes [rows, 2·C] (k | r inputs);
                    // x += sigmoid(r) · (relu(k)² · Wv), r and relu² in the products' epilogues.
                    let ln2 = (bl.ln2.0.ptr(), bl.ln2.1.ptr(), LN_EPS);
                    let ffn_shift = wkv_off + h * n * n;
                    g.ln_shift_mix(x, ln2, mixes, bl.ffn_mix.ptr(), 2, c, ffn_shift, b.meta)?;
                    g.linear(&bl.ffn_r, prod(mixes.f32_at(c), 2 * c, xx, c))?;
                    g.linear(&bl.ffn_k, prod(mixes, 2 * c, fk, f).then(Epilogue::ReluSquare))?;
                    g.linear(&bl.ffn_v, prod(fk, f, x, c).then(Epilogue::AccumulateGated(xx)))?;
                }
                g.gather_rows(x, b.picked, px, np, c)?;
                g.layernorm(px, self.ln_out.0.ptr(), self.ln_out.1.ptr(), pn, np, c, LN_EPS)?;
                g.linear(&self.head, Product::new(pn, c, np, logits, v))?;
                Ok(())
            },
        )
    }
}
