#!/usr/bin/env python3
"""Write tests/fixtures/coco_eval/*.json: pycocotools' own COCOeval (iouType 'bbox') results on
seeded cases, to check marrow's evaluator (src/eval/coco.rs) against the real thing
(tests/eval_coco.rs).

    python3 weights/make_coco_fixture.py --txl-pbc DATASET_ROOT [--out tests/fixtures/coco_eval]

DATASET_ROOT is a checkout of the TXL-PBC dataset (github.com/nicoaira/TXL-PBC_Dataset, MIT):
DATASET_ROOT/labels/val/*.txt (YOLO) and DATASET_ROOT/images/val/*.png (read only for their
sizes). Without --txl-pbc the txl_pbc case is left as it is.

Needs numpy, pycocotools and (for --txl-pbc) Pillow. Deterministic (fixed seeds).

Each case file holds
    class_names  model class names, index 0 = background (category id k = class k)
    images       [{file, width, height, gt: [{bbox: [x1,y1,x2,y2], class, area, iscrowd}],
                   dets: [{bbox: [x1,y1,x2,y2], class, score}]}]
    results      one per maxDets setting ([1,10,100] and [1,10,300]):
                 {max_dets, stats (COCOeval.stats, as pycocotools prints them),
                  ap_at_last_max_dets (mean of precision[:, :, :, all, -1] over entries > -1),
                  per_class {name: {AP, AP50}} (from eval['precision'][..., k, all, -1])}
    iou_thrs, rec_thrs   pycocotools' Params (numpy linspace), to pin them bit for bit
and the txl_pbc case also
    yolo_labels  {stem: label file text}, classes_txt: the dataset's classes.txt text
so that the Rust test can check its YOLO reader against the ground truth used here.

pycocotools receives every box as [x1, y1, x2 - x1, y2 - y1] computed here in float64, which is
exactly what marrow computes from [x1, y1, x2, y2]. Annotation ids start at 1 (pycocotools treats
a ground-truth id of 0 as "unmatched").
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

SEED = 20261201
MAX_DETS = ([1, 10, 100], [1, 10, 300])


def xywh(b):
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def run_cocoeval(case, max_dets):
    names = case["class_names"]
    images, anns, dets = [], [], []
    for i, im in enumerate(case["images"]):
        images.append({"id": i + 1, "file_name": im["file"], "width": im["width"], "height": im["height"]})
        for g in im["gt"]:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": g["class"], "bbox": xywh(g["bbox"]),
                         "area": g["area"], "iscrowd": int(g["iscrowd"])})
        for d in im["dets"]:
            dets.append({"image_id": i + 1, "category_id": d["class"], "bbox": xywh(d["bbox"]), "score": d["score"]})
    cats = [{"id": k, "name": n} for k, n in enumerate(names) if k > 0]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": cats}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    p = ev.eval["precision"]  # [T, R, K, A, M]

    def mean_valid(s):
        s = s[s > -1]
        return float(np.mean(s)) if len(s) else -1.0

    per_class = {}
    for k, n in enumerate(names[1:]):
        per_class[n] = {"AP": mean_valid(p[:, :, k, 0, -1]), "AP50": mean_valid(p[0, :, k, 0, -1])}
    return {
        "max_dets": list(max_dets),
        "stats": [float(x) for x in ev.stats],
        "ap_at_last_max_dets": mean_valid(p[:, :, :, 0, -1]),
        "per_class": per_class,
    }, ev


def r2(x):
    return round(float(x), 2)


def box_around(rng, cx, cy, w, h):
    return [r2(cx - w / 2), r2(cy - h / 2), r2(cx + w / 2), r2(cy + h / 2)]


def jitter(rng, b, frac):
    w, h = b[2] - b[0], b[3] - b[1]
    d = rng.normal(0, frac, 4) * np.array([w, h, w, h])
    return [r2(b[0] + d[0]), r2(b[1] + d[1]), r2(max(b[2] + d[2], b[0] + d[0] + 0.5)), r2(max(b[3] + d[3], b[1] + d[1] + 0.5))]


def score(rng):
    s = float(rng.uniform(0.05, 1.0))
    # Half the scores on a 0.05 grid: exact ties within and across images.
    return round(s * 20) / 20 if rng.random() < 0.5 else round(s, 4)


def synthetic_case():
    """3 classes, the last with no ground truth; boxes of every area range; crowd GT; GT areas
    that differ from the box area; images without GT, without detections, with neither; one image
    with >100 detections; duplicate and near-duplicate detections; score ties."""
    rng = np.random.default_rng(SEED)
    names = ["__background__", "alpha", "beta", "gamma"]
    images = []
    sizes = {"small": (4, 30), "medium": (34, 94), "large": (100, 220)}
    for i in range(14):
        W, H = int(rng.integers(240, 640)), int(rng.integers(240, 640))
        n_gt = {0: 0, 1: 6, 2: 0}.get(i, int(rng.integers(1, 12)))
        if i == 3:
            n_gt = 60  # the crowded image
        gt = []
        for _ in range(n_gt):
            lo, hi = sizes[rng.choice(list(sizes))]
            w, h = rng.uniform(lo, hi, 2)
            cx, cy = rng.uniform(w / 2, W - w / 2), rng.uniform(h / 2, H - h / 2)
            b = box_around(rng, cx, cy, w, h)
            area = (b[2] - b[0]) * (b[3] - b[1])
            if rng.random() < 0.25:
                area = r2(area * rng.uniform(0.6, 1.0))  # a segmentation-like area, not w*h
            # the crowded image is all alpha: maxDets counts per image *and class*
            c = 1 if i == 3 else int(rng.integers(1, 3))
            gt.append({"bbox": b, "class": c, "area": area, "iscrowd": False})
        if i in (4, 9):
            b = box_around(rng, W / 2, H / 2, W * 0.5, H * 0.5)
            gt.append({"bbox": b, "class": 1, "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": True})
        dets = []
        if i not in (1, 2):  # image 1: GT but no detections; image 2: neither
            for g in gt:
                if g["iscrowd"]:
                    for _ in range(3):  # several detections inside the crowd region
                        b = g["bbox"]
                        cx, cy = rng.uniform(b[0] + 20, b[2] - 20), rng.uniform(b[1] + 20, b[3] - 20)
                        dets.append({"bbox": box_around(rng, cx, cy, 30, 30), "class": 1, "score": score(rng)})
                    continue
                if rng.random() < 0.8:
                    c = g["class"] if rng.random() > 0.1 else 3 - g["class"]
                    dets.append({"bbox": jitter(rng, g["bbox"], 0.08), "class": c, "score": score(rng)})
                    if rng.random() < 0.2:  # duplicate / near-duplicate
                        b = dets[-1]["bbox"] if rng.random() < 0.5 else jitter(rng, g["bbox"], 0.03)
                        dets.append({"bbox": list(b), "class": c, "score": score(rng)})
            n_sp = int(rng.integers(0, 5)) + {0: 3, 3: 100}.get(i, 0)  # image 0: detections, no GT
            for _ in range(n_sp):  # spurious, some of class 3 (which has no ground truth)
                lo, hi = sizes[rng.choice(list(sizes))]
                w, h = rng.uniform(lo, hi, 2)
                b = box_around(rng, rng.uniform(0, W), rng.uniform(0, H), w, h)
                c = 1 if i == 3 and rng.random() < 0.9 else int(rng.integers(1, 4))
                dets.append({"bbox": b, "class": c, "score": score(rng)})
        order = rng.permutation(len(dets))
        dets = [dets[j] for j in order]
        images.append({"file": f"synthetic_{i:02d}.png", "width": W, "height": H, "gt": gt, "dets": dets})
    return {"class_names": names, "images": images}


def boundaries_case():
    """Hand-placed boxes on the edges: IoU exactly 0.5 and 0.75, GT areas exactly 32² and 96²,
    equal IoU to two GTs (the later one wins in pycocotools), a crowd GT matched by several
    detections, identical scores across images, a detection whose own area is outside the range."""
    names = ["__background__", "a", "b"]

    def g(b, c=1, area=None, crowd=False):
        return {"bbox": b, "class": c, "area": (b[2] - b[0]) * (b[3] - b[1]) if area is None else area, "iscrowd": crowd}

    def d(b, s, c=1):
        return {"bbox": b, "class": c, "score": s}

    images = [
        {"file": "edges_0.png", "width": 300, "height": 300,
         "gt": [g([0, 0, 10, 10]), g([100, 100, 132, 132]), g([150, 0, 246, 96]), g([0, 200, 40, 240], 2)],
         "dets": [d([0, 0, 5, 10], 0.9), d([0, 0, 7.5, 10], 0.9), d([100, 100, 132, 132], 0.5),
                  d([150, 0, 246, 96], 0.5), d([0, 200, 40, 240], 0.7, 2), d([0, 200, 40, 240], 0.7, 1)]},
        {"file": "edges_1.png", "width": 300, "height": 300,
         # two identical GTs: a detection has equal IoU with both
         "gt": [g([10, 10, 50, 50]), g([10, 10, 50, 50]), g([200, 200, 300, 300], crowd=True),
                g([60, 60, 70, 70], area=2000.0)],
         "dets": [d([10, 10, 50, 50], 0.9), d([10, 10, 50, 50], 0.9), d([10, 10, 50, 50], 0.9),
                  d([210, 210, 240, 240], 0.8), d([250, 250, 290, 290], 0.8), d([60, 60, 70, 70], 0.6),
                  d([0, 100, 2, 102], 0.95), d([0, 100, 200, 300], 0.3)]},
        {"file": "edges_2.png", "width": 64, "height": 64, "gt": [], "dets": [d([0, 0, 8, 8], 0.9, 2)]},
        {"file": "edges_3.png", "width": 64, "height": 64, "gt": [g([0, 0, 8, 8], 2)], "dets": []},
    ]
    return {"class_names": names, "images": images}


def yolo_to_xyxy(cx, cy, w, h, W, H):
    # Exactly marrow's labels::parse_yolo_label: clamp the normalised edges, then scale.
    c = lambda v: min(max(v, 0.0), 1.0)
    return [c(cx - w / 2) * W, c(cy - h / 2) * H, c(cx + w / 2) * W, c(cy + h / 2) * H]


def txl_case(root):
    """A few real TXL-PBC val label files as ground truth; detections = jittered, dropped,
    re-classed and spurious boxes."""
    from PIL import Image

    rng = np.random.default_rng(SEED + 1)
    ldir = os.path.join(root, "labels", "val")
    idir = os.path.join(root, "images", "val")
    with open(os.path.join(root, "classes.txt"), encoding="utf-8") as f:
        classes_txt = f.read()
    file_names = [l.split(None, 1)[1].strip() if l.split(None, 1)[0].isdigit() else l.strip()
                  for l in classes_txt.splitlines() if l.strip()]
    # Model classes in another order than classes.txt: the reader must map by name.
    names = ["__background__", file_names[2], file_names[0], file_names[1]]
    to_model = {k: names.index(n) for k, n in enumerate(file_names)}
    stems = sorted(f[:-4] for f in os.listdir(ldir) if f.endswith(".txt"))
    picked, seen = [], set()
    for j in rng.permutation(len(stems)):
        s = stems[j]
        with open(os.path.join(ldir, s + ".txt"), encoding="utf-8") as f:
            text = f.read()
        ks = {int(l.split()[0]) for l in text.splitlines() if l.strip()}
        if len(picked) < 5 or not ks <= seen:
            picked.append((s, text))
            seen |= ks
        if len(picked) >= 5 and seen >= set(range(len(file_names))):
            break
    images, labels = [], {}
    for s, text in picked:
        img = next(f for f in os.listdir(idir) if f.rsplit(".", 1)[0] == s)
        W, H = Image.open(os.path.join(idir, img)).size
        gt = []
        for line in text.splitlines():
            if not line.strip():
                continue
            k, cx, cy, w, h = line.split()
            b = yolo_to_xyxy(float(cx), float(cy), float(w), float(h), W, H)
            gt.append({"bbox": b, "class": to_model[int(k)], "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": False})
        dets = []
        for gb in gt:
            if rng.random() < 0.12:
                continue  # missed
            c = gb["class"] if rng.random() > 0.08 else int(rng.integers(1, 4))
            dets.append({"bbox": jitter(rng, gb["bbox"], 0.06), "class": c, "score": score(rng)})
        for _ in range(int(rng.integers(1, 5))):
            w, h = rng.uniform(10, 90, 2)
            dets.append({"bbox": box_around(rng, rng.uniform(0, W), rng.uniform(0, H), w, h),
                         "class": int(rng.integers(1, 4)), "score": score(rng)})
        images.append({"file": img, "width": W, "height": H, "gt": gt, "dets": dets})
        labels[s] = text
    return {"class_names": names, "images": images, "yolo_labels": labels, "classes_txt": classes_txt}


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "coco_eval"))
    ap.add_argument("--txl-pbc", help="root of a TXL-PBC dataset checkout (labels/val, images/val, classes.txt)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cases = {"synthetic": synthetic_case(), "boundaries": boundaries_case()}
    if args.txl_pbc:
        cases["txl_pbc"] = txl_case(args.txl_pbc)
    import pycocotools

    params = COCOeval(iouType="bbox").params
    for name, case in cases.items():
        case["results"] = []
        for md in MAX_DETS:
            res, ev = run_cocoeval(case, md)
            case["results"].append(res)
        case["iou_thrs"] = [float(x) for x in params.iouThrs]
        case["rec_thrs"] = [float(x) for x in params.recThrs]
        case["pycocotools"] = getattr(pycocotools, "__version__", None) or _dist_version()
        path = os.path.join(args.out, name + ".json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(case, f, separators=(",", ":"))
            f.write("\n")
        s = case["results"][0]["stats"]
        print(f"{path}: {len(case['images'])} images, AP {s[0]:.4f} AP50 {s[1]:.4f} AR100 {s[8]:.4f}, "
              f"{os.path.getsize(path)} bytes")


def _dist_version():
    from importlib.metadata import version

    return version("pycocotools")


if __name__ == "__main__":
    main()
