#!/usr/bin/env python3
"""Write tests/fixtures/nms_cases.safetensors: torchvision's own NMS decisions on random boxes,
to check marrow's CPU reference (src/cpu/nms.rs) against the real thing (tests/nms.rs).

    python3 weights/make_nms_fixture.py [--out tests/fixtures/nms_cases.safetensors]

Deterministic (fixed seed, CPU, 1 thread). Each case <name> stores
    <name>.boxes [N,4] f32, <name>.scores [N] f32, <name>.idxs [N] int64 (batched cases),
    <name>.thr [1] f32 (the Python float threshold, rounded to f32), <name>.keep [K] int64
(and trick.vanilla_keep: the same input through the per-class path), and the case kinds are
listed in the metadata key "marrow.nms_cases" (JSON: name -> kind, kind in nms / batched, plus
"__torchvision__" -> the torchvision version that made it). The boxes are clustered so that many pairs overlap near the thresholds,
and scores are partly quantised so that exact ties occur (torchvision's CPU nms sorts stably).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torchvision
from safetensors.torch import save_file
from torchvision.ops import boxes as box_ops

SEED = 20260301


def random_boxes(g: torch.Generator, n: int, extent: float, zero_area: int = 0, dups: int = 0):
    # Cluster centres, then jittered boxes around them: plenty of IoUs near 0.5 and 0.7.
    k = max(1, n // 12)
    centres = torch.rand(k, 2, generator=g) * extent
    sizes = 8 + torch.rand(k, 2, generator=g) * 120
    pick = torch.randint(0, k, (n,), generator=g)
    c = centres[pick] + torch.randn(n, 2, generator=g) * sizes[pick] * 0.15
    wh = sizes[pick] * (0.75 + 0.5 * torch.rand(n, 2, generator=g))
    b = torch.cat([c - wh / 2, c + wh / 2], dim=1).clamp(0, extent).float()
    if zero_area:
        i = torch.randint(0, n, (zero_area,), generator=g)
        b[i, 2] = b[i, 0]
    if dups:
        src = torch.randint(0, n, (dups,), generator=g)
        dst = torch.randint(0, n, (dups,), generator=g)
        b[dst] = b[src]
    return b


def random_scores(g: torch.Generator, n: int):
    s = torch.sigmoid(torch.randn(n, generator=g) * 3).float()
    # A third of the scores on a coarse grid: exact ties, as f32 sigmoid saturation gives.
    q = torch.rand(n, generator=g) < 0.33
    s[q] = torch.round(s[q] * 16) / 16
    return s


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "nms_cases.safetensors"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(SEED)
    tensors = {}
    kinds = {}

    def put(name, kind, boxes, scores, thr, keep, idxs=None):
        tensors[f"{name}.boxes"] = boxes.contiguous()
        tensors[f"{name}.scores"] = scores.contiguous()
        tensors[f"{name}.thr"] = torch.tensor([thr], dtype=torch.float32)
        tensors[f"{name}.keep"] = keep.to(torch.int64).contiguous()
        if idxs is not None:
            tensors[f"{name}.idxs"] = idxs.to(torch.int64).contiguous()
        kinds[name] = kind

    # Plain nms at both model thresholds, with ties, duplicates and zero-area boxes.
    for name, n, thr in [("nms07", 700, 0.7), ("nms05", 500, 0.5)]:
        b = random_boxes(g, n, 800.0, zero_area=n // 20, dups=n // 25)
        s = random_scores(g, n)
        put(name, "nms", b, s, thr, torchvision.ops.nms(b, s, thr))

    # batched_nms on the trick path (≤ 1000 boxes) with box-head-like labels 1..90: the class
    # offsets quantise coordinates to ~1/128 px.
    n = 900
    b = random_boxes(g, n, 1333.0, zero_area=10, dups=20)
    s = random_scores(g, n)
    labels = torch.randint(1, 91, (n,), generator=g)
    # Several labels share boxes so that many same-class pairs exist.
    labels[: n // 2] = torch.randint(1, 4, (n // 2,), generator=g)
    put("trick", "batched", b, s, 0.5, torchvision.ops.batched_nms(b, s, labels, 0.5), labels)
    # The same boxes through the per-class loop (what torchvision runs above 1000 boxes).
    tensors["trick.vanilla_keep"] = box_ops._batched_nms_vanilla(b, s, labels, 0.5).to(torch.int64)

    # Near-threshold pairs with labels 40..90 on the trick path: rows y = 2p, A = [0, y, W, y+1],
    # B = [0, y, w, y+1] with w a few ULPs around t·W. The ~1.8e5 class offsets re-round the
    # coordinates, so many decisions differ from per-class NMS: this pins the exact f32 shift.
    pairs = 500
    big_w = 1 + 2000 * torch.rand(pairs, generator=g)
    w = (0.5 * big_w).float()
    for _ in range(3):
        step = torch.randint(-1, 2, (pairs,), generator=g).float()
        w = torch.nextafter(w, w + step)
    y = 2 * torch.arange(pairs, dtype=torch.float32)
    a = torch.stack([torch.zeros(pairs), y, big_w, y + 1], dim=1)
    bb = torch.stack([torch.zeros(pairs), y, w, y + 1], dim=1)
    b = torch.stack([a, bb], dim=1).reshape(-1, 4).float()
    s = random_scores(g, 2 * pairs)
    s[1::2] = torch.minimum(s[0::2], s[1::2])
    labels = torch.randint(40, 91, (pairs,), generator=g).repeat_interleave(2)
    keep = torchvision.ops.batched_nms(b, s, labels, 0.5)
    per_class = box_ops._batched_nms_vanilla(b, s, labels, 0.5)
    flips = len(set(keep.tolist()) ^ set(per_class.tolist()))
    print(f"trick_quant: the coordinate trick flips {flips} decisions of per-class NMS")
    put("trick_quant", "batched", b, s, 0.5, keep, labels)
    tensors["trick_quant.vanilla_keep"] = per_class.to(torch.int64)

    # batched_nms on the vanilla path (> 1000 boxes), RPN-like: 5 level ids, threshold 0.7.
    n = 1500
    b = random_boxes(g, n, 800.0, zero_area=10, dups=20)
    s = random_scores(g, n)
    levels = torch.randint(0, 5, (n,), generator=g)
    put("vanilla", "batched", b, s, 0.7, torchvision.ops.batched_nms(b, s, levels, 0.7), levels)

    # One metadata key: safetensors writes several in hash order, and the file should be
    # byte-identical on every run.
    kinds["__torchvision__"] = torchvision.__version__
    meta = {"marrow.nms_cases": json.dumps(kinds)}
    save_file(tensors, args.out, metadata=meta)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes): {kinds}")


if __name__ == "__main__":
    main()
