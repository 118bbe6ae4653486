#!/usr/bin/env python3
"""Writes the .pth fixtures for crates/gyre/tests/pth_loader.rs into crates/gyre/tests/fixtures/pth/.

Real files come from torch.save (run with the torch you want to check, e.g. 2.15): one dict per
dtype, shared storages, an OrderedDict state_dict, wrappers, non-contiguous and expanded views,
pickle protocol 4, the legacy non-zip format and a deflated re-zip. Damaged files are built by
hand: their pickles are written opcode by opcode below and zipped with zipfile; none of them is
ever unpickled here (forbidden_global.pth names os.system on purpose).

expected.json maps file -> tensor name -> {dtype, shape, values (row-major, as float)}. Values are
multiples of 1/64 below 4 in magnitude, so they are exact in float32, float16 and bfloat16.

Usage: python3 tools/make_pth_fixtures.py
"""

import collections
import json
import struct
import zipfile
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "crates/gyre/tests/fixtures/pth"
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

gen = torch.Generator().manual_seed(20240611)


def values(*shape, dtype=torch.float32):
    """Deterministic values exact in every float dtype: k/64 for |k| < 250."""
    return (torch.randint(-249, 250, shape, generator=gen).float() / 64).to(dtype)


def describe(tensors):
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        out[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "values": [float(x) for x in t.contiguous().float().flatten().tolist()],
        }
    return out


expected = {}


def save(name, obj, tensors, **kwargs):
    torch.save(obj, OUT / name, **kwargs)
    expected[name] = describe(tensors)


# --- hand-built pickles (protocol 2), never unpickled -------------------------------------


def unicode(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def small_int(v):
    return b"K" + bytes([v])


def glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tensor_pickle(entries):
    """{name: _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())}.

    entries: list of (name, key, storage_numel, offset, size, stride); all ints < 256."""
    p = b"\x80\x02}(" + b""
    for name, key, numel, offset, size, stride in entries:
        p += unicode(name) + glob("torch._utils", "_rebuild_tensor_v2") + b"(("
        p += unicode("storage") + glob("torch", "FloatStorage") + unicode(key) + unicode("cpu")
        p += small_int(numel) + b"tQ" + small_int(offset)
        p += b"(" + b"".join(small_int(s) for s in size) + b"t"
        p += b"(" + b"".join(small_int(s) for s in stride) + b"t"
        p += b"\x89" + glob("collections", "OrderedDict") + b")Rt" + b"R"
    return p + b"u."


def write_archive(name, pickle_bytes, storages):
    """A torch-like zip: <stem>/data.pkl, byteorder, data/<key>, version; all STORED."""
    stem = name.removesuffix(".pth")
    with zipfile.ZipFile(OUT / name, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{stem}/data.pkl", pickle_bytes)
        z.writestr(f"{stem}/byteorder", b"little")
        for key, raw in storages.items():
            z.writestr(f"{stem}/data/{key}", raw)
        z.writestr(f"{stem}/version", b"3\n")


def f32_bytes(n):
    return struct.pack(f"<{n}f", *[i * 0.25 for i in range(n)])


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.pth"):
        old.unlink()

    # One flat dict per dtype: 1-D, 2-D, 3-D and [1, 1, 5].
    for tag, dtype in DTYPES.items():
        d = {
            "vec": values(5, dtype=dtype),
            "mat": values(3, 4, dtype=dtype),
            "cube": values(2, 3, 4, dtype=dtype),
            "row": values(1, 1, 5, dtype=dtype),
        }
        save(f"{tag}.pth", d, d)

    # Views of one storage: torch.save writes the whole storage once, with offsets.
    base = values(12)
    d = {"base": base, "tail": base[1:], "block": base[4:10].view(2, 3)}
    save("shared.pth", d, d)

    # model.state_dict(): an OrderedDict with a `_metadata` attribute (pickled with BUILD).
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(values(*p.shape))
    sd = model.state_dict()
    assert isinstance(sd, collections.OrderedDict)
    save("ordered.pth", sd, sd)

    # Wrappers: {"state_dict": {...}} and {"model": {...}} with non-tensor neighbours.
    inner = {"w": values(2, 3), "b": values(3, dtype=torch.bfloat16)}
    save("wrapped_state_dict.pth", {"state_dict": inner, "epoch": 3, "note": "hi", "lr": 1e-3}, inner)
    inner = {"emb": values(4, 2, dtype=torch.float16)}
    obj = {"model": inner, "step": 10, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
    save("wrapped_model.pth", obj, inner)

    # Non-contiguous views: gyre copies them into row-major order.
    m = values(3, 4)
    c = values(2, 3, 4, dtype=torch.bfloat16)
    d = {"t": m.T, "perm": c.permute(2, 0, 1)}
    assert not d["t"].is_contiguous() and not d["perm"].is_contiguous()
    save("transposed.pth", d, d)

    # An expanded view (stride 0) reuses elements: refused.
    e = values(3, 1).expand(3, 4)
    save("expanded.pth", {"e": e}, {"e": e})

    # Pickle protocol 4 (FRAME, MEMOIZE, STACK_GLOBAL, SHORT_BINUNICODE), an empty tensor,
    # a 0-d tensor and an nn.Parameter (_rebuild_parameter).
    d = {
        "empty": torch.zeros(0),
        "scalar": torch.tensor(3.5),
        "param": torch.nn.Parameter(values(2, 2)),
        "half": values(3, dtype=torch.float16),
    }
    save("protocol4.pth", d, d, pickle_protocol=4)

    # One larger tensor whose bytes should be used in place (64-byte aligned entry).
    big = (torch.arange(128 * 128) % 251).float().view(128, 128) * 0.5
    torch.save({"big": big}, OUT / "large.pth")

    # The legacy (pre-1.6) format.
    torch.save({"a": torch.ones(2)}, OUT / "legacy.pth", _use_new_zipfile_serialization=False)

    # A real file re-zipped with deflate.
    src = zipfile.ZipFile(OUT / "f32.pth")
    with zipfile.ZipFile(OUT / "compressed.pth", "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename.replace("f32/", "compressed/", 1), src.read(info.filename))

    # Damaged files, built by hand.
    write_archive(
        "too_small.pth",
        tensor_pickle([("w", "0", 8, 0, (4, 4), (4, 1))]),
        {"0": f32_bytes(8)},
    )
    write_archive(
        "short_entry.pth",
        tensor_pickle([("w", "0", 16, 0, (16,), (1,))]),
        {"0": f32_bytes(2)},
    )
    write_archive(
        "missing_storage.pth",
        tensor_pickle([("a", "0", 4, 0, (4,), (1,)), ("b", "1", 4, 0, (4,), (1,))]),
        {"0": f32_bytes(4)},
    )
    # `os.system("echo pwned")`: must be refused by name, never resolved.
    evil = b"\x80\x02" + glob("os", "system") + unicode("echo pwned") + b"\x85R."
    write_archive("forbidden_global.pth", evil, {})
    # NEWOBJ (0x81) is a real opcode that torch never writes for a state dict.
    write_archive("unknown_opcode.pth", b"\x80\x02}q\x00\x81.", {})

    with open(OUT / "expected.json", "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")

    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"torch {torch.__version__}: wrote {len(list(OUT.iterdir()))} files, {total} bytes to {OUT}")
    assert total < 200_000


if __name__ == "__main__":
    main()
