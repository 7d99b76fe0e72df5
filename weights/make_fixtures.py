#!/usr/bin/env python3
"""Regenerate every file under tests/fixtures/ deterministically (CPU, f32, 1 thread).

    python3 weights/make_fixtures.py [--out tests/fixtures]

The fixture model is rebuilt from seedgen v1 (no weights are committed); see tests/fixtures/README.md.
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
import make_reference as mr  # noqa: E402

SEED = 20261125
CLASS_NAMES = ["__background__", "WBC", "RBC", "platelet"]
MIN_SIZE, MAX_SIZE = 160, 700
FPN_WIDTH, REPRESENTATION = 64, 1024
# Keep activations O(1) through the ResNet body (unscaled, residual growth reaches ~1e3 at P2) and
# keep RPN objectness and class scores spread (no saturation / exact ties); see README.
SCALES = {
    "backbone.body.layer1.": 0.85,
    "backbone.body.layer2.": 0.8,
    "backbone.body.layer3.": 0.8,
    "backbone.body.layer4.": 0.8,
    "rpn.head.cls_logits.": 0.4,
    "rpn.head.bbox_pred.": 0.07,
    "roi_heads.box_predictor.cls_score.": 0.15,
    "roi_heads.box_predictor.bbox_pred.": 0.1,
}
LAYERS_KEY = "marrow.layers"


# A second fixture model, identical but for its anchors: sizes with a fractional one (the rounding
# of the cell anchors) and five aspect ratios, so the RPN head has 5 outputs per location.
CUSTOM_ANCHORS = {"anchor_sizes": [20.0, 44.5, 90.0, 170.0, 333.0], "aspect_ratios": [0.25, 0.5, 1.0, 2.0, 4.0]}


def fixture_model(anchors: dict | None = None):
    cfg = mm.make_config("resnet50", CLASS_NAMES, MIN_SIZE, MAX_SIZE, 0.0, **(anchors or {}))
    arch = mm.arch_for("resnet50", FPN_WIDTH, len(CLASS_NAMES), REPRESENTATION,
                       anchors=len(cfg["rpn"]["aspect_ratios"]))
    model, spec, check, _ = mm.build_seeded_model(cfg, arch, SEED, SCALES)
    meta = {mm.CONFIG_KEY: mm.config_json(cfg), mm.SEEDGEN_KEY: spec, mm.SEEDGEN_CHECK_KEY: check}
    return model, cfg, meta


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


@torch.no_grad()
def make_layers(model, meta: dict, path: str):
    rng = np.random.default_rng(SEED + 1)
    relu_in = lambda *s: _t(np.maximum(rng.normal(0.3, 1.0, s), 0.0))  # noqa: E731  post-ReLU-like, >= 0
    b = model.backbone.body
    fpn = model.backbone.fpn
    out, cases = OrderedDict(), {}

    x = _t(rng.normal(0.0, 1.0, (1, 3, 37, 45)))
    y = b.relu(b.bn1(b.conv1(x)))
    out["stem.in"], out["stem.conv_bn_relu"], out["stem.out"] = x, y, b.maxpool(y)
    cases["stem"] = {"modules": ["backbone.body.conv1", "backbone.body.bn1", "relu", "backbone.body.maxpool"],
                     "in": "stem.in", "out": ["stem.conv_bn_relu", "stem.out"]}

    for name, mod, shape in [("layer1.1", b.layer1[1], (1, 256, 11, 13)),
                             ("layer2.0", b.layer2[0], (1, 256, 11, 13)),
                             ("layer4.0", b.layer4[0], (1, 1024, 5, 7))]:
        x = relu_in(*shape)
        out[f"{name}.in"], out[f"{name}.out"] = x, mod(x)
        cases[name] = {"modules": [f"backbone.body.{name}"], "in": f"{name}.in", "out": [f"{name}.out"]}

    for tag, shapes in [("fpn", [(1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6), (1, 2048, 2, 3)]),
                        ("fpn_odd", [(1, 256, 15, 13), (1, 512, 8, 7), (1, 1024, 4, 4), (1, 2048, 3, 2)])]:
        ins = OrderedDict((str(i), relu_in(*s)) for i, s in enumerate(shapes))
        res = fpn(ins)
        for i in range(4):
            out[f"{tag}.in.{i}"] = ins[str(i)]
        for k, v in res.items():
            out[f"{tag}.out.{k}"] = v
        cases[tag] = {"modules": ["backbone.fpn"], "in": [f"{tag}.in.{i}" for i in range(4)],
                      "out": [f"{tag}.out.{k}" for k in res]}

    m = dict(meta)
    m[LAYERS_KEY] = json.dumps(cases)
    m[mr.NOTE_KEY] = ("single-layer teacher-forced cases of the seeded fixture model: stem (conv1+bn1+relu, "
                      "maxpool) on an odd 37x45 input, Bottleneck without downsample (layer1.1), stride-2 "
                      "Bottleneck with downsample (layer2.0, layer4.0) on odd sizes, FPN on exact-2x sizes "
                      "(fpn.*) and on non-2x sizes (fpn_odd.*, general nearest rule)")
    out = OrderedDict((k, v.contiguous().float()) for k, v in out.items())
    mm.write_safetensors(path, out, m)
    return out


def _pool_stride(t):
    hp, wp = (int(x) for x in t["transform.image"].shape[-2:])
    ph, pw = (int(x) for x in t["fpn.pool"].shape[-2:])
    return hp // ph, wp // pw


IMAGES = [
    # tag, (H, W), seed, note, check(tensors) -> None
    ("land_120x160", (120, 160), 1,
     "ordinary landscape image: 120x160 -> resized 160x213, padded 160x224",
     lambda t: (t["transform.size"].tolist() == [160, 213]
                and list(t["transform.image"].shape[-2:]) == [160, 224])),
    ("portrait_trunc159_100x77", (100, 77), 2,
     "portrait image whose short side truncates to min_size-1: 100x77, scale 160/77 in f64, "
     "int(77*scale) = 159 (not 160) -> resized 207x159, padded 224x160",
     lambda t: (t["transform.size"].tolist() == [207, 159]
                and list(t["transform.image"].shape[-2:]) == [224, 160])),
    ("pool61_50x210", (50, 210), 3,
     "P6 (pool) anchor stride 61 along x: 50x210 -> resized 160x672, padded 160x672, P5 5x21, "
     "pool 3x11, anchor strides (160//3, 672//11) = (53, 61)",
     lambda t: (t["transform.size"].tolist() == [160, 672]
                and list(t["transform.image"].shape[-2:]) == [160, 672]
                and list(t["fpn.pool"].shape[-2:]) == [3, 11]
                and _pool_stride(t) == (53, 61))),
]

ANCHOR_IMAGES = [
    ("anchors5_90x120", (90, 120), 4,
     "custom anchors (CUSTOM_ANCHORS: sizes 20/44.5/90/170/333, 5 aspect ratios): 90x120 -> resized "
     "160x213, padded 160x224; 5 anchors per location",
     lambda t: (t["transform.size"].tolist() == [160, 213]
                and t["rpn.logits"].numel() == 5 * sum(h * w for h, w in
                                                       [(40, 56), (20, 28), (10, 14), (5, 7), (3, 4)]))),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    model, cfg, meta = fixture_model()
    paths = []
    p = os.path.join(a.out, "layers.safetensors")
    make_layers(model, meta, p)
    paths.append(p)
    for tag, (h, w), seed, note, check in IMAGES:
        img = mr.synthetic_image(h, w, seed)
        p = os.path.join(a.out, f"image_{tag}.safetensors")
        extra = dict(meta)
        t, info = mr.make_reference(model, cfg, img, p, f"synthetic {h}x{w} seed {seed}", full=False,
                                    note=note, extra_meta=extra)
        if not check(t):
            raise SystemExit(f"fixture {tag}: size assertion failed: {info}")
        sig = t["rpn.scores"]
        print(f"{tag}: {info} rpn.scores std {sig.std().item():.3f} "
              f"det labels {torch.bincount(t['det.labels'], minlength=len(CLASS_NAMES)).tolist()}")
        paths.append(p)
    # The custom-anchor model on one small image: the whole detector with non-default anchors.
    model_a, cfg_a, meta_a = fixture_model(CUSTOM_ANCHORS)
    for tag, (h, w), seed, note, check in ANCHOR_IMAGES:
        img = mr.synthetic_image(h, w, seed)
        p = os.path.join(a.out, f"image_{tag}.safetensors")
        t, info = mr.make_reference(model_a, cfg_a, img, p, f"synthetic {h}x{w} seed {seed}", full=False,
                                    note=note, extra_meta=dict(meta_a))
        if not check(t):
            raise SystemExit(f"fixture {tag}: check failed: {info}")
        print(f"{tag}: {info} rpn.logits {tuple(t['rpn.logits'].shape)} "
              f"det labels {torch.bincount(t['det.labels'], minlength=len(CLASS_NAMES)).tolist()}")
        paths.append(p)
    total = 0
    for p in paths:
        n = os.path.getsize(p)
        total += n
        print(f"{os.path.relpath(p)}: {n} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
