#!/usr/bin/env python3
"""Generate tiny Llama / Mistral parity fixtures for gyre.

Run:   python3 tools/make_llama_fixtures.py            (regenerates everything)
       python3 tools/make_llama_fixtures.py --only llama_gqa_f32 mistral_window_f32

Needs torch, transformers, safetensors and numpy. The Rust tests do not need any
of them: they read the files written here.

Every case is one directory under crates/gyre/tests/fixtures/llama/<case>/. The
directory holds:

  * the HF model files, exactly as `save_pretrained(..., safe_serialization=True)`
    wrote them: config.json, generation_config.json, and either model.safetensors
    or model-0000k-of-0000n.safetensors plus model.safetensors.index.json. Case 2
    then has its config.json rewritten (see below).
  * expected.safetensors:
        tokens         int64   [T]     the input ids (one sequence, no BOS rule)
        logits         float32 [T, V]  logits at EVERY position of one
                                       full-sequence forward (no KV cache),
                                       computed by transformers in float32 from
                                       the stored weights (for bf16/f16
                                       checkpoints: exact upcast of the stored
                                       weights, f32 compute)
        logits_native  float32 [T, V]  (bf16/f16 cases only) the same forward
                                       run natively in the storage dtype,
                                       logits cast to f32
  * meta.json: versions, seeds, shapes, suggested tolerances, checks done here.

How the weights are made: the model class is built from a config with a large
`initializer_range` (0.15) and the default HF init (normal(0, 0.15) for every
Linear and the Embedding), so logits are O(1-10) instead of ~0. Then every
RMSNorm weight (input_layernorm, post_attention_layernorm, model.norm) is
overwritten with 1 + 0.3*randn, so an engine that ignores norm weights, or uses
(1 + w) as in Gemma, fails. All runs use attn_implementation="eager",
model.eval(), torch.no_grad(), one CPU thread.

Cases
-----
1. llama_gqa_f32
   LlamaForCausalLM, hidden 128, 8 query heads / 2 KV heads (GQA, 4 query heads
   per KV head), head_dim 16, intermediate 160, 2 layers, vocab 256,
   rope_theta 10000, rms_norm_eps 1e-5, untied lm_head, float32, one
   model.safetensors. Config written in the new transformers-5 spelling
   (`dtype`, `rope_parameters`).
2. llama_mha_oldconfig_f32
   LlamaForCausalLM without GQA (3 heads, head_dim 16 implied by
   hidden 48 / 3), rope_theta 500000, rms_norm_eps 1e-6, float32. Its config.json
   is then REWRITTEN into the old (transformers 4.3x) spelling: top-level
   `rope_theta`, `torch_dtype`, `rope_scaling: null`, and no
   `num_key_value_heads`, `head_dim`, `attention_bias`, `mlp_bias`,
   `pretraining_tp`, `tie_word_embeddings`, `bos_token_id`, `eos_token_id`,
   `pad_token_id`, `attention_dropout`. An engine must take the defaults
   (kv heads = heads, head_dim = hidden / heads, untied, no biases). The script
   reloads the rewritten directory with transformers and checks that the
   logits are unchanged. It also records how much the logits move when
   rope_theta falls back to 10000, which shows that the test reads rope_theta.
3. llama_tied_bf16
   LlamaForCausalLM, tie_word_embeddings=True (the files hold no
   lm_head.weight; checked), bfloat16 storage, 4 query heads / 2 KV heads,
   head_dim 16, 3 layers, sharded into >= 2 files with
   model.safetensors.index.json. `logits` = bf16 weights upcast to f32 with f32
   compute (an engine that keeps bf16 weights and computes in f32 should match
   within ~1e-4). `logits_native` = torch bf16 compute (looser bound).
4. mistral_window_f32
   MistralForCausalLM, sliding_window 8, T = 32, 8 query heads / 2 KV heads,
   head_dim 16 given explicitly while hidden is 64 (so q_proj is [128, 64] and
   o_proj is [64, 128]; head_dim != hidden / heads, as in Mistral-Nemo),
   float32. The script checks that the window changes the logits (compared with
   the same weights and sliding_window=None), records the first position where
   they differ, reads the mask that eager attention really received, and checks
   it against the rule in meta.json["window_rule"].
5. llama_f16
   LlamaForCausalLM, float16 storage, 6 query heads / 2 KV heads, head_dim 16
   (hidden 96), untied, one file. `logits` = f32 compute on the upcast f16
   weights. `logits_native` = torch float16 compute.

Determinism: fixed seeds. The same torch/transformers versions (recorded in
meta.json) give byte-identical files. Other versions may change the random
init, and then every fixture changes together (the files stay consistent with
each other).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
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
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

try:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
except Exception:  # pragma: no cover - logging knobs are cosmetic
    pass

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_ROOT = REPO_ROOT / "crates" / "gyre" / "tests" / "fixtures" / "llama"

INIT_STD = 0.15  # initializer_range; the HF default 0.02 gives near-zero logits
NORM_SPREAD = 0.3  # RMSNorm weights = 1 + NORM_SPREAD * randn
F32_TOL = 1e-4

VERSIONS = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "safetensors": safetensors.__version__,
    "numpy": np.__version__,
    "python": platform.python_version(),
}


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(msg, flush=True)


def build_model(model_cls, config, seed: int):
    """Default HF init under a fixed seed, then non-trivial RMSNorm weights."""
    torch.manual_seed(seed)
    model = model_cls(config)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        n_norms = 0
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, model.norm
                p.copy_(1.0 + NORM_SPREAD * torch.randn(p.shape, generator=gen, dtype=torch.float32))
                n_norms += 1
    assert n_norms == 2 * config.num_hidden_layers + 1, n_norms
    return model


def make_tokens(vocab: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (length,), generator=gen, dtype=torch.int64)
    # make sure the first and last embedding rows are exercised
    toks[3] = 0
    toks[7] = vocab - 1
    return toks


def load(model_cls, path: Path, dtype: torch.dtype, **config_overrides):
    model = model_cls.from_pretrained(
        str(path), dtype=dtype, attn_implementation="eager", **config_overrides
    )
    model.eval()
    for p in model.parameters():
        assert p.dtype == dtype, (p.dtype, dtype)
    return model


@torch.no_grad()
def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=tokens[None, :], use_cache=False)
    return out.logits[0].to(torch.float32).contiguous()


def tensor_dtypes(path: Path) -> dict[str, str]:
    """name -> dtype string for every tensor in every *.safetensors model file."""
    result = {}
    for f in sorted(path.glob("model*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                result[k] = str(fh.get_slice(k).get_dtype())
    return result


def check_weights_equal(model_a, model_b) -> None:
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys(), set(sa) ^ set(sb)
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


def logits_stats(x: torch.Tensor) -> dict:
    return {
        "max_abs": round(float(x.abs().max()), 4),
        "std": round(float(x.std()), 4),
        "argmax_first_8": [int(i) for i in x.argmax(-1)[:8]],
    }


def config_summary(cfg) -> dict:
    keys = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim",
        "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
        "sliding_window",
    ]
    s = {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}
    s["rope_theta"] = cfg.rope_parameters["rope_theta"]
    return s


def write_expected(case_dir: Path, tokens, logits, logits_native=None) -> None:
    tensors = {"tokens": tokens.contiguous(), "logits": logits.contiguous()}
    if logits_native is not None:
        tensors["logits_native"] = logits_native.contiguous()
    save_file(tensors, str(case_dir / "expected.safetensors"), metadata={"format": "pt"})


def write_meta(case_dir: Path, meta: dict) -> None:
    full = {"case": case_dir.name}
    full.update(meta)
    full.update({k: VERSIONS[k] for k in ("torch", "transformers")})
    full["versions"] = VERSIONS
    full["generator"] = "tools/make_llama_fixtures.py"
    with open(case_dir / "meta.json", "w") as f:
        json.dump(full, f, indent=2, sort_keys=False)
        f.write("\n")


def fresh_dir(name: str) -> Path:
    d = OUT_ROOT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def native_tolerance(max_abs_diff: float) -> float:
    """Suggested bound for an engine computing in the low-precision dtype."""
    return float(f"{max(3.0 * max_abs_diff, 0.05):.2g}")


COMMON_NOTES = [
    "logits are for every position of ONE full-sequence forward (no KV cache), attn_implementation=eager.",
    "RMSNorm weights are 1 + 0.3*randn (not ones): Llama RMSNorm is x*rsqrt(mean(x^2)+eps), cast to the "
    "activation dtype, then * weight (not 1+weight).",
    f"Init std {INIT_STD} (config initializer_range) so logits are O(1-10).",
    "RoPE is the HF half-split pairing (dim i with i + head_dim/2).",
]


# --------------------------------------------------------------------------- cases


def case_llama_gqa_f32() -> dict:
    name = "llama_gqa_f32"
    d = fresh_dir(name)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
        initializer_range=INIT_STD, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = build_model(LlamaForCausalLM, cfg, seed=1)
    model.save_pretrained(str(d), safe_serialization=True)
    tokens = make_tokens(cfg.vocab_size, 24, seed=101)

    reloaded = load(LlamaForCausalLM, d, torch.float32)
    check_weights_equal(model, reloaded)
    logits = forward_logits(reloaded, tokens)
    assert torch.equal(logits, forward_logits(model, tokens))

    dtypes = tensor_dtypes(d)
    assert "lm_head.weight" in dtypes, "untied case must store lm_head.weight"
    assert set(dtypes.values()) == {"F32"}, set(dtypes.values())
    assert (d / "model.safetensors").exists()

    write_expected(d, tokens, logits)
    write_meta(d, {
        "description": "Llama GQA 8 query heads / 2 KV heads (4 per group), rope_theta 1e4, eps 1e-5, "
                       "untied lm_head, float32, single model.safetensors, transformers-5 config spelling.",
        "architecture": "LlamaForCausalLM",
        "dtype": "float32",
        "compute_dtype_of_logits": "float32",
        "config": config_summary(reloaded.config),
        "seeds": {"init": 1, "norms": 1001, "tokens": 101},
        "T": int(tokens.numel()), "V": cfg.vocab_size,
        "tolerance_suggested": {"logits": F32_TOL},
        "logits_stats": logits_stats(logits),
        "notes": COMMON_NOTES,
    })
    return {"case": name}


OLD_CONFIG_DROP = [
    "num_key_value_heads", "head_dim", "attention_bias", "mlp_bias", "pretraining_tp",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
    "rope_parameters", "dtype",
]


def case_llama_mha_oldconfig_f32() -> dict:
    name = "llama_mha_oldconfig_f32"
    d = fresh_dir(name)
    theta = 500000.0
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=48, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=3,
        max_position_embeddings=256, rope_theta=theta, rms_norm_eps=1e-6,
        initializer_range=INIT_STD, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = build_model(LlamaForCausalLM, cfg, seed=2)
    assert model.config.head_dim == 16
    model.save_pretrained(str(d), safe_serialization=True)
    tokens = make_tokens(cfg.vocab_size, 24, seed=102)

    new_style = load(LlamaForCausalLM, d, torch.float32)
    logits_new = forward_logits(new_style, tokens)
    new_cfg_json = json.loads((d / "config.json").read_text())

    # Rewrite config.json into the old spelling.
    old = {k: v for k, v in new_cfg_json.items() if k not in OLD_CONFIG_DROP}
    assert new_cfg_json["rope_parameters"] == {"rope_theta": theta, "rope_type": "default"}, new_cfg_json
    old["rope_theta"] = theta
    old["rope_scaling"] = None
    old["torch_dtype"] = "float32"
    old["transformers_version"] = "4.38.2"
    old = dict(sorted(old.items()))
    (d / "config.json").write_text(json.dumps(old, indent=2) + "\n")

    old_style = load(LlamaForCausalLM, d, torch.float32)
    oc = old_style.config
    assert oc.num_key_value_heads == 3 and oc.head_dim == 16, (oc.num_key_value_heads, oc.head_dim)
    assert oc.rope_parameters["rope_theta"] == theta, oc.rope_parameters
    assert oc.tie_word_embeddings is False
    assert not oc.attention_bias and not oc.mlp_bias
    check_weights_equal(new_style, old_style)
    logits = forward_logits(old_style, tokens)
    reload_diff = float((logits - logits_new).abs().max())
    assert reload_diff == 0.0, reload_diff

    # Sensitivity: the same weights with the default rope_theta must give different logits.
    # (from_pretrained(..., rope_theta=...) is rejected in transformers 5: the attribute is gone.)
    cfg_default = LlamaConfig.from_pretrained(str(d))
    cfg_default.rope_parameters = {"rope_theta": 10000.0, "rope_type": "default"}
    default_theta = load(LlamaForCausalLM, d, torch.float32, config=cfg_default)
    assert default_theta.config.rope_parameters["rope_theta"] == 10000.0, default_theta.config.rope_parameters
    theta_diff = float((forward_logits(default_theta, tokens) - logits).abs().max())
    assert theta_diff > 1e-2, theta_diff

    dtypes = tensor_dtypes(d)
    assert "lm_head.weight" in dtypes and set(dtypes.values()) == {"F32"}

    write_expected(d, tokens, logits)
    write_meta(d, {
        "description": "Llama MHA (kv heads = heads = 3, head_dim 16 implied), rope_theta 5e5, eps 1e-6, float32; "
                       "config.json rewritten to the old transformers-4.3x spelling with defaultable fields removed.",
        "architecture": "LlamaForCausalLM",
        "dtype": "float32",
        "compute_dtype_of_logits": "float32",
        "config": config_summary(old_style.config),
        "seeds": {"init": 2, "norms": 1002, "tokens": 102},
        "T": int(tokens.numel()), "V": cfg.vocab_size,
        "tolerance_suggested": {"logits": F32_TOL},
        "logits_stats": logits_stats(logits),
        "old_config_rewrite": {
            "removed_keys": OLD_CONFIG_DROP,
            "added_keys": {"rope_theta": theta, "rope_scaling": None, "torch_dtype": "float32",
                           "transformers_version": "4.38.2 (fake, old-style marker)"},
            "defaults_the_engine_must_apply": {
                "num_key_value_heads": "= num_attention_heads",
                "head_dim": "= hidden_size / num_attention_heads",
                "tie_word_embeddings": False,
                "attention_bias": False, "mlp_bias": False,
            },
            "transformers_reload_max_abs_diff": reload_diff,
            "max_abs_diff_if_rope_theta_ignored_(10000)": round(theta_diff, 4),
        },
        "notes": COMMON_NOTES + [
            "rms_norm_eps is kept (1e-6). In this transformers version LlamaConfig's default rms_norm_eps is "
            "also 1e-6, but Llama-2 checkpoints store 1e-5 explicitly.",
            "generation_config.json still carries bos/eos ids (as new-style saves do).",
        ],
    })
    return {"case": name}


def case_llama_tied_bf16() -> dict:
    name = "llama_tied_bf16"
    d = fresh_dir(name)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
        initializer_range=INIT_STD, tie_word_embeddings=True,
        attn_implementation="eager",
    )
    model = build_model(LlamaForCausalLM, cfg, seed=3)
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(d), safe_serialization=True, max_shard_size="100KB")
    tokens = make_tokens(cfg.vocab_size, 24, seed=103)

    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) >= 2, shards
    assert (d / "model.safetensors.index.json").exists()
    assert not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    dtypes = tensor_dtypes(d)
    assert "lm_head.weight" not in dtypes, "tied model must not store lm_head.weight"
    assert set(dtypes.values()) == {"BF16"}, set(dtypes.values())
    assert set(dtypes) == set(index["weight_map"])

    m32 = load(LlamaForCausalLM, d, torch.float32)
    assert m32.lm_head.weight.data_ptr() == m32.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    check_weights_equal(model, m32)  # upcast is exact
    logits = forward_logits(m32, tokens)

    m16 = load(LlamaForCausalLM, d, torch.bfloat16)
    logits_native = forward_logits(m16, tokens)
    diff = float((logits - logits_native).abs().max())
    log(f"  {name}: max |bf16 native - f32 compute| = {diff:.4g}")

    write_expected(d, tokens, logits, logits_native)
    write_meta(d, {
        "description": "Llama tied embeddings (no lm_head.weight stored), bfloat16 storage, GQA 4 query / 2 KV heads, "
                       "3 layers, sharded (>=2 files + model.safetensors.index.json).",
        "architecture": "LlamaForCausalLM",
        "dtype": "bfloat16",
        "compute_dtype_of_logits": "float32 (bf16 weights upcast exactly)",
        "compute_dtype_of_logits_native": "bfloat16 (torch CPU), cast to float32",
        "shards": shards,
        "config": config_summary(m32.config),
        "seeds": {"init": 3, "norms": 1003, "tokens": 103},
        "T": int(tokens.numel()), "V": cfg.vocab_size,
        "tolerance_suggested": {"logits": F32_TOL, "logits_native": native_tolerance(diff)},
        "max_abs_native_vs_f32compute": diff,
        "logits_stats": logits_stats(logits),
        "notes": COMMON_NOTES + [
            "lm_head = embed_tokens (tied); the engine must fall back to model.embed_tokens.weight.",
            "`logits` is the bound to meet (1e-4) for an engine that keeps bf16 weights and computes in f32.",
            "`logits_native` is torch's bf16 run: RMSNorm in f32 then cast to bf16 before * weight, "
            "softmax in f32, everything else in bf16. The native tolerance is a suggestion (3x the observed "
            "native-vs-f32 gap, at least 0.05).",
        ],
    })
    return {"case": name}


def captured_layer0_mask(model, tokens) -> torch.Tensor:
    """The additive attention mask that layer 0's eager attention receives."""
    seen = {}

    def hook(_module, args, kwargs):
        seen["mask"] = kwargs.get("attention_mask")

    h = model.model.layers[0].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward_logits(model, tokens)
    finally:
        h.remove()
    mask = seen["mask"]
    assert mask is not None and mask.dim() == 4, mask
    return mask[0, 0]


def case_mistral_window_f32() -> dict:
    name = "mistral_window_f32"
    d = fresh_dir(name)
    window = 8
    T = 32
    cfg = MistralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
        initializer_range=INIT_STD, tie_word_embeddings=False, sliding_window=window,
        attn_implementation="eager",
    )
    model = build_model(MistralForCausalLM, cfg, seed=4)
    model.save_pretrained(str(d), safe_serialization=True)
    tokens = make_tokens(cfg.vocab_size, T, seed=104)

    m = load(MistralForCausalLM, d, torch.float32)
    assert m.config.sliding_window == window
    check_weights_equal(model, m)
    logits = forward_logits(m, tokens)
    dtypes = tensor_dtypes(d)
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] and set(dtypes.values()) == {"F32"}
    with safe_open(str(d / "model.safetensors"), framework="pt") as fh:
        assert list(fh.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape()) == [128, 64]
        assert list(fh.get_slice("model.layers.0.self_attn.o_proj.weight").get_shape()) == [64, 128]
        assert list(fh.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape()) == [32, 64]

    # The mask eager attention actually used: key j visible to query i iff 0 <= i - j < window.
    mask = captured_layer0_mask(m, tokens)
    visible = mask == 0 if mask.dtype != torch.bool else mask
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    rule = ((i - j) >= 0) & ((i - j) < window)
    assert torch.equal(visible.cpu(), rule), "sliding-window rule differs from 0 <= i-j < window"
    keys_per_query = [int(v) for v in visible.sum(-1)]

    # Same weights without the window.
    full = load(MistralForCausalLM, d, torch.float32, sliding_window=None)
    assert full.config.sliding_window is None
    logits_full = forward_logits(full, tokens)
    per_pos = (logits - logits_full).abs().amax(-1)
    differ = [int(p) for p in torch.nonzero(per_pos > 0).flatten()]
    first_diff = differ[0] if differ else None
    assert first_diff == window, (first_diff, per_pos)
    assert float(per_pos[:window].max()) == 0.0
    assert bool((per_pos[T - 8:] > 1e-3).all()), per_pos
    log(f"  {name}: window changes logits from position {first_diff}; "
        f"max |Δ| at last 8 positions >= {float(per_pos[T - 8:].min()):.3g}")

    write_expected(d, tokens, logits)
    window_rule = (
        "key j is visible to query i iff 0 <= i - j < sliding_window (the current token plus the "
        f"sliding_window-1 previous ones: {window} keys per query once i >= {window - 1}). "
        "Source: transformers/masking_utils.py::sliding_window_overlay "
        "(`kv_idx > q_idx - sliding_window`) AND causal_mask_function (`kv_idx <= q_idx`), "
        "combined in sliding_window_causal_mask_function and used by create_sliding_window_causal_mask "
        "(called from modeling_mistral.py::MistralModel.forward when config.sliding_window is not None); "
        "eager_mask turns it into 0 / finfo.min. Consistent with flash-attn window_size=(W-1, W-1) in "
        "modeling_flash_attention_utils.py and DynamicSlidingWindowLayer keeping W-1 past tokens "
        "(cache_utils.py). Verified here against the mask eager attention received."
    )
    write_meta(d, {
        "description": "Mistral sliding-window attention (window 8, T 32), GQA 8 query / 2 KV heads, explicit "
                       "head_dim 16 with hidden 64 (q_proj [128,64], o_proj [64,128]), float32.",
        "architecture": "MistralForCausalLM",
        "dtype": "float32",
        "compute_dtype_of_logits": "float32",
        "config": config_summary(m.config),
        "seeds": {"init": 4, "norms": 1004, "tokens": 104},
        "T": T, "V": cfg.vocab_size,
        "tolerance_suggested": {"logits": F32_TOL},
        "window_rule": window_rule,
        "window_rule_formula": "visible(i, j) = (0 <= i - j) and (i - j < sliding_window)",
        "keys_visible_per_query": keys_per_query,
        "window_check": {
            "first_position_where_window_changes_logits": first_diff,
            "positions_that_differ_from_no_window": differ,
            "max_abs_diff_vs_no_window_per_position": [round(float(x), 6) for x in per_pos],
        },
        "logits_stats": logits_stats(logits),
        "notes": COMMON_NOTES + [
            "head_dim comes from config.json (16), NOT hidden_size/num_attention_heads (8).",
            "Positions 0..sliding_window-1 match a no-window model exactly; later ones differ.",
        ],
    })
    return {"case": name}


def case_llama_f16() -> dict:
    name = "llama_f16"
    d = fresh_dir(name)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=96, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
        initializer_range=INIT_STD, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = build_model(LlamaForCausalLM, cfg, seed=5)
    model = model.to(torch.float16)
    model.save_pretrained(str(d), safe_serialization=True)
    tokens = make_tokens(cfg.vocab_size, 24, seed=105)

    dtypes = tensor_dtypes(d)
    assert "lm_head.weight" in dtypes and set(dtypes.values()) == {"F16"}, set(dtypes.values())
    assert (d / "model.safetensors").exists()

    m32 = load(LlamaForCausalLM, d, torch.float32)
    check_weights_equal(model, m32)
    logits = forward_logits(m32, tokens)
    m16 = load(LlamaForCausalLM, d, torch.float16)
    logits_native = forward_logits(m16, tokens)
    assert torch.isfinite(logits_native).all()
    diff = float((logits - logits_native).abs().max())
    log(f"  {name}: max |f16 native - f32 compute| = {diff:.4g}")

    write_expected(d, tokens, logits, logits_native)
    write_meta(d, {
        "description": "Llama float16 storage, GQA 6 query / 2 KV heads (3 per group), head_dim 16, untied, "
                       "single file.",
        "architecture": "LlamaForCausalLM",
        "dtype": "float16",
        "compute_dtype_of_logits": "float32 (f16 weights upcast exactly)",
        "compute_dtype_of_logits_native": "float16 (torch CPU), cast to float32",
        "config": config_summary(m32.config),
        "seeds": {"init": 5, "norms": 1005, "tokens": 105},
        "T": int(tokens.numel()), "V": cfg.vocab_size,
        "tolerance_suggested": {"logits": F32_TOL, "logits_native": native_tolerance(diff)},
        "max_abs_native_vs_f32compute": diff,
        "logits_stats": logits_stats(logits),
        "notes": COMMON_NOTES + [
            "`logits` is the bound to meet (1e-4) for an engine that keeps f16 weights and computes in f32.",
        ],
    })
    return {"case": name}


CASES = {
    "llama_gqa_f32": case_llama_gqa_f32,
    "llama_mha_oldconfig_f32": case_llama_mha_oldconfig_f32,
    "llama_tied_bf16": case_llama_tied_bf16,
    "mistral_window_f32": case_mistral_window_f32,
    "llama_f16": case_llama_f16,
}


def summary() -> int:
    rows = []
    total = 0
    for name in CASES:
        d = OUT_ROOT / name
        if not d.exists():
            continue
        files = sorted(p for p in d.iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in files)
        total += size
        rows.append((name, len(files), size, ", ".join(p.name for p in files)))
    w = max(len(r[0]) for r in rows) if rows else 4
    log("")
    log(f"{'case':<{w}}  files  {'bytes':>9}  names")
    for name, n, size, names in rows:
        log(f"{name:<{w}}  {n:>5}  {size:>9}  {names}")
    log(f"{'TOTAL':<{w}}  {'':>5}  {total:>9}")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=sorted(CASES), help="regenerate only these cases")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    OUT_ROOT.mkdir(parents=True, exist_ok=True)
    log(f"torch {VERSIONS['torch']}, transformers {VERSIONS['transformers']}, "
        f"safetensors {VERSIONS['safetensors']}, numpy {VERSIONS['numpy']}, python {VERSIONS['python']}")
    for name in args.only or CASES:
        log(f"[{name}]")
        CASES[name]()
    total = summary()
    if total > 3 * 1024 * 1024:
        log(f"WARNING: fixtures total {total} bytes, above the 3 MiB target", )


if __name__ == "__main__":
    sys.exit(main())
