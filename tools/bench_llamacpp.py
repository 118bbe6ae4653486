#!/usr/bin/env python3
"""gyre vs llama.cpp on the same GGUF file, side by side.

usage: python3 tools/bench_llamacpp.py [--shape tiny-llama] [--types f16,q8_0,q4_k_m] [--prompt 16]
                                        [--gen 16] [--rounds 3] [--threads N] [--gguf-dir DIR]
                                        [--keep] [--gyre PATH] [--json]
       python3 tools/bench_llamacpp.py --file MODEL.gguf [...]

For each type it writes a random-weight GGUF of the shape (F16 with the `gguf` PyPI package;
every other type quantized from it by llama.cpp's own `llama_model_quantize`: `q4_0`, `q4_1`,
`q5_0`, `q5_1`, `q8_0`, `q2_k`, `q3_k`, `q4_k`, `q5_k`, `q6_k` are pure, every matrix in that
type; `q3_k_m`, `q4_k_m`, `q5_k_m` are llama.cpp's mixes, the files users download), or takes
the given --file, then times llama.cpp through `llama-cpp-python` (PyPI) and gyre (`gyre bench
--model FILE --json`, when its release binary exists) on that same file, with the same protocol,
and prints both with the ratio gyre/llama.cpp.

Protocol (both engines): prefill the prompt tokens (i*7919+13) % vocab in one call, then `gen`
single-token decode steps; decode speed is the median step. llama.cpp gets one untimed warm-up
round first (it reads its weights from the memory-mapped GGUF: the first touch page-faults).
gyre's synthetic weights are not the GGUF's random ones; speed does not depend on the values.

The machine's read bandwidth moves between levels from minute to minute (BENCHMARKS.md), so
the two engines alternate for `--rounds` rounds (llama.cpp, gyre, llama.cpp, gyre, ...) and
each figure is the median over the rounds; the per-round ratios are printed too.

Needs: pip install gguf llama-cpp-python (the latter builds llama.cpp from source: minutes).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# hidden, layers, heads, kv heads, head dim, MLP width, vocab, tied head: the same numbers as
# gyre's synthetic Llama shapes (crates/gyre/src/bench.rs).
SHAPES = {
    "tiny-llama": (256, 4, 4, 2, 64, 704, 4096, False),
    "gemma-2b-like": (2048, 18, 8, 1, 256, 16384, 256_000, True),
    "llama-7b": (4096, 32, 32, 32, 128, 11008, 32000, False),
    "mistral-7b": (4096, 32, 32, 8, 128, 14336, 32000, False),
    "solar-10.7b": (4096, 48, 32, 8, 128, 14336, 32000, False),
    "tinyllama-1.1b": (2048, 22, 32, 4, 64, 5632, 32000, False),
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_gguf(path, shape, ftype):
    """A random GGUF of `shape`: uniform fan-in matrices, unit norms, a dummy SPM vocabulary."""
    import gguf
    from gguf import GGMLQuantizationType as QT
    from gguf import GGUFWriter, LlamaFileType

    c, layers, heads, kv, hd, ff, vocab, tied = SHAPES[shape]
    rng = np.random.default_rng(1234)
    t0 = time.time()
    w = GGUFWriter(path, "llama")
    w.add_name(f"random-{shape}")
    w.add_context_length(4096)
    w.add_embedding_length(c)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_rope_dimension_count(hd)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_file_type(LlamaFileType.MOSTLY_F16 if ftype == "f16" else LlamaFileType.MOSTLY_Q8_0)
    if ftype != "f16":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    specials = [b"<unk>", b"<s>", b"</s>"]
    byte_toks = [("<0x%02X>" % i).encode() for i in range(256)]
    rest = vocab - len(specials) - len(byte_toks)
    w.add_tokenizer_model("llama")
    w.add_token_list(specials + byte_toks + [("t%d" % i).encode() for i in range(rest)])
    w.add_token_scores([0.0] * (len(specials) + 256) + [-float(i) for i in range(rest)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * rest)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    nbytes = 0

    def mat(name, rows, cols, bound=None):
        nonlocal nbytes
        bound = bound if bound is not None else (3.0 / cols) ** 0.5
        a = rng.random((rows, cols), dtype=np.float32)
        a *= 2 * bound
        a -= bound
        if ftype == "f16":
            a = a.astype(np.float16)
            w.add_tensor(name, a)
        else:
            a = gguf.quants.quantize(a, QT.Q8_0)
            w.add_tensor(name, a, raw_dtype=QT.Q8_0)
        nbytes += a.nbytes

    def ones(name, n):
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    mat("token_embd.weight", vocab, c, 0.05)
    for i in range(layers):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight", c)
        mat(p + "attn_q.weight", heads * hd, c)
        mat(p + "attn_k.weight", kv * hd, c)
        mat(p + "attn_v.weight", kv * hd, c)
        mat(p + "attn_output.weight", c, heads * hd)
        ones(p + "ffn_norm.weight", c)
        mat(p + "ffn_gate.weight", ff, c)
        mat(p + "ffn_up.weight", ff, c)
        mat(p + "ffn_down.weight", c, ff)
    ones("output_norm.weight", c)
    if not tied:
        mat("output.weight", vocab, c)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return nbytes, time.time() - t0


QUANT_FTYPES = {
    "q4_0": ("Q4_0", True), "q4_1": ("Q4_1", True), "q5_0": ("Q5_0", True), "q5_1": ("Q5_1", True),
    "q8_0": ("Q8_0", True), "q2_k": ("Q2_K", True), "q3_k": ("Q3_K_M", True), "q4_k": ("Q4_K_M", True),
    "q5_k": ("Q5_K_M", True), "q6_k": ("Q6_K", True),
    "q3_k_m": ("Q3_K_M", False), "q4_k_m": ("Q4_K_M", False), "q5_k_m": ("Q5_K_M", False),
}
GGML_TYPE_IDS = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_k": 10, "q3_k": 11,
                 "q4_k": 12, "q5_k": 13, "q6_k": 14}


def quantize_gguf(src, dst, kind):
    """llama.cpp's quantizer: pure types put every matrix (embedding and head too) in the type,
    the _m mixes are llama.cpp's own choice per tensor."""
    import llama_cpp

    ftype, pure = QUANT_FTYPES[kind]
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.nthread = os.cpu_count()
    if pure:
        p.pure = True
        p.output_tensor_type = GGML_TYPE_IDS[kind]
        p.token_embedding_type = GGML_TYPE_IDS[kind]
    t0 = time.time()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p)
    if rc != 0:
        sys.exit(f"llama_model_quantize to {kind} failed ({rc})")
    return time.time() - t0


def bytes_per_token(shape, ftype):
    """Weight bytes one decode step reads: every matrix once (the embedding table too when it
    is the head), one embedding row otherwise."""
    c, layers, heads, kv, hd, ff, vocab, tied = SHAPES[shape]
    per_layer = c * heads * hd * 2 + c * kv * hd * 2 + 3 * c * ff
    n = layers * per_layer + vocab * c  # the head (or the tied table)
    b = 2.0 if ftype == "f16" else 34.0 / 32.0
    return int(n * b + (0 if tied else c * b))


def time_llamacpp(path, vocab, prompt_len, gen, threads):
    import llama_cpp
    from llama_cpp import Llama

    t0 = time.time()
    llm = Llama(
        model_path=path,
        n_ctx=max(256, prompt_len + gen + 8),
        # llama-cpp-python keeps n_batch rows of scores and writes row n_tokens − 1.
        n_batch=max(64, prompt_len + gen + 8),
        n_ubatch=max(64, prompt_len),
        n_threads=threads,
        n_threads_batch=threads,
        use_mmap=True,
        verbose=bool(os.environ.get("VERBOSE")),
    )
    load_s = time.time() - t0
    prompt = [(i * 7919 + 13) % vocab for i in range(prompt_len)]
    out = {}
    for rep in ("warmup", "timed"):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        pf = time.perf_counter() - t
        steps = []
        for _ in range(gen):
            t = time.perf_counter()
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            steps.append(time.perf_counter() - t)
        med = statistics.median(steps)
        out[rep] = {"prefill_tok_s": prompt_len / pf, "decode_tok_s": 1 / med, "decode_ms_median": med * 1e3}
    res = dict(out["timed"])
    res.update(
        load_s=load_s,
        warmup_prefill_tok_s=out["warmup"]["prefill_tok_s"],
        llama_cpp_python=llama_cpp.__version__,
        system_info=llama_cpp.llama_print_system_info().decode().strip(),
        ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    del llm
    return res


def median_of(runs):
    """The first run with every numeric field replaced by its median over `runs`."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs if key in r)
    return out


def run_gyre(gyre, path, prompt_len, gen, threads):
    cmd = [gyre, "bench", "--model", path, "--prompt", str(prompt_len), "--gen", str(gen), "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip()[-500:], "cmd": " ".join(cmd)}
    last = [l for l in p.stdout.strip().splitlines() if l.startswith("{")][-1]
    r = json.loads(last)
    r["cmd"] = " ".join(cmd)
    return r


def vocab_of(path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    return int(emb.shape[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="tiny-llama", choices=sorted(SHAPES))
    ap.add_argument("--types", default="f16,q8_0", help="GGUF types: f16, " + ", ".join(QUANT_FTYPES))
    ap.add_argument("--file", default=None, help="benchmark this GGUF file instead of random ones")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per engine")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--gguf-dir", default=None, help="where to write the GGUFs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the GGUFs (reused if present)")
    ap.add_argument("--gyre", default=os.path.join(REPO, "target", "release", "gyre"))
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = ap.parse_args()

    types = [t.strip().lower() for t in a.types.split(",") if t.strip()]
    for t in types:
        if t != "f16" and t not in QUANT_FTYPES:
            sys.exit(f"unknown GGUF type {t} (f16, {', '.join(QUANT_FTYPES)})")
    gdir = a.gguf_dir or tempfile.mkdtemp(prefix="gyre-llamacpp-")
    os.makedirs(gdir, exist_ok=True)
    have_gyre = os.path.exists(a.gyre)
    results = []
    jobs = [("file", a.file)] if a.file else [(t, os.path.join(gdir, f"{a.shape}-{t}.gguf")) for t in types]
    base = os.path.join(gdir, f"{a.shape}-f16.gguf")
    made = set()
    for t, path in jobs:
        if t != "file" and not (a.keep and os.path.exists(path)):
            if not os.path.exists(base):
                nb, sec = write_gguf(base, a.shape, "f16")
                made.add(base)
                print(f"wrote {base}: {nb / 1e9:.3f} GB of matrices in {sec:.1f}s", file=sys.stderr)
            if t != "f16":
                sec = quantize_gguf(base, path, t)
                made.add(path)
                print(f"quantized {path} in {sec:.1f}s", file=sys.stderr)
        vocab = vocab_of(path)
        lcs, gys = [], []
        for k in range(max(1, a.rounds)):
            print(f"round {k + 1}: llama.cpp {t}: timing...", file=sys.stderr)
            lcs.append(time_llamacpp(path, vocab, a.prompt, a.gen, a.threads))
            if have_gyre:
                print(f"round {k + 1}: gyre {t}: timing...", file=sys.stderr)
                gys.append(run_gyre(a.gyre, path, a.prompt, a.gen, a.threads))
        lc = median_of(lcs)
        good = [g for g in gys if "decode_tok_s" in g]
        gy = median_of(good) if good else (gys[0] if gys else None)
        if gy and "weight_bytes_per_token" in gy:
            lc["weight_bytes_per_token"] = gy["weight_bytes_per_token"]
        per_round = [(g["decode_tok_s"] / l["decode_tok_s"]) for g, l in zip(gys, lcs) if "decode_tok_s" in g]
        results.append({"type": t, "file": path, "llamacpp": lc, "gyre": gy, "rounds": len(lcs),
                        "decode_ratio_per_round": per_round})
    if not a.keep:
        for p in made:
            os.remove(p)
        if not a.gguf_dir:
            os.rmdir(gdir)

    load = open("/proc/loadavg").read().strip()
    print(f"{a.shape} | prompt {a.prompt} gen {a.gen} | {a.threads} threads | loadavg {load}")
    if results:
        print(f"llama-cpp-python {results[0]['llamacpp']['llama_cpp_python']}; "
              f"{results[0]['llamacpp']['system_info']}")
    if not os.path.exists(a.gyre):
        print(f"(no gyre binary at {a.gyre}: build it with `cargo build --release`)")
    print(f"{'':<42} {'gyre':>10} {'llama.cpp':>10} {'gyre/llama.cpp':>15}")
    for r in results:
        lc, gy = r["llamacpp"], r["gyre"]
        for key, label in (("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s (median)")):
            name = f"{r['type'].upper()} {label}"
            if gy and key in gy:
                print(f"{name:<42} {gy[key]:>10.2f} {lc[key]:>10.2f} {gy[key] / lc[key]:>14.2f}x")
            else:
                print(f"{name:<42} {'-':>10} {lc[key]:>10.2f}")
        if gy and "machine_read_gbs" in gy:
            lbw = lc["weight_bytes_per_token"] * lc["decode_tok_s"] / 1e9 / gy["machine_read_gbs"]
            print(f"{'  of read bandwidth':<42} {gy['bandwidth_ratio'] * 100:>9.1f}% {lbw * 100:>9.1f}%"
                  f"   (machine {gy['machine_read_gbs']:.1f} GB/s, measured by gyre)")
        if r["decode_ratio_per_round"]:
            rounds = ", ".join(f"{x:.2f}x" for x in r["decode_ratio_per_round"])
            print(f"{'  decode ratio per round':<42} {rounds}   (medians of {r['rounds']} rounds above)")
        if gy and "error" in gy:
            print(f"  gyre failed: {gy['error']}")
    if a.json:
        for r in results:
            if r["gyre"] and "decode_tok_s" in r["gyre"]:
                r["ratio"] = {k: r["gyre"][k] / r["llamacpp"][k] for k in ("prefill_tok_s", "decode_tok_s")}
        print(json.dumps({"shape": a.shape, "prompt": a.prompt, "gen": a.gen, "threads": a.threads,
                          "loadavg": load, "results": results}))


if __name__ == "__main__":
    main()
