"""A small trainable PyTorch RWKV-5.2 ("Eagle") language model.

The forward pass follows the math in the reference notes (shared/reference/MODELS.md, section B)
and the inference code of the `rwkv` pip package (ChatRWKV), so a checkpoint saved from this
module with its own tensor names loads there unchanged (`.pth`, strategy 'cpu fp32'):

    xx = LayerNorm(x; ln1)                      sx = xx shifted right by one token (zeros first)
    r, k, v = mix(xx, sx, mu_{r,k,v}) @ W_{r,k,v}      g = silu(mix(xx, sx, mu_g) @ W_g)
    y[t, h, j] = sum_i r[t,h,i] * (u[h,i] k[t,h,i] v[t,h,j] + S_{t-1}[h,i,j])
    S_t[h,i,j] = k[t,h,i] v[t,h,j] + w[h,i] S_{t-1}[h,i,j]       w = exp(-exp(time_decay))
    x += (GroupNorm_H(y; ln_x, eps=64e-5) * g) @ W_o
    xx = LayerNorm(x; ln2)   x += sigmoid(mix_r @ W_r) * (relu(mix_k @ W_k)^2 @ W_v)
    logits = LayerNorm(x; ln_out) @ head

Block 0 also has `ln0`, applied to the embedding before the first block (the `rwkv` package
folds it into `emb.weight` at load time).

For training the recurrence is evaluated in chunks (`wkv_chunked`): exact in real arithmetic,
with every decay factor written as exp(log(w) * n) for n >= 0, so nothing overflows.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_SIZE = 64


def wkv_chunked(r, k, v, log_w, u, chunk: int = 16):
    """RWKV-5.2 linear attention over a whole sequence from a zero state.

    r, k, v: [B, T, H, N] float32; log_w: [H, N] (= -exp(time_decay)); u: [H, N].
    Returns y: [B, T, H, N].
    """
    B, T, H, N = r.shape
    pad = (-T) % chunk
    if pad:
        z = r.new_zeros(B, pad, H, N)
        r, k, v = torch.cat([r, z], 1), torch.cat([k, z], 1), torch.cat([v, z], 1)
    Tp = T + pad
    nc, L = Tp // chunk, chunk
    # [B, H, nc, L, N]
    r = r.view(B, nc, L, H, N).permute(0, 3, 1, 2, 4)
    k = k.view(B, nc, L, H, N).permute(0, 3, 1, 2, 4)
    v = v.view(B, nc, L, H, N).permute(0, 3, 1, 2, 4)
    pos = torch.arange(L, device=r.device)
    # Intra-chunk pair decay D[h, t, s, i] = w_i^(t-s-1) for s < t, else 0.
    diff = (pos[:, None] - pos[None, :] - 1).clamp(min=0).to(r.dtype)
    mask = (pos[:, None] > pos[None, :]).to(r.dtype)
    D = torch.exp(log_w[:, None, None, :] * diff[None, :, :, None]) * mask[None, :, :, None]
    # A[b,h,c,t,s] = sum_i r[t,i] k[s,i] D[t,s,i]
    A = torch.einsum("bhcti,htsi,bhcsi->bhcts", r, D, k)
    y = A @ v
    # Bonus (current token) term.
    y = y + (r * u[None, :, None, None, :] * k).sum(-1, keepdim=True) * v
    # Inter-chunk: carry the state S [B, H, N(key), N(value)].
    dec_in = torch.exp(log_w[:, None, :] * pos[None, :, None].to(r.dtype))  # [H, L, N]: w^t
    dec_out = torch.exp(log_w[:, None, :] * (L - 1 - pos)[None, :, None].to(r.dtype))  # w^(L-1-s)
    dec_all = torch.exp(log_w * L)[:, :, None]  # [H, N, 1]
    S = r.new_zeros(B, H, N, N)
    outs = []
    for c in range(nc):
        rc, kc, vc = r[:, :, c], k[:, :, c], v[:, :, c]  # [B, H, L, N]
        outs.append(y[:, :, c] + (rc * dec_in[None]) @ S)
        S = dec_all[None] * S + (kc * dec_out[None]).transpose(-1, -2) @ vc
    y = torch.stack(outs, 2)  # [B, H, nc, L, N]
    y = y.permute(0, 2, 3, 1, 4).reshape(B, Tp, H, N)
    return y[:, :T]


def wkv_loop(r, k, v, log_w, u):
    """Token-by-token reference of `wkv_chunked` (slow; for checking)."""
    B, T, H, N = r.shape
    w = torch.exp(log_w)[None, :, :, None]
    S = r.new_zeros(B, H, N, N)
    ys = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append((r[:, t, :, None, :] @ (u[None, :, :, None] * kv + S)).squeeze(-2))
        S = kv + w * S
    return torch.stack(ys, 1)


class TimeMix(nn.Module):
    def __init__(self, C: int, layer: int, n_layer: int):
        super().__init__()
        H = C // HEAD_SIZE
        self.H = H
        r01 = layer / max(n_layer - 1, 1)
        r10 = 1.0 - layer / n_layer
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        self.time_mix_k = nn.Parameter(ddd.pow(r10))
        self.time_mix_v = nn.Parameter(ddd.pow(r10) + 0.3 * r01)
        self.time_mix_r = nn.Parameter(ddd.pow(0.5 * r10))
        self.time_mix_g = nn.Parameter(ddd.pow(0.5 * r10))
        n = torch.arange(C, dtype=torch.float32)
        decay = -6.0 + 5.0 * (n / (C - 1)).pow(0.7 + 1.3 * r01)
        self.time_decay = nn.Parameter(decay.view(H, HEAD_SIZE))
        bonus = r01 * (1 - n / (C - 1)) + ((n + 1) % 3 - 1) * 0.1
        self.time_faaaa = nn.Parameter(bonus.view(H, HEAD_SIZE))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)
        nn.init.zeros_(self.output.weight)

    def forward(self, xx):  # xx: LayerNorm'd input [B, T, C]
        B, T, C = xx.shape
        sx = F.pad(xx, (0, 0, 1, -1))
        mix = lambda mu: xx * mu + sx * (1 - mu)
        r = self.receptance(mix(self.time_mix_r)).view(B, T, self.H, HEAD_SIZE)
        k = self.key(mix(self.time_mix_k)).view(B, T, self.H, HEAD_SIZE)
        v = self.value(mix(self.time_mix_v)).view(B, T, self.H, HEAD_SIZE)
        g = F.silu(self.gate(mix(self.time_mix_g)))
        y = wkv_chunked(r, k, v, -torch.exp(self.time_decay), self.time_faaaa)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        return self.output(y * g)


class ChannelMix(nn.Module):
    def __init__(self, C: int, F_: int, layer: int, n_layer: int):
        super().__init__()
        r10 = 1.0 - layer / n_layer
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        self.time_mix_k = nn.Parameter(ddd.pow(r10))
        self.time_mix_r = nn.Parameter(ddd.pow(r10))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.receptance.weight)

    def forward(self, xx):
        sx = F.pad(xx, (0, 0, 1, -1))
        kx = xx * self.time_mix_k + sx * (1 - self.time_mix_k)
        rx = xx * self.time_mix_r + sx * (1 - self.time_mix_r)
        return torch.sigmoid(self.receptance(rx)) * self.value(torch.relu(self.key(kx)).square())


class Block(nn.Module):
    def __init__(self, C: int, F_: int, layer: int, n_layer: int):
        super().__init__()
        if layer == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(C, layer, n_layer)
        self.ffn = ChannelMix(C, F_, layer, n_layer)

    def forward(self, x):
        x = x + self.att(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class RWKV5(nn.Module):
    def __init__(self, vocab: int, n_embd: int = 256, n_layer: int = 4, dim_ffn: int = 896):
        super().__init__()
        assert n_embd % HEAD_SIZE == 0
        self.emb = nn.Embedding(vocab, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, dim_ffn, i, n_layer) for i in range(n_layer))
        self.ln_out = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        nn.init.normal_(self.head.weight, std=0.5 / math.sqrt(n_embd))

    def forward(self, idx):  # idx [B, T] -> logits [B, T, V] (float32)
        x = self.blocks[0].ln0(self.emb(idx))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_out(x))
