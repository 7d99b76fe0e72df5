#!/usr/bin/env python3
"""Attach a randomly initialised refinement head (docs/design.md §6) to a marrow weights file.

    python3 weights/add_refine_head.py IN.safetensors OUT.safetensors --cell gru|lstm --hidden H
        --key K --steps T [--seed S] [--stop-threshold 0.5] [--nms-thresh 0.5] [--half] [--replace]

The detector's tensors and metadata are copied unchanged (same dtype, same order); the head's
tensors `refine.*` are appended in §6 order, drawn from PyTorch's default-init distributions with
numpy's PCG64 seeded by --seed (refine.init_params_numpy; beta = 1), stored in f32, or f16 with
--half; the config gains the `refine` object. This builds the "trained detector + randomly
initialised head" files that the engine's end-to-end check compares against
`weights/make_reference.py`. A file that already has a head is refused unless --replace.
The metadata key `marrow.refine.init` records {"seed", "init": "numpy-pcg64 torch-default"}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import marrow_model as mm  # noqa: E402
import refine as rf  # noqa: E402

INIT_KEY = "marrow.refine.init"


def add_head(src, dst, cell, hidden, key, steps, seed=0, stop_threshold=0.5, nms_thresh=0.5, half=False,
             replace=False, log=print):
    """Attach a seeded random head; returns its refine config."""
    rcfg = mm.check_refine_config({"cell": cell, "hidden": hidden, "key": key, "steps": steps,
                                   "stop_threshold": stop_threshold, "nms_thresh": nms_thresh})

    def make(arch):
        head = rf.RefineHead(arch["fpn_width"], arch["representation_size"], arch["num_classes"], rcfg["cell"],
                             rcfg["hidden"], rcfg["key"], rcfg["steps"], rcfg["stop_threshold"], rcfg["nms_thresh"])
        return rf.init_params_numpy(head, np.random.default_rng(int(seed)))
    write_with_head(src, dst, make, half, replace, {"seed": int(seed), "init": "numpy-pcg64 torch-default"}, log)
    return rcfg


def write_with_head(src, dst, head, half=False, replace=False, init_meta=None, log=print):
    """Copy the marrow file `src` to `dst` with `head` (a RefineHead, or a function arch -> RefineHead)
    attached: detector tensors and metadata unchanged, refine.* appended in §6 order (f16 with
    half), config `refine` set, `marrow.refine.init` = JSON init_meta. Verifies by loading back."""
    tensors, meta = mm.read_safetensors(src)
    if mm.CONFIG_KEY not in meta:
        raise mm.MarrowError(f"{src}: no {mm.CONFIG_KEY} metadata (not a marrow weights file?)")
    cfg_raw = json.loads(meta[mm.CONFIG_KEY])
    has = [k for k in tensors if k.startswith(mm.REFINE_PREFIX)]
    if (has or cfg_raw.get("refine") is not None) and not replace:
        raise mm.MarrowError(f"{src} already has a refinement head; pass --replace to replace it")
    tensors = OrderedDict((k, v) for k, v in tensors.items() if not k.startswith(mm.REFINE_PREFIX))
    cfg_raw["refine"] = None
    cfg = mm.merge_config(cfg_raw)
    if "backbone.body.conv1.weight" not in tensors:
        raise mm.MarrowError(f"{src}: no detector tensors (a seedgen fixture?); attach heads to full weight files")
    arch = mm.infer_arch({k: tuple(v.shape) for k, v in tensors.items()})
    if not isinstance(head, rf.RefineHead):
        head = head(arch)
    if head.arch() != {k: arch[k] for k in ("fpn_width", "representation_size", "num_classes")}:
        raise mm.MarrowError(f"head built for {head.arch()} but {src} is {arch}")
    rcfg = mm.check_refine_config(head.config())
    for k, v in head.marrow_tensors(torch.float16 if half else torch.float32).items():
        tensors[k] = v
    cfg["refine"] = rcfg
    meta = dict(meta)
    meta[mm.CONFIG_KEY] = mm.config_json(cfg)
    meta[INIT_KEY] = json.dumps(init_meta or {}, separators=(",", ":"))
    mm.write_safetensors(dst, tensors, meta)
    # Verify: loads back with the head.
    model, cfg2, arch2, _ = mm.load_marrow(dst)
    head2 = rf.head_from_model(model, cfg2, arch2)
    assert head2 is not None and head2.config() == rcfg
    log(f"wrote {dst}: refine {rcfg} on a {arch['backbone']} (FPN {arch['fpn_width']}, representation "
        f"{arch['representation_size']}, {arch['num_classes']} classes), {init_meta}, "
        f"{'f16' if half else 'f32'} head, {os.path.getsize(dst)} bytes")
    return rcfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--cell", required=True, choices=["gru", "lstm"])
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--key", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-threshold", type=float, default=0.5)
    ap.add_argument("--nms-thresh", type=float, default=0.5)
    ap.add_argument("--half", action="store_true", help="store the head's tensors in f16")
    ap.add_argument("--replace", action="store_true", help="replace an existing head")
    a = ap.parse_args(argv)
    try:
        add_head(a.input, a.output, a.cell, a.hidden, a.key, a.steps, a.seed, a.stop_threshold, a.nms_thresh,
                 a.half, a.replace)
    except (mm.MarrowError, OSError, RuntimeError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
