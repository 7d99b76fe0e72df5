#!/usr/bin/env python3
"""Evaluate a marrow safetensors model through torchvision on a YOLO-format split, as deployed:
one image at a time (no batch padding), PIL-decoded pixels, the model's own config.

    python3 weights/eval_model.py --weights W.safetensors --data DATASET_ROOT [--split val]
        [--threshold 0.7] [--out metrics.json] [--limit N] [--no-refine]
        [--min-size N --max-size M]

A file with a refinement head (refine.* + the `refine` config) is evaluated through the head
(weights/refine.py detect_refined: the detector, then the head on its live full-precision FPN
levels), unless --no-refine; the result says which output it measured.

Reports pycocotools COCOeval (bbox) AP, AP50, AP75, AR100, per-class AP / AP50, and counting
metrics at the threshold: per-class mean absolute count error and the share of images whose
count is exact. The model-card numbers and the f16-vs-f32 comparison come from here; `marrow
eval` computes the same metrics with the engine (docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import marrow_model as mm  # noqa: E402
import train  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--data", required=True, help="YOLO root: images/<split>, labels/<split>, classes.txt")
    ap.add_argument("--split", default="val")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--out")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-refine", action="store_true", help="ignore the file's refinement head")
    ap.add_argument("--min-size", type=int, help="test-scale sweep: override the config's transform min_size")
    ap.add_argument("--max-size", type=int, help="test-scale sweep: override the config's transform max_size")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, cfg, arch, _ = mm.load_marrow(a.weights)
    model.eval()
    # A test-scale sweep measures what editing the file's transform sizes would give; the engine
    # reads the same two numbers from the config, so the result transfers as is.
    if a.min_size is not None:
        model.transform.min_size = (a.min_size,)
        cfg["transform"]["min_size"] = a.min_size
    if a.max_size is not None:
        model.transform.max_size = a.max_size
        cfg["transform"]["max_size"] = a.max_size
    import refine as rf
    head = None if a.no_refine else rf.head_from_model(model, cfg, arch)
    names = cfg["class_names"][1:]
    k = len(names)
    split = train.load_yolo(a.data, a.split, k + 1)
    gt = train.coco_gt(split, k + 1, names)
    n = len(split) if a.limit is None else min(a.limit, len(split))
    t0 = time.time()
    dets, counts_det, counts_gt = [], np.zeros((n, k), int), np.zeros((n, k), int)
    with torch.inference_mode():
        for i in range(n):
            x = train.to_tensor(split.image(i))
            if head is None:
                o = model([x])[0]
            else:
                o = rf.detect_refined(model, head, x, check=False)["refine"]
            for b, s, l in zip(o["boxes"].tolist(), o["scores"].tolist(), o["labels"].tolist()):
                dets.append({"image_id": i, "category_id": int(l),
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
                if s >= a.threshold:
                    counts_det[i, int(l) - 1] += 1
            for l in split.labels[i].tolist():
                counts_gt[i, int(l) - 1] += 1
    secs = time.time() - t0
    st, pc = train.coco_bbox_eval(gt, dets, n, names)
    per_class = {}
    for j, nm in enumerate(names):
        err = np.abs(counts_det[:, j] - counts_gt[:, j])
        per_class[nm] = {
            **pc[nm],
            "count_mae": float(err.mean()), "count_exact": float((err == 0).mean()),
            "gt": int(counts_gt[:, j].sum()), "counted": int(counts_det[:, j].sum()),
        }
    res = {"weights": os.path.basename(a.weights), "output": "detector" if head is None else f"refine ({cfg['refine']['cell']})",
           "split": a.split, "images": n,
           "min_size": model.transform.min_size[0], "max_size": model.transform.max_size, "threshold": a.threshold,
           "AP": st[0], "AP50": st[1], "AP75": st[2], "APs": st[3], "APm": st[4], "APl": st[5],
           "AR1": st[6], "AR10": st[7], "AR100": st[8],
           "mAP50_classes": float(np.mean([per_class[nm]["AP50"] for nm in names])),
           "per_class": per_class, "seconds": secs, "torch": torch.__version__}
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
