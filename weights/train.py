#!/usr/bin/env python3
"""Train the torchvision Faster R-CNN + ResNet-FPN that marrow runs, from scratch, on CPU or GPU.

    python3 weights/train.py --data DIR --work-dir WD [--config compact|paper] [--epochs N]
        [--time-budget MINUTES] [--lr 0.01] [--resume]
    python3 weights/train.py --coco-train T.json --coco-val V.json [--coco-images DIR] --work-dir WD ...
    python3 weights/train.py export --work-dir WD --out model.safetensors [--half] [--from best|last]

Data: a YOLO-format directory (images/{train,val}/*, labels/{train,val}/<stem>.txt with
`class cx cy w h` normalised to [0,1], classes.txt one name a line, class 0 first), or COCO JSON
files (categories in id order become classes 1..K). Class index 0 of the model is __background__.
Images are read with PIL `convert("RGB")` (alpha dropped) and uint8 / 255, as torchvision sees them.

Model (= what marrow runs, see marrow_model.build_model): torchvision FasterRCNN, ResNet body with
BackboneWithFPN (layers 1-4, LastLevelMaxPool), the default AnchorGenerator (32..512, ratios
0.5/1/2), TwoMLPHead + FastRCNNPredictor, default RPN / box test-time parameters. From scratch:
BatchNorm2d while training (all layers trainable); exported as FrozenBatchNorm2d with eps 1e-5.

  compact (default): ResNet-18, FPN 128, representation 256, min_size 384, max_size 640
  paper:             ResNet-50, FPN 256, representation 1024, min_size 800, max_size 1333 (GPU)

Training: SGD (momentum 0.9, weight decay 1e-4 on weights, not on norms/biases), linear warmup then
cosine, batch 2, gradient-norm clipping; augmentations: horizontal / vertical flips, 90° rotations,
brightness / contrast / saturation / small hue and per-channel stain gain jitter, and scale jitter
through torchvision's own multi-min_size resize (evaluation and export use the fixed min_size).
COCO AP on val after every epoch (pycocotools); best.pt keeps the best val AP.

Work dir (keep it outside the git tree): last.pt (full state, written every epoch and every
--ckpt-minutes), best.pt (model weights of the best val AP), train.log, metrics.jsonl (one JSON line
per epoch), model.safetensors (+ model_f16.safetensors) exported at the end. --resume continues
from last.pt exactly where it stopped (mid-epoch included; model, optimizer, schedule, RNG states).

--epochs N fixes the schedule length; --time-budget MINUTES (training + evaluation wall time,
summed over resumes) measures s/iter over the first iterations and fits the number of epochs into
the budget; re-planned after every epoch, it only ever shortens the schedule (the cosine then
follows the shorter length). With both, the budget caps N.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import math
import os
import random
import sys
import time

# Sleeping (not spinning) OpenMP workers: on a CPU shared with other jobs (compiles), spinning
# threads waiting at every parallel-region barrier made an iteration 3x slower (10.5 vs 3.4 s/iter
# measured on 2 busy cores). Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import convert  # noqa: E402
import marrow_model as mm  # noqa: E402

CONFIGS = {
    "compact": {"backbone": "resnet18", "fpn_width": 128, "representation_size": 256,
                "min_size": 384, "max_size": 640, "train_min_sizes": [320, 352, 384, 416, 448]},
    "paper": {"backbone": "resnet50", "fpn_width": 256, "representation_size": 1024,
              "min_size": 800, "max_size": 1333, "train_min_sizes": [640, 672, 704, 736, 768, 800]},
}
EXPORT_EPS = 1e-5  # BatchNorm2d's eps: the FrozenBatchNorm2d that reproduces it
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------
# logging


class Log:
    def __init__(self, path=None):
        self.f = open(path, "a", encoding="utf-8") if path else None

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        print(f"[{stamp}] {line}", flush=True)
        if self.f:
            self.f.write(f"[{stamp}] {line}\n")
            self.f.flush()


# ----------------------------------------------------------------------------------------------
# data


def read_rgb(path: str) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def image_size(path: str):
    from PIL import Image
    with Image.open(path) as im:
        return im.size  # (w, h)


class Split:
    """A list of images with boxes (x1, y1, x2, y2 in native pixels) and labels (1..K)."""

    def __init__(self, paths, sizes, boxes, labels):
        self.paths, self.sizes, self.boxes, self.labels = paths, sizes, boxes, labels
        self._cache = {}

    def __len__(self):
        return len(self.paths)

    def image(self, i) -> np.ndarray:
        im = self._cache.get(i)
        if im is None:
            im = self._cache[i] = read_rgb(self.paths[i])
            h, w = im.shape[:2]
            if (w, h) != tuple(self.sizes[i]):
                raise ValueError(f"{self.paths[i]}: size {w}x{h}, expected {self.sizes[i]}")
        return im

    def num_boxes(self):
        return sum(len(b) for b in self.boxes)


def load_yolo(root: str, split: str, num_classes: int) -> Split:
    img_dir = os.path.join(root, "images", split)
    paths = sorted(p for p in glob.glob(os.path.join(img_dir, "*")) if p.lower().endswith(IMAGE_EXTS))
    if not paths:
        raise SystemExit(f"error: no images in {img_dir}")
    sizes, boxes, labels = [], [], []
    for p in paths:
        w, h = image_size(p)
        stem = os.path.splitext(os.path.basename(p))[0]
        lp = os.path.join(root, "labels", split, stem + ".txt")
        bb, ll = [], []
        if os.path.exists(lp):
            with open(lp, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    parts = line.split()
                    if not parts:
                        continue
                    if len(parts) != 5:
                        raise SystemExit(f"error: {lp}:{n}: expected 'class cx cy w h'")
                    c = int(parts[0])
                    if not 0 <= c < num_classes:
                        raise SystemExit(f"error: {lp}:{n}: class {c} not in 0..{num_classes - 1}")
                    cx, cy, bw, bh = (float(v) for v in parts[1:])
                    x1, x2 = max(0.0, (cx - bw / 2) * w), min(float(w), (cx + bw / 2) * w)
                    y1, y2 = max(0.0, (cy - bh / 2) * h), min(float(h), (cy + bh / 2) * h)
                    if x2 - x1 < 1 or y2 - y1 < 1:
                        continue
                    bb.append([x1, y1, x2, y2])
                    ll.append(c + 1)
        sizes.append((w, h))
        boxes.append(np.asarray(bb, np.float32).reshape(-1, 4))
        labels.append(np.asarray(ll, np.int64))
    return Split(paths, sizes, boxes, labels)


def load_coco(json_path: str, image_root: str | None):
    with open(json_path, encoding="utf-8") as f:
        d = json.load(f)
    cats = sorted(d["categories"], key=lambda c: c["id"])
    cat_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
    root = image_root or os.path.dirname(os.path.abspath(json_path))
    anns = {}
    for a in d.get("annotations", []):
        if a.get("iscrowd", 0):
            continue
        anns.setdefault(a["image_id"], []).append(a)
    paths, sizes, boxes, labels = [], [], [], []
    for im in sorted(d["images"], key=lambda m: m["id"]):
        p = os.path.join(root, im["file_name"])
        w, h = (im["width"], im["height"]) if "width" in im else image_size(p)
        bb, ll = [], []
        for a in anns.get(im["id"], []):
            x, y, bw, bh = a["bbox"]
            x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)
            if x2 - x1 < 1 or y2 - y1 < 1:
                continue
            bb.append([x1, y1, x2, y2])
            ll.append(cat_to_label[a["category_id"]])
        paths.append(p)
        sizes.append((w, h))
        boxes.append(np.asarray(bb, np.float32).reshape(-1, 4))
        labels.append(np.asarray(ll, np.int64))
    return Split(paths, sizes, boxes, labels), [c["name"] for c in cats]


def load_data(a):
    """(train Split, val Split, class names without background)."""
    if a.data:
        with open(os.path.join(a.data, "classes.txt"), encoding="utf-8") as f:
            names = [ln.strip() for ln in f if ln.strip()]
        return load_yolo(a.data, a.train_split, len(names)), load_yolo(a.data, a.val_split, len(names)), names
    if not (a.coco_train and a.coco_val):
        raise SystemExit("error: give --data DIR (YOLO layout) or --coco-train and --coco-val")
    tr, names = load_coco(a.coco_train, a.coco_images)
    va, names2 = load_coco(a.coco_val, a.coco_images)
    if names != names2:
        raise SystemExit(f"error: train categories {names} != val categories {names2}")
    return tr, va, names


def field_size(split: Split) -> int:
    """Median over the images of min(width, height), native pixels: the side of a square field
    that the transform scales exactly as it scaled a typical training image (short side →
    min_size), so that cells in `marrow count --tile auto` fields appear at the training scale.
    (The median long side was used first: its 575 px fields showed TXL-PBC's 640×480 cells 17 %
    smaller than in training and lost a fifth of them.)"""
    return int(round(float(np.median([min(w, h) for w, h in split.sizes]))))


# ----------------------------------------------------------------------------------------------
# augmentation (boxes x1, y1, x2, y2 in pixels; image float [3, H, W] in [0, 1])


def augment(img: torch.Tensor, boxes: torch.Tensor, rng: random.Random, colour=True):
    import torchvision.transforms.functional as TF
    _, h, w = img.shape
    boxes = boxes.clone()
    if rng.random() < 0.5:  # horizontal flip
        img = img.flip(-1)
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    if rng.random() < 0.5:  # vertical flip
        img = img.flip(-2)
        boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
    for _ in range(rng.randrange(4)):  # 90° counter-clockwise: (x, y) -> (y, W - x)
        _, h, w = img.shape
        img = torch.rot90(img, 1, dims=(1, 2))
        boxes = torch.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], dim=1)
    if colour:
        img = TF.adjust_brightness(img, rng.uniform(0.8, 1.2))
        img = TF.adjust_contrast(img, rng.uniform(0.8, 1.2))
        img = TF.adjust_saturation(img, rng.uniform(0.75, 1.25))
        if rng.random() < 0.5:
            img = TF.adjust_hue(img, rng.uniform(-0.03, 0.03))
        gain = torch.tensor([rng.uniform(0.93, 1.07) for _ in range(3)]).view(3, 1, 1)  # stain
        img = (img * gain).clamp_(0, 1)
    return img.contiguous(), boxes


def to_tensor(im: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(im).permute(2, 0, 1).float().div_(255)


# ----------------------------------------------------------------------------------------------
# model


def build_train_model(c: dict, num_classes: int):
    """The marrow architecture with trainable BatchNorm2d (from scratch)."""
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    body = getattr(torchvision.models, c["backbone"])(weights=None, norm_layer=torch.nn.BatchNorm2d,
                                                      zero_init_residual=True)
    bottleneck = c["backbone"] in ("resnet50", "resnet101")
    in_channels_list = [256, 512, 1024, 2048] if bottleneck else [64, 128, 256, 512]
    w = c["fpn_width"]
    backbone = BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               in_channels_list, w, extra_blocks=LastLevelMaxPool())
    rep = c["representation_size"]
    # Anchors: the config's (torchvision's defaults unless --anchor-sizes / --aspect-ratios).
    # Everything else (RPN / box test-time parameters, mean / std) is torchvision's default, which
    # is marrow's default config.
    acfg = mm.make_config(anchor_sizes=c.get("anchor_sizes"), aspect_ratios=c.get("aspect_ratios"))
    model = FasterRCNN(backbone, num_classes=None, rpn_anchor_generator=mm.anchor_generator(acfg),
                       min_size=tuple(c["train_min_sizes"]), max_size=c["max_size"],
                       box_head=TwoMLPHead(w * 7 * 7, rep), box_predictor=FastRCNNPredictor(rep, num_classes))
    return model


@contextlib.contextmanager
def eval_mode(model, c):
    """model.eval() at the fixed export min_size."""
    was = model.training
    sizes = model.transform.min_size
    model.eval()
    model.transform.min_size = (c["min_size"],)
    try:
        yield model
    finally:
        model.transform.min_size = sizes
        model.train(was)


# ----------------------------------------------------------------------------------------------
# evaluation


def coco_gt(split: Split, num_classes: int, names) -> dict:
    images, anns = [], []
    for i, ((w, h), bb, ll) in enumerate(zip(split.sizes, split.boxes, split.labels)):
        images.append({"id": i, "width": w, "height": h, "file_name": os.path.basename(split.paths[i])})
        for b, l in zip(bb.tolist(), ll.tolist()):
            bw, bh = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(l), "bbox": [b[0], b[1], bw, bh],
                         "area": bw * bh, "iscrowd": 0})
    cats = [{"id": k, "name": names[k - 1]} for k in range(1, num_classes)]
    return {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}


def coco_bbox_eval(gt: dict, dets: list, n: int, names) -> tuple[list, dict]:
    """pycocotools COCOeval (bbox) of `dets` on the first `n` images of `gt` (COCO dicts, image
    ids 0..n-1). Returns the 12 summary stats (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100,
    ARs, ARm, ARl) and, per class name, its AP, AP50 and AP75 (-1 where a class has no ground
    truth). The one place train.py, train_refine.py and eval_model.py evaluate."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = {**gt, "images": gt["images"][:n],
                     "annotations": [x for x in gt["annotations"] if x["image_id"] < n]}
        g.createIndex()
        E = COCOeval(g, g.loadRes(dets), "bbox")
        E.params.imgIds = list(range(n))
        E.evaluate()
        E.accumulate()
        E.summarize()
    prec = E.eval["precision"]  # [T, R, K, A, M]; T=0 is IoU .5, T=5 IoU .75, A=0 all areas, M=2 100 dets

    def mean(p):
        return float(p[p > -1].mean()) if (p > -1).any() else -1.0

    per_class = {nm: {"AP": mean(prec[:, :, k, 0, 2]), "AP50": mean(prec[0, :, k, 0, 2]),
                      "AP75": mean(prec[5, :, k, 0, 2])} for k, nm in enumerate(names)}
    return [float(x) for x in E.stats], per_class


@torch.inference_mode()
def evaluate(model, c, split: Split, gt: dict, names, batch=2, limit=None) -> dict:
    t0 = time.time()
    n = len(split) if limit is None else min(limit, len(split))
    dets = []
    with eval_mode(model, c):
        for s in range(0, n, batch):
            idx = list(range(s, min(n, s + batch)))
            outs = model([to_tensor(split.image(i)) for i in idx])
            for i, o in zip(idx, outs):
                for b, sc, l in zip(o["boxes"].tolist(), o["scores"].tolist(), o["labels"].tolist()):
                    dets.append({"image_id": i, "category_id": int(l), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                 "score": float(sc)})
    res = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": 0.0, "AR100": 0.0,
           "AP50_per_class": {nm: 0.0 for nm in names}, "AP_per_class": {nm: 0.0 for nm in names},
           "detections": len(dets), "images": n}
    if dets:
        st, pc = coco_bbox_eval(gt, dets, n, names)
        res.update(AP=st[0], AP50=st[1], AP75=st[2], APs=st[3], APm=st[4], APl=st[5], AR100=st[8])
        res["AP50_per_class"] = {nm: pc[nm]["AP50"] for nm in names}
        res["AP_per_class"] = {nm: pc[nm]["AP"] for nm in names}
    res["seconds"] = time.time() - t0
    return res


# ----------------------------------------------------------------------------------------------
# checkpoints


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_at(it: int, s: dict) -> float:
    base, warm, total = s["base_lr"], s["warmup_iters"], max(1, s["total_iters"])
    if it < warm:
        f = s["warmup_factor"] + (1 - s["warmup_factor"]) * it / warm
    else:
        p = min(1.0, (it - warm) / max(1, total - warm))
        f = s["min_factor"] + (1 - s["min_factor"]) * 0.5 * (1 + math.cos(math.pi * p))
    return base * f


# ----------------------------------------------------------------------------------------------
# training


def train(a):
    torch.set_num_threads(a.threads)
    os.makedirs(a.work_dir, exist_ok=True)
    log = Log(os.path.join(a.work_dir, "train.log"))
    last_path = os.path.join(a.work_dir, "last.pt")
    ck = None
    if a.resume:
        if not os.path.exists(last_path):
            raise SystemExit(f"error: --resume but no {last_path}")
        ck = torch.load(last_path, map_location="cpu", weights_only=False)
        saved = ck["args"]
        new_epochs = a.epochs  # an explicit --epochs on resume re-sets the schedule length
        for k in ("data", "coco_train", "coco_val", "coco_images", "time_budget", "epochs", "max_images"):
            if getattr(a, k) is None:
                setattr(a, k, saved.get(k))
        for k, v in saved.items():  # the recipe comes from the checkpoint
            if k not in ("data", "coco_train", "coco_val", "coco_images", "time_budget", "epochs", "max_images", "resume",
                         "work_dir", "threads", "cmd", "out", "half", "which"):
                setattr(a, k, v)
        log(f"resuming from {last_path}: epoch {ck['state']['epoch'] + 1}, iteration {ck['state']['it_in_epoch']} of "
            f"the epoch, global iteration {ck['state']['global_iter']}")
    elif os.path.exists(last_path):
        raise SystemExit(f"error: {last_path} exists; pass --resume to continue it or use a new --work-dir")

    c = dict(CONFIGS[a.config])
    if a.min_size:
        c["min_size"] = a.min_size
    if a.max_size:
        c["max_size"] = a.max_size
    for key, flag in (("anchor_sizes", "--anchor-sizes"), ("aspect_ratios", "--aspect-ratios")):
        v = convert.parse_floats(flag, getattr(a, key))
        if v is not None:
            c[key] = v
    mm.make_config(anchor_sizes=c.get("anchor_sizes"), aspect_ratios=c.get("aspect_ratios"))  # range checks
    log(f"train.py {' '.join(sys.argv[1:])}")
    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}, config {a.config}: {json.dumps(c)}")
    train_set, val_set, names = load_data(a)
    if a.max_images:  # smoke tests only
        for sp in (train_set, val_set):
            for k in ("paths", "sizes", "boxes", "labels"):
                setattr(sp, k, getattr(sp, k)[:a.max_images])
    if a.class_names:
        given = [s_.strip() for s_ in a.class_names.split(",")]
        if len(given) != len(names):
            raise SystemExit(f"error: --class-names has {len(given)} names, the data has {len(names)} classes {names}")
        names = given
    num_classes = len(names) + 1
    class_names = ["__background__"] + names
    field = field_size(train_set)
    log(f"data: {len(train_set)} train images ({train_set.num_boxes()} boxes), {len(val_set)} val images "
        f"({val_set.num_boxes()} boxes); classes {class_names}; field (median short side) {field} px")
    gt = coco_gt(val_set, num_classes, names)

    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    model = build_train_model(c, num_classes)
    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": a.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, momentum=0.9)
    bs = a.batch_size
    ipe = len(train_set) // bs
    sched = {"kind": "warmup+cosine", "base_lr": a.lr, "warmup_iters": a.warmup_iters,
             "warmup_factor": 0.01, "min_factor": 0.01, "total_iters": (a.epochs or 12) * ipe}
    st = {"epoch": 0, "it_in_epoch": 0, "global_iter": 0, "perm": None, "best_ap": -1.0, "best_epoch": None,
          "seconds": 0.0, "epochs": a.epochs or 12, "planned": a.epochs is not None or a.time_budget is None,
          "eval_seconds": None}
    aug_rng = random.Random(a.seed)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched = ck["scheduler"]
        st = ck["state"]
        torch.set_rng_state(ck["rng"]["torch"])
        np.random.set_state(ck["rng"]["numpy"])
        random.setstate(ck["rng"]["python"])
        aug_rng.setstate(ck["rng"]["aug"])
        if new_epochs is not None and new_epochs != st["epochs"]:
            log(f"--epochs {new_epochs}: schedule {st['epochs']} -> {new_epochs} epochs")
            st["epochs"], st["planned"] = new_epochs, True
            sched["total_iters"] = new_epochs * ipe
    model.train()
    nparams = sum(p.numel() for p in model.parameters())
    log(f"model: {c['backbone']} FPN {c['fpn_width']} rep {c['representation_size']}, {nparams / 1e6:.2f} M "
        f"parameters; batch {bs}, {ipe} iterations/epoch; lr {a.lr}, warmup {a.warmup_iters}, clip {a.clip}")

    def checkpoint(reason):
        t = time.time()
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched,
                     "state": st, "args": vars(a), "config": c, "class_names": class_names, "field": field,
                     "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate(), "aug": aug_rng.getstate()}}, last_path)
        log(f"checkpoint ({reason}): {last_path}, epoch {st['epoch']} iteration {st['it_in_epoch']} "
            f"({time.time() - t:.1f} s)")

    def plan(s_iter, now_epochs_done):
        """Fit the schedule into --time-budget (never lengthens it)."""
        if a.time_budget is None:
            return
        eval_s = st["eval_seconds"] if st["eval_seconds"] is not None else 0.6 * s_iter * len(val_set)
        per_epoch = s_iter * ipe + eval_s
        left = a.time_budget * 60 - st["seconds"]
        done = st["global_iter"] / ipe
        fit = int(math.floor(done + max(0.0, left - 60) / per_epoch))
        cap = st["epochs"] if st["planned"] else (a.epochs or 10 ** 6)
        new = max(now_epochs_done, min(cap, fit), 1)
        if new != st["epochs"] or not st["planned"]:
            log(f"plan: {s_iter:.2f} s/iter, ~{per_epoch / 60:.1f} min/epoch incl. eval, {left / 60:.0f} min of "
                f"the budget left -> {new} epochs (was {st['epochs']})")
        st["epochs"], st["planned"] = new, True
        sched["total_iters"] = new * ipe

    win = {}
    win_n, win_t = 0, time.time()
    recent = []  # s/iter of recent iterations (for planning)
    last_ckpt = time.time()
    session_t0, session_s0 = time.time(), st["seconds"]
    bad = 0
    lr = lr_at(st["global_iter"], sched)
    while st["epoch"] < st["epochs"]:
        if st["perm"] is None:
            st["perm"] = torch.randperm(len(train_set)).tolist()
        while st["it_in_epoch"] < ipe and st["epoch"] < st["epochs"]:
            t_it = time.time()
            b = st["it_in_epoch"]
            idx = st["perm"][b * bs:(b + 1) * bs]
            images, targets = [], []
            for i in idx:
                img, boxes = augment(to_tensor(train_set.image(i)), torch.from_numpy(train_set.boxes[i]), aug_rng,
                                     colour=not a.no_colour)
                images.append(img)
                targets.append({"boxes": boxes, "labels": torch.from_numpy(train_set.labels[i])})
            lr = lr_at(st["global_iter"], sched)
            for g in opt.param_groups:
                g["lr"] = lr
            losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                bad += 1
                log(f"warning: non-finite loss at iteration {st['global_iter']} ({ {k: float(v) for k, v in losses.items()} }); step skipped")
                opt.zero_grad(set_to_none=True)
                if bad > 20:
                    raise SystemExit("error: more than 20 non-finite losses; lower --lr")
            else:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
                opt.step()
                for k, v in losses.items():
                    win[k] = win.get(k, 0.0) + v.item()
                win["loss"] = win.get("loss", 0.0) + loss.item()
                win["grad_norm"] = win.get("grad_norm", 0.0) + float(gn)
                win_n += 1
            st["it_in_epoch"] += 1
            st["global_iter"] += 1
            now = time.time()
            st["seconds"] = session_s0 + (now - session_t0)
            recent.append(now - t_it)
            recent = recent[-200:]
            if not st["planned"] and len(recent) >= a.calib_iters:
                plan(float(np.median(recent)), 0)
            if st["global_iter"] % a.log_every == 0 and win_n:
                s_it = (now - win_t) / a.log_every
                parts = " ".join(f"{k} {v / win_n:.4f}" for k, v in win.items())
                log(f"epoch {st['epoch'] + 1}/{st['epochs']} iter {st['it_in_epoch']}/{ipe} "
                    f"(global {st['global_iter']}/{sched['total_iters']}) lr {lr:.5f} {s_it:.2f} s/iter {parts}")
                win, win_n, win_t = {}, 0, now
            if now - last_ckpt > a.ckpt_minutes * 60:
                checkpoint("timer")
                last_ckpt = time.time()
        if st["it_in_epoch"] < ipe:
            break
        # end of epoch: evaluate, keep best, checkpoint, re-plan
        ep = st["epoch"] + 1
        r = evaluate(model, c, val_set, gt, names, batch=a.eval_batch)
        st["eval_seconds"] = r["seconds"]
        r.update(epoch=ep, global_iter=st["global_iter"], lr=lr, train_seconds=st["seconds"],
                 s_per_iter=float(np.median(recent)) if recent else None)
        pc = " ".join(f"{k} {v:.3f}" for k, v in r["AP50_per_class"].items())
        log(f"val epoch {ep}: AP {r['AP']:.4f} AP50 {r['AP50']:.4f} AP75 {r['AP75']:.4f} AR100 {r['AR100']:.4f} | "
            f"AP50 per class: {pc} | {r['detections']} detections, eval {r['seconds']:.0f} s")
        with open(os.path.join(a.work_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(r) + "\n")
        if r["AP"] > st["best_ap"]:
            st["best_ap"], st["best_epoch"] = r["AP"], ep
            save_atomic({"model": model.state_dict(), "epoch": ep, "val": r, "config": c, "class_names": class_names,
                         "field": field, "args": vars(a)}, os.path.join(a.work_dir, "best.pt"))
            log(f"best.pt <- epoch {ep} (val AP {r['AP']:.4f})")
        st["epoch"] = ep
        st["it_in_epoch"] = 0
        st["perm"] = None
        st["seconds"] = session_s0 + (time.time() - session_t0)
        if recent:
            plan(float(np.median(recent[-100:])), ep)
        checkpoint(f"end of epoch {ep}")
        last_ckpt = time.time()
    log(f"training done: {st['epoch']} epochs, {st['global_iter']} iterations, {st['seconds'] / 60:.1f} min; "
        f"best val AP {st['best_ap']:.4f} at epoch {st['best_epoch']}")
    if not a.no_export:
        for half in (False, True):
            out = os.path.join(a.work_dir, "model_f16.safetensors" if half else "model.safetensors")
            try:
                export(a.work_dir, out, half=half, log=log)
            except Exception as e:  # noqa: BLE001  (training is done; export can be rerun)
                log(f"export failed ({type(e).__name__}: {e}); rerun: python3 weights/train.py export "
                    f"--work-dir {a.work_dir} --out {out}")


def export(work_dir, out, half=False, which="best", log=print, field=None):
    path = os.path.join(work_dir, f"{which}.pt")
    if which == "best" and not os.path.exists(path):
        log(f"no best.pt in {work_dir} (no finished epoch); exporting last.pt")
        path = os.path.join(work_dir, "last.pt")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    c = ck["config"]
    convert.convert(path, out, half=half, class_names=ck["class_names"], eps=EXPORT_EPS, min_size=c["min_size"],
                    max_size=c["max_size"], field=field or ck["field"], log=log,
                    anchor_sizes=c.get("anchor_sizes"), aspect_ratios=c.get("aspect_ratios"))
    if "val" in ck:
        log(f"{out}: from {os.path.basename(path)}, epoch {ck['epoch']}, val AP {ck['val']['AP']:.4f} "
            f"AP50 {ck['val']['AP50']:.4f}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        ap = argparse.ArgumentParser(prog="train.py export", description="export best.pt (or last.pt) to marrow safetensors")
        ap.add_argument("--work-dir", required=True)
        ap.add_argument("--out", required=True)
        ap.add_argument("--half", action="store_true")
        ap.add_argument("--from", dest="which", choices=["best", "last"], default="best")
        ap.add_argument("--field", type=int, help="override the checkpoint's field size (px)")
        a = ap.parse_args(argv[1:])
        export(a.work_dir, a.out, a.half, a.which, field=a.field)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="YOLO-format directory (images/<split>, labels/<split>, classes.txt)")
    ap.add_argument("--class-names", help="comma-separated names of classes 1..K (no background) for the export; "
                    "default: classes.txt / the COCO category names")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--val-split", default="val")
    ap.add_argument("--coco-train", help="COCO JSON of the training images")
    ap.add_argument("--coco-val", help="COCO JSON of the validation images")
    ap.add_argument("--coco-images", help="image root for COCO file_name (default: the JSON's folder)")
    ap.add_argument("--work-dir", required=True, help="checkpoints and logs (outside the git tree)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="compact")
    ap.add_argument("--min-size", type=int, help="override the config's (export / eval) min_size")
    ap.add_argument("--max-size", type=int, help="override the config's max_size")
    ap.add_argument("--anchor-sizes", help="AnchorGenerator sizes, one per FPN level P2..P6, comma-separated "
                    "(default 32,64,128,256,512)")
    ap.add_argument("--aspect-ratios", help="AnchorGenerator aspect ratios h/w, comma-separated (default 0.5,1,2)")
    ap.add_argument("--epochs", type=int, help="schedule length (default 12 without --time-budget)")
    ap.add_argument("--time-budget", type=float, help="minutes of training + evaluation; fits the epochs into it")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--warmup-iters", type=int, default=500)
    ap.add_argument("--clip", type=float, default=10.0, help="gradient-norm clipping")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--eval-batch", type=int, default=2)
    ap.add_argument("--no-colour", action="store_true", help="no colour / stain jitter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt-minutes", type=float, default=10.0)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--calib-iters", type=int, default=40, help="iterations timed before --time-budget plans")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--max-images", type=int, help="use only the first N images of each split (smoke tests)")
    ap.add_argument("--resume", action="store_true", help="continue WORK_DIR/last.pt")
    a = ap.parse_args(argv)
    train(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
