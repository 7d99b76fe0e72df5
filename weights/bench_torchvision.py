#!/usr/bin/env python3
"""Times torchvision's ResNet-50-FPN backbone on the CPU: transform + body + FPN, as
fasterrcnn_resnet50_fpn runs them (FrozenBatchNorm2d as in the pretrained model, FPN 256 with
LastLevelMaxPool), eval mode, no grad, random weights, a random H×W image in [0, 1].

Prints one JSON object (the last line of stdout): median / min / max seconds after warm-up for
the whole backbone and for each stage, the thread count, and the CPU cores the process used.
benches/backbone.rs runs this so that marrow's and torchvision's numbers come from the same run.

    python3 weights/bench_torchvision.py [--height 480] [--width 640] [--threads 2] [--reps 5] [--warmup 1]

--full times the whole fasterrcnn_resnet50_fpn eval forward instead (the same FrozenBatchNorm2d
ResNet-50-FPN-256 backbone, RPN, TwoMLPHead 1024, FastRCNNPredictor with --num-classes classes,
torchvision's default test settings), split into transform / backbone / rpn / roi_heads /
postprocess, with the live proposal and detection counts (benches/detector.rs runs this):

    python3 weights/bench_torchvision.py --full [--num-classes 91] [--reps 3] [--warmup 1]
"""

import argparse
import json
import platform
import statistics
import time

import torch
import torchvision
from torchvision.models import resnet50
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d


def stats(xs):
    return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "samples_s": xs}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="time the whole detector, not just the backbone")
    ap.add_argument("--num-classes", type=int, default=91, help="with --full: classes incl. background")
    a = ap.parse_args()
    if a.full:
        return full(a)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    # fasterrcnn_resnet50_fpn's backbone: resnet50 with FrozenBatchNorm2d, FPN over layer1..4.
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3).eval()
    transform = GeneralizedRCNNTransform(800, 1333, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    # Two images, rotated between runs.
    images = [torch.rand(3, a.height, a.width) for _ in range(2)]

    def run(i):
        t0 = time.perf_counter()
        batch, _ = transform([images[i % 2]])
        t1 = time.perf_counter()
        feats = backbone.body(batch.tensors)
        t2 = time.perf_counter()
        out = backbone.fpn(feats)
        t3 = time.perf_counter()
        return (t1 - t0, t2 - t1, t3 - t2, t3 - t0), tuple(batch.tensors.shape), out

    with torch.no_grad():
        for i in range(a.warmup):
            run(i)
        c0, w0 = time.process_time(), time.perf_counter()
        runs = []
        for i in range(a.reps):
            t, padded, out = run(i)
            runs.append(t)
        cores = (time.process_time() - c0) / (time.perf_counter() - w0)

    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "threads": torch.get_num_threads(),
                "mkldnn": torch.backends.mkldnn.is_available(),
                "python": platform.python_version(),
                "image": [a.height, a.width],
                "padded": list(padded[2:]),
                "outputs": {k: list(v.shape) for k, v in out.items()},
                "reps": a.reps,
                "warmup": a.warmup,
                "transform_s": stats([r[0] for r in runs]),
                "body_s": stats([r[1] for r in runs]),
                "fpn_s": stats([r[2] for r in runs]),
                "total_s": stats([r[3] for r in runs]),
                "cpu_cores_used": cores,
            }
        )
    )


def full(a):
    """The whole fasterrcnn_resnet50_fpn eval forward, stage by stage exactly as
    GeneralizedRCNN.forward runs them (transform, backbone, rpn, roi_heads, postprocess)."""
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    # fasterrcnn_resnet50_fpn(weights=...) builds exactly this (FrozenBatchNorm2d because the
    # pretrained builder uses it; with weights=None it would switch to BatchNorm2d).
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
    model = FasterRCNN(backbone, num_classes=a.num_classes).eval()
    images = [torch.rand(3, a.height, a.width) for _ in range(2)]

    def run(i):
        imgs = [images[i % 2]]
        orig = [tuple(im.shape[-2:]) for im in imgs]
        t = [time.perf_counter()]
        batch, _ = model.transform(imgs)
        t.append(time.perf_counter())
        feats = model.backbone(batch.tensors)
        t.append(time.perf_counter())
        proposals, _ = model.rpn(batch, feats)
        t.append(time.perf_counter())
        dets, _ = model.roi_heads(feats, proposals, batch.image_sizes)
        t.append(time.perf_counter())
        dets = model.transform.postprocess(dets, batch.image_sizes, orig)
        t.append(time.perf_counter())
        parts = [t[j + 1] - t[j] for j in range(5)] + [t[5] - t[0]]
        return parts, tuple(batch.tensors.shape), len(proposals[0]), len(dets[0]["boxes"])

    with torch.no_grad():
        for i in range(a.warmup):
            run(i)
        c0, w0 = time.process_time(), time.perf_counter()
        runs = []
        for i in range(a.reps):
            parts, padded, n_prop, n_det = run(i)
            runs.append(parts)
        cores = (time.process_time() - c0) / (time.perf_counter() - w0)
    names = ["transform", "backbone", "rpn", "roi_heads", "postprocess", "total"]
    out = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "mode": "full",
        "num_classes": a.num_classes,
        "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
        "image": [a.height, a.width],
        "padded": list(padded[2:]),
        "proposals": n_prop,
        "detections": n_det,
        "reps": a.reps,
        "warmup": a.warmup,
        "cpu_cores_used": cores,
    }
    for j, n in enumerate(names):
        out[f"{n}_s"] = stats([r[j] for r in runs])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
