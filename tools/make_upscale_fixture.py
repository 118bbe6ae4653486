#!/usr/bin/env python3
"""Make the `gyre upscale` comparison fixture with mergekit's passthrough merge.

Run:   python3 tools/make_upscale_fixture.py [--mergekit-yaml PATH]

Needs torch, transformers, safetensors and mergekit (`pip install mergekit`; it pulls in
accelerate, peft, datasets, scipy). The Rust tests do not need any of them: they read the
files written here.

Writes crates/gyre/tests/fixtures/upscale/:

  llama8_f32/        the source: a random LlamaForCausalLM (hidden 32, 4 heads / 2 KV heads,
                     intermediate 48, 8 layers, vocab 64, untied lm_head), float32, saved by
                     `save_pretrained(safe_serialization=True)`. Every RMSNorm weight is set to
                     1 + 0.3*randn so layers differ in every tensor.
  mergekit_solar_bf16/
                     mergekit's output for the SOLAR recipe on it (n = 8, m = 2: layers 0..6
                     then 2..8, 12 layers), merge_method passthrough, dtype bfloat16: the
                     weights, config.json, and mergekit_config.yml (the recipe). README.md
                     and tokenizer files mergekit may write are dropped.
  meta.json          versions, seed, recipe.

The test `mergekit_passthrough_matches` in crates/gyre/tests/upscale.rs runs
`gyre::upscale` with the same recipe and `--dtype bf16` and compares every tensor byte for
byte (mergekit converts with torch's `.to(bfloat16)`, round-to-nearest-even) and the depth
written to config.json.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/gyre/tests/fixtures/upscale"
SEED = 1234

RECIPE = """\
slices:
  - sources:
      - model: {src}
        layer_range: [0, 6]
  - sources:
      - model: {src}
        layer_range: [2, 8]
merge_method: passthrough
dtype: bfloat16
"""


def make_source(path: Path) -> None:
    torch.manual_seed(SEED)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path, safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mergekit-yaml", default=shutil.which("mergekit-yaml") or "mergekit-yaml")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    src = OUT / "llama8_f32"
    make_source(src)
    dst = OUT / "mergekit_solar_bf16"
    if dst.exists():
        shutil.rmtree(dst)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "solar.yml"
        recipe.write_text(RECIPE.format(src=src))
        subprocess.run(
            [args.mergekit_yaml, str(recipe), str(Path(tmp) / "out"), "--no-copy-tokenizer"],
            check=True,
        )
        dst.mkdir()
        for f in sorted((Path(tmp) / "out").iterdir()):
            if f.suffix in (".safetensors",) or f.name in ("config.json", "model.safetensors.index.json"):
                shutil.copy(f, dst / f.name)
        (dst / "mergekit_config.yml").write_text(RECIPE.format(src="llama8_f32"))
    import mergekit  # noqa: F401  (version for meta.json)
    from importlib.metadata import version

    meta = {
        "generator": "tools/make_upscale_fixture.py",
        "seed": SEED,
        "recipe": "SOLAR: layers 0..6 then 2..8 of an 8-layer Llama, passthrough, bfloat16",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "mergekit": version("mergekit"),
        },
        "files": sorted(str(p.relative_to(OUT)) for p in OUT.rglob("*") if p.is_file() and p.name != "meta.json"),
    }
    (OUT / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
