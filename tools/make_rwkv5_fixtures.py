#!/usr/bin/env python3
"""Generate tiny RWKV-5.2 ("Eagle") parity fixtures and a World-tokenizer corpus for gyre.

Run:   python3 tools/make_rwkv5_fixtures.py              (regenerates everything)
       python3 tools/make_rwkv5_fixtures.py --only tokenizer
       python3 tools/make_rwkv5_fixtures.py --only rwkv5_tiny_f32 rwkv5_tiny_bf16

Needs torch, numpy, safetensors and the `rwkv` pip package (ChatRWKV's package,
`pip install rwkv`; written against rwkv 0.8.32). The Rust tests need none of them:
they only read the files written here. Everything is seeded, single-threaded and
byte-for-byte reproducible (re-running rewrites identical files).

Output: crates/gyre/tests/fixtures/rwkv5/

  rwkv5_tiny_f32/
      model.pth             torch.save() of a plain dict {name: tensor}, float32,
                            exactly the RWKV-LM v5.2 names/shapes (MODELS.md B.1),
                            keys in RWKV-LM state_dict order.
      model.safetensors     the same tensors (identical values, same dtype) written
                            by safetensors.torch.save_file.
      state_tiny.pth        a "state-tuning" file: dict with only
                            blocks.{n}.att.time_state, float32 [H, N, N], stored
                            layout [head, value_j, key_i] (MODELS.md B.6).
      expected.safetensors  see below.
      meta.json             versions, shapes, seeds, checks done, notes.
  rwkv5_tiny_bf16/
      model.pth             the same model rounded to bfloat16 (torch.save).
      expected.safetensors, meta.json
  world_tokenizer.json      World-tokenizer encode corpus (see below).

The model (both cases): n_embd C=128, head size N=64 (H=2 heads), 2 layers,
dim_ffn F=160, vocab V=224, ln0 present in block 0, 2-D time_decay [H, N] (so the
package detects v5.2), time_faaaa [H, N], time_mix_* [1, 1, C], ln_x, gate,
untied head.weight. V is deliberately not a power of two. F and V are smaller than the RWKV-LM defaults (int(3.5*C)//32*32
= 448, V=65536) only to keep the whole directory under 4 MB; nothing in the
maths depends on them (the package reads them from the shapes, and so must gyre).
Random values have realistic scales so that every path matters:
  * emb rows N(0, s^2) with s log-uniform in [1e-3, 1] per row (ln0 eps matters),
  * time_decay uniform so that w = exp(-exp(d)) lies in ~[0.3, 0.999],
  * time_faaaa (the bonus u, used raw) ~ N(0, 0.5^2),
  * time_mix_* uniform in (0.02, 0.98),
  * every LayerNorm / GroupNorm weight 1 + 0.3*randn, bias 0.2*randn,
  * Linear weights N(0, 1/fan_in) (head: 3/sqrt(C)) so logits are O(1..10),
  * the value rows of head 1 in layer 1 are scaled down (x GN_SMALL_HEAD_SCALE) so
    that the GroupNorm input variance of that head is comparable to eps = 64e-5;
    using eps 1e-5 instead of 64e-5 then moves the logits far beyond 1e-4 (the
    size of that effect is recorded in meta.json "sensitivity").

expected.safetensors (per case):
  tokens              int64 [T]     T = 24 ids, includes 0 and V-1 (and a repeat).
  logits              f32 [T, V]    ONE package forward of the whole sequence from a
                                    zero state: RWKV(model, 'cpu fp32').forward(tokens,
                                    None, full_output=True). full_output=True makes the
                                    sequence path return the logits of every position
                                    (False returns only the last row).
  logits_step         f32 [T, V]    the same, feeding one token at a time and carrying
                                    the package state (the one-token code path,
                                    att_one_v5_1/ffn_one); checked == logits within 3e-5
                                    (fp32 rounding; measured 1.05e-5, see TOL_STEP).
  state.{n}.att_shift f32 [C]       package state after the whole sequence (zero start):
  state.{n}.wkv       f32 [H, N, N]   state[3n+0], state[3n+1], state[3n+2].
  state.{n}.ffn_shift f32 [C]         wkv axis order is [head, key_i, value_j] (the
                                      package layout, i.e. the TRANSPOSE of the
                                      time_state file layout).
  f32 case only:
  logits_state        f32 [T, V]    full-sequence logits starting from the tuned state
                                    of state_tiny.pth (wkv = time_state.transpose(1,2),
                                    both token shifts zero).
  state_tuned.{n}.*                 package state after that run (same layout as state.*).
  bf16 case only:
  logits              (as above; the package loading the bf16 file with 'cpu fp32')
  logits_upcast       f32 [T, V]    the package with 'cpu fp32' on a float32 copy of the
                                    bf16 tensors (exact upcast). Differs from `logits`
                                    ONLY because the package folds ln0 into emb in the
                                    storage dtype (bf16) at load time; see meta.json.
  logits_native       f32 [T, V]    the package with strategy 'cpu bf16' (bf16
                                    activations and matmuls, fp32 wkv state/GroupNorm).

Every package run is also cross-checked against an independent float64 re-implementation
of MODELS.md B.3-B.6 written in this file (ref_forward); the max differences are in
meta.json "checks_max_abs_diff". The same re-implementation measures how far common
mistakes (wrong GroupNorm or LayerNorm eps, ln0 applied twice or not at all, untransposed
state file, token shift of the raw residual, exp'd bonus, decay on the value axis ...) move
the logits: meta.json "sensitivity_max_abs_logit_change". Each is asserted > 1e-3 in at
least one of the two runs (zero / tuned state), so a 1e-4 parity test catches all of them.

world_tokenizer.json: {"reference", "vocab_file", "vocab_sha256", ..., "cases":
[{"text", "ids"}], "decode_cases": [{"ids", "decoded"}]}. ids come from
rwkv.rwkv_tokenizer.TRIE_TOKENIZER loaded with the package's bundled
rwkv_vocab_v20230424.txt (not copied into the repo). Every case round-trips
(decode(encode(text)) == text, asserted here). The corpus text was written for this
fixture (plus seeded pseudo-random Unicode strings).
"""

import os
import sys

# Must be set before rwkv.model is imported (it reads them at import time).
os.environ["RWKV_CUDA_ON"] = "0"
os.environ["RWKV_JIT_ON"] = "1"  # the package default (TorchScript on CPU; no fusion)
for _k in ("RWKV_V7_ON", "RWKV_RESCALE_LAYER", "RWKV_DML_ON", "RWKV_DE_VERSION"):
    os.environ.pop(_k, None)

import argparse
import contextlib
import hashlib
import importlib.metadata
import io
import json
import platform
import random
import shutil
import tempfile
import warnings
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore", category=FutureWarning)

import rwkv  # noqa: E402
import rwkv.model  # noqa: E402
from rwkv.model import RWKV  # noqa: E402
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "crates", "gyre", "tests", "fixtures", "rwkv5")
GENERATOR = "tools/make_rwkv5_fixtures.py"

# ----------------------------------------------------------------------------- model shape
C = 128          # n_embd = dim_att
N = 64           # head size
H = C // N       # 2 heads
L = 2            # layers
FFN = 160        # dim_ffn
V = 224          # vocab (not a power of two)
T = 24           # sequence length

SEED_WEIGHTS = 5201
SEED_TOKENS = 5202
SEED_STATE = 5203
SEED_TOK_CORPUS = 5204

# Value rows of (layer 1, head 1) are scaled by this, so that head's GroupNorm input
# variance is ~eps and the eps (64e-5 vs 1e-5) visibly changes the logits.
GN_SMALL_LAYER = 1
GN_SMALL_HEAD = 1
GN_SMALL_HEAD_SCALE = 0.03

# Package sequence path vs one-token path (and chunked / merged-state variants). The brief asked
# for 1e-5; the measured gap is 1e-5..2e-5 on logits of magnitude ~13 (~1e-6 relative) depending
# on the random draw (1.05e-5 with the seeds below). That is plain fp32 rounding: each path is
# itself ~1e-5 away from the float64 re-implementation, the error being amplified by GroupNorm on
# low-variance heads at the first positions.
TOL_STEP = 3e-5
TOL_REF = 1e-4       # package (fp32) vs float64 re-implementation
MAX_TOTAL_BYTES = 4_000_000

VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(rwkv.__file__)), "rwkv_vocab_v20230424.txt")


def versions():
    return {
        "rwkv": importlib.metadata.version("rwkv"),
        "torch": torch.__version__,
        "safetensors": importlib.metadata.version("safetensors"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


# ============================================================================= weights
def make_weights(seed=SEED_WEIGHTS):
    """Random v5.2 checkpoint, float32, names/shapes/order as RWKV-LM's state_dict.

    Key order per block follows RWKV-LM (`Block`: ln1, ln2, ln0; `RWKV_Tmix_x052`:
    time_mix_k/v/r/g, time_decay, time_faaaa, receptance, key, value, output, gate, ln_x;
    `RWKV_CMix_x052`: time_mix_k/r, key, receptance, value).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float32)

    def norm_pair():
        return 1.0 + randn(C, std=0.3), randn(C, std=0.2)

    # w = exp(-exp(d)) in [0.3, 0.999]  <=>  d in [ln(-ln 0.999), ln(-ln 0.3)]
    d_lo, d_hi = float(np.log(-np.log(0.999))), float(np.log(-np.log(0.3)))

    w = OrderedDict()
    # Row scales log-uniform in [1e-3, 1] (trained RWKV embeddings are small): for the small rows
    # the ln0 variance is comparable to eps=1e-5, so the LayerNorm eps matters.
    row_scale = 10.0 ** uniform(-3.0, 0.0, V, 1)
    w["emb.weight"] = randn(V, C) * row_scale
    for n in range(L):
        b = f"blocks.{n}."
        w[b + "ln1.weight"], w[b + "ln1.bias"] = norm_pair()
        w[b + "ln2.weight"], w[b + "ln2.bias"] = norm_pair()
        if n == 0:
            w[b + "ln0.weight"], w[b + "ln0.bias"] = norm_pair()
        a = b + "att."
        for m in "kvrg":
            w[a + f"time_mix_{m}"] = uniform(0.02, 0.98, 1, 1, C)
        w[a + "time_decay"] = uniform(d_lo, d_hi, H, N)
        w[a + "time_faaaa"] = randn(H, N, std=0.5)
        w[a + "receptance.weight"] = randn(C, C, std=C ** -0.5)
        w[a + "key.weight"] = randn(C, C, std=C ** -0.5)
        value = randn(C, C, std=C ** -0.5)
        if n == GN_SMALL_LAYER:
            value[GN_SMALL_HEAD * N:(GN_SMALL_HEAD + 1) * N, :] *= GN_SMALL_HEAD_SCALE
        w[a + "value.weight"] = value
        w[a + "output.weight"] = randn(C, C, std=C ** -0.5)
        w[a + "gate.weight"] = randn(C, C, std=C ** -0.5)
        w[a + "ln_x.weight"], w[a + "ln_x.bias"] = norm_pair()
        f = b + "ffn."
        for m in "kr":
            w[f + f"time_mix_{m}"] = uniform(0.02, 0.98, 1, 1, C)
        w[f + "key.weight"] = randn(FFN, C, std=C ** -0.5)
        w[f + "receptance.weight"] = randn(C, C, std=C ** -0.5)
        w[f + "value.weight"] = randn(C, FFN, std=FFN ** -0.5)
    w["ln_out.weight"], w["ln_out.bias"] = norm_pair()
    w["head.weight"] = randn(V, C, std=3.0 * C ** -0.5)
    # every tensor owns its storage (torch.save would otherwise write shared storages)
    return OrderedDict((k, v.clone().contiguous()) for k, v in w.items())


def make_time_state(seed=SEED_STATE):
    """State-tuning file: blocks.{n}.att.time_state, [H, N(value j), N(key i)], moderate scale."""
    g = torch.Generator().manual_seed(seed)
    st = OrderedDict()
    for n in range(L):
        st[f"blocks.{n}.att.time_state"] = (torch.randn(H, N, N, generator=g) * 0.5).contiguous()
    return st


def make_tokens(seed=SEED_TOKENS):
    rng = np.random.default_rng(seed)
    toks = [int(x) for x in rng.integers(1, V - 1, size=T)]
    toks[0] = 17
    toks[3] = 0          # <|endoftext|> id
    toks[9] = V - 1      # last id
    toks[10] = V - 1     # immediate repeat
    toks[15] = toks[2]   # later repeat
    toks[T - 1] = 0
    return toks


# ============================================================================= independent reference
def ref_forward(sd, tokens, time_state=None, *, gn_eps=64e-5, ln0="once", shift="ln",
                u_exp=False, decay_axis="key", state_transpose=True, decay_mode="exp_neg_exp",
                ln_eps=1e-5, capture=None):
    """Own float64 implementation of MODELS.md B.2-B.6 (one token at a time).

    sd: raw checkpoint dict (as stored). time_state: optional dict from a state file.
    The keyword arguments select deliberate mistakes for the sensitivity table; `capture`, if a
    list, receives (layer, GroupNorm input [H, N]) for every token and layer.
    Returns logits [T, V] float64 and the final state list in the package layout.
    """
    d = {k: v.double() for k, v in sd.items()}

    def ln(x, p, eps=ln_eps):
        mu = x.mean()
        var = ((x - mu) ** 2).mean()
        return (x - mu) / torch.sqrt(var + eps) * d[p + ".weight"] + d[p + ".bias"]

    emb = d["emb.weight"]
    att_shift = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    ffn_shift = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    wkv = []
    for n in range(L):
        if time_state is None:
            wkv.append(torch.zeros(H, N, N, dtype=torch.float64))
        else:
            s = time_state[f"blocks.{n}.att.time_state"].double()
            wkv.append(s.transpose(1, 2).clone() if state_transpose else s.clone())

    out = []
    for tok in tokens:
        x = emb[tok]
        if ln0 == "once":
            x = ln(x, "blocks.0.ln0")
        elif ln0 == "twice":
            x = ln(ln(x, "blocks.0.ln0"), "blocks.0.ln0")
        for n in range(L):
            a = f"blocks.{n}.att."
            x_att_in = x
            xx = ln(x, f"blocks.{n}.ln1")
            sx = att_shift[n]
            mix = {m: xx * d[a + f"time_mix_{m}"].reshape(C) + sx * (1 - d[a + f"time_mix_{m}"].reshape(C))
                   for m in "kvrg"}
            r = (d[a + "receptance.weight"] @ mix["r"]).reshape(H, N)
            k = (d[a + "key.weight"] @ mix["k"]).reshape(H, N)
            v = (d[a + "value.weight"] @ mix["v"]).reshape(H, N)
            gg = F.silu(d[a + "gate.weight"] @ mix["g"])
            dec = d[a + "time_decay"]
            if decay_mode == "exp_neg_exp":
                wd = torch.exp(-torch.exp(dec))
            else:  # mistake: exp(-d)
                wd = torch.exp(-dec).clamp(max=1.0)
            u = torch.exp(d[a + "time_faaaa"]) if u_exp else d[a + "time_faaaa"]
            S = wkv[n]
            A = k[:, :, None] * v[:, None, :]                       # [H, key i, value j]
            y = torch.einsum("hi,hij->hj", r, u[:, :, None] * A + S)
            if decay_axis == "key":
                S = A + wd[:, :, None] * S
            else:  # mistake: decay along the value axis
                S = A + wd[:, None, :] * S
            wkv[n] = S
            if capture is not None:
                capture.append((n, y.clone()))
            mu = y.mean(dim=1, keepdim=True)
            var = ((y - mu) ** 2).mean(dim=1, keepdim=True)
            y = ((y - mu) / torch.sqrt(var + gn_eps)).reshape(C)
            y = y * d[a + "ln_x.weight"] + d[a + "ln_x.bias"]
            x = x + d[a + "output.weight"] @ (y * gg)
            att_shift[n] = xx if shift == "ln" else x_att_in  # "raw": mistake

            f = f"blocks.{n}.ffn."
            x_ffn_in = x
            xx2 = ln(x, f"blocks.{n}.ln2")
            sx2 = ffn_shift[n]
            kx = xx2 * d[f + "time_mix_k"].reshape(C) + sx2 * (1 - d[f + "time_mix_k"].reshape(C))
            rx = xx2 * d[f + "time_mix_r"].reshape(C) + sx2 * (1 - d[f + "time_mix_r"].reshape(C))
            kk = torch.relu(d[f + "key.weight"] @ kx) ** 2
            x = x + torch.sigmoid(d[f + "receptance.weight"] @ rx) * (d[f + "value.weight"] @ kk)
            ffn_shift[n] = xx2 if shift == "ln" else x_ffn_in
        out.append(d["head.weight"] @ ln(x, "ln_out"))
    state = []
    for n in range(L):
        state += [att_shift[n], wkv[n], ffn_shift[n]]
    return torch.stack(out), state


# ============================================================================= package helpers
@contextlib.contextmanager
def quiet():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf


def load_package(pth_path, strategy):
    assert pth_path.endswith(".pth")
    with quiet() as buf:
        m = RWKV(model=pth_path[: -len(".pth")], strategy=strategy)
    log = buf.getvalue()
    detected = [ln for ln in log.splitlines() if ln.startswith("Model detected")]
    return m, (detected[0] if detected else None), log


def clone_state(state):
    return [s.clone() for s in state]


def package_state_zero(m):
    """What RWKV.forward builds for state=None (no time_state in the model)."""
    st = []
    for i in range(m.args.n_layer):
        at = m.strategy[i].atype
        st += [torch.zeros(m.args.n_embd, dtype=at),
               torch.zeros(m.args.n_head, m.args.n_att // m.args.n_head, m.args.n_att // m.args.n_head,
                           dtype=torch.float),
               torch.zeros(m.args.n_embd, dtype=at)]
    return st


def package_state_from_file(m, time_state):
    """Tuned initial state exactly as ChatRWKV's forward builds it when the model dict holds
    blocks.{n}.att.time_state: wkv = time_state.transpose(1,2).float(), shifts zero."""
    st = package_state_zero(m)
    for i in range(m.args.n_layer):
        st[3 * i + 1] = time_state[f"blocks.{i}.att.time_state"].transpose(1, 2).to(torch.float).contiguous()
    return st


def run_seq(m, tokens, state):
    out, st = m.forward(list(tokens), None if state is None else clone_state(state), full_output=True)
    assert out.shape == (len(tokens), V), out.shape
    return out.float().clone(), clone_state(st)


def run_steps(m, tokens, state):
    st = None if state is None else clone_state(state)
    rows = []
    for tok in tokens:
        o, st = m.forward([tok], st, full_output=True)
        assert o.shape == (V,), o.shape  # a 1-token list takes the one-token path, returns [V]
        rows.append(o.float().clone())
        st = clone_state(st)
    return torch.stack(rows), st


def maxdiff(a, b):
    return float((a.double() - b.double()).abs().max())


def state_tensors(prefix, state):
    out = OrderedDict()
    for n in range(L):
        out[f"{prefix}.{n}.att_shift"] = state[3 * n + 0].float().contiguous()
        out[f"{prefix}.{n}.wkv"] = state[3 * n + 1].float().contiguous()
        out[f"{prefix}.{n}.ffn_shift"] = state[3 * n + 2].float().contiguous()
    return out


def state_diff(sa, sb):
    return max(maxdiff(x, y) for x, y in zip(sa, sb))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def logits_stats(lg):
    return {
        "max_abs": round(float(lg.abs().max()), 4),
        "std": round(float(lg.std()), 4),
        "argmax_first_8": [int(i) for i in lg.argmax(dim=-1)[:8]],
    }


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_st(tensors, path, metadata):
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o644)  # safetensors creates 0600 files


def model_config():
    return {
        "n_embd": C, "dim_att": C, "head_size": N, "n_head": H, "n_layer": L,
        "dim_ffn": FFN, "vocab_size": V, "ln0": True, "tied_head": False,
        "layernorm_eps": 1e-5, "groupnorm_eps": 64e-5,
    }


SENSITIVITY_VARIANTS = [
    ("groupnorm_eps_1e-5", dict(gn_eps=1e-5)),
    ("ln0_not_applied", dict(ln0="none")),
    ("ln0_applied_twice", dict(ln0="twice")),
    ("token_shift_raw_residual", dict(shift="raw")),
    ("time_faaaa_exp", dict(u_exp=True)),
    ("decay_on_value_axis", dict(decay_axis="value")),
    ("decay_exp_neg_d", dict(decay_mode="exp_neg_d")),
    ("layernorm_eps_1e-6", dict(ln_eps=1e-6)),
]


def sensitivity(sd, tokens, time_state=None):
    base, _ = ref_forward(sd, tokens, time_state)
    res = OrderedDict()
    for name, kw in SENSITIVITY_VARIANTS:
        lg, _ = ref_forward(sd, tokens, time_state, **kw)
        res[name] = float("%.3g" % maxdiff(lg, base))
    if time_state is not None:
        lg, _ = ref_forward(sd, tokens, time_state, state_transpose=False)
        res["state_file_not_transposed"] = float("%.3g" % maxdiff(lg, base))
        lg, _ = ref_forward(sd, tokens, None)
        res["state_file_ignored"] = float("%.3g" % maxdiff(lg, base))
    return res


def groupnorm_input_var(sd, tokens):
    """Per (layer, head) min/max over the sequence of the GroupNorm input variance (float64)."""
    cap = []
    ref_forward(sd, tokens, capture=cap)
    stats = {}
    for n, y in cap:
        var = y.var(dim=1, unbiased=False)
        for h in range(H):
            key = f"layer{n}_head{h}"
            lo, hi = stats.get(key, (float("inf"), 0.0))
            stats[key] = (min(lo, float(var[h])), max(hi, float(var[h])))
    return {k: [float("%.3g" % a), float("%.3g" % b)] for k, (a, b) in stats.items()}


# ============================================================================= cases
def common_package_checks(m, detected):
    assert detected == "Model detected: v5.2", detected
    assert m.version == 5.2, m.version
    assert m.args.n_head == H and m.args.n_embd == C and m.args.n_att == C and m.args.n_ffn == FFN
    assert m.args.n_layer == L
    assert m.RESCALE_LAYER == 0
    assert "blocks.0.ln0.weight" not in m.w  # folded into emb and deleted at load
    assert "blocks.0.att.time_first" in m.w and "blocks.0.att.time_faaaa" not in m.w


def case_f32(tmp):
    name = "rwkv5_tiny_f32"
    cdir = os.path.join(OUT, name)
    os.makedirs(cdir, exist_ok=True)
    sd = make_weights()
    ts = make_time_state()
    tokens = make_tokens()

    pth = os.path.join(cdir, "model.pth")
    torch.save(sd, pth)
    save_st(OrderedDict((k, v) for k, v in sd.items()), os.path.join(cdir, "model.safetensors"),
            metadata={"format": "pt"})
    st_path = os.path.join(cdir, "state_tiny.pth")
    torch.save(ts, st_path)

    # files round-trip and agree bit for bit
    back_pth = torch.load(pth, map_location="cpu", weights_only=True)
    back_st = load_file(os.path.join(cdir, "model.safetensors"))
    assert list(back_pth.keys()) == list(sd.keys())
    for k, v in sd.items():
        assert back_pth[k].dtype == torch.float32 and torch.equal(back_pth[k], v), k
        assert back_st[k].dtype == torch.float32 and torch.equal(back_st[k], v), k
    back_ts = torch.load(st_path, map_location="cpu", weights_only=True)
    for k, v in ts.items():
        assert torch.equal(back_ts[k], v)

    m, detected, _ = load_package(pth, "cpu fp32")
    common_package_checks(m, detected)
    # the package's folded embedding equals LN(emb; ln0) computed here
    emb_fold = F.layer_norm(sd["emb.weight"], (C,), sd["blocks.0.ln0.weight"], sd["blocks.0.ln0.bias"])
    fold_diff = maxdiff(m.w["emb.weight"], emb_fold)

    logits, state = run_seq(m, tokens, None)
    logits_step, state_step = run_steps(m, tokens, None)
    half = T // 2
    l1, s1 = run_seq(m, tokens[:half], None)
    l2, s2 = run_seq(m, tokens[half:], s1)
    logits_chunked = torch.cat([l1, l2])

    tuned0 = package_state_from_file(m, ts)
    logits_state, state_tuned = run_seq(m, tokens, tuned0)
    logits_state_step, state_tuned_step = run_steps(m, tokens, tuned0)

    # The package's own time_state path: merge the state file into the model dict
    # (what ChatRWKV's rwkv_state_merger.py does), load, forward(state=None).
    merged = OrderedDict(sd)
    merged.update(ts)
    merged_pth = os.path.join(tmp, "merged_f32.pth")
    torch.save(merged, merged_pth)
    mm, _, _ = load_package(merged_pth, "cpu fp32")
    assert mm.args.time_state is True
    logits_state_pkg, state_tuned_pkg = run_seq(mm, tokens, None)

    ref_logits, ref_state = ref_forward(sd, tokens)
    ref_logits_state, ref_state_tuned = ref_forward(sd, tokens, ts)

    checks = OrderedDict()
    checks["emb_fold_vs_F.layer_norm"] = fold_diff
    checks["logits_step_vs_logits"] = maxdiff(logits_step, logits)
    checks["logits_chunked_12+12_vs_logits"] = maxdiff(logits_chunked, logits)
    checks["state_step_vs_state"] = state_diff(state_step, state)
    checks["state_chunked_vs_state"] = state_diff(s2, state)
    checks["logits_state_step_vs_logits_state"] = maxdiff(logits_state_step, logits_state)
    checks["logits_state_via_merged_time_state_vs_manual_state"] = maxdiff(logits_state_pkg, logits_state)
    checks["state_tuned_via_merged_vs_manual"] = state_diff(state_tuned_pkg, state_tuned)
    checks["logits_vs_float64_reimplementation"] = maxdiff(logits, ref_logits)
    checks["logits_state_vs_float64_reimplementation"] = maxdiff(logits_state, ref_logits_state)
    checks["state_vs_float64_reimplementation"] = state_diff(state, ref_state)
    checks["state_tuned_vs_float64_reimplementation"] = state_diff(state_tuned, ref_state_tuned)
    checks["logits_state_vs_logits"] = maxdiff(logits_state, logits)
    for k in ("logits_step_vs_logits", "logits_chunked_12+12_vs_logits",
              "logits_state_step_vs_logits_state", "logits_state_via_merged_time_state_vs_manual_state",
              "state_step_vs_state", "state_chunked_vs_state", "state_tuned_via_merged_vs_manual"):
        assert checks[k] <= TOL_STEP, (k, checks[k])
    for k in ("logits_vs_float64_reimplementation", "logits_state_vs_float64_reimplementation"):
        assert checks[k] <= TOL_REF, (k, checks[k])
    assert checks["emb_fold_vs_F.layer_norm"] == 0.0
    assert checks["logits_state_vs_logits"] > 1e-2

    sens = sensitivity(sd, tokens, ts)
    sens_zero = sensitivity(sd, tokens)
    for k in set(sens) | set(sens_zero):
        # every listed mistake moves the logits far beyond a 1e-4 parity tolerance
        assert max(sens.get(k, 0.0), sens_zero.get(k, 0.0)) > 1e-3, (k, sens.get(k), sens_zero.get(k))

    exp = OrderedDict()
    exp["tokens"] = torch.tensor(tokens, dtype=torch.int64)
    exp["logits"] = logits.contiguous()
    exp["logits_step"] = logits_step.contiguous()
    exp["logits_state"] = logits_state.contiguous()
    exp.update(state_tensors("state", state))
    exp.update(state_tensors("state_tuned", state_tuned))
    save_st(exp, os.path.join(cdir, "expected.safetensors"), metadata={"generator": GENERATOR})

    meta = base_meta(name, "float32", m, detected)
    meta["description"] = ("Tiny random RWKV-5.2 (v5.2 'Eagle' layout), float32 .pth (torch.save of a plain "
                           "dict) plus the identical tensors as model.safetensors, plus a state-tuning file.")
    meta["files"] = {
        "model.pth": {"bytes": os.path.getsize(pth), "sha256": sha256_file(pth),
                      "format": "torch.save zip archive of a plain dict {name: tensor} (no wrapper, no config)"},
        "model.safetensors": {"bytes": os.path.getsize(os.path.join(cdir, "model.safetensors")),
                              "sha256": sha256_file(os.path.join(cdir, "model.safetensors")),
                              "note": "same names, dtype and values as model.pth"},
        "state_tiny.pth": {"bytes": os.path.getsize(st_path), "sha256": sha256_file(st_path),
                           "keys": list(ts.keys()),
                           "shape": [H, N, N], "dtype": "float32",
                           "layout": "[head, value_j, key_i]; package/engine wkv = time_state.transpose(1,2)"},
    }
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                       for k, v in sd.items()}
    meta["expected"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                        for k, v in exp.items()}
    meta["reference_calls"] = {
        "logits": "RWKV(model=<dir>/model, strategy='cpu fp32').forward(tokens, None, full_output=True)",
        "logits_step": "for tok in tokens: out, state = model.forward([tok], state)  (state starts None)",
        "logits_state": ("state0 = per layer [zeros(C), time_state.transpose(1,2).float(), zeros(C)]; "
                         "model.forward(tokens, state0, full_output=True). Cross-checked against the "
                         "package's own path: state file keys merged into the model dict, "
                         "forward(tokens, None) -> identical."),
        "state.*": "the state list returned by the `logits` call: state[3n+0], state[3n+1], state[3n+2]",
        "state_tuned.*": "the state list returned by the `logits_state` call",
    }
    meta["tokens"] = tokens
    meta["logits_stats"] = logits_stats(logits)
    meta["logits_state_stats"] = logits_stats(logits_state)
    meta["checks_max_abs_diff"] = {k: float("%.3g" % v) for k, v in checks.items()}
    meta["sensitivity_max_abs_logit_change"] = {
        "description": ("max |logits(mistake) - logits(correct)| with the float64 re-implementation; "
                        "'zero_state' is the `logits` run, 'tuned_state' the `logits_state` run"),
        "zero_state": sens_zero,
        "tuned_state": sens,
    }
    meta["groupnorm_input_variance_min_max"] = groupnorm_input_var(sd, tokens)
    meta["tolerance_suggested"] = {"logits": 1e-4, "logits_step": 1e-4, "logits_state": 1e-4,
                                   "state.*": 1e-4, "state_tuned.*": 1e-4}
    write_json(os.path.join(cdir, "meta.json"), meta)
    return sd, tokens


def case_bf16(tmp, sd32=None, tokens=None):
    name = "rwkv5_tiny_bf16"
    cdir = os.path.join(OUT, name)
    os.makedirs(cdir, exist_ok=True)
    if sd32 is None:
        sd32 = make_weights()
    if tokens is None:
        tokens = make_tokens()
    sd = OrderedDict((k, v.to(torch.bfloat16).contiguous()) for k, v in sd32.items())
    pth = os.path.join(cdir, "model.pth")
    torch.save(sd, pth)
    back = torch.load(pth, map_location="cpu", weights_only=True)
    assert list(back.keys()) == list(sd.keys())
    for k, v in sd.items():
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], v), k

    m, detected, _ = load_package(pth, "cpu fp32")
    common_package_checks(m, detected)
    logits, state = run_seq(m, tokens, None)
    logits_step, state_step = run_steps(m, tokens, None)

    # exact f32 upcast of the stored bf16 tensors, same package / strategy
    up = OrderedDict((k, v.float().contiguous()) for k, v in sd.items())
    up_pth = os.path.join(tmp, "upcast_bf16.pth")
    torch.save(up, up_pth)
    mu, _, _ = load_package(up_pth, "cpu fp32")
    logits_upcast, state_upcast = run_seq(mu, tokens, None)

    # How the package folds ln0 for a bf16 file: F.layer_norm on bf16 tensors -> bf16 result,
    # then upcast to fp32 because the strategy's activation dtype is fp32.
    emb_fold_bf16 = F.layer_norm(sd["emb.weight"], (C,), sd["blocks.0.ln0.weight"], sd["blocks.0.ln0.bias"])
    assert emb_fold_bf16.dtype == torch.bfloat16
    fold_pkg_vs_torch_bf16 = maxdiff(m.w["emb.weight"], emb_fold_bf16.float())
    emb_fold_f32 = F.layer_norm(up["emb.weight"], (C,), up["blocks.0.ln0.weight"], up["blocks.0.ln0.bias"])
    fold_rounded = emb_fold_f32.to(torch.bfloat16).float()
    n_mismatch = int((fold_rounded != m.w["emb.weight"]).sum())

    mn, detected_native, _ = load_package(pth, "cpu bf16")
    logits_native, _ = run_seq(mn, tokens, None)
    logits_native_step, _ = run_steps(mn, tokens, None)

    ref_up, ref_state_up = ref_forward(up, tokens)
    # reference with the package's bf16 ln0 fold: replace emb by the folded bf16 table, no ln0
    sd_fold = OrderedDict(up)
    sd_fold["emb.weight"] = m.w["emb.weight"].float().clone()
    ref_fold, ref_state_fold = ref_forward(sd_fold, tokens, ln0="none")

    checks = OrderedDict()
    checks["logits_step_vs_logits"] = maxdiff(logits_step, logits)
    checks["state_step_vs_state"] = state_diff(state_step, state)
    checks["logits_vs_logits_upcast"] = maxdiff(logits, logits_upcast)
    checks["emb_fold_package_vs_torch_layer_norm_bf16"] = fold_pkg_vs_torch_bf16
    checks["emb_fold_elements_differing_from_bf16(f32 LayerNorm)"] = n_mismatch
    checks["logits_upcast_vs_float64_reimplementation"] = maxdiff(logits_upcast, ref_up)
    checks["logits_vs_float64_reimplementation_with_bf16_folded_emb"] = maxdiff(logits, ref_fold)
    checks["state_vs_float64_reimplementation_with_bf16_folded_emb"] = state_diff(state, ref_state_fold)
    checks["logits_native_vs_logits"] = maxdiff(logits_native, logits)
    checks["logits_native_step_vs_logits_native"] = maxdiff(logits_native_step, logits_native)
    assert checks["logits_step_vs_logits"] <= TOL_STEP
    assert checks["state_step_vs_state"] <= TOL_STEP
    assert checks["emb_fold_package_vs_torch_layer_norm_bf16"] == 0.0
    assert checks["logits_upcast_vs_float64_reimplementation"] <= TOL_REF
    assert checks["logits_vs_float64_reimplementation_with_bf16_folded_emb"] <= TOL_REF

    exp = OrderedDict()
    exp["tokens"] = torch.tensor(tokens, dtype=torch.int64)
    exp["logits"] = logits.contiguous()
    exp["logits_step"] = logits_step.contiguous()
    exp["logits_upcast"] = logits_upcast.contiguous()
    exp["logits_native"] = logits_native.contiguous()
    exp.update(state_tensors("state", state))
    save_st(exp, os.path.join(cdir, "expected.safetensors"), metadata={"generator": GENERATOR})

    meta = base_meta(name, "bfloat16", m, detected)
    meta["description"] = ("The rwkv5_tiny_f32 model rounded to bfloat16 (round-to-nearest-even, torch .to()) "
                           "and saved with torch.save as a plain dict.")
    meta["files"] = {"model.pth": {"bytes": os.path.getsize(pth), "sha256": sha256_file(pth),
                                   "format": "torch.save zip archive of a plain dict {name: bfloat16 tensor}"}}
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                       for k, v in sd.items()}
    meta["expected"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                        for k, v in exp.items()}
    meta["reference_calls"] = {
        "logits": "RWKV(model=<dir>/model, strategy='cpu fp32').forward(tokens, None, full_output=True)",
        "logits_step": "same model, one token at a time carrying the state",
        "logits_upcast": ("RWKV(<f32 copy of the bf16 tensors>, 'cpu fp32').forward(tokens, None, "
                          "full_output=True)  == exact upcast, everything in fp32"),
        "logits_native": "RWKV(model=<dir>/model, strategy='cpu bf16').forward(tokens, None, full_output=True)",
        "state.*": "state list returned by the `logits` call (fp32 strategy)",
    }
    meta["strategy_native"] = "cpu bf16"
    meta["detected_native"] = detected_native
    meta["tokens"] = tokens
    meta["logits_stats"] = logits_stats(logits)
    meta["checks_max_abs_diff"] = {k: (v if isinstance(v, int) else float("%.3g" % v)) for k, v in checks.items()}
    meta["tolerance_suggested"] = {
        "logits": ("1e-4 only if the engine reproduces the package's bf16 ln0 fold "
                   "(emb_folded = bf16_round(LayerNorm_f32(upcast emb; upcast ln0)), then upcast); "
                   "an engine that upcasts first and folds in f32 matches logits_upcast instead"),
        "logits_upcast": 1e-4,
        "logits_step": "as logits",
        "logits_native": ("bf16 activations: loose, e.g. max abs <= %.2g (measured %.3g vs logits)"
                          % (max(0.5, 4 * checks["logits_native_vs_logits"]), checks["logits_native_vs_logits"])),
        "state.*": "1e-4 with the bf16 ln0 fold, as logits",
    }
    meta["notes"].append(
        "ln0 fold in bf16: RWKV.__init__ runs F.layer_norm(emb, ln0) on the tensors as stored, so for this "
        "bf16 file the folded table is rounded to bf16 BEFORE the 'cpu fp32' strategy upcasts it. Every other "
        "tensor is upcast exactly (time_decay/time_faaaa/ln_x are explicitly .float()'d, the rest .to(fp32)). "
        "So `logits` = fp32 maths on (bf16-rounded folded emb + exact upcast of every other tensor); "
        "`logits_upcast` = fp32 maths on the exact upcast of everything with ln0 applied in fp32. "
        "Rounding torch's f32 LayerNorm of the upcast tensors to bf16 reproduced the package's folded table "
        "in all but %d of %d elements." % (n_mismatch, V * C))
    write_json(os.path.join(cdir, "meta.json"), meta)


def base_meta(case, dtype, m, detected):
    return OrderedDict(
        case=case,
        generator=GENERATOR,
        architecture="RWKV-5.2 (v5.2 'Eagle', RWKV-LM RWKV_Tmix_x052 / RWKV_CMix_x052 layout)",
        storage_dtype=dtype,
        config=model_config(),
        strategy="cpu fp32",
        env={"RWKV_JIT_ON": os.environ["RWKV_JIT_ON"], "RWKV_CUDA_ON": os.environ["RWKV_CUDA_ON"],
             "RWKV_V7_ON": "unset", "RWKV_RESCALE_LAYER": "unset"},
        package_detected=detected,
        package_version_attr=m.version,
        package_rescale_layer=m.RESCALE_LAYER,
        package_functions_used=[
            "rwkv.model.RWKV.__init__ (version detection, ln0 fold, time_faaaa->time_first, "
            "time_decay -> exp(-exp(.)) fp32, weight transposes)",
            "rwkv.model.RWKV.forward (len(tokens) > 1: att_seq_v5_2 + ffn_seq; "
            "len(tokens) == 1: att_one_v5_1 + ffn_one)",
        ],
        seeds={"weights": SEED_WEIGHTS, "tokens": SEED_TOKENS, "time_state": SEED_STATE},
        T=T, V=V,
        versions=versions(),
        notes=[
            "Version detection (RWKV.__init__): 'ln_x' => 5, 'gate.weight' => 5.1, a 2-D att.time_decay with "
            "shape[1] > 1 seen while the version is already 5.x => 5.2. Keys are scanned in dict order, and in "
            "RWKV-LM order att.time_decay comes BEFORE att.gate/ln_x inside a block, so block 0's time_decay is "
            "seen at version 4 and the 5.2 upgrade happens on block 1's time_decay: a 1-layer checkpoint in this "
            "key order would be detected as v5.1 (and n_head left unset). Fixture has 2 layers.",
            "n_head = time_decay.shape[0]; n_att = att.key.weight.shape[0]; n_ffn = ffn.key.weight.shape[0].",
            "ln0 is folded into emb.weight at load (F.layer_norm, eps 1e-5) and deleted; applied once.",
            "time_faaaa is renamed time_first and used raw (REAL_TIME_FIRST), no exp; reshaped [H, N, 1] fp32.",
            "time_decay -> exp(-exp(time_decay.float())) reshaped [H, N, 1]; decays the key axis of the state.",
            "RESCALE_LAYER is 0 for fp32/bf16 strategies ('fp16' not in strategy) and RWKV_RESCALE_LAYER is unset: "
            "no weight pre-division, no x/2.",
            "GroupNorm eps 64e-5 (F.group_norm, num_groups=H); LayerNorm eps 1e-5 (F.layer_norm default).",
            "full_output=True: the sequence path returns [T, V] (one row per position); full_output=False "
            "returns only the last row [V]. A 1-token list takes the one-token path and returns [V].",
            "State list: 3 tensors per layer [att_shift [C] (act dtype), wkv [H, N, N] fp32 in "
            "[head, key_i, value_j], ffn_shift [C] (act dtype)]. Shifts hold the LayerNorm OUTPUT (ln1 / ln2) "
            "of the previous token. forward() writes into the list it was given (in place) and returns it.",
            "Tuned state: the package supports it only when blocks.{n}.att.time_state is INSIDE the model dict "
            "(args.time_state); forward(state=None) then starts from time_state.transpose(1,2).float() with zero "
            "shifts. A separate state file is therefore applied here by building that same list and passing it "
            "to forward(); both ways are checked equal (f32 case).",
            "Logits are F.layer_norm(x, ln_out) @ head.weight.T, returned .float().",
            "RWKV_JIT_ON=1 (package default, TorchScript) and RWKV_JIT_ON=0 gave bit-identical logits and "
            "states for both cases with rwkv 0.8.32 / torch 2.15 on CPU (checked by hand when this was written).",
            "Feeding the sequence in two chunks (12 + 12 tokens, carrying the state) reproduces `logits` "
            "bit for bit (f32 case, checks).",
        ],
    )


# ============================================================================= tokenizer corpus
PROSE = [
    "The lighthouse keeper counted the ships every evening, writing their names in a small leather "
    "notebook. Some nights there were none at all, and he wrote the date anyway, followed by a single dash.",
    "A recurrent network carries its memory forward one step at a time. Unlike attention, the cost of each "
    "new token does not grow with the length of the conversation; the price is that everything it remembers "
    "must fit into a fixed-size state.",
    "Mix two cups of flour with a pinch of salt. Add warm water slowly -- about 180 ml -- and knead for ten "
    "minutes. Let the dough rest (covered!) for at least an hour; then shape it, bake at 230 \u00b0C, and "
    "enjoy.",
    "\"Are you sure?\" she asked. 'Quite sure,' he replied, although he wasn't. The train left at 7:45 a.m., "
    "which meant they had exactly 2 hours, 13 minutes and 9 seconds... or so the station clock claimed.",
    "Invoice #2024-0173: 3 x widgets @ $4.99 = $14.97; shipping $0.00; tax (8.25%) $1.24; total $16.21. "
    "Questions? Email billing@example.com or visit https://example.com/help?topic=invoices&lang=en#faq.",
    "In the spring the river rose above the old stone bridge, and the children of the village were not "
    "allowed to cross it until the water went down. They threw sticks from the bank instead and raced them "
    "to the bend, where the willows leaned so low that their leaves touched the current.",
    "Rules of thumb: (1) measure twice; (2) cut once; (3) if something can't be undone, sleep on it. "
    "These are not laws of nature, but they have saved more furniture than any warranty ever has.",
    "THE QUICK BROWN FOX? the quick brown fox! The Quick Brown Fox. tHE qUICK bROWN fOX; "
    "ThE qUiCk BrOwN fOx: thequickbrownfox",
    "Numbers: 0 1 2 3 10 100 1000 10000 3.14159 2.71828 -42 +7 1e-5 6.022e23 0x1F 0b1010 1_000_000 "
    "12,345,678.90 \u00bd \u00be \u2153 \u2460 \u2461 \u2462 \u216b",
    "The first rule of the workshop was that every tool went back on its hook before anyone went home. "
    "The second rule, added later and written in a different hand, said that the first rule applied on "
    "Fridays too. Nobody remembered who had written it, but everybody knew why.",
    "When the power failed, the old radio still worked. We sat around it in the kitchen, listening to a "
    "station from three hundred kilometres away that played nothing but weather reports and slow piano "
    "music, and for a few hours the storm outside felt less like a threat and more like a neighbour who "
    "talked too loudly.",
    "Checklist for a new release:\n  1. bump the version\n  2. update CHANGELOG.md\n  3. run the full "
    "test suite (yes, the slow one)\n  4. tag, push, and wait for CI\n  5. announce it -- briefly.",
    "Q: Why do the logits differ in the fifth decimal place?\nA: Because floating-point addition is not "
    "associative, and two programs that add the same numbers in a different order will, sooner or later, "
    "disagree about the last bit.",
    "Don't, can't, won't, shouldn't've, y'all'd've; it's the cat's toy, the cats' toys, and the Joneses' "
    "house. Hyphen-ated, en\u2013dash, em\u2014dash, minus \u2212 sign, \u201csmart quotes\u201d and "
    "\u2018single ones\u2019.",
]

PYTHON_CODE = (
    "#!/usr/bin/env python3\n"
    "\"\"\"Tiny inventory tool (written for a tokenizer test).\"\"\"\n"
    "import json\n"
    "from dataclasses import dataclass, field\n"
    "\n"
    "\n"
    "@dataclass\n"
    "class Item:\n"
    "\tname: str\n"
    "\tcount: int = 0\n"
    "\ttags: list[str] = field(default_factory=list)\n"
    "\n"
    "\tdef restock(self, n: int) -> None:\n"
    "\t\tif n <= 0:\n"
    "\t\t\traise ValueError(f\"bad amount: {n!r}\")\n"
    "\t\tself.count += n\n"
    "\n"
    "\n"
    "def load(path):\n"
    "    with open(path, encoding=\"utf-8\") as fh:\n"
    "        raw = json.load(fh)\n"
    "    return [Item(**row) for row in raw.get('items', [])]\n"
    "\n"
    "\n"
    "if __name__ == \"__main__\":\n"
    "    items = load(\"stock.json\")\n"
    "    for i, it in enumerate(sorted(items, key=lambda x: (-x.count, x.name))):\n"
    "        print(f\"{i:>3}  {it.name:<20}{it.count:6d}  {', '.join(it.tags)}\")\n"
    "    total = sum(it.count for it in items)  # comment with trailing spaces   \n"
    "    print('total =', total, end='\\n\\n')\n"
)

RUST_CODE = (
    "use std::collections::HashMap;\n"
    "\n"
    "/// Counts words, ignoring ASCII case.\n"
    "pub fn word_counts(text: &str) -> HashMap<String, usize> {\n"
    "\tlet mut map = HashMap::new();\n"
    "\tfor w in text.split_whitespace() {\n"
    "\t\tlet key = w.trim_matches(|c: char| !c.is_alphanumeric()).to_ascii_lowercase();\n"
    "\t\tif key.is_empty() {\n"
    "\t\t\tcontinue;\n"
    "\t\t}\n"
    "\t\t*map.entry(key).or_insert(0) += 1;\n"
    "\t}\n"
    "\tmap\n"
    "}\n"
    "\n"
    "#[derive(Debug, Clone, PartialEq)]\n"
    "enum Shape<'a> {\n"
    "    Circle { r: f64 },\n"
    "    Rect(f64, f64),\n"
    "    Named(&'a str),\n"
    "}\n"
    "\n"
    "impl<'a> Shape<'a> {\n"
    "    fn area(&self) -> Option<f64> {\n"
    "        match *self {\n"
    "            Shape::Circle { r } => Some(std::f64::consts::PI * r * r),\n"
    "            Shape::Rect(w, h) if w >= 0.0 && h >= 0.0 => Some(w * h),\n"
    "            _ => None,\n"
    "        }\n"
    "    }\n"
    "}\n"
    "\n"
    "fn main() -> Result<(), Box<dyn std::error::Error>> {\n"
    "    let v: Vec<u32> = (0..10).filter(|x| x % 3 != 0).collect();\n"
    "    println!(\"{:?} {:#x} {:>8.3}\", v, 255u8, 1.0f32 / 3.0);\n"
    "    Ok(())\n"
    "}\n"
)

OTHER_CODE = [
    "{\"name\": \"gyre\", \"version\": \"0.1.0\", \"tags\": [\"rwkv\", \"llama\"], \"nested\": {\"a\": null, "
    "\"b\": true, \"c\": -1.5e-3}}",
    "SELECT id, name, COUNT(*) AS n FROM users u JOIN orders o ON o.user_id = u.id WHERE u.created_at >= "
    "'2023-01-01' GROUP BY id, name HAVING n > 5 ORDER BY n DESC LIMIT 10;",
    "<div class=\"card\" data-id='42'>\n  <p>Hello &amp; welcome &lt;user&gt;</p>\n  <!-- comment -->\n</div>",
    "#include <stdio.h>\nint main(void) {\n\tfor (int i = 0; i < 3; ++i) printf(\"%d\\n\", i);\n\treturn 0;\n}\n",
    "#!/bin/sh\nset -eu\nfor f in *.txt; do\n\tn=$(wc -l < \"$f\")\n\t[ \"$n\" -gt 100 ] && echo \"$f: $n\"\n"
    "done\n",
    "server:\n  host: 0.0.0.0\n  port: 8080\n  routes:\n    - path: /v1/completions\n      methods: [POST]\n"
    "    - path: /health\n      methods: [GET, HEAD]\n",
    "$ cargo test --release -- --nocapture 2>&1 | tee log.txt && echo \"exit=$?\"\n",
    "# Heading\n\n- item one\n- item **two**\n  - nested `code`\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```rust\n"
    "let x = 1;\n```\n",
    "    def f(x):\n        return x * 2\n\n\n\n    # four newlines above\n",
]

MULTILINGUAL = [
    "\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff0c\u6211\u4eec\u53bb\u516c\u56ed\u6563\u6b65\u5427\u3002"
    "\u8fd9\u662f\u4e00\u4e2a\u7528\u4e8e\u6d4b\u8bd5\u5206\u8bcd\u5668\u7684\u53e5\u5b50\uff0c\u5305\u542b"
    "\u6807\u70b9\u7b26\u53f7\uff1a\u9017\u53f7\u3001\u53e5\u53f7\u548c\u95ee\u53f7\uff1f",
    "\u5faa\u73af\u795e\u7ecf\u7f51\u7edc\u4e00\u6b21\u53ea\u5904\u7406\u4e00\u4e2a\u8bcd\uff0c\u5b83\u7684"
    "\u8bb0\u5fc6\u4fdd\u5b58\u5728\u56fa\u5b9a\u5927\u5c0f\u7684\u72b6\u6001\u91cc\u3002\u6570\u5b57\uff1a"
    "\uff11\uff12\uff13\uff0c\u82f1\u6587\uff1aRWKV\u3002",
    "\u4eca\u65e5\u306f\u3044\u3044\u5929\u6c17\u3067\u3059\u306d\u3002\u6771\u4eac\u306e\u685c\u306f"
    "\u3068\u3066\u3082\u7dba\u9e97\u3067\u3059\u3002\u30ab\u30bf\u30ab\u30ca\u3068\u3072\u3089\u304c\u306a"
    "\u3092\u6df7\u305c\u305f\u30c6\u30b9\u30c8\u6587\u3067\u3059\u3002\uff8a\uff9d\uff76\uff78\u30ab\u30ca",
    "\uc548\ub155\ud558\uc138\uc694. \uc624\ub298\uc740 \ub0a0\uc528\uac00 \uc88b\uc2b5\ub2c8\ub2e4. "
    "\ud55c\uad6d\uc5b4 \ud1a0\ud06c\ub098\uc774\uc800 \ud14c\uc2a4\ud2b8 \ubb38\uc7a5\uc785\ub2c8\ub2e4.",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645. \u0647\u0630\u0647 "
    "\u062c\u0645\u0644\u0629 \u0642\u0635\u064a\u0631\u0629 \u0644\u0627\u062e\u062a\u0628\u0627\u0631 "
    "\u0627\u0644\u0645\u062d\u0644\u0644 \u0661\u0662\u0663.",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u042d\u0442\u043e \u043a\u043e\u0440\u043e"
    "\u0442\u043a\u043e\u0435 \u043f\u0440\u0435\u0434\u043b\u043e\u0436\u0435\u043d\u0438\u0435 \u0434"
    "\u043b\u044f \u043f\u0440\u043e\u0432\u0435\u0440\u043a\u0438 \u0442\u043e\u043a\u0435\u043d\u0438"
    "\u0437\u0430\u0442\u043e\u0440\u0430. \u0401\u0436\u0438\u043a \u0438 \u0449\u0443\u043a\u0430.",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e\u0964 \u092f\u0939 "
    "\u090f\u0915 \u092a\u0930\u0940\u0915\u094d\u0937\u0923 \u0935\u093e\u0915\u094d\u092f \u0939\u0948"
    "\u0964 \u0967\u0968\u0969",
    "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u03ba\u03cc\u03c3\u03bc\u03b5. \u05e9\u05dc\u05d5\u05dd "
    "\u05e2\u05d5\u05dc\u05dd. \u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e0a\u0e32\u0e27\u0e42\u0e25\u0e01. "
    "Xin ch\u00e0o th\u1ebf gi\u1edbi. Gr\u00fc\u00df Gott, sch\u00f6ne Stra\u00dfe. \u00c7a va tr\u00e8s "
    "bien, merci. \u0130stanbul'da \u0131s\u0131k. \u00c5ngstr\u00f6m, \u00e6\u00f8\u00e5.",
    "\u6625\u5929\u7684\u65e9\u6668\uff0c\u6cb3\u8fb9\u7684\u67f3\u6811\u53d1\u51fa\u4e86"
    "\u65b0\u82bd\uff0c\u5b69\u5b50\u4eec\u5728\u6865\u4e0a\u6254\u77f3\u5934\uff0c\u770b"
    "\u8c01\u7684\u6c34\u82b1\u6700\u5927\u3002\u8001\u4eba\u5750\u5728\u957f\u6905\u4e0a"
    "\u770b\u62a5\u7eb8\uff0c\u4e00\u53ea\u732b\u8eb2\u5728\u4ed6\u7684\u811a\u8fb9\u7761"
    "\u89c9\u3002\u300c\u4f60\u597d\u300d\u300e\u518d\u89c1\u300f\u300a\u4e66\u540d\u300b",
    "\u96e8\u306e\u65e5\u306f\u3001\u56f3\u66f8\u9928\u3067\u672c\u3092\u8aad\u3080\u306e"
    "\u304c\u597d\u304d\u3067\u3059\u3002\u7a93\u306e\u5916\u3067\u306f\u3001\u5098\u3092"
    "\u3055\u3057\u305f\u4eba\u305f\u3061\u304c\u6025\u3044\u3067\u6b69\u3044\u3066\u3044"
    "\u307e\u3059\u3002\u30b3\u30fc\u30d2\u30fc\u3092\u4e00\u676f\u304f\u3060\u3055\u3044"
    "\u3002",
    # NFC vs NFD (no normalisation: different bytes, different ids)
    "caf\u00e9 vs cafe\u0301; \u00c5 vs A\u030a; \u1e9b\u0323 and \ufb01 ligature; \u212b angstrom sign",
    "mixed: English \u4e2d\u6587 \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4 \u0627\u0644\u0639\u0631\u0628\u064a"
    "\u0629 \u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0939\u093f\u0928\u094d\u0926\u0940 in one line.",
]

EMOJI = [
    "\U0001f44d \U0001f44d\U0001f3fb \U0001f44d\U0001f3fc \U0001f44d\U0001f3fd \U0001f44d\U0001f3fe "
    "\U0001f44d\U0001f3ff",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family, \U0001f469\U0001f3ff\u200d\U0001f4bb "
    "coder, \U0001f3f3\ufe0f\u200d\U0001f308 flag, \U0001f9d1\U0001f3fd\u200d\U0001f91d\u200d\U0001f9d1"
    "\U0001f3fb handshake",
    "\U0001f1ef\U0001f1f5\U0001f1fa\U0001f1f8\U0001f1e9\U0001f1ea flags, 1\ufe0f\u20e3 #\ufe0f\u20e3 "
    "keycaps, \u2764\ufe0f \u2764 heart, \U0001f600\U0001f602\U0001f923\U0001f60d\U0001f914\U0001f644",
    "\U0001f30d\U0001f680\u2728\U0001f525\U0001f4af\u2705\u274c\u26a0\ufe0f\U0001f9e0\U0001f916",
]

CONTROL_AND_WHITESPACE = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\n\n\n",
    "\r\n",
    "line one\r\nline two\r\n\r\nline four\r\n",
    "\t",
    "\t\t\tindented with tabs\n\t\t\t\n",
    "trailing spaces    \n    leading spaces",
    " " * 7 + "x" + " " * 31 + "y" + " " * 64 + "z",
    " " * 128,
    " " * 129,
    " " * 300,
    "\n" * 9 + "after nine newlines",
    "-" * 80,
    "-" * 81 + "=" * 40,
    "".join(chr(c) for c in range(0, 32)) + "\x7f",
    "\x00null\x00byte\x00",
    "\x1b[31mred\x1b[0m \x1b[1;32mbold green\x1b[0m",
    "bell\x07 backspace\x08 vt\x0b ff\x0c cr\r alone",
    "C1: \x80\x85\x9f nbsp:\u00a0 soft-hyphen:\u00ad zwsp:\u200b zwj:\u200d zwnj:\u200c",
    "\ufeffBOM at start, RTL mark \u200f here, LTR \u200e there, \u2028line sep\u2029para sep",
    "private use \ue000\uf8ff, noncharacters \ufffe\uffff, replacement \ufffd, max \U0010ffff, "
    "plane 1 \U0001d400\U0001d7ff, CJK ext B \U00020000\U0002a6d6",
    "<|endoftext|> is just text to this tokenizer",
    "User: hi\n\nAssistant: Hi. I am your assistant and I will provide expert full response in full "
    "details.\n\nUser: What is 2+2?\n\nAssistant:",
    "a",
    "Z",
    "0",
    "~",
    "!!!???...,,,;;;:::",
    "".join(chr(c) for c in range(32, 127)),
]


def pseudo_random_strings(seed=SEED_TOK_CORPUS, count=24):
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x0, 0x1F)]
    out = []
    for _ in range(count):
        n = rng.randint(1, 40)
        chars = []
        for _ in range(n):
            lo, hi = ranges[rng.randrange(len(ranges))]
            chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    # random ASCII words with random spacing
    words = ["the", "a", "token", "state", "rwkv", "eagle", "head", "of", "and", "in", "Hello", "world",
             "123", "x", "\t", "\n", "  ", "(", ")", ".", ",", "def", "fn"]
    for _ in range(8):
        out.append("".join(rng.choice(words) + rng.choice(["", " ", " ", "  ", "\n"])
                           for _ in range(rng.randint(5, 30))))
    return out


def corpus_texts():
    texts = []
    texts += PROSE
    texts += [PYTHON_CODE, RUST_CODE]
    texts += OTHER_CODE
    texts += MULTILINGUAL
    texts += EMOJI
    texts += CONTROL_AND_WHITESPACE
    texts += pseudo_random_strings()
    # one long mixed document
    texts.append("\n\n".join(PROSE[:3] + [PYTHON_CODE[:400]] + MULTILINGUAL[:4] + EMOJI[:2] + ["\r\n".join(PROSE[3:5])]))
    return texts


def make_tokenizer_fixture():
    tok = TRIE_TOKENIZER(VOCAB_FILE)
    with open(VOCAB_FILE, "r", encoding="utf-8") as f:
        n_lines = sum(1 for _ in f)
    texts = corpus_texts()
    n_chars = sum(len(t) for t in texts)
    assert n_chars >= 10_000, n_chars
    cases = []
    max_id = 0
    for t in texts:
        ids = tok.encode(t)
        assert tok.decode(ids) == t, repr(t)
        assert tok.decodeBytes(ids) == t.encode("utf-8")
        max_id = max([max_id] + ids)
        cases.append({"text": t, "ids": ids})
    assert any(t == "" for t in texts)

    # decode behaviour on ids that are not valid UTF-8 (or not in the vocab)
    decode_ids = [
        [],
        [11],
        [261],
        [33155, 40213],
        [0],                                    # id 0 (<|endoftext|>) is not in the vocab file
        [0, 11],
        tok.encode("\u20ac"),                   # one token for the 3 bytes e2 82 ac
        [1 + 0xE2],                             # lone lead byte of a 3-byte sequence
        [1 + 0xE2, 1 + 0x82],                   # truncated sequence
        [1 + 0xE2, 1 + 0x82, 1 + 0xAC],         # complete: U+20AC via single-byte ids
        [1 + 0x80],                             # lone continuation byte
        [1 + 0xFF],                             # never valid in UTF-8
        [33155, 1 + 0xC3],                      # valid prefix then truncated 2-byte sequence
        [65529],                                # 128 spaces, the longest token
    ]
    decode_cases = []
    for ids in decode_ids:
        decode_cases.append({"ids": ids, "decoded": tok.decode(ids),
                             "bytes_hex": tok.decodeBytes(ids).hex() if 0 not in ids else None})
    assert tok.decode([1 + 0xE2, 1 + 0x82, 1 + 0xAC]) == "\u20ac"

    obj = OrderedDict()
    obj["reference"] = "rwkv %s rwkv.rwkv_tokenizer.TRIE_TOKENIZER(encode/decode)" % importlib.metadata.version("rwkv")
    obj["generator"] = GENERATOR
    obj["vocab_file"] = "rwkv/rwkv_vocab_v20230424.txt (inside the installed `rwkv` pip package)"
    obj["vocab_sha256"] = sha256_file(VOCAB_FILE)
    obj["vocab_bytes"] = os.path.getsize(VOCAB_FILE)
    obj["vocab_lines"] = n_lines
    obj["notes"] = [
        "ids are greedy longest byte matches over the UTF-8 bytes (TRIE_TOKENIZER.encode); no normalisation, "
        "no special tokens; id 0 (<|endoftext|>) is not in the vocab file and is never produced by encode.",
        "every case satisfies decode(ids) == text (checked by the generator).",
        "decode_cases: TRIE_TOKENIZER.decode returns '\\ufffd' for the WHOLE input whenever the concatenated "
        "bytes are not valid UTF-8, and also for any id not in the vocab (id 0 raises KeyError inside a bare "
        "try/except). bytes_hex is the raw byte concatenation (null where an id is unknown).",
        "texts were written for this fixture, plus seeded pseudo-random Unicode strings (seed %d)."
        % SEED_TOK_CORPUS,
    ]
    obj["total_chars"] = n_chars
    obj["total_ids"] = sum(len(c["ids"]) for c in cases)
    obj["max_id"] = max_id
    obj["cases"] = cases
    obj["decode_cases"] = decode_cases
    path = os.path.join(OUT, "world_tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n")
        items = list(obj.items())
        for i, (k, v) in enumerate(items):
            end = "," if i + 1 < len(items) else ""
            if k in ("cases", "decode_cases"):
                f.write("  %s: [\n" % json.dumps(k))
                for j, c in enumerate(v):
                    f.write("    " + json.dumps(c, ensure_ascii=False) + ("," if j + 1 < len(v) else "") + "\n")
                f.write("  ]%s\n" % end)
            else:
                f.write("  %s: %s%s\n" % (json.dumps(k), json.dumps(v, ensure_ascii=False), end))
        f.write("}\n")
    with open(path, "r", encoding="utf-8") as f:
        back = json.load(f)
    assert back["cases"] == cases
    print(f"world_tokenizer.json: {len(cases)} cases, {n_chars} chars, {obj['total_ids']} ids")


# ============================================================================= main
def dir_size(path):
    total = 0
    for root, _, files in os.walk(path):
        for fn in files:
            total += os.path.getsize(os.path.join(root, fn))
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None,
                    help="subset of: rwkv5_tiny_f32 rwkv5_tiny_bf16 tokenizer")
    args = ap.parse_args()
    only = set(args.only) if args.only else {"rwkv5_tiny_f32", "rwkv5_tiny_bf16", "tokenizer"}

    torch.set_num_threads(1)
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="rwkv5_fixtures_")
    try:
        sd32 = tokens = None
        if "rwkv5_tiny_f32" in only:
            sd32, tokens = case_f32(tmp)
            print("rwkv5_tiny_f32: done")
        if "rwkv5_tiny_bf16" in only:
            case_bf16(tmp, sd32, tokens)
            print("rwkv5_tiny_bf16: done")
        if "tokenizer" in only:
            make_tokenizer_fixture()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = dir_size(OUT)
    print(f"{OUT}: {total} bytes")
    assert total < MAX_TOTAL_BYTES, total


if __name__ == "__main__":
    sys.exit(main())
