#!/usr/bin/env python3
"""Write tests/fixtures/rpn_anchors.safetensors and tests/fixtures/rpn_chain.safetensors: torchvision
references for the RPN's post-head stages (anchors, per-level top-k, decode, pre-NMS filters).

    python3 weights/make_rpn_fixture.py [--out tests/fixtures]

CPU, f32, torch.set_num_threads(1). Deterministic, byte-identical output.

rpn_anchors.safetensors: torchvision's default AnchorGenerator (sizes 32..512, ratios 0.5/1/2), and
two non-default ones (CUSTOM_ANCHOR_CASES; their sizes and ratios in the case's metadata), on
feature maps shaped like the FPN's for several padded sizes (P2..P5 = Hp/4..Hp/32, pool =
ceil(P5/2), so the pool level's stride is Hp // ceil(Hp/64): 61 for 800 and 672, 53 for 160).
Per case <tag>: `anchors.<tag>.feat` [L,2] i64 (h,w), `anchors.<tag>.strides` [L,2] i64,
`anchors.<tag>.counts` [L] i64, and either `anchors.<tag>.all` [N,4] f32 (small cases) or
`anchors.<tag>.sample` [M,4] f32 (every 97th anchor) plus the FNV-1a-64 of the whole [N,4] f32
little-endian buffer in metadata `marrow.rpn.anchors` ({tag: {"padded": [h,w], "fnv1a64": hex}}).

rpn_chain.safetensors: the fixture model (weights/make_fixtures.py) on the image of
image_land_120x160 (synthetic 120x160, seed 1): `chain.logits` [A], `chain.deltas` [A,4] (the
head's outputs in torchvision's concat order), `chain.feat` [L,2] i64, `chain.padded` [2] i64,
`chain.resized` [2] i64, `chain.topk` [K] i64 (rpn._get_top_n_idx: global anchor indices, level by
level, each in descending logit order), `chain.boxes` [M,4], `chain.scores` [M], `chain.levels`
[M] i64: the candidates that reach batched_nms (after clip, remove_small_boxes, score_thresh), in
torchvision's order.
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

ANCHOR_CASES = [
    # tag, padded (h, w), store all anchors?
    ("p96x160", (96, 160), True),      # P5 3x5 -> pool 2x3: strides (48, 53)
    ("p224x160", (224, 160), True),    # P5 7x5 -> pool 4x3: strides (56, 53)
    ("p160x672", (160, 672), False),   # pool 3x11: strides (53, 61)
    ("p800x1088", (800, 1088), False), # pool 13x17: strides (61, 64); 217 413 anchors
    ("p1344x800", (1344, 800), False), # portrait max size: pool 21x13: strides (64, 61)
]
# Non-default generators (config rpn.anchor_sizes / aspect_ratios): tag, padded, all?, anchors.
# A fractional size and odd ratios exercise the cell anchors' rounding; 7 ratios = 7 per location.
CUSTOM_ANCHOR_CASES = [
    ("c96x160", (96, 160), True, {"anchor_sizes": [20.0, 44.5, 90.0, 170.0, 333.0],
                                  "aspect_ratios": [0.25, 0.5, 1.0, 2.0, 4.0]}),
    ("c800x1088", (800, 1088), False, {"anchor_sizes": [12.0, 27.3, 61.0, 137.9, 300.0],
                                       "aspect_ratios": [0.3, 0.6, 0.9, 1.0, 1.1, 1.7, 3.3]}),
]


def fnv1a64(b: bytes) -> int:
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def feat_sizes(hp: int, wp: int):
    fs = [(hp // s, wp // s) for s in (4, 8, 16, 32)]
    h5, w5 = fs[-1]
    fs.append(((h5 - 1) // 2 + 1, (w5 - 1) // 2 + 1))
    return fs


def anchor_generator(anchors=None):
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    if anchors is not None:
        return mm.anchor_generator(mm.make_config(**anchors))
    sizes = ((32,), (64,), (128,), (256,), (512,))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


@torch.no_grad()
def anchors_for(hp: int, wp: int, anchors=None):
    from torchvision.models.detection.image_list import ImageList
    gen = anchor_generator(anchors)
    fs = feat_sizes(hp, wp)
    il = ImageList(torch.zeros(1, 3, hp, wp), [(hp, wp)])
    feats = [torch.zeros(1, 1, h, w) for h, w in fs]
    return gen(il, feats)[0], fs


def make_anchors(path: str):
    out, meta = OrderedDict(), {}
    cases = [c + (None,) for c in ANCHOR_CASES] + CUSTOM_ANCHOR_CASES
    for tag, (hp, wp), full, anchors in cases:
        a, fs = anchors_for(hp, wp, anchors)
        a = a.to(torch.float32).contiguous()
        per_loc = 3 if anchors is None else len(anchors["aspect_ratios"])
        counts = [h * w * per_loc for h, w in fs]
        assert a.shape[0] == sum(counts)
        out[f"anchors.{tag}.feat"] = torch.tensor(fs, dtype=torch.int64)
        out[f"anchors.{tag}.strides"] = torch.tensor([[hp // h, wp // w] for h, w in fs], dtype=torch.int64)
        out[f"anchors.{tag}.counts"] = torch.tensor(counts, dtype=torch.int64)
        if full:
            out[f"anchors.{tag}.all"] = a
        else:
            out[f"anchors.{tag}.sample"] = a[::97].contiguous()
        meta[tag] = {"padded": [hp, wp], "fnv1a64": f"{fnv1a64(a.numpy().astype('<f4').tobytes()):016x}"}
        if anchors is not None:
            meta[tag]["sizes"], meta[tag]["ratios"] = anchors["anchor_sizes"], anchors["aspect_ratios"]
        print(f"anchors {tag}: feat {fs} N {a.shape[0]} strides {[[hp // h, wp // w] for h, w in fs]}")
    mm.write_safetensors(path, out, {"marrow.rpn.anchors": json.dumps(meta, sort_keys=True),
                                     "marrow.fixture.note": "torchvision AnchorGenerator outputs"})


@torch.no_grad()
def make_chain(path: str):
    import make_fixtures as mf
    import make_reference as mr
    from torchvision.models.detection.rpn import concat_box_prediction_layers
    from torchvision.ops import boxes as box_ops

    model, cfg, _ = mf.fixture_model()
    model.eval()
    img = mr.to_input(mr.synthetic_image(120, 160, 1))
    images, _ = model.transform([img])
    feats = list(model.backbone(images.tensors).values())
    rpn = model.rpn
    objectness, deltas = rpn.head(feats)
    anchors = rpn.anchor_generator(images, feats)
    num_per_level = [o[0].numel() for o in objectness]
    obj, d = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(d.detach(), anchors).view(1, -1, 4)
    obj = obj.view(1, -1)
    top = rpn._get_top_n_idx(obj, num_per_level)[0]
    levels = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(num_per_level)])
    lg, lv, bx = obj[0, top], levels[top], proposals[0, top]
    sc = torch.sigmoid(lg)
    hs, ws = images.image_sizes[0]
    bx = box_ops.clip_boxes_to_image(bx, (hs, ws))
    keep = box_ops.remove_small_boxes(bx, rpn.min_size)
    bx, sc, lv = bx[keep], sc[keep], lv[keep]
    keep = torch.where(sc >= rpn.score_thresh)[0]
    bx, sc, lv = bx[keep], sc[keep], lv[keep]
    # The same candidates that torchvision's filter_proposals hands to batched_nms.
    fp_boxes, _ = rpn.filter_proposals(proposals, obj, images.image_sizes, num_per_level)
    kept = box_ops.batched_nms(bx, sc, lv, rpn.nms_thresh)[: rpn.post_nms_top_n()]
    assert torch.equal(bx[kept], fp_boxes[0])
    out = OrderedDict()
    out["chain.logits"] = obj[0].contiguous()
    out["chain.deltas"] = d.reshape(-1, 4).contiguous()
    out["chain.feat"] = torch.tensor([list(f.shape[-2:]) for f in feats], dtype=torch.int64)
    out["chain.padded"] = torch.tensor(list(images.tensors.shape[-2:]), dtype=torch.int64)
    out["chain.resized"] = torch.tensor([hs, ws], dtype=torch.int64)
    out["chain.topk"] = top.to(torch.int64).contiguous()
    out["chain.boxes"] = bx.contiguous()
    out["chain.scores"] = sc.contiguous()
    out["chain.levels"] = lv.contiguous()
    print(f"chain: padded {tuple(images.tensors.shape[-2:])} resized {(hs, ws)} anchors {obj.shape[1]} "
          f"per level {num_per_level} topk {top.numel()} candidates {bx.shape[0]}")
    mm.write_safetensors(path, out, {"marrow.fixture.note":
                                     "RPN post-head chain of the fixture model on image_land_120x160's image"})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name, fn in (("rpn_anchors.safetensors", make_anchors), ("rpn_chain.safetensors", make_chain)):
        p = os.path.join(a.out, name)
        fn(p)
        print(f"{os.path.relpath(p)}: {os.path.getsize(p)} bytes")


if __name__ == "__main__":
    main()
