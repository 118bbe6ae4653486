#!/usr/bin/env python3
"""Make gyre's GGUF fixtures with llama.cpp's own converter and quantizer, and the expected
logits from transformers in float64.

Run:  python3 tools/make_gguf_fixtures.py --llama-cpp DIR [--gyre target/release/gyre]

DIR is a llama.cpp source tree (convert_hf_to_gguf.py and gguf-py): the one inside the
llama-cpp-python sdist works (`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`,
then `tar xzf` it; the tree is vendor/llama.cpp). Needs torch, transformers, sentencepiece,
numpy, safetensors and llama-cpp-python (built without AMX on Sapphire Rapids, see
DEVELOPERS.md). The Rust tests need none of them: they read the files written here.

Cases, each a directory under crates/gyre/tests/fixtures/gguf/<case>/ holding model.gguf,
expected.safetensors and meta.json:

1. llama3_tied_f16: LlamaForCausalLM, hidden 128, 4 heads / 2 KV heads (head_dim 32),
   intermediate 256, 2 layers, vocab 320 (a SentencePiece BPE model trained here, with
   byte fallback), tied embeddings, Llama-3 RoPE scaling (factor 8, original context 64, so
   the factors are not all 1), weights rounded to f16 before saving so that the F16 GGUF holds
   them exactly. Converted by convert_hf_to_gguf.py --outtype f16: the q/k rows are permuted
   for ggml's rotary and the RoPE factors become rope_freqs.weight. `logits` is the original
   transformers model in float64: the GGUF must reproduce the checkpoint it was made from.
2. mixed_quant: hidden 256, 4 heads / 2 KV heads (head_dim 64), intermediate 512, 2 layers,
   vocab 320, untied. Converted to F32, quantized by llama.cpp (`llama_model_quantize`, pure)
   to each of Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K, and assembled into one file
   whose 16 matrices take those types in turn (every type at least once). `logits` is
   transformers in float64 on the gguf package's dequantization of exactly those tensors (q/k
   rows put back); `llamacpp_logits` is llama.cpp's own forward of the same file, for the
   accuracy comparison (gyre must be at least 10x closer to `logits`); `greedy` is the
   float64 model's greedy continuation of BOS + `tokens` (16 ids; meta.json records the
   smallest gap between the two best logits on the way).

Both: `tokens` (int64) is a fixed sentence tokenized by llama.cpp from the file's own
vocabulary, `text` its source (in meta.json); the test also checks gyre's tokenization of it.

With --gyre, the script also measures the accuracy table of BENCHMARKS.md: one pure file per
type at the mixed_quant shape, mean |Δlogit| of gyre and of llama.cpp against the float64
forward on the dequantized weights.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/gyre/tests/fixtures/gguf"

CORPUS = """In the beginning God created the heaven and the earth. And the earth was without form,
and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face
of the waters. And God said, Let there be light: and there was light. And God saw the light,
that it was good: and God divided the light from the darkness. The quick brown fox jumps over
the lazy dog. 1234567890 numbers, punctuation; quotes "like this" and 'this'. Tabs	and
newlines
matter too. Unicode: café, naïve, Straße, 東京, 😀.
"""

TEXT = "And God said, Let there be light: and the fox was café."
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def sh(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, **kw)


def train_tokenizer(work: Path) -> Path:
    import sentencepiece as spm

    corpus = work / "corpus.txt"
    corpus.write_text(CORPUS * 20)
    prefix = work / "sp"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, num_threads=1, split_digits=True,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    return prefix.with_suffix(".model")


def make_hf(work: Path, name: str, sp_model: Path, **cfg):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.pop("seed"))
    round_f16 = cfg.pop("round_f16", False)
    config = LlamaConfig(vocab_size=320, rms_norm_eps=1e-5, max_position_embeddings=512,
                         initializer_range=0.15, bos_token_id=1, eos_token_id=2, **cfg)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            if round_f16:
                p.copy_(p.half().float())
    d = work / name
    model.save_pretrained(d, safe_serialization=True)
    # The converter reads the SentencePiece model itself (real scores, byte tokens) and the
    # template and special tokens from tokenizer_config.json.
    (d / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "chat_template": CHAT_TEMPLATE, "tokenizer_class": "LlamaTokenizer",
    }))
    return d, model


def convert(llama_cpp: Path, hf_dir: Path, out: Path, outtype: str):
    env = dict(os.environ, PYTHONPATH=str(llama_cpp / "gguf-py"))
    sh([sys.executable, llama_cpp / "convert_hf_to_gguf.py", hf_dir, "--outtype", outtype,
        "--outfile", out], env=env, stdout=subprocess.DEVNULL)


def quantize(src: Path, dst: Path, type_name: str):
    import llama_cpp

    ftype = {
        "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
        "Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K",
    }[type_name]
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.pure = True
    p.nthread = 2
    ggml_type = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
                 "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}[type_name]
    p.output_tensor_type = ggml_type
    p.token_embedding_type = ggml_type
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p)
    assert rc == 0, f"quantize to {type_name} failed ({rc})"


def read_gguf(path: Path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def assemble_mixed(f32_file: Path, per_type: dict, out: Path):
    """One file whose matrices take the types in turn; metadata from the F32 file."""
    import gguf
    from gguf import GGUFReader, GGUFWriter, GGUFValueType

    base = GGUFReader(str(f32_file))
    readers = {t: GGUFReader(str(p)) for t, p in per_type.items()}
    arch = bytes(base.fields["general.architecture"].parts[-1]).decode()
    w = GGUFWriter(str(out), arch)
    for key, field in base.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == GGUFValueType.STRING:
                val = [bytes(field.parts[i]) for i in field.data]
            else:
                val = [field.parts[i].tolist()[0] for i in field.data]
            w.add_key_value(key, val, vtype, sub_type=sub)
        elif vtype == GGUFValueType.STRING:
            w.add_key_value(key, bytes(field.parts[-1]).decode(), vtype)
        else:
            w.add_key_value(key, field.parts[-1].tolist()[0], vtype)
    assignment = {}
    k = 0
    for t in base.tensors:
        if len(t.shape) == 2:
            ty = TYPES[k % len(TYPES)]
            k += 1
            src = next(x for x in readers[ty].tensors if x.name == t.name)
            assert src.tensor_type.name == ty, (t.name, src.tensor_type.name, ty)
            w.add_tensor(t.name, np.asarray(src.data), raw_dtype=src.tensor_type)
            assignment[t.name] = ty
        else:
            w.add_tensor(t.name, np.asarray(t.data))
            assignment[t.name] = t.tensor_type.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return assignment


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of convert_hf_to_gguf.py's permute (GGUF row h·hd + 2b + a holds
    transformers row h·hd + a·hd/2 + b)."""
    rows = w.shape[0]
    hd = rows // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
PARTS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(n: str):
    if n in GGUF_TO_HF:
        return GGUF_TO_HF[n]
    _, i, part, _ = n.split(".")
    return f"model.layers.{i}.{PARTS[part]}.weight"


def dequantized_state(path: Path, heads: int, kv_heads: int):
    from gguf.quants import dequantize

    state = {}
    for t in read_gguf(path).tensors:
        if t.name == "rope_freqs.weight":
            continue
        v = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
        v = v.reshape(list(reversed([int(d) for d in t.shape])))
        if ".attn_q." in t.name:
            v = unpermute(v, heads)
        if ".attn_k." in t.name:
            v = unpermute(v, kv_heads)
        state[hf_name(t.name)] = v
    return state


def f64_logits(model, tokens, state=None):
    import torch

    m = model.double()
    if state is not None:
        sd = m.state_dict()
        for k, v in state.items():
            assert sd[k].shape == v.shape, (k, sd[k].shape, v.shape)
            sd[k] = torch.from_numpy(v)
        if "lm_head.weight" not in state:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        m.load_state_dict(sd)
    with torch.no_grad():
        out = m(torch.tensor([tokens]), use_cache=False).logits[0]
    return out.numpy()


def f64_greedy(model, prompt, n):
    """Greedy continuation by transformers (the model as loaded, float64), and the smallest
    gap between the top two logits along the way (ties would make the test fragile)."""
    import torch

    ids, gaps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            top = torch.topk(logits, 2).values
            gaps.append(float(top[0] - top[1]))
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt):], min(gaps)


def llamacpp_tokens(path: Path, text: str):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def llamacpp_logits(path: Path, tokens):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=64,
                          n_threads=2, verbose=False, seed=0)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def write_case(name: str, gguf_file: Path, tensors: dict, meta: dict):
    from safetensors.numpy import save_file

    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.gguf").write_bytes(gguf_file.read_bytes())
    save_file(tensors, str(d / "expected.safetensors"))
    (d / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {d} ({(d / 'model.gguf').stat().st_size} bytes)", file=sys.stderr)


def mean_abs(a, b):
    return float(np.mean(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def gyre_logits(gyre: str, path: Path, tokens):
    out = subprocess.run([gyre, "logits", "--model", str(path), "--tokens", ",".join(map(str, tokens))],
                         check=True, capture_output=True, text=True).stdout
    return np.array(json.loads(out)["logits"], dtype=np.float64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, type=Path)
    ap.add_argument("--gyre", help="a gyre binary: also print the per-type accuracy table")
    args = ap.parse_args()
    import torch
    import transformers
    import llama_cpp
    import gguf

    torch.set_num_threads(1)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "llama_cpp_python": llama_cpp.__version__, "gguf": getattr(gguf, "__version__", "?")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(os.environ.get("GGUF_FIXTURE_WORK", tmp))
        work.mkdir(parents=True, exist_ok=True)
        sp_model = train_tokenizer(work)

        # 1. llama3_tied_f16
        hf, model = make_hf(work, "a", sp_model, seed=1, round_f16=True, hidden_size=128,
                            intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        a = work / "a.gguf"
        convert(args.llama_cpp, hf, a, "f16")
        tokens = llamacpp_tokens(a, TEXT)
        logits = f64_logits(model, tokens)
        ll = llamacpp_logits(a, tokens)
        write_case("llama3_tied_f16", a, {
            "tokens": np.array(tokens, dtype=np.int64),
            "logits": logits.astype(np.float32),
            "llamacpp_logits": ll.astype(np.float32),
        }, {"text": TEXT, "versions": versions,
            "llamacpp_mean_abs_diff": mean_abs(ll, logits),
            "tensor_types": {t.name: t.tensor_type.name for t in read_gguf(a).tensors}})

        # 2. mixed_quant
        hf, model = make_hf(work, "b", sp_model, seed=2, hidden_size=256, intermediate_size=512,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=False, rope_theta=10000.0)
        f32 = work / "b-f32.gguf"
        convert(args.llama_cpp, hf, f32, "f32")
        per_type = {}
        for ty in TYPES:
            per_type[ty] = work / f"b-{ty}.gguf"
            quantize(f32, per_type[ty], ty)
        mixed = work / "b-mixed.gguf"
        assignment = assemble_mixed(f32, per_type, mixed)
        tokens = llamacpp_tokens(mixed, TEXT)
        logits = f64_logits(model, tokens, dequantized_state(mixed, 4, 2))
        ll = llamacpp_logits(mixed, tokens)
        # The model now holds the dequantized weights in float64: its greedy continuation of
        # BOS + the text is what `gyre generate` must print.
        greedy, gap = f64_greedy(model, [1] + tokens, 16)
        write_case("mixed_quant", mixed, {
            "tokens": np.array(tokens, dtype=np.int64),
            "logits": logits.astype(np.float32),
            "llamacpp_logits": ll.astype(np.float32),
            "greedy": np.array(greedy, dtype=np.int64),
        }, {"text": TEXT, "versions": versions, "tensor_types": assignment,
            "llamacpp_mean_abs_diff": mean_abs(ll, logits),
            "greedy_min_top2_gap": gap})

        if args.gyre:
            print("| type | bits/weight | gyre mean abs Δlogit | llama.cpp mean abs Δlogit | llama.cpp / gyre |")
            print("|---|---|---|---|---|")
            for ty in TYPES:
                p = per_type[ty]
                want = f64_logits(model, tokens, dequantized_state(p, 4, 2))
                g = mean_abs(gyre_logits(args.gyre, p, tokens), want)
                l = mean_abs(llamacpp_logits(p, tokens), want)
                bits = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5, "Q2_K": 2.625,
                        "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}[ty]
                print(f"| {ty} | {bits} | {g:.2e} | {l:.2e} | {l / g:.0f}x |")


if __name__ == "__main__":
    main()
