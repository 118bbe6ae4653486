#!/usr/bin/env python3
"""Generate tiny RecurrentGemma (Griffin) parity fixtures for gyre.

Run:   python3 tools/make_griffin_fixtures.py            (regenerates every case)
       python3 tools/make_griffin_fixtures.py --only griffin_small

Needs torch, transformers, safetensors, numpy and the DeepMind reference package
`recurrentgemma` (PyPI; the torch implementation `recurrentgemma.torch`). The
Rust tests need none of them: they only read the files written here.

Installing the reference without JAX
------------------------------------
recurrentgemma 1.0.1 declares jax/flax only under the `jax` extra, but its
top-level `recurrentgemma/__init__.py` imports `recurrentgemma.jax.*` anyway, so
`import recurrentgemma.torch` fails without flax. And it pins numpy < 2.4. What
was done here (and works):

    pip install --no-deps recurrentgemma==1.0.1
    pip install "absl-py>=1,<2" "einops<1" "jaxtyping<1" "typeguard>=2,<3" sentencepiece

If the normal import fails on a missing jax/flax, this script registers a bare
`recurrentgemma` package object pointing at the installed directory (so the
top-level `__init__` never runs) and imports `recurrentgemma.common` and
`recurrentgemma.torch` from it. The torch code itself is unchanged; meta.json
records which import path was taken.

Where the numbers come from
---------------------------
Every expected logit is computed by the DeepMind reference
(`recurrentgemma.torch.Griffin`), in float32 params and float32 activations,
`gradient_checkpointing=False`, `model.eval()`, `torch.no_grad()`, one CPU
thread. The embedding multiplier is bf16(sqrt(width)) even in f32: that is what
the reference does on purpose (`Embedder.encode`), so it is kept.

The reference weights are then renamed/reshaped to the HF layout (table below)
and saved with transformers' `RecurrentGemmaForCausalLM.save_pretrained`. The
HF model is reloaded from disk and its logits are compared with the reference
at every position below the attention window (asserted <= 1e-4). Past the
window HF and the reference differ (see "Window" below); the first differing
position is recorded in meta.json, not asserted away.

Reference name -> HF name (i = layer; C = width, L = lru_width, F = MLP width,
H = heads, bw = L/H, hd = C/H)
    embedder.input_embedding [V,C]        -> model.embed_tokens.weight (same; lm_head tied, not stored)
    final_norm.scale [C]                  -> model.final_norm.weight
    blocks.i.temporal_pre_norm.scale      -> model.layers.i.temporal_pre_norm.weight
    blocks.i.channel_pre_norm.scale       -> model.layers.i.channel_pre_norm.weight
    blocks.i.recurrent_block.linear_{x,y}.{weight [L,C],bias [L]}
                                          -> model.layers.i.temporal_block.linear_{x,y}.{weight,bias}
    blocks.i.recurrent_block.linear_out.{weight [C,L],bias [C]}
                                          -> model.layers.i.temporal_block.linear_out.{weight,bias}
    blocks.i.recurrent_block.conv_1d.w [4,L]
                                          -> model.layers.i.temporal_block.conv_1d.weight [L,1,4]
                                             hf[c,0,k] = ref[k,c]  (k = 3 multiplies the current token)
    blocks.i.recurrent_block.conv_1d.b [L]-> ...temporal_block.conv_1d.bias
    blocks.i.recurrent_block.rg_lru.a_param [L]      -> ...temporal_block.rg_lru.recurrent_param
    blocks.i.recurrent_block.rg_lru.input_gate.w [H,bw,bw] -> ...rg_lru.input_gate_weight (same, input index first)
    blocks.i.recurrent_block.rg_lru.input_gate.b [H,bw]    -> ...rg_lru.input_gate_bias
    blocks.i.recurrent_block.rg_lru.a_gate.w [H,bw,bw]     -> ...rg_lru.recurrent_gate_weight
    blocks.i.recurrent_block.rg_lru.a_gate.b [H,bw]        -> ...rg_lru.recurrent_gate_bias
    blocks.i.attention_block.proj_q.weight [C,C]     -> ...temporal_block.q_proj.weight
    blocks.i.attention_block.proj_k.weight [hd,C]    -> ...temporal_block.k_proj.weight
    blocks.i.attention_block.proj_v.weight [hd,C]    -> ...temporal_block.v_proj.weight
    blocks.i.attention_block.proj_final.{weight [C,C],bias [C]} -> ...temporal_block.o_proj.{weight,bias}
    blocks.i.mlp_block.ffw_up.w [2,C,F]   -> ...mlp_block.gate_proj.weight = w[0].T [F,C]
                                             ...mlp_block.up_proj.weight   = w[1].T [F,C]
    blocks.i.mlp_block.ffw_up.b [2,1,1,F] -> ...mlp_block.gate_proj.bias = b[0,0,0], up_proj.bias = b[1,0,0]
    blocks.i.mlp_block.ffw_down.{weight [C,F],bias [C]} -> ...mlp_block.down_proj.{weight,bias}
(HF config `intermediate_size` = 2*F: HF's MLP uses intermediate_size // 2.)

Weights
-------
Reference init (`Griffin(config, dtype=float32)` under torch.manual_seed), then
every parameter that the reference initialises to something trivial is
perturbed with a separate generator so each code path matters:
  * RMSNorm `scale` (init 0; used as 1 + scale)      -> 0.3 * randn
  * every bias (linear_x/y/out, conv_1d.b, proj_final, ffw_up.b, ffw_down,
    input_gate.b, a_gate.b; all init 0)              -> 0.1 * randn (gates: 0.5 * randn)
  * conv_1d.w (init std 0.05, negligible)            -> 0.5 * randn
  * rg_lru.a_param (ring init)                       -> += 0.5 * randn
  * input_gate.w / a_gate.w                          -> += 0.5 * std * randn
  * embedder.input_embedding                         -> *= 2   (logits O(1..10))
  * attention proj_q                                 -> *= 2   (sharper attention, so the window matters)
Everything stays float32.

Cases
-----
1. griffin_small
   width 96, lru_width 128 (!= width), 4 heads (head_dim 24: partial RoPE on
   the first 12 dims, pairs i <-> i+6; RG-LRU gates are 4 blocks of 32), one KV
   head, MLP width 288 (HF intermediate_size 576), 4 layers
   recurrent, recurrent, attention, recurrent. The HF config stores
   block_types = ["recurrent","recurrent","attention"] with num_hidden_layers 4,
   so layer 3 comes from the CYCLIC rule layer_type(i) = block_types[i % 3]
   (the real 2B/9B configs rely on the same rule). attention_window_size 8,
   conv1d_width 4, vocab 256, logits_soft_cap 30, embedding multiplier
   bf16(sqrt(96)) = 9.8125 (not 9.79796). config.json exactly as transformers
   5.x save_pretrained writes it (`block_types`, `rope_parameters`, `dtype`).
   tokens_long: 32 tokens (4x the window). tokens_short: 6 tokens.
2. griffin_attn_first
   width 64, lru_width 96, 2 heads (head_dim 32: RoPE on 16 dims, pairs
   i <-> i+8; RG-LRU blocks of 48), MLP width 192 (intermediate_size 384),
   2 layers attention, recurrent (an attention block FIRST), window 4.
   tokens_long: 20 tokens (5x the window). tokens_short: 3 tokens (shorter
   than conv1d_width, so the conv runs with fewer taps than its width).
   Its config.json is rewritten into the LEGACY spelling of the hub
   checkpoints (google/recurrentgemma-2b, transformers 4.40): the layer
   pattern is under `_block_types` (no `block_types`), `rope_theta` and
   `partial_rotary_factor` are top-level (no `rope_parameters`),
   `embeddings_scale_by_sqrt_dim: true`, `torch_dtype`. NOTE: transformers 5.x
   does not read `_block_types` (it silently falls back to the default
   recurrent,recurrent,attention pattern), so the script cross-checks HF with a
   config whose block_types is set from `_block_types` by hand; meta.json
   records what a plain load would have used. An engine must accept both keys.

Files per case (crates/gyre/tests/fixtures/griffin/<case>/)
  config.json, generation_config.json, model.safetensors   HF model dir (f32,
                                     no lm_head.weight: tied to embed_tokens)
  expected.safetensors
      tokens_long       int64   [T]     ids, one sequence, positions 0..T-1
      logits_long       float32 [T, V]  DeepMind reference, ONE forward over the
                                        whole sequence, segment_pos 0..T-1, no cache
      logits_long_step  float32 [T, V]  DeepMind reference, one token at a time
                                        from `Griffin.init_cache` (segment_pos t),
                                        using the reference's own decode cache
      tokens_short      int64   [Ts]
      logits_short      float32 [Ts, V] as logits_long
  meta.json     versions, API used, configs, seeds, name map, checks, window
                semantics observed, embedding multiplier, notes.

Checks asserted here (the script fails otherwise):
  * logits_long_step == logits_long within 1e-4 (reference decode vs prefill)
  * reference prefill of P tokens followed by single steps == logits_long for
    several P (below, at and past the window; this is what the reference
    sampler does)
  * HF (reloaded from disk, eager, f32, use_cache=False) == reference within
    1e-4 at every position < window, and on the whole short sequence
  * HF loads the directory with no missing / unexpected keys; the safetensors
    file has no lm_head.weight

Window (MODELS.md A.7/A.8): the reference lets query q see keys
q - window .. q (window + 1 keys) in prefill and in decode. transformers 5.x
prefill uses a sliding-window mask of `window` keys (q - window + 1 .. q), so
HF first differs from the reference at position q = window. Observed values
are in meta.json["window"].

Determinism: fixed seeds, one thread. The same torch / transformers /
recurrentgemma versions (recorded in meta.json) give byte-identical files.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import safetensors
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

try:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
except Exception:  # pragma: no cover - cosmetic
    pass

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_ROOT = REPO_ROOT / "crates" / "gyre" / "tests" / "fixtures" / "griffin"
GENERATOR = "tools/make_griffin_fixtures.py"
F32_TOL = 1e-4


# --------------------------------------------------------------------------- reference import


def import_reference():
    """Returns (common, rg_torch, modules, import_mode)."""
    try:
        import recurrentgemma.torch as rg_torch  # noqa: F401

        mode = "normal `import recurrentgemma.torch`"
    except ModuleNotFoundError as e:
        if not (e.name or "").split(".")[0] in ("jax", "flax", "jaxlib", "orbax"):
            raise
        for k in [k for k in sys.modules if k == "recurrentgemma" or k.startswith("recurrentgemma.")]:
            del sys.modules[k]
        spec = importlib.util.find_spec("recurrentgemma")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("recurrentgemma is not installed (pip install --no-deps recurrentgemma)")
        pkg = types.ModuleType("recurrentgemma")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = None
        sys.modules["recurrentgemma"] = pkg
        mode = (
            f"top-level recurrentgemma/__init__.py skipped (it imports recurrentgemma.jax and "
            f"`{e.name}` is not installed); recurrentgemma.common and recurrentgemma.torch imported "
            f"from {pkg.__path__[0]}"
        )
    common = importlib.import_module("recurrentgemma.common")
    rg_torch = importlib.import_module("recurrentgemma.torch")
    modules = importlib.import_module("recurrentgemma.torch.modules")
    return common, rg_torch, modules, mode


common, rg, rg_modules, IMPORT_MODE = import_reference()
RECURRENT = common.TemporalBlockType.RECURRENT
ATTENTION = common.TemporalBlockType.ATTENTION

VERSIONS = {
    "recurrentgemma": importlib.metadata.version("recurrentgemma"),
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "safetensors": safetensors.__version__,
    "numpy": np.__version__,
    "python": platform.python_version(),
}

REFERENCE_API = {
    "model": "recurrentgemma.torch.Griffin(config, gradient_checkpointing=False, device='cpu', dtype=torch.float32)",
    "config": "recurrentgemma.common.GriffinConfig(vocab_size, width, mlp_expanded_width, num_heads, block_types, "
              "embeddings_scale_by_sqrt_dim=True, attention_window_size, logits_soft_cap, lru_width)",
    "prefill": "logits, _ = model(tokens[None], segment_pos=arange(T)[None], cache=None, return_cache=False)",
    "decode": "cache = model.init_cache(batch_size=1, dtype=torch.float32); for t: "
              "logits_t, cache = model(tokens[None, t:t+1], segment_pos=[[t]], cache=cache)",
    "prefill_then_decode": "_, cache = model(tokens[None, :P], segment_pos=arange(P)[None]) (cache=None, "
                           "return_cache=True), then the decode loop from t = P",
    "mask": "recurrentgemma.torch.modules._compute_forward_pass_mask(segment_pos, window)",
}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- reference model


def block_name(t) -> str:
    return {RECURRENT: "recurrent", ATTENTION: "attention"}[t]


def build_reference(spec: dict):
    cfg = rg.GriffinConfig(
        vocab_size=spec["vocab"],
        width=spec["width"],
        mlp_expanded_width=spec["mlp"],
        num_heads=spec["heads"],
        block_types=tuple(spec["layers"]),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=spec["window"],
        logits_soft_cap=spec["soft_cap"],
        lru_width=spec["lru"],
    )
    torch.manual_seed(spec["seed_init"])
    model = rg.Griffin(cfg, gradient_checkpointing=False, device="cpu", dtype=torch.float32)
    model.eval()
    counts = perturb(model, spec["seed_perturb"])
    for p in model.parameters():
        assert p.dtype == torch.float32
    return cfg, model, counts


@torch.no_grad()
def perturb(model, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rn(p, std):
        return std * torch.randn(p.shape, generator=gen, dtype=torch.float32)

    counts: dict[str, int] = {}
    for name, p in sorted(model.named_parameters()):
        if name.endswith(".scale"):  # RMSNorm, init 0, used as (1 + scale)
            p.copy_(rn(p, 0.3)); rule = "norm_scale"
        elif name.endswith("conv_1d.w"):
            p.copy_(rn(p, 0.5)); rule = "conv_w"
        elif name.endswith("rg_lru.a_param"):
            p.add_(rn(p, 0.5)); rule = "a_param"
        elif name.endswith(("input_gate.w", "a_gate.w")):
            p.add_(rn(p, 0.5 * float(p.std()))); rule = "gate_w"
        elif name.endswith(("input_gate.b", "a_gate.b")):
            p.copy_(rn(p, 0.5)); rule = "gate_b"
        elif name.endswith((".bias", ".b")):
            assert float(p.abs().max()) == 0.0, name
            p.copy_(rn(p, 0.1)); rule = "bias"
        elif name == "embedder.input_embedding":
            p.mul_(2.0); rule = "embedding"
        elif name.endswith("proj_q.weight"):
            p.mul_(2.0); rule = "proj_q"
        else:
            rule = "unchanged"
        counts[rule] = counts.get(rule, 0) + 1
    return counts


@torch.no_grad()
def ref_prefill(model, tokens: torch.Tensor) -> torch.Tensor:
    t = tokens.numel()
    logits, _ = model(tokens[None], segment_pos=torch.arange(t)[None], cache=None, return_cache=False)
    assert logits.dtype == torch.float32
    return logits[0].contiguous()


@torch.no_grad()
def ref_decode(model, tokens: torch.Tensor, prefill_len: int = 0) -> torch.Tensor:
    """Reference decode with its own cache; optional prefill of the first P tokens."""
    t_total = tokens.numel()
    out = []
    if prefill_len > 0:
        logits, cache = model(
            tokens[None, :prefill_len], segment_pos=torch.arange(prefill_len)[None], cache=None, return_cache=True
        )
        out.append(logits[0])
    else:
        cache = model.init_cache(batch_size=1, dtype=torch.float32)
    for t in range(prefill_len, t_total):
        logits, cache = model(tokens[None, t : t + 1], segment_pos=torch.tensor([[t]]), cache=cache, return_cache=True)
        out.append(logits[0])
    res = torch.cat(out, dim=0)
    assert res.shape == (t_total, model.config.vocab_size)
    return res.contiguous()


# --------------------------------------------------------------------------- conversion


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def put(k, v):
        assert k not in out, k
        out[k] = v.contiguous()

    put("model.embed_tokens.weight", sd.pop("embedder.input_embedding"))
    put("model.final_norm.weight", sd.pop("final_norm.scale"))
    for i, bt in enumerate(model.config.block_types):
        r, h = f"blocks.{i}.", f"model.layers.{i}."
        put(h + "temporal_pre_norm.weight", sd.pop(r + "temporal_pre_norm.scale"))
        put(h + "channel_pre_norm.weight", sd.pop(r + "channel_pre_norm.scale"))
        if bt == RECURRENT:
            rb, tb = r + "recurrent_block.", h + "temporal_block."
            for lin in ("linear_x", "linear_y", "linear_out"):
                put(tb + f"{lin}.weight", sd.pop(rb + f"{lin}.weight"))
                put(tb + f"{lin}.bias", sd.pop(rb + f"{lin}.bias"))
            w = sd.pop(rb + "conv_1d.w")  # [K, L]
            put(tb + "conv_1d.weight", w.t()[:, None, :])  # [L, 1, K], hf[c,0,k] = ref[k,c]
            put(tb + "conv_1d.bias", sd.pop(rb + "conv_1d.b"))
            put(tb + "rg_lru.recurrent_param", sd.pop(rb + "rg_lru.a_param"))
            put(tb + "rg_lru.input_gate_weight", sd.pop(rb + "rg_lru.input_gate.w"))
            put(tb + "rg_lru.input_gate_bias", sd.pop(rb + "rg_lru.input_gate.b"))
            put(tb + "rg_lru.recurrent_gate_weight", sd.pop(rb + "rg_lru.a_gate.w"))
            put(tb + "rg_lru.recurrent_gate_bias", sd.pop(rb + "rg_lru.a_gate.b"))
        else:
            ab, tb = r + "attention_block.", h + "temporal_block."
            put(tb + "q_proj.weight", sd.pop(ab + "proj_q.weight"))
            put(tb + "k_proj.weight", sd.pop(ab + "proj_k.weight"))
            put(tb + "v_proj.weight", sd.pop(ab + "proj_v.weight"))
            put(tb + "o_proj.weight", sd.pop(ab + "proj_final.weight"))
            put(tb + "o_proj.bias", sd.pop(ab + "proj_final.bias"))
        mb, hm = r + "mlp_block.", h + "mlp_block."
        w = sd.pop(mb + "ffw_up.w")  # [2, C, F]
        b = sd.pop(mb + "ffw_up.b")  # [2, 1, 1, F]
        put(hm + "gate_proj.weight", w[0].t())
        put(hm + "up_proj.weight", w[1].t())
        put(hm + "gate_proj.bias", b[0, 0, 0])
        put(hm + "up_proj.bias", b[1, 0, 0])
        put(hm + "down_proj.weight", sd.pop(mb + "ffw_down.weight"))
        put(hm + "down_proj.bias", sd.pop(mb + "ffw_down.bias"))
    assert not sd, f"unconverted reference parameters: {sorted(sd)}"
    return out


def hf_config_for(spec: dict) -> RecurrentGemmaConfig:
    return RecurrentGemmaConfig(
        num_hidden_layers=len(spec["layers"]),
        vocab_size=spec["vocab"],
        hidden_size=spec["width"],
        intermediate_size=2 * spec["mlp"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=1,
        lru_width=spec["lru"],
        attention_window_size=spec["window"],
        conv1d_width=4,
        logits_soft_cap=spec["soft_cap"],
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        block_types=list(spec["hf_block_types"]),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        tie_word_embeddings=True,
    )


def build_hf(spec: dict, hf_sd: dict) -> RecurrentGemmaForCausalLM:
    cfg = hf_config_for(spec)
    want = [{"recurrent": "linear_attention", "attention": "sliding_attention"}[block_name(b)] for b in spec["layers"]]
    assert cfg.layers_block_type == want, (cfg.layers_block_type, want)
    torch.manual_seed(0)
    model = RecurrentGemmaForCausalLM(cfg).to(torch.float32)
    model.eval()
    res = model.load_state_dict(hf_sd, strict=False)
    assert not res.unexpected_keys, res.unexpected_keys
    assert set(res.missing_keys) <= {"lm_head.weight"}, res.missing_keys
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    return model


def load_hf(path: Path, config=None) -> RecurrentGemmaForCausalLM:
    kw = {"config": config} if config is not None else {}
    model, info = RecurrentGemmaForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True, **kw
    )
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), (k, info.get(k))
    model.eval()
    for p in model.parameters():
        assert p.dtype == torch.float32
    return model


@torch.no_grad()
def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=tokens[None], use_cache=False)
    return out.logits[0].float().contiguous()


@torch.no_grad()
def hf_decode(model, tokens: torch.Tensor, prefill_len: int) -> torch.Tensor:
    """transformers' stateful decode: prefill P (>= 2) tokens, then one token at a time."""
    from transformers.cache_utils import DynamicCache

    model._setup_cache(model.config, 1, torch.device("cpu"), torch.float32)
    pkv = DynamicCache(config=model.config)
    out = []
    o = model(input_ids=tokens[None, :prefill_len], position_ids=torch.arange(prefill_len)[None],
              use_cache=True, past_key_values=pkv)
    out.append(o.logits[0])
    for t in range(prefill_len, tokens.numel()):
        o = model(input_ids=tokens[None, t : t + 1], position_ids=torch.tensor([[t]]),
                  use_cache=True, past_key_values=pkv)
        out.append(o.logits[0])
    return torch.cat(out).float()


# --------------------------------------------------------------------------- helpers


def make_tokens(vocab: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (length,), generator=gen, dtype=torch.int64)
    if length > 4:
        toks[1] = 0  # first and last embedding rows
        toks[3] = vocab - 1
    return toks


def per_pos_maxdiff(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [float(x) for x in (a - b).abs().amax(dim=-1)]


def first_pos_above(diffs: list[float], tol: float = F32_TOL):
    for i, d in enumerate(diffs):
        if d > tol:
            return i
    return None


def fmt(x: float) -> float:
    return float(f"{x:.3g}")


def logits_stats(x: torch.Tensor) -> dict:
    return {
        "max_abs": round(float(x.abs().max()), 4),
        "std": round(float(x.std()), 4),
        "argmax_first_8": [int(i) for i in x.argmax(-1)[:8]],
    }


def fresh_dir(name: str) -> Path:
    d = OUT_ROOT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def tensor_info(path: Path) -> dict[str, list]:
    res = {}
    with safe_open(str(path), framework="pt") as fh:
        for k in fh.keys():
            sl = fh.get_slice(k)
            res[k] = [str(sl.get_dtype()), list(sl.get_shape())]
    return res


# --------------------------------------------------------------------------- one case


def run_case(spec: dict) -> dict:
    name = spec["name"]
    log(f"== {name}")
    d = fresh_dir(name)
    window = spec["window"]
    cfg, ref, perturb_counts = build_reference(spec)

    tokens_long = make_tokens(spec["vocab"], spec["T_long"], spec["seed_tokens"])
    tokens_short = make_tokens(spec["vocab"], spec["T_short"], spec["seed_tokens"] + 1)

    # ---- reference logits
    logits_long = ref_prefill(ref, tokens_long)
    logits_short = ref_prefill(ref, tokens_short)
    logits_long_step = ref_decode(ref, tokens_long, prefill_len=0)
    step_diff = per_pos_maxdiff(logits_long_step, logits_long)
    step_max = max(step_diff)
    if step_max > F32_TOL:
        raise AssertionError(
            f"{name}: reference decode != reference prefill: max {step_max:.3g}, first position "
            f"{first_pos_above(step_diff)} (per position: {[fmt(x) for x in step_diff]})"
        )
    # the short sequence must be the prefix-independent run of its own tokens
    short_step = ref_decode(ref, tokens_short, prefill_len=0)
    short_step_max = float((short_step - logits_short).abs().max())
    assert short_step_max <= F32_TOL, short_step_max

    prefill_checks = {}
    for p in spec["prefill_lens"]:
        got = ref_decode(ref, tokens_long, prefill_len=p)
        diff = float((got - logits_long).abs().max())
        assert diff <= F32_TOL, (name, p, diff)
        prefill_checks[f"P={p}"] = fmt(diff)

    # ---- window semantics of the reference
    t_long = tokens_long.numel()
    mask = rg_modules._compute_forward_pass_mask(torch.arange(t_long)[None], window)[0]
    visible = [int(x) for x in mask.sum(-1)]
    assert visible == [min(q + 1, window + 1) for q in range(t_long)], visible
    attn_blocks = [b.attention_block for b in ref.blocks if hasattr(b, "attention_block")]
    for b in attn_blocks:
        b.window_size = t_long + 1  # temporarily: no window at all
    logits_nowin = ref_prefill(ref, tokens_long)
    for b in attn_blocks:
        b.window_size = window
    assert torch.equal(ref_prefill(ref, tokens_long), logits_long)
    nowin_first = first_pos_above(per_pos_maxdiff(logits_nowin, logits_long))
    assert nowin_first == window + 1, (nowin_first, window)

    # ---- HF conversion, save, reload, compare
    hf_sd = to_hf_state_dict(ref)
    hf_built = build_hf(spec, hf_sd)
    hf_built.save_pretrained(str(d), safe_serialization=True)
    files = sorted(p.name for p in d.iterdir())
    assert "model.safetensors" in files and not any(f.startswith("model-0") for f in files), files
    tinfo = tensor_info(d / "model.safetensors")
    assert "lm_head.weight" not in tinfo, "tied lm_head must not be stored"
    assert set(tinfo) == set(hf_sd), set(tinfo) ^ set(hf_sd)
    assert {v[0] for v in tinfo.values()} == {"F32"}
    with safe_open(str(d / "model.safetensors"), framework="pt") as fh:
        for k in fh.keys():
            assert torch.equal(fh.get_tensor(k), hf_sd[k]), k

    config_note = {}
    if spec.get("legacy_config"):
        legacy = rewrite_legacy_config(d, spec)
        plain = RecurrentGemmaConfig.from_pretrained(str(d))
        fixed = RecurrentGemmaConfig.from_pretrained(str(d))
        fixed.block_types = list(legacy["_block_types"])
        assert fixed.layers_block_type == hf_built.config.layers_block_type
        assert fixed.rope_parameters["rope_theta"] == 10000.0
        assert fixed.rope_parameters["partial_rotary_factor"] == 0.5
        assert fixed.num_key_value_heads == 1 and fixed.intermediate_size == 2 * spec["mlp"]
        hf = load_hf(d, config=fixed)
        config_note = {
            "spelling": "legacy hub / transformers-4.40 style (see legacy_rewrite)",
            "legacy_rewrite": legacy["_rewrite"],
            "transformers_plain_load_block_types": list(plain.block_types),
            "transformers_plain_load_layers_block_type": list(plain.layers_block_type),
            "cross_check_used": "RecurrentGemmaConfig.from_pretrained(dir) with block_types := config['_block_types']",
        }
    else:
        hf = load_hf(d)
        assert list(hf.config.block_types) == list(spec["hf_block_types"])
        config_note = {"spelling": f"as written by transformers {transformers.__version__} save_pretrained"}
    assert hf.config.layers_block_type == hf_built.config.layers_block_type
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    normalizer = float(hf.model.normalizer)
    ref_mult = float(torch.tensor(math.sqrt(spec["width"])).type(torch.bfloat16))
    assert normalizer == ref_mult, (normalizer, ref_mult)

    hf_long = hf_logits(hf, tokens_long)
    hf_short = hf_logits(hf, tokens_short)
    hf_long_diff = per_pos_maxdiff(hf_long, logits_long)
    below = max(hf_long_diff[:window])
    assert below <= F32_TOL, (name, below)
    short_max = float((hf_short - logits_short).abs().max())
    assert short_max <= F32_TOL, (name, short_max)
    hf_first = first_pos_above(hf_long_diff)
    # HF's rule, observed: the reference with window - 1 (i.e. `window` visible keys) reproduces HF everywhere
    for b in attn_blocks:
        b.window_size = window - 1
    logits_wm1 = ref_prefill(ref, tokens_long)
    for b in attn_blocks:
        b.window_size = window
    hf_vs_ref_wm1 = float((hf_long - logits_wm1).abs().max())
    assert hf_vs_ref_wm1 <= F32_TOL, (name, hf_vs_ref_wm1)

    hf_dec_note: dict
    try:
        hf_dec = hf_decode(hf, tokens_long, prefill_len=2)
        dd = per_pos_maxdiff(hf_dec, logits_long)
        hf_dec_note = {
            "how": "transformers stateful decode: _setup_cache + DynamicCache(config), prefill 2 tokens, then 1 token/step",
            "max_abs_diff_below_window": fmt(max(dd[:window])),
            "first_position_differing_gt_1e-4": first_pos_above(dd),
            "per_position_max_abs_diff": [fmt(x) for x in dd],
        }
    except Exception as e:  # informational only
        hf_dec_note = {"error": f"{type(e).__name__}: {e}"}

    # ---- write expected + meta
    save_file(
        {
            "tokens_long": tokens_long.contiguous(),
            "logits_long": logits_long.contiguous(),
            "logits_long_step": logits_long_step.contiguous(),
            "tokens_short": tokens_short.contiguous(),
            "logits_short": logits_short.contiguous(),
        },
        str(d / "expected.safetensors"),
        metadata={"format": "pt"},
    )

    meta = {
        "case": name,
        "description": spec["description"],
        "generator": GENERATOR,
        "versions": VERSIONS,
        "reference_import": IMPORT_MODE,
        "reference_api": REFERENCE_API,
        "reference_config": {
            "vocab_size": cfg.vocab_size, "width": cfg.width, "mlp_expanded_width": cfg.mlp_expanded_width,
            "num_heads": cfg.num_heads, "lru_width": cfg.lru_width,
            "block_types": [block_name(b) for b in cfg.block_types],
            "embeddings_scale_by_sqrt_dim": cfg.embeddings_scale_by_sqrt_dim,
            "attention_window_size": cfg.attention_window_size, "logits_soft_cap": cfg.logits_soft_cap,
            "conv1d_temporal_width": 4, "rms_norm_eps": 1e-6, "rope_max_wavelength": 10000,
            "head_dim": cfg.width // cfg.num_heads, "rope_dims": (cfg.width // cfg.num_heads) // 2,
            "rg_lru_block_width": cfg.lru_width // cfg.num_heads,
            "final_w_init_variance_scale": 2.0 / len(cfg.block_types),
        },
        "hf_config": {
            **config_note,
            "layers_block_type": list(hf.config.layers_block_type),
            "intermediate_size": hf.config.intermediate_size,
            "real_mlp_width": hf.config.intermediate_size // 2,
            "head_dim": hf.config.head_dim,
            "num_key_value_heads": hf.config.num_key_value_heads,
        },
        "embedding_multiplier": {
            "value_used": ref_mult,
            "exact_sqrt_width": math.sqrt(spec["width"]),
            "rule": "bf16(sqrt(width)), applied to f32 activations (reference Embedder.encode; HF normalizer buffer)",
        },
        "seeds": {"init": spec["seed_init"], "perturb": spec["seed_perturb"],
                  "tokens_long": spec["seed_tokens"], "tokens_short": spec["seed_tokens"] + 1},
        "perturbation": {
            "rules": "see the module docstring of the generator",
            "parameters_per_rule": perturb_counts,
        },
        "shapes": {"T_long": int(t_long), "T_short": int(tokens_short.numel()), "V": spec["vocab"]},
        "tensors": {k: v for k, v in sorted(tinfo.items())},
        "tolerance_suggested": {"logits_f32": F32_TOL},
        "checks": {
            "ref_step_vs_prefill_max_abs_diff": fmt(step_max),
            "ref_step_vs_prefill_short_max_abs_diff": fmt(short_step_max),
            "ref_prefill_P_then_step_vs_prefill_max_abs_diff": prefill_checks,
            "hf_vs_ref_below_window_max_abs_diff": fmt(below),
            "hf_vs_ref_short_max_abs_diff": fmt(short_max),
            "hf_vs_ref_long_first_position_differing_gt_1e-4": hf_first,
            "hf_vs_ref_long_per_position_max_abs_diff": [fmt(x) for x in hf_long_diff],
            "hf_decode_vs_ref (informational)": hf_dec_note,
        },
        "window": {
            "attention_window_size": window,
            "reference_rule": "query q sees keys k with q - window <= k <= q (window + 1 keys), prefill and decode",
            "reference_visible_keys_per_query_long": visible,
            "reference_with_no_window_first_differs_at": nowin_first,
            "reference_decode_equals_prefill": True,
            "hf_prefill_first_differs_at": hf_first,
            "hf_rule_observed": "transformers (prefill and its stateful decode) keeps `window` keys "
                                "(q - window < k <= q), so it first differs from the reference at q = window",
            "hf_prefill_vs_reference_run_with_window_minus_1_max_abs_diff": fmt(hf_vs_ref_wm1),
        },
        "logits_stats": {"long": logits_stats(logits_long), "short": logits_stats(logits_short)},
        "notes": NOTES + spec.get("notes", []),
    }
    with open(d / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")

    size = sum(p.stat().st_size for p in d.iterdir())
    log(f"   logits std {float(logits_long.std()):.3f} max {float(logits_long.abs().max()):.3f}; "
        f"step diff {step_max:.2e}; hf<window {below:.2e}; hf first diff at {hf_first}; "
        f"nowin first diff at {nowin_first}; hf decode first diff "
        f"{hf_dec_note.get('first_position_differing_gt_1e-4', hf_dec_note.get('error'))}; size {size} B")
    return {"case": name, "bytes": size}


LEGACY_DROP = ["block_types", "rope_parameters", "dtype", "tie_word_embeddings", "use_cache"]


def rewrite_legacy_config(d: Path, spec: dict) -> dict:
    """Rewrite config.json into the spelling of the hub checkpoints (transformers 4.40 era)."""
    new = json.loads((d / "config.json").read_text())
    assert new["rope_parameters"]["rope_theta"] == 10000.0
    assert new["rope_parameters"]["partial_rotary_factor"] == 0.5
    old = {k: v for k, v in new.items() if k not in LEGACY_DROP}
    old["_block_types"] = list(new["block_types"])
    old["rope_theta"] = 10000.0
    old["partial_rotary_factor"] = 0.5
    old["embeddings_scale_by_sqrt_dim"] = True
    old["torch_dtype"] = "float32"
    old = dict(sorted(old.items()))
    (d / "config.json").write_text(json.dumps(old, indent=2) + "\n")
    ret = dict(old)
    ret["_rewrite"] = {
        "removed_keys": LEGACY_DROP,
        "added_keys": ["_block_types", "rope_theta", "partial_rotary_factor", "embeddings_scale_by_sqrt_dim",
                       "torch_dtype"],
        "kept_transformers_version": new.get("transformers_version"),
        "defaults_the_engine_must_apply": {"tie_word_embeddings": True},
    }
    return ret


NOTES = [
    "Expected logits come from the DeepMind reference (recurrentgemma.torch), not from transformers.",
    "Every sequence starts at segment_pos 0: the RG-LRU reset at position 0 zeroes a and sets the "
    "sqrt(1-a^2) input normaliser to 1 for that token; the conv sees zeros before the first token.",
    "RMSNorm: x * rsqrt(mean(x^2) + 1e-6) * (1 + w); the reference computes it in the activation dtype "
    "(f32 here).",
    "MLP: down(gelu_tanh(gate(x)) * up(x)); gate = reference ffw_up.w[0], up = ffw_up.w[1].",
    "Attention: MQA (1 KV head), RoPE (theta 10000, half-split pairing) on the first head_dim/2 dims of "
    "q and k only, scores * head_dim^-0.5, softmax in f32, o_proj has a bias, q/k/v have none.",
    "Logits: 30 * tanh(logits / 30) after the tied projection (x @ E^T).",
    "HF differs from the reference from position `window` on (prefill) - see window / checks. Engines "
    "should match the reference (logits_long), i.e. window + 1 visible keys.",
    "The informational HF decode prefills 2 tokens: transformers' stateful decode cannot start from a "
    "1-token prefill when lru_width != hidden_size (its conv1d_state is allocated with hidden_size "
    "channels; RuntimeError in torch.cat).",
]


CASES = {
    "griffin_small": dict(
        name="griffin_small",
        description="width 96, lru_width 128, 4 heads (head_dim 24, RoPE on 12 dims), 1 KV head, MLP 288, "
                    "layers R,R,A,R (HF block_types [R,R,A] cycled over 4 layers), window 8, vocab 256, "
                    "soft cap 30, embedding multiplier bf16(sqrt 96) = 9.8125; T_long 32, T_short 6; "
                    "transformers-5 config spelling.",
        vocab=256, width=96, lru=128, heads=4, mlp=288, window=8, soft_cap=30.0,
        layers=[RECURRENT, RECURRENT, ATTENTION, RECURRENT],
        hf_block_types=["recurrent", "recurrent", "attention"],
        T_long=32, T_short=6, prefill_lens=[1, 5, 8, 9, 13, 20],
        seed_init=11, seed_perturb=1011, seed_tokens=111,
        notes=["config.json has block_types of length 3 and num_hidden_layers 4: layer i uses "
               "block_types[i % len(block_types)]."],
    ),
    "griffin_attn_first": dict(
        name="griffin_attn_first",
        description="width 64, lru_width 96, 2 heads (head_dim 32, RoPE on 16 dims), 1 KV head, MLP 192, "
                    "layers A,R (attention first), window 4, vocab 256, soft cap 30, multiplier 8.0; "
                    "T_long 20, T_short 3 (< conv width 4); LEGACY hub config spelling (_block_types).",
        vocab=256, width=64, lru=96, heads=2, mlp=192, window=4, soft_cap=30.0,
        layers=[ATTENTION, RECURRENT],
        hf_block_types=["attention", "recurrent"],
        T_long=20, T_short=3, prefill_lens=[2, 3, 4, 5, 11],
        seed_init=22, seed_perturb=1022, seed_tokens=222,
        legacy_config=True,
        notes=["config.json uses `_block_types` (legacy hub spelling). transformers 5.x ignores that key "
               "and would build the default recurrent,recurrent,attention pattern (recorded under "
               "hf_config.transformers_plain_load_*); an engine must read `_block_types` when "
               "`block_types` is absent.",
               "sqrt(64) = 8 is exact in bf16, so this case does not test the rounding (griffin_small does)."],
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=sorted(CASES), help="cases to regenerate")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    names = args.only or list(CASES)
    results = [run_case(CASES[n]) for n in names]
    total = sum(p.stat().st_size for p in OUT_ROOT.rglob("*") if p.is_file())
    for r in results:
        log(f"{r['case']}: {r['bytes']} bytes")
    log(f"total under {OUT_ROOT.relative_to(REPO_ROOT)}: {total} bytes")
    assert total < 3_000_000, total


if __name__ == "__main__":
    main()
