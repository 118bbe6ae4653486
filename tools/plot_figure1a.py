#!/usr/bin/env python3
"""Plots the RecurrentGemma paper's Figure 1a experiment from `gyre bench --curve` tables.

    gyre bench --device cuda --synthetic recurrentgemma-2b --batch max --prompt 2048 \\
        --gen 8192 --curve 16 > docs/figure1a-recurrentgemma-2b.txt
    gyre bench --device cuda --synthetic gemma-2b-like --batch max --prompt 2048 \\
        --gen 8192 --curve 16 > docs/figure1a-gemma-2b-like.txt
    python3 tools/plot_figure1a.py docs/figure1a-*.txt -o docs/figure1a.png

Each table row: generated, window tok/s, total tok/s, state GB (see crates/gyre-cli/src/bench.rs).
"""
import argparse
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    name, rows = path, []
    for line in open(path):
        m = re.match(r"model:\s+(\S+).*?(batch \d+)?,? prompt", line)
        if m:
            name = m.group(1) + (f" ({m.group(2)})" if m.group(2) else "")
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit():
            rows.append([float(p) for p in parts])
    return name, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tables", nargs="+")
    ap.add_argument("-o", "--out", default="docs/figure1a.png")
    args = ap.parse_args()
    fig, (tp, mem) = plt.subplots(1, 2, figsize=(11, 4))
    for path in args.tables:
        name, rows = read(path)
        gen = [r[0] for r in rows]
        tp.plot(gen, [r[1] for r in rows], marker="o", label=name)
        mem.plot(gen, [r[3] for r in rows], marker="o", label=name)
    tp.set_xlabel("tokens generated per sequence (after a 2048-token prompt)")
    tp.set_ylabel("decode throughput, tokens/s (whole batch)")
    tp.set_ylim(bottom=0)
    tp.grid(alpha=0.3)
    tp.legend()
    mem.set_xlabel("tokens generated per sequence")
    mem.set_ylabel("state memory of the batch, GB")
    mem.set_ylim(bottom=0)
    mem.grid(alpha=0.3)
    fig.suptitle("gyre on one H100, bf16 weights, random weights at real shapes")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
