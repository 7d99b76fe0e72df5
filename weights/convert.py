#!/usr/bin/env python3
"""Convert a torchvision Faster R-CNN + ResNet-FPN checkpoint (.pth) to a marrow safetensors file.

    python weights/convert.py IN.pth OUT.safetensors [--half] [--class-names a,b,c | --class-names-file F]
        [--eps E] [--min-size 800] [--max-size 1333] [--field PX] [--lineage NAME=myeloid,NAME=erythroid]
        [--refine-config JSON] [--drop-unknown] [--no-verify]

IN: a state_dict, or a training checkpoint dict holding one under "model" / "state_dict" /
"model_state_dict" (a "module." prefix is stripped). Legacy FPN/RPN names are renamed to the
current torchvision names, *.num_batches_tracked is dropped, the architecture is inferred from
the shapes and checked, and the config JSON is written to the "marrow.config" metadata key
(+ "marrow.source" = {"file", "sha256"}). Unknown tensors are refused unless --drop-unknown.
A refinement head (refine.* tensors, docs/design.md §6) is carried with its config, taken from
--refine-config JSON or the checkpoint's "refine_config" (or "config"/"marrow_config" -> "refine");
its tensors are checked against it and the detector (H, K, cell gates, classes, FPN width,
representation size), an error naming the tensor.

FrozenBatchNorm2d eps: --eps when given; otherwise inferred: `*.num_batches_tracked` buffers mean the
model was trained with BatchNorm2d (eps 1e-5); without them it cannot be told, and 0.0 (torchvision's
pretrained builder, `overwrite_eps`) is used with a warning.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import marrow_model as mm  # noqa: E402


DEFAULT_EPS = 0.0  # torchvision's pretrained detection builders (overwrite_eps)
BATCHNORM_EPS = 1e-5  # torch.nn.BatchNorm2d's default


def infer_eps(raw_sd, eps=None, log=print) -> float:
    """The FrozenBatchNorm2d eps to record: `eps` when given, 1e-5 when the checkpoint holds
    BatchNorm2d `num_batches_tracked` buffers, else DEFAULT_EPS with a warning."""
    if eps is not None:
        log(f"eps {float(eps):g}: given with --eps")
        return float(eps)
    n = sum(1 for k in raw_sd if k.endswith("num_batches_tracked"))
    if n:
        log(f"eps {BATCHNORM_EPS:g}: the checkpoint has {n} num_batches_tracked buffers, so it was trained "
            "with BatchNorm2d (eps 1e-5); pass --eps to override")
        return BATCHNORM_EPS
    log(f"warning: eps {DEFAULT_EPS:g}: could not tell how the model was normalised (no num_batches_tracked "
        "buffers: FrozenBatchNorm2d), so the default of torchvision's pretrained builders is used; pass "
        "--eps 1e-5 if it was built with FrozenBatchNorm2d's own default or trained with BatchNorm2d")
    return DEFAULT_EPS


def checkpoint_refine_config(obj):
    """The refinement head's config carried by a training checkpoint dict, or None: under
    "refine_config", or "refine" in a "config" / "marrow_config" dict (weights/train_refine.py
    writes "refine_config")."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("refine_config"), dict):
        return obj["refine_config"]
    for k in ("config", "marrow_config"):
        c = obj.get(k)
        if isinstance(c, dict) and isinstance(c.get("refine"), dict):
            return c["refine"]
    return None


def convert(src: str, dst: str, half=False, class_names=None, eps=None, min_size=800, max_size=1333,
            drop_unknown=False, verify=True, log=print, field=None, lineage=None, refine_config=None,
            anchor_sizes=None, aspect_ratios=None) -> dict:
    try:
        obj = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a bad file)
        raise mm.MarrowError(f"cannot read checkpoint: {e}") from e
    raw = mm.extract_state_dict(obj)
    eps = infer_eps(raw, eps, log)
    sd = mm.normalise_names(raw)
    arch = mm.infer_arch({k: tuple(v.shape) for k, v in sd.items() if not k.startswith(mm.REFINE_PREFIX)})
    cfg = mm.make_config(arch["backbone"], class_names, min_size, max_size, eps, field, lineage,
                         anchor_sizes, aspect_ratios)
    mm.check_config_vs_arch(cfg, arch)
    # The refinement head: its config from --refine-config or the checkpoint; its tensors checked
    # against it and the detector (H, K, G, N, C, R), each error naming the tensor.
    rc = refine_config if refine_config is not None else checkpoint_refine_config(obj)
    if rc is not None:
        cfg["refine"] = mm.check_refine_config(rc)
    sd, refine = mm.split_refine(sd, cfg, arch, os.path.basename(src))
    model = mm.build_model(cfg, arch)
    expected = mm.model_tensor_shapes(model)
    exp_names = {n for n, _ in expected}
    unknown = [k for k in sd if k not in exp_names]
    missing = [n for n, _ in expected if n not in sd]
    if missing:
        raise mm.MarrowError(f"{len(missing)} tensors missing for a {arch['backbone']} Faster R-CNN: {missing[:10]}")
    if unknown:
        if not drop_unknown:
            raise mm.MarrowError(f"{len(unknown)} tensors are not part of a torchvision Faster R-CNN "
                                 f"({unknown[:10]}{' ...' if len(unknown) > 10 else ''}); "
                                 "pass --drop-unknown to drop them")
        log(f"warning: dropping {len(unknown)} unknown tensors: {unknown}")
    out = {}
    for name, shape in expected:  # state_dict order
        t = sd[name]
        if tuple(t.shape) != tuple(shape):
            raise mm.MarrowError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not t.is_floating_point():
            raise mm.MarrowError(f"{name}: dtype {t.dtype} is not floating point")
        t = t.detach().to(torch.float16 if half else torch.float32).contiguous()
        if not torch.isfinite(t).all():
            raise mm.MarrowError(f"{name}: contains NaN or Inf")
        out[name] = t
    for name, t in (refine or {}).items():  # split_refine checked names, shapes and finiteness
        out[name] = t.detach().to(torch.float16 if half else torch.float32).contiguous()
        if not torch.isfinite(out[name]).all():
            raise mm.MarrowError(f"{name}: not finite after conversion to {'f16' if half else 'f32'}")
    meta = {
        mm.CONFIG_KEY: mm.config_json(cfg),
        mm.SOURCE_KEY: json.dumps({"file": os.path.basename(src), "sha256": mm.sha256_file(src)}),
    }
    mm.write_safetensors(dst, out, meta)
    if verify:
        model2, cfg2, arch2, _ = mm.load_marrow(dst)
        assert arch2 == arch, (arch2, arch)
        assert (model2.marrow_refine is None) == (refine is None) and cfg2["refine"] == cfg["refine"]
    log(f"wrote {dst}: {arch['backbone']}, FPN {arch['fpn_width']}, {arch['num_classes']} classes, "
        f"representation {arch['representation_size']}, {len(out)} tensors, "
        f"{'f16' if half else 'f32'}, {os.path.getsize(dst)} bytes"
        + (f", refinement head {cfg['refine']}" if refine is not None else ""))
    return arch


def parse_floats(flag: str, text):
    """None, or the comma-separated numbers of a command-line flag (MarrowError naming the flag)."""
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise mm.MarrowError(f"{flag}: {text!r} is not a comma-separated list of numbers") from None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--half", action="store_true", help="store tensors as f16")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--class-names", help="comma-separated, index 0 = background")
    g.add_argument("--class-names-file", help="one class name per line, index 0 = background")
    ap.add_argument("--eps", type=float, default=None,
                    help="FrozenBatchNorm2d eps (default: 1e-5 when the checkpoint has num_batches_tracked "
                         "buffers, i.e. BatchNorm2d training; else 0.0 = torchvision's pretrained builder)")
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--max-size", type=int, default=1333)
    ap.add_argument("--field", type=int, help="field size in native pixels (median max(width, height) of "
                                              "the training images), recorded as config `field`")
    ap.add_argument("--anchor-sizes", help="comma-separated AnchorGenerator sizes, one per FPN level P2..P6 "
                    "(default 32,64,128,256,512); the state_dict cannot tell them")
    ap.add_argument("--aspect-ratios", help="comma-separated AnchorGenerator aspect ratios h/w (default 0.5,1,2); "
                    "their count must equal rpn.head.cls_logits' outputs")
    ap.add_argument("--lineage", help="comma-separated NAME=myeloid|erythroid, recorded as config `lineage`")
    ap.add_argument("--refine-config", help="JSON refine object (cell, hidden, key, steps[, stop_threshold, "
                    "nms_thresh]) for the checkpoint's refine.* tensors; default: the checkpoint's "
                    "refine_config / config.refine")
    ap.add_argument("--drop-unknown", action="store_true", help="drop (with a warning) tensors that are not part of the model")
    ap.add_argument("--no-verify", action="store_true", help="skip re-loading the output into torchvision")
    a = ap.parse_args(argv)
    names = None
    if a.class_names:
        names = [s.strip() for s in a.class_names.split(",")]
    elif a.class_names_file:
        with open(a.class_names_file, encoding="utf-8") as f:
            names = [ln.strip() for ln in f if ln.strip()]
    lineage = None
    if a.lineage:
        lineage = {}
        for item in a.lineage.split(","):
            k, sep, v = item.partition("=")
            if not sep:
                print(f"error: --lineage: {item!r} is not NAME=LINEAGE", file=sys.stderr)
                return 2
            lineage[k.strip()] = v.strip()
    try:
        rc = json.loads(a.refine_config) if a.refine_config else None
        sizes = parse_floats("--anchor-sizes", a.anchor_sizes)
        ratios = parse_floats("--aspect-ratios", a.aspect_ratios)
        convert(a.input, a.output, a.half, names, a.eps, a.min_size, a.max_size, a.drop_unknown, not a.no_verify,
                field=a.field, lineage=lineage, refine_config=rc, anchor_sizes=sizes, aspect_ratios=ratios)
    except (mm.MarrowError, OSError, RuntimeError, ValueError, KeyError) as e:
        print(f"error: {a.input}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
