#!/usr/bin/env python3
"""Run torchvision's Faster R-CNN (a marrow safetensors model) on images and write every detection
and the counts at a threshold as JSON — the reference `marrow count` must reproduce.

    python3 weights/make_count_fixture.py --weights W.safetensors --out F.json IMAGE_OR_DIR... \
        [--threshold 0.7] [--limit N]

Pixels: PIL `Image.open(p).convert("RGB")` (libjpeg-turbo for JPEG; alpha dropped), uint8 / 255,
exactly what torchvision users hand the model. CPU, float32, eval mode, one image at a time (a
batch pads images to a common size, which changes torchvision's own results).

Output: {"model": {"file", "sha256"}, "torch", "torchvision", "threshold", "classes",
"images": [{"file", "width", "height", "detections": [{"bbox": [x1,y1,x2,y2], "score", "label"}],
"counts": {class: n}}]}. Used for tests/fixtures/default_model_torchvision.json and for the
real-image parity runs in docs/validation.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import marrow_model as mm  # noqa: E402

EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def walk(d, out):
    """marrow's folder walk: entries (files and folders together) in sorted path order."""
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        if name.startswith(".") or name.endswith(".annotated.png"):
            continue
        if os.path.isdir(p):
            walk(p, out)
        elif name.lower().endswith(EXTS):
            out.append(p)


def inputs(paths):
    out = []
    for p in paths:
        if os.path.isdir(p):
            walk(p, out)
        else:
            out.append(p)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--limit", type=int, help="at most N images (in sorted order)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from PIL import Image

    torch.set_num_threads(a.threads)
    model, cfg, arch, meta = mm.load_marrow(a.weights)
    model.eval()
    names = cfg["class_names"] or [f"class_{i}" for i in range(arch["num_classes"])]
    with open(a.weights, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    files = inputs(a.images)
    if a.limit:
        files = files[: a.limit]
    out_images = []
    with torch.no_grad():
        for i, p in enumerate(files):
            with Image.open(p) as im:
                rgb = np.asarray(im.convert("RGB"))
            x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0
            det = model([x])[0]
            dets = [
                {"bbox": [float(v) for v in b], "score": float(s), "label": int(l)}
                for b, s, l in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())
            ]
            counts = {n: 0 for n in names[1:]}
            for d in dets:
                if d["score"] >= a.threshold and d["label"] >= 1:
                    counts[names[d["label"]]] += 1
            out_images.append({"file": p, "width": rgb.shape[1], "height": rgb.shape[0],
                               "detections": dets, "counts": counts})
            print(f"[{i + 1}/{len(files)}] {p}: {sum(counts.values())} counted, {len(dets)} detections",
                  file=sys.stderr)
    doc = {"model": {"file": os.path.basename(a.weights), "sha256": sha},
           "torch": torch.__version__, "torchvision": torchvision.__version__,
           "threshold": a.threshold, "classes": names[1:], "images": out_images}
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
