#!/usr/bin/env python3
"""Expected token ids of GGUF vocabularies, from llama.cpp itself.

Run:  tools/fetch_test_assets.sh && python3 tools/make_gguf_tokenizer_fixtures.py

Needs gguf and llama-cpp-python (built without AMX on Sapphire Rapids; see DEVELOPERS.md).
Writes crates/gyre/tests/fixtures/gguf/tokenizers.json; the Rust test (tests/gguf_tokenizer.rs)
needs neither package.

Each case turns one real tokenizer.json of tests-assets/ into GGUF tokenizer metadata by the
rules below, writes a vocabulary-only GGUF, and records llama.cpp's ids for every text
(`tokenize(text, add_bos=False, special=True)`). The Rust test applies the same rules to the
same tokenizer.json (checked through `fnv`, an FNV-1a-64 hash of the metadata) and must get
the same ids from gyre's GGUF tokenizer.

Rules (tokenizer.json -> GGUF):
- tokens: the text of every id 0..N-1 (model vocab and added tokens; N = largest id + 1).
- token types: added tokens are CONTROL (3) when special, else USER_DEFINED (4); the model's
  unk_token is UNKNOWN (2); `<0xXX>` is BYTE (6); the rest NORMAL (1).
- SentencePiece cases (`llama`): the score of a token is -(rank of the first merge that makes
  it); tokens no merge makes score -(merges + id), single characters and bytes 0.
- BPE cases (`gpt2`): merges as "left right" strings, scores all 0, `tokenizer.ggml.pre` as
  given.
- bos/eos/unk ids from tokenizer_config.json's token texts; add_bos_token from there when set.
"""
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tests-assets"
OUT = ROOT / "crates/gyre/tests/fixtures/gguf/tokenizers.json"

CASES = [
    {"name": "llama2", "asset": "llama2", "model": "llama", "add_space_prefix": True},
    {"name": "gemma3", "asset": "gemma3", "model": "llama", "add_space_prefix": False},
    {"name": "gpt2", "asset": "gpt2", "model": "gpt2", "pre": "gpt-2"},
    {"name": "llama3", "asset": "llama3", "model": "gpt2", "pre": "llama-bpe"},
    # Other pre-tokenizers over the same vocabularies: llama.cpp's ids for their split patterns.
    {"name": "gpt2-as-smollm", "asset": "gpt2", "model": "gpt2", "pre": "smollm"},
    {"name": "gpt2-as-qwen2", "asset": "gpt2", "model": "gpt2", "pre": "qwen2"},
    {"name": "llama3-as-tekken", "asset": "llama3", "model": "gpt2", "pre": "tekken"},
    {"name": "llama3-as-gpt-4o", "asset": "llama3", "model": "gpt2", "pre": "gpt-4o"},
    {"name": "gpt2-as-deepseek-coder", "asset": "gpt2", "model": "gpt2", "pre": "deepseek-coder"},
]

TEXTS = [
    "Hello world",
    " Hello world",
    "Hello  world   with   spaces",
    "tabs\tand\nnewlines\n\nand\r\nreturns",
    "Numbers 1234567 and 3.14159, 2024-12-07",
    "don't you'll I'm we've THEY'RE she'd",
    "émojis 😀🎉 and CJK 你好世界 こんにちは 한국어",
    "Arabic مرحبا بالعالم and Hindi नमस्ते",
    "fn main() { println!(\"hi\"); }  // code",
    "HeLLo WoRLD MiXeD CaSe",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "<s>special</s> and <|endoftext|> and <|begin_of_text|> and <start_of_turn>user",
    "",
    " ",
    "\n",
    "   \n\t  ",
    "https://example.com/path?query=1&x=2",
    "Straße naïve café façade",
    "\u00a0non-breaking\u2009thin space",
    "The quick brown fox jumps over the lazy dog.",
]

CONTROL, USER_DEFINED, UNKNOWN, BYTE, NORMAL = 3, 4, 2, 6, 1


def fnv(data: bytes, h: int = 0xCBF29CE484222325) -> int:
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def convert(case):
    tj = json.loads((ASSETS / case["asset"] / "tokenizer.json").read_text())
    cfg = json.loads((ASSETS / case["asset"] / "tokenizer_config.json").read_text())
    model = tj["model"]
    texts = {}
    for t, i in model["vocab"].items():
        texts[i] = t
    added = {a["id"]: a for a in tj["added_tokens"]}
    for i, a in added.items():
        texts[i] = a["content"]
    n = max(texts) + 1
    tokens = [texts.get(i, f"[PAD{i}]") for i in range(n)]
    merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in model.get("merges", [])]
    unk = model.get("unk_token")
    types = []
    for i, t in enumerate(tokens):
        if i in added:
            types.append(CONTROL if added[i]["special"] else USER_DEFINED)
        elif unk is not None and t == unk:
            types.append(UNKNOWN)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    if case["model"] == "llama":
        first = {}
        for rank, m in enumerate(merges):
            a, b = m.split(" ", 1)
            first.setdefault(a + b, rank)
        scores = []
        for i, t in enumerate(tokens):
            if t in first:
                scores.append(-float(first[t]))
            elif len(t) <= 1 or types[i] == BYTE:
                scores.append(0.0)
            else:
                scores.append(-float(len(merges) + i))
        merges_out = []
    else:
        scores = [0.0] * n
        merges_out = merges

    def tok_id(field):
        v = cfg.get(field)
        if isinstance(v, dict):
            v = v.get("content")
        if v is None:
            return None
        return next((i for i, t in enumerate(tokens) if t == v), None)

    meta = {
        "tokens": tokens, "scores": scores, "types": types, "merges": merges_out,
        "bos": tok_id("bos_token"), "eos": tok_id("eos_token"), "unk": tok_id("unk_token"),
        "add_bos": cfg.get("add_bos_token"), "add_space_prefix": case.get("add_space_prefix"),
    }
    h = 0xCBF29CE484222325
    for t in tokens:
        h = fnv(t.encode() + b"\0", h)
    h = fnv(np.array(scores, dtype="<f4").tobytes(), h)
    h = fnv(np.array(types, dtype="<i4").tobytes(), h)
    for m in merges_out:
        h = fnv(m.encode() + b"\n", h)
    return meta, f"{h:016x}"


def write_gguf(path: Path, case, meta):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(case["model"])
    if case.get("pre"):
        w.add_tokenizer_pre(case["pre"])
    w.add_token_list([t.encode() for t in meta["tokens"]])
    w.add_token_scores(meta["scores"])
    w.add_token_types(meta["types"])
    if meta["merges"]:
        w.add_token_merges(meta["merges"])
    for key, fn in [("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id)]:
        if meta[key] is not None:
            fn(meta[key])
    if meta["add_bos"] is not None:
        w.add_add_bos_token(meta["add_bos"])
    if meta["add_space_prefix"] is not None:
        w.add_add_space_prefix(meta["add_space_prefix"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    import tempfile

    import llama_cpp

    out = {"llama_cpp_python": llama_cpp.__version__, "texts": TEXTS, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            meta, h = convert(case)
            path = Path(tmp) / f"{case['name']}.gguf"
            write_gguf(path, case, meta)
            llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
            ids = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in TEXTS]
            with_bos = llm.tokenize(TEXTS[0].encode(), add_bos=True, special=True)
            out["cases"].append({**case, "fnv": h, "ids": ids, "with_bos": with_bos})
            print(f"{case['name']}: {len(meta['tokens'])} tokens, fnv {h}", file=sys.stderr)
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
