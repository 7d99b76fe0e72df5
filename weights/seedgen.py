"""seedgen v1: counter-based seeded weight generator, bit-identical to src/seedgen.rs.

value(seed, name, i) = f32(lo + (hi - lo) * u), u = (splitmix64(key ^ i) >> 40) / 2^24,
key = splitmix64(seed ^ fnv1a64(utf8(name))), all integer arithmetic mod 2^64, i = flat
row-major element index, (lo, hi) from range_for(). See weights/README.md.
"""
from __future__ import annotations

import json
import math

import numpy as np

SEEDGEN_VERSION = 1
MASK = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & MASK
    return h


def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def key(seed: int, name: str) -> int:
    return splitmix64((seed & MASK) ^ fnv1a64(name.encode("utf-8")))


def scale_for(name: str, scales: dict | None) -> float:
    """Multiplier of the longest key of `scales` that prefixes `name` (1.0 if none),
    rounded to f32 then widened to f64 exactly as the Rust side does."""
    best, mult = -1, 1.0
    for k, v in (scales or {}).items():
        if name.startswith(k) and len(k) > best:
            best, mult = len(k), v
    return float(np.float32(mult))


def range_for(name: str, shape, scales: dict | None = None) -> tuple[float, float]:
    shape = tuple(int(s) for s in shape)
    if name.endswith("running_var"):
        lo, hi = 0.5, 2.0
    elif name.endswith("running_mean"):
        lo, hi = -0.3, 0.3
    elif len(shape) == 1 and name.endswith(".weight"):
        lo, hi = 0.5, 1.5
    elif len(shape) == 1 and name.endswith(".bias"):
        lo, hi = -0.2, 0.2
    elif len(shape) >= 2 and name.endswith(".weight"):
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        b = math.sqrt(6.0 / fan_in)
        lo, hi = -b, b
    else:
        lo, hi = -0.1, 0.1
    s = scale_for(name, scales)
    return lo * s, hi * s


def uniform(seed: int, name: str, n: int) -> np.ndarray:
    """The 24-bit uniforms u in [0,1) as float64, for flat indices 0..n-1."""
    k = np.uint64(key(seed, name))
    out = np.empty(n, dtype=np.float64)
    chunk = 1 << 22
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk), dtype=np.uint64)
        bits = _splitmix64_np(idx ^ k) >> np.uint64(40)
        out[start:start + idx.size] = bits.astype(np.float64) / 16777216.0
    return out


def generate(seed: int, name: str, shape, scales: dict | None = None) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    lo, hi = range_for(name, shape, scales)
    u = uniform(seed, name, n)
    vals = lo + (hi - lo) * u  # float64, each op rounded once, same order as Rust
    return vals.astype(np.float32).reshape(shape)


def spec_json(seed: int, scales: dict, tensors) -> str:
    """The "marrow.seedgen" metadata value."""
    return json.dumps({
        "version": SEEDGEN_VERSION,
        "seed": int(seed),
        "scales": {k: float(v) for k, v in sorted(scales.items())},
        "tensors": [[n, [int(s) for s in shape]] for n, shape in tensors],
    }, separators=(",", ":"))


def generate_all(spec: dict):
    if spec.get("version") != SEEDGEN_VERSION:
        raise ValueError(f"seedgen version {spec.get('version')} unsupported (want {SEEDGEN_VERSION})")
    scales = spec.get("scales", {})
    return [(n, tuple(shape), generate(spec["seed"], n, shape, scales)) for n, shape in spec["tensors"]]


def check_entry(arr: np.ndarray) -> dict:
    """{"sum": sequential f64 sum in flat order (as Rust's iter().sum()), "first": first 5 values}
    for the "marrow.seedgen.check" metadata.
    Also "sum_bits" (hex of the f64 bits) and "first_bits" (the f32 bit patterns as integers):
    exact even where a JSON parser rounds decimals imprecisely (serde_json without its
    `float_roundtrip` feature can be 1 ulp off on f64)."""
    flat = np.ascontiguousarray(arr.reshape(-1), dtype=np.float32)
    s = np.cumsum(flat.astype(np.float64))[-1] if flat.size else np.float64(0.0)
    return {"sum": float(s), "first": [float(x) for x in flat[:5]],
            "sum_bits": "0x%016x" % int(np.float64(s).view(np.uint64)),
            "first_bits": [int(x) for x in flat[:5].view(np.uint32)]}


if __name__ == "__main__":
    # Golden values used by the Rust unit tests in src/seedgen.rs.
    seed = 20261125
    np.set_printoptions(precision=17)
    print("fnv1a64('') =", hex(fnv1a64(b"")), "fnv1a64('a') =", hex(fnv1a64(b"a")))
    print("splitmix64(0) =", hex(splitmix64(0)), "splitmix64(1) =", hex(splitmix64(1)))
    print("key =", hex(key(seed, "backbone.body.conv1.weight")))
    cases = [
        ("backbone.body.conv1.weight", (64, 3, 7, 7), {}),
        ("backbone.body.bn1.running_var", (64,), {}),
        ("backbone.body.bn1.running_mean", (64,), {}),
        ("backbone.body.bn1.weight", (64,), {}),
        ("backbone.body.bn1.bias", (64,), {}),
        ("rpn.head.cls_logits.weight", (3, 64, 1, 1), {"rpn.head.": 2.0, "rpn.head.cls_logits.": 0.3}),
        ("anchors", (7,), {}),
    ]
    for name, shape, sc in cases:
        a = generate(seed, name, shape, sc)
        flat = a.reshape(-1)
        print(name, shape, sc, "range", range_for(name, shape, sc))
        print("  first", [repr(float(x)) for x in flat[:5]], "bits", [hex(int(x)) for x in flat[:5].view(np.uint32)])
        print("  sum", repr(float(np.sum(flat.astype(np.float64)))))
