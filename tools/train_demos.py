#!/usr/bin/env python3
"""Train gyre's three bundled demo models (Llama, RecurrentGemma, RWKV-5.2) on the KJV Bible.

Stages (run in order; `all` runs every stage):

  data            corpus from the Debian `bible-kjv-text` package (read with the `bible` program
                  from `bible-kjv`), held-out split -> models/heldout.txt, shared byte-level BPE
                  tokenizer -> <workdir>/tokenizer.json
  llama           train transformers.LlamaForCausalLM           -> models/demo-llama/
  recurrentgemma  train transformers.RecurrentGemmaForCausalLM  -> models/demo-recurrentgemma/
  rwkv5           train tools/rwkv5_torch.RWKV5 (RWKV-5.2)      -> models/demo-rwkv5/
  verify-rwkv     load the saved RWKV weights with the `rwkv` pip package ('cpu fp32') and assert
                  its logits match RWKV5's within 1e-4
  report          held-out perplexity (protocol below) -> models/reference_ppl.json,
                  docs/demo_models.md, docs/demo_models.png, sample generations

Held-out perplexity protocol (the same one gyre uses; also written into reference_ppl.json):
  * tokenize models/heldout.txt (whole file, UTF-8) with the shared tokenizer.json WITHOUT special
    tokens;
  * split the ids into consecutive non-overlapping chunks of W = 256 tokens (the last, partial,
    chunk included);
  * llama / recurrentgemma: each window is [BOS] + chunk, run from a fresh state (positions 0..);
    every chunk token is predicted (the first from BOS alone);
  * rwkv5: each window is the chunk alone, from the zero state; every chunk token except the
    first is predicted;
  * NLL = mean over all predicted tokens of -log softmax(logits)[target] (natural log, logits in
    float32 from the stored weights upcast to float32); perplexity = exp(NLL).

Models are stored as bfloat16 safetensors; every reported number uses those bf16 weights upcast to
float32. Training uses random windows of the same shape as the evaluation windows (256 input
positions; BOS first for llama/recurrentgemma), AdamW, linear warm-up then cosine decay, fixed seeds.

Usage (CPU, ~10 min per model):  python tools/train_demos.py all --steps 300
       (GPU, minutes):            python tools/train_demos.py all --device cuda --steps 2000 --batch 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rwkv5_torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
DOCS = ROOT / "docs"
FAMILIES = ["llama", "recurrentgemma", "rwkv5"]
SEQ = 256  # input positions per training / evaluation window
EVAL_W = 256  # held-out chunk length in tokens
VOCAB = 2048
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
UNK, BOS, EOS = 0, 1, 2
HELDOUT_FRACTION = 0.01


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# data


def read_kjv() -> list[str]:
    """All 31102 verses of the KJV in order, one string per verse (no verse numbers)."""
    if not Path("/usr/lib/bible.data").exists() or shutil.which("bible") is None:
        sys.exit("needs the Debian packages bible-kjv-text and bible-kjv: apt-get install -y bible-kjv-text bible-kjv")
    raw = subprocess.run(["bible", "-l100000", "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout
    verses = []
    for line in raw.splitlines():
        s = line.strip()
        if line.startswith("  ") and s.split(" ", 1)[0].isdigit():
            verses.append(" ".join(s.split(" ", 1)[1].split()))
    assert len(verses) == 31102, len(verses)
    return verses


def stage_data(args):
    verses = read_kjv()
    n_hold = max(int(len(verses) * HELDOUT_FRACTION), 1)
    train, held = verses[:-n_hold], verses[-n_hold:]
    MODELS.mkdir(exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "train.txt").write_text("\n".join(train) + "\n")
    (MODELS / "heldout.txt").write_text("\n".join(held) + "\n")
    log(f"train: {len(train)} verses; heldout: {len(held)} verses, {len((MODELS / 'heldout.txt').read_bytes())} bytes")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(args.workdir / "train.txt")], trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == [UNK, BOS, EOS]
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    tok.save(str(args.workdir / "tokenizer.json"))
    ids = tok.encode((args.workdir / "train.txt").read_text(), add_special_tokens=False).ids
    np.save(args.workdir / "train_ids.npy", np.array(ids, dtype=np.int16))
    log(f"tokenizer: vocab {tok.get_vocab_size()}; train tokens {len(ids)}")


def load_tokenizer(args):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(args.workdir / "tokenizer.json"))


# ----------------------------------------------------------------------------------------------
# models


def model_dir(fam: str) -> Path:
    return MODELS / f"demo-{fam}"


def build(fam: str):
    if fam == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
            bos_token_id=BOS, eos_token_id=EOS, pad_token_id=None,
        )
        return LlamaForCausalLM(cfg)
    if fam == "recurrentgemma":
        from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

        cfg = RecurrentGemmaConfig(
            vocab_size=VOCAB, hidden_size=256, lru_width=256, intermediate_size=2 * 3 * 256,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
            attention_window_size=128, conv1d_width=4, logits_soft_cap=30.0, rms_norm_eps=1e-6,
            block_types=["recurrent", "recurrent", "attention"], partial_rotary_factor=0.5,
            tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=UNK,
        )
        return RecurrentGemmaForCausalLM(cfg)
    if fam == "rwkv5":
        return rwkv5_torch.RWKV5(VOCAB, n_embd=256, n_layer=4, dim_ffn=896)
    raise ValueError(fam)


def logits_of(fam: str, model, ids: torch.Tensor) -> torch.Tensor:
    if fam == "rwkv5":
        return model(ids).float()
    return model(input_ids=ids, use_cache=False).logits.float()


def n_params(fam: str, model) -> int:
    # Unique tensors (tied embeddings counted once).
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def save_model(fam: str, model, args):
    d = model_dir(fam)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": fam != "rwkv5", "add_eos_token": False,
        "model_max_length": SEQ if fam == "llama" else 1000000,
        "clean_up_tokenization_spaces": False,
    }
    shutil.copy(args.workdir / "tokenizer.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    if fam == "rwkv5":
        from safetensors.torch import save_file

        sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        model.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
        model.float()
        gc = d / "generation_config.json"
        if gc.exists():
            gc.unlink()


def load_model(fam: str):
    """The stored (bf16) weights, upcast to float32, in eval mode."""
    d = model_dir(fam)
    if fam == "rwkv5":
        from safetensors.torch import load_file

        m = build("rwkv5")
        m.load_state_dict({k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()})
    elif fam == "llama":
        from transformers import LlamaForCausalLM

        m = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    else:
        from transformers import RecurrentGemmaForCausalLM

        m = RecurrentGemmaForCausalLM.from_pretrained(d, dtype=torch.float32)
    return m.eval()


# ----------------------------------------------------------------------------------------------
# training


def lr_at(step, total, peak, warmup, time_frac=0.0):
    """Linear warm-up, then cosine decay to 10 % of the peak. Progress is the larger of the step
    fraction and the fraction of the --max-minutes wall-clock budget spent, so a run that hits the
    time cap still ends with a fully decayed learning rate."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(max((step - warmup) / max(total - warmup, 1), time_frac), 1.0)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def patch_recurrentgemma_scan():
    """Replace transformers' RG-LRU training scan with an equivalent one that is fast on CPU.

    `RecurrentGemmaRglru._rnn_scan` writes each step into a preallocated tensor in place, which
    makes autograd copy the whole [B, T, lru] tensor at every step in the backward pass. This
    version computes the same recurrence (h_t = a_t * h_{t-1} + x_t in float32) and stacks the
    steps instead. Only the multi-token branch changes; `check_scan_patch` compares the two.
    """
    from transformers.models.recurrent_gemma import modeling_recurrent_gemma as mrg

    cls = mrg.RecurrentGemmaRglru
    if getattr(cls, "_gyre_patched", False):
        return
    orig = cls._rnn_scan

    def _rnn_scan(self, hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype=torch.float32):
        if hidden_states.shape[1] == 1:
            return orig(self, hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype)
        a = (recurrent_gate * ~reset).type(acc_dtype)
        x = hidden_states.type(acc_dtype)
        h = recurrent_states
        if h is None:
            h = torch.zeros(hidden_states[:, 0].shape, dtype=acc_dtype, device=hidden_states.device)
        outs = []
        for t in range(hidden_states.shape[1]):
            h = a[:, t] * h + x[:, t]
            outs.append(h)
        return torch.stack(outs, 1).type(hidden_states.dtype), h

    cls._orig_rnn_scan = orig
    cls._rnn_scan = _rnn_scan
    cls._gyre_patched = True


def check_scan_patch():
    from transformers.models.recurrent_gemma import modeling_recurrent_gemma as mrg

    cls = mrg.RecurrentGemmaRglru
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 33, 8, generator=g)
    a = torch.rand(2, 33, 8, generator=g)
    reset = torch.zeros(2, 33, 1, dtype=torch.bool)
    reset[:, 0] = True
    y1, h1 = cls._orig_rnn_scan(None, x, a, reset, None)
    y2, h2 = cls._rnn_scan(None, x, a, reset, None)
    assert torch.allclose(y1, y2, atol=1e-6) and torch.allclose(h1, h2, atol=1e-6)


def get_batch(fam, ids: np.ndarray, batch: int, rng: np.random.Generator, device):
    """Random windows: (inputs [B, SEQ], targets [B, SEQ])."""
    n_text = SEQ if fam != "rwkv5" else SEQ + 1
    starts = rng.integers(0, len(ids) - n_text, size=batch)
    x = np.stack([ids[s : s + n_text] for s in starts]).astype(np.int64)
    if fam != "rwkv5":
        x = np.concatenate([np.full((batch, 1), BOS, dtype=np.int64), x], 1)
    x = torch.from_numpy(x).to(device)
    return x[:, :-1], x[:, 1:]


def stage_train(fam: str, args):
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if fam == "recurrentgemma":
        patch_recurrentgemma_scan()
        check_scan_patch()
    ids = np.load(args.workdir / "train_ids.npy").astype(np.int64)
    model = build(fam).to(args.device).train()
    params = n_params(fam, model)
    log(f"[{fam}] parameters: {params:,}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "time_" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    steps = args.bench if args.bench else args.steps
    warmup = min(args.warmup, max(steps // 10, 1))
    t0 = time.time()
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr, warmup, (time.time() - t0) / (60 * args.max_minutes))
        x, y = get_batch(fam, ids, args.batch, rng, args.device)
        logits = logits_of(fam, model, x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        out_of_time = time.time() - t0 > 60 * args.max_minutes
        if step % args.log_every == 0 or step == steps - 1 or out_of_time:
            el = time.time() - t0
            log(f"[{fam}] step {step + 1}/{steps} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{el:.0f}s ({el / (step + 1):.2f} s/step)")
        if out_of_time and not args.bench:
            log(f"[{fam}] --max-minutes {args.max_minutes} reached after {step + 1} steps; stopping")
            break
    elapsed = time.time() - t0
    if args.bench:
        log(f"[{fam}] bench: {elapsed / steps:.3f} s/step at batch {args.batch} x {SEQ}")
        return
    steps = len(losses)
    final = float(np.mean(losses[-20:]))
    save_model(fam, model, args)
    info = {
        "parameters": params, "steps": steps, "batch": args.batch, "seq_len": SEQ,
        "tokens_seen": steps * args.batch * SEQ, "peak_lr": args.lr, "warmup": warmup,
        "final_train_loss_mean_last20": round(final, 4), "train_seconds": round(elapsed, 1),
        "device": str(args.device), "threads": torch.get_num_threads(), "seed": args.seed,
    }
    (args.workdir / f"train_{fam}.json").write_text(json.dumps(info, indent=2))
    log(f"[{fam}] done: {json.dumps(info)}")


# ----------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def heldout_nll(fam: str, model, ids: list[int], device) -> tuple[float, int, int]:
    """(mean NLL, predicted tokens, windows) under the protocol in the module docstring."""
    total, count, windows = 0.0, 0, 0
    for s in range(0, len(ids), EVAL_W):
        chunk = ids[s : s + EVAL_W]
        window = chunk if fam == "rwkv5" else [BOS] + chunk
        if len(window) < 2:
            continue
        x = torch.tensor([window], device=device)
        logits = logits_of(fam, model, x[:, :-1])
        nll = F.cross_entropy(logits[0], x[0, 1:], reduction="sum")
        total += nll.item()
        count += len(window) - 1
        windows += 1
    return total / count, count, windows


@torch.no_grad()
def sample(fam, model, tok, prompt, n=40, top_k=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if fam != "rwkv5":
        ids = [BOS] + ids
    start = len(ids)
    for _ in range(n):
        logits = logits_of(fam, model, torch.tensor([ids[-SEQ:]]))[0, -1]
        if top_k:
            v, i = logits.topk(top_k)
            nxt = i[torch.multinomial(torch.softmax(v / 0.8, -1), 1, generator=g)].item()
        else:
            nxt = int(logits.argmax())
        if nxt == EOS:
            break
        ids.append(nxt)
    return prompt + tok.decode(ids[start:])


def stage_verify_rwkv(args) -> dict:
    """Load models/demo-rwkv5 with the `rwkv` package and compare logits to RWKV5's."""
    from safetensors.torch import load_file

    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV

    sd = load_file(str(model_dir("rwkv5") / "model.safetensors"))
    pth = args.workdir / "demo-rwkv5" / "model.pth"
    pth.parent.mkdir(parents=True, exist_ok=True)
    # float32 copies of the stored bf16 values (exact): the package folds ln0 into emb.weight in
    # the checkpoint's dtype, so a bf16 .pth would be rounded there before the fp32 strategy.
    torch.save({k: v.float() for k, v in sd.items()}, pth)
    ref = RWKV(model=str(pth)[:-4], strategy="cpu fp32", verbose=False)
    mine = load_model("rwkv5")
    tok = load_tokenizer(args)
    texts = [
        "In the beginning God created the heaven and the earth.",
        "And God said, Let there be light: and there was light. And God saw the light, that it was good.",
        "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures: he leadeth me",
    ]
    worst = 0.0
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False).ids
        a, _ = ref.forward(ids, None, full_output=True)
        b = logits_of("rwkv5", mine, torch.tensor([ids]))[0]
        worst = max(worst, (a.float() - b).abs().max().item())
    # One more check through the package's single-token (recurrent) path.
    ids = tok.encode(texts[1], add_special_tokens=False).ids
    state, outs = None, []
    for i in ids:
        o, state = ref.forward([i], state)
        outs.append(o.float())
    b = logits_of("rwkv5", mine, torch.tensor([ids]))[0]
    worst = max(worst, (torch.stack(outs) - b).abs().max().item())
    ok = worst < 1e-4
    log(f"[verify-rwkv] max |logit diff| vs rwkv package (cpu fp32) = {worst:.3e} -> {'PASS' if ok else 'FAIL'}")
    assert ok, worst
    return {"max_abs_logit_diff": worst, "tolerance": 1e-4, "sequences": len(texts) + 1, "pass": ok}


PROTOCOL = (
    "Tokenize the whole of models/heldout.txt (UTF-8) with the shared tokenizer.json without special "
    "tokens. Split the ids into consecutive non-overlapping chunks of W tokens (the last partial chunk "
    "included). llama/recurrentgemma: window = [BOS] + chunk, evaluated from a fresh state/cache with "
    "positions 0..; every chunk token is predicted (the first from BOS). rwkv5: window = chunk, evaluated "
    "from the zero state; every chunk token except the first is predicted. NLL = mean over all predicted "
    "tokens of -ln softmax(logits)[target], float32 logits from the stored bf16 weights upcast to float32; "
    "ppl = exp(NLL). RecurrentGemma local attention as in transformers' RecurrentGemmaForCausalLM: a "
    "query at position q sees keys q-attention_window_size < p <= q (128 keys including itself)."
)

STATE_CTX = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]


def state_bytes(fam: str, cfg: dict, ctx: int) -> int:
    if fam == "llama":
        hd = cfg["hidden_size"] // cfg["num_attention_heads"]
        return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * hd * 4 * ctx
    if fam == "recurrentgemma":
        types = [cfg["block_types"][i % len(cfg["block_types"])] for i in range(cfg["num_hidden_layers"])]
        hd = cfg["hidden_size"] // cfg["num_attention_heads"]
        lru = cfg["lru_width"]
        rec = types.count("recurrent") * ((cfg["conv1d_width"] - 1) * lru + lru)
        att = types.count("attention") * cfg["attention_window_size"] * cfg["num_key_value_heads"] * hd * 2
        return (rec + att) * 4
    C, L, H = cfg["n_embd"], cfg["n_layer"], cfg["n_embd"] // 64
    return L * (2 * C + H * 64 * 64) * 4


def human(n: float) -> str:
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def stage_report(args):
    import transformers

    tok = load_tokenizer(args)
    text = (MODELS / "heldout.txt").read_text()
    ids = tok.encode(text, add_special_tokens=False).ids
    out = {
        "protocol": PROTOCOL, "window_tokens": EVAL_W, "heldout_file": "models/heldout.txt",
        "heldout_bytes": len(text.encode()), "heldout_tokens": len(ids), "bos_id": BOS,
        "weights": "bfloat16 safetensors upcast to float32",
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "models": {},
    }
    samples = {}
    for fam in FAMILIES:
        m = load_model(fam)
        nll, cnt, nw = heldout_nll(fam, m, ids, "cpu")
        info = json.loads((args.workdir / f"train_{fam}.json").read_text())
        d = model_dir(fam)
        cfg = json.loads((d / "config.json").read_text()) if fam != "rwkv5" else {"n_embd": 256, "n_layer": 4}
        out["models"][f"demo-{fam}"] = {
            "parameters": n_params(fam, m), "predicted_tokens": cnt, "windows": nw,
            "mean_nll": round(nll, 6), "ppl": round(math.exp(nll), 4),
            "state_bytes_at_32k": state_bytes(fam, cfg, 32768),
            "dir_bytes": sum(f.stat().st_size for f in d.iterdir()),
            "training": info,
        }
        log(f"[report] {fam}: nll {nll:.4f} ppl {math.exp(nll):.3f} over {cnt} tokens / {nw} windows")
        samples[fam] = [sample(fam, m, tok, "And God said", 40), sample(fam, m, tok, "The LORD is my", 40, top_k=20, seed=1)]
        for s in samples[fam]:
            log(f"[sample {fam}] {s!r}")
    if (args.workdir / "verify_rwkv.json").exists():
        out["rwkv_package_parity"] = json.loads((args.workdir / "verify_rwkv.json").read_text())
    (MODELS / "reference_ppl.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.workdir / "samples.json").write_text(json.dumps(samples, indent=2))
    write_docs(out, samples)


def write_docs(out: dict, samples: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    DOCS.mkdir(exist_ok=True)
    cfgs = {}
    for fam in FAMILIES:
        d = model_dir(fam)
        cfgs[fam] = json.loads((d / "config.json").read_text()) if fam != "rwkv5" else {"n_embd": 256, "n_layer": 4}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for fam in FAMILIES:
        ys = [state_bytes(fam, cfgs[fam], c) if fam == "llama" else state_bytes(fam, cfgs[fam], c) for c in STATE_CTX]
        a1.plot(STATE_CTX, [y / 1024 for y in ys], marker="o", ms=3, label=f"demo-{fam}")
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("context length (tokens)")
    a1.set_ylabel("decode state (KiB, f32)")
    a1.set_title("State memory vs context")
    a1.grid(True, which="both", alpha=0.3)
    a1.legend()
    names = [f"demo-{f}" for f in FAMILIES]
    ppls = [out["models"][n]["ppl"] for n in names]
    bars = a2.bar(names, ppls, color=["C0", "C1", "C2"])
    for b, p in zip(bars, ppls):
        a2.text(b.get_x() + b.get_width() / 2, p, f"{p:.2f}", ha="center", va="bottom")
    a2.set_ylabel(f"held-out perplexity (W={out['window_tokens']})")
    a2.set_title("Held-out perplexity (models/heldout.txt)")
    fig.tight_layout()
    fig.savefig(DOCS / "demo_models.png", dpi=110)

    rows = []
    for fam in FAMILIES:
        n = f"demo-{fam}"
        m = out["models"][n]
        t = m["training"]
        s1k, s32k = state_bytes(fam, cfgs[fam], 1024), state_bytes(fam, cfgs[fam], 32768)
        rows.append(
            f"| `models/{n}` | {m['parameters'] / 1e6:.2f} M | {m['ppl']:.2f} (NLL {m['mean_nll']:.3f}) | "
            f"{t['steps']} steps × {t['batch']}×{t['seq_len']} tok = {t['tokens_seen'] / 1e6:.2f} M tok, "
            f"{t['train_seconds'] / 60:.1f} min ({t['device']}, {t['threads']} threads) | "
            f"{t['final_train_loss_mean_last20']:.3f} | {human(s1k)} | {human(s32k)} | "
            f"see `gyre bench --model models/{n}` |"
        )
    pv = out.get("rwkv_package_parity")
    md = f"""# Demo models

Three tiny models, one per architecture family gyre supports, trained by `tools/train_demos.py` on the
King James Bible (public domain; Debian package `bible-kjv-text`), all sharing one byte-level BPE
tokenizer (vocab {VOCAB}, `<unk>`=0, `<s>`=1, `</s>`=2). The last {HELDOUT_FRACTION:.0%} of the verses
(Revelation 5:12 to the end; exact text in `models/heldout.txt`, {out['heldout_bytes']:,} bytes,
{out['heldout_tokens']:,} tokens) was held out and never trained on. Weights are stored as bfloat16.
They are plain text models (no chat template); try `gyre generate --model models/demo-llama --prompt "And God said"`.

| model | parameters | held-out ppl | training | final train loss | state @ 1k ctx | state @ 32k ctx | decode tok/s |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

* **Held-out perplexity** (`models/reference_ppl.json`, torch {out['torch_version']}, transformers
  {out['transformers_version']}): {out['protocol']} W = {out['window_tokens']}.
* **State memory** (analytic, f32): Llama KV cache = 2·layers·kv_heads·head_dim·4 bytes per token
  (4 KiB/token here), growing linearly; RecurrentGemma is fixed: per recurrent layer (conv_width−1)·lru + lru
  floats, per attention layer a ring of attention_window_size (128) slots × kv_dim × 2 (K and V);
  RWKV-5 is fixed: layers·(2·C + H·64·64) floats.
* Architectures: Llama — hidden 256, 4 layers, 4 heads / 2 KV heads, MLP 768, tied embeddings, ctx 256.
  RecurrentGemma — hidden 256 = lru_width, 4 layers (recurrent, recurrent, attention, recurrent), 4 heads,
  1 KV head, MLP 768 (intermediate_size 1536, halved by transformers), window 128, tied embeddings.
  RWKV-5.2 — n_embd 256 (4 heads of 64), 4 layers, dim_ffn 896, untied head.
* Training: AdamW (β 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then cosine decay to 10 %,
  random 256-position windows of the training text (BOS first for Llama/RecurrentGemma), grad clip 1.0,
  seed {out['models']['demo-llama']['training']['seed']}.
"""
    if pv:
        md += (
            f"* RWKV parity: the RWKV weights loaded by the `rwkv` pip package (strategy `cpu fp32`) give logits "
            f"within {pv['max_abs_logit_diff']:.1e} of `tools/rwkv5_torch.py` (tolerance 1e-4, sequence and "
            "single-token paths).\n"
        )
    md += "\n![state memory and perplexity](demo_models.png)\n\n## Sample generations (PyTorch)\n\n"
    for fam in FAMILIES:
        md += f"**demo-{fam}**\n\n"
        for s, how in zip(samples[fam], ["greedy", "top-k 20, T 0.8"]):
            md += f"- ({how}) {s!r}\n"
        md += "\n"
    (DOCS / "demo_models.md").write_text(md)
    log("[report] wrote docs/demo_models.md, docs/demo_models.png, models/reference_ppl.json")


# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["data", *FAMILIES, "verify-rwkv", "report", "all"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--max-minutes", type=float, default=1e9, help="wall-clock cap per model (the LR schedule follows it)")
    ap.add_argument("--bench", type=int, default=0, help="time this many steps and exit (no save)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gyre-demo-work"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stages = ["data", *FAMILIES, "verify-rwkv", "report"] if args.stage == "all" else [args.stage]
    for st in stages:
        if st == "data":
            stage_data(args)
        elif st in FAMILIES:
            stage_train(st, args)
        elif st == "verify-rwkv":
            r = stage_verify_rwkv(args)
            (args.workdir / "verify_rwkv.json").write_text(json.dumps(r, indent=2))
        else:
            stage_report(args)


if __name__ == "__main__":
    main()
