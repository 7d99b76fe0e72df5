#!/usr/bin/env python3
"""Write a reference dump (docs/design.md §5) of torchvision's Faster R-CNN on one image.

    python weights/make_reference.py --weights W.safetensors|W.pth (--image IMG | --synthetic HxW --seed S)
        --out R.safetensors [--min-size N] [--max-size N] [--eps E] [--full] [--note TEXT]

CPU, float32, torch.set_num_threads(1), eval mode. Tensors (NCHW, f32 unless said):
  input.image [3,H,W] (uint8/255, RGB, alpha dropped), transform.image [1,3,Hp,Wp],
  transform.size [2] i64, fpn.0..fpn.3, fpn.pool, rpn.proposals [K,4], rpn.scores [K]
  (sigmoid of the kept objectness logits), box.logits [K,C], box.deltas [K,4C],
  det.boxes [D,4] (original-image coords) det.scores [D] det.labels [D] i64.
Extras: rpn.logits [A] (all anchors' objectness logits, torchvision's concat order),
  det.boxes_resized [D,4] (before transform.postprocess), transform.padded_size [2] i64,
  original_size [2] i64; with --full also body.c2..body.c5, rpn.deltas [A,4], box.features [K,R]
  (TwoMLPHead output).
Metadata: marrow.config (as used), marrow.reference = JSON {torch, torchvision, image, original_size,
  resized_size, padded_size, ties...}; marrow.fixture.note when --note is given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import marrow_model as mm  # noqa: E402

REFERENCE_KEY = "marrow.reference"
NOTE_KEY = "marrow.fixture.note"


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
    """A deterministic image-like uint8 RGB [H,W,3]: a smooth pinkish background, round 'cells'
    (smooth blobs, a few with dark nuclei) and mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    bg = np.array([0.85, 0.72, 0.78]) + 0.05 * np.sin(xx / max(w, 1) * 3.0 + rng.uniform(0, 6))[..., None] \
        + 0.04 * np.cos(yy / max(h, 1) * 2.5 + rng.uniform(0, 6))[..., None]
    img = np.broadcast_to(bg, (h, w, 3)).copy()
    n = max(3, int(h * w / 900))
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(3, max(4.0, min(h, w) / 5))
        col = rng.choice([np.array([0.80, 0.35, 0.40]), np.array([0.55, 0.30, 0.60]), np.array([0.70, 0.50, 0.55])])
        m = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (r * r)) ** 2)[..., None]
        img = img * (1 - 0.8 * m) + col * 0.8 * m
        if rng.uniform() < 0.4:
            nm = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (0.3 * r * r)) ** 2)[..., None]
            img = img * (1 - 0.7 * nm) + np.array([0.30, 0.15, 0.45]) * 0.7 * nm
    img += rng.normal(0, 0.02, img.shape)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def load_image(path: str) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            raise mm.MarrowError(f"{path}: 16/32-bit integer images are not supported by this tool")
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def to_input(img_u8: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] -> f32 [3,H,W] in [0,1], as torchvision's convert_image_dtype (x.float()/255)."""
    return torch.from_numpy(np.ascontiguousarray(img_u8)).permute(2, 0, 1).contiguous().to(torch.float32) / 255


def _ties(x: torch.Tensor) -> int:
    return int(x.numel() - torch.unique(x).numel())


@torch.no_grad()
def run_reference(model, img: torch.Tensor, full: bool = False):
    """Runs the model stage by stage; returns (tensors, info). Checks the staged run against
    model([img]) so the dump is exactly what torchvision's forward produces."""
    torch.set_num_threads(1)
    model.eval()
    H, W = int(img.shape[1]), int(img.shape[2])
    out = {"input.image": img.contiguous()}
    images, _ = model.transform([img])
    out["transform.image"] = images.tensors
    hs, ws = images.image_sizes[0]
    out["transform.size"] = torch.tensor([hs, ws], dtype=torch.int64)
    out["transform.padded_size"] = torch.tensor(list(images.tensors.shape[-2:]), dtype=torch.int64)
    out["original_size"] = torch.tensor([H, W], dtype=torch.int64)
    body = model.backbone.body(images.tensors)
    if full:
        for i, k in enumerate(body):
            out[f"body.c{i + 2}"] = body[k]
    feats = model.backbone.fpn(body)
    for k, v in feats.items():
        out[f"fpn.{k}"] = v

    cap = {}
    rpn = model.rpn
    orig_fp = rpn.filter_proposals

    def filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level):
        cap["rpn.logits"] = objectness.detach().reshape(-1).clone()
        boxes, scores = orig_fp(proposals, objectness, image_shapes, num_anchors_per_level)
        cap["rpn.proposals"], cap["rpn.scores"] = boxes[0], scores[0]
        return boxes, scores

    orig_head = rpn.head.forward

    def head_forward(x):
        logits, deltas = orig_head(x)
        from torchvision.models.detection.rpn import concat_box_prediction_layers
        _, d = concat_box_prediction_layers([lg.detach() for lg in logits], [dl.detach() for dl in deltas])
        cap["rpn.deltas"] = d.reshape(-1, 4).clone()
        return logits, deltas

    hooks = [
        model.roi_heads.box_head.register_forward_hook(lambda m, i, o: cap.__setitem__("box.features", o)),
        model.roi_heads.box_predictor.register_forward_hook(
            lambda m, i, o: cap.update({"box.logits": o[0], "box.deltas": o[1]})),
    ]
    rpn.filter_proposals = filter_proposals
    rpn.head.forward = head_forward
    try:
        proposals, _ = rpn(images, feats)
        dets, _ = model.roi_heads(feats, proposals, images.image_sizes)
    finally:
        del rpn.filter_proposals
        del rpn.head.forward
        for h in hooks:
            h.remove()
    out["rpn.logits"] = cap["rpn.logits"]
    if full:
        out["rpn.deltas"] = cap["rpn.deltas"]
    out["rpn.proposals"] = cap["rpn.proposals"]
    out["rpn.scores"] = cap["rpn.scores"]
    assert torch.equal(out["rpn.proposals"], proposals[0])
    out["box.logits"] = cap["box.logits"]
    out["box.deltas"] = cap["box.deltas"]
    if full:
        out["box.features"] = cap["box.features"]
    out["det.boxes_resized"] = dets[0]["boxes"].clone()
    post = model.transform.postprocess(dets, images.image_sizes, [(H, W)])[0]
    out["det.boxes"] = post["boxes"]
    out["det.scores"] = post["scores"]
    out["det.labels"] = post["labels"].to(torch.int64)

    # The staged run must equal torchvision's own forward.
    ref = model([img])[0]
    for k in ("boxes", "scores", "labels"):
        if not torch.equal(ref[k], post[k]):
            raise RuntimeError(f"staged run differs from model.forward in det.{k}")

    out = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v).contiguous() for k, v in out.items()}
    info = {
        "original_size": [H, W],
        "resized_size": [int(hs), int(ws)],
        "padded_size": list(images.tensors.shape[-2:]),
        "num_proposals": int(out["rpn.proposals"].shape[0]),
        "num_detections": int(out["det.scores"].shape[0]),
        "rpn_score_ties": _ties(out["rpn.scores"]),
        "det_score_ties": _ties(out["det.scores"]),
    }
    return out, info


def make_reference(model, cfg: dict, img_u8: np.ndarray, out_path: str, image_desc: str,
                   full=False, note=None, extra_meta=None):
    import torchvision
    tensors, info = run_reference(model, to_input(img_u8), full=full)
    info.update({"torch": torch.__version__, "torchvision": torchvision.__version__, "image": image_desc,
                 "device": "cpu", "threads": 1})
    meta = {mm.CONFIG_KEY: mm.config_json(cfg), REFERENCE_KEY: json.dumps(info)}
    if note:
        meta[NOTE_KEY] = note
    meta.update(extra_meta or {})
    mm.write_safetensors(out_path, tensors, meta)
    return tensors, info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="marrow .safetensors or torchvision .pth")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="image file (PNG/JPEG/...); alpha is dropped")
    src.add_argument("--synthetic", help="HxW: a deterministic synthetic RGB image")
    ap.add_argument("--seed", type=int, default=0, help="seed for --synthetic")
    ap.add_argument("--out", required=True)
    ap.add_argument("--min-size", type=int)
    ap.add_argument("--max-size", type=int)
    ap.add_argument("--eps", type=float, help="FrozenBN eps (only for .pth input; safetensors carry it)")
    ap.add_argument("--full", action="store_true", help="also dump body.c2..c5, rpn.deltas, box.features")
    ap.add_argument("--note", help="text for the marrow.fixture.note metadata key")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        ov = {}
        if a.min_size:
            ov["min_size"] = a.min_size
        if a.max_size:
            ov["max_size"] = a.max_size
        if a.weights.endswith(".safetensors"):
            model, cfg, arch, _ = mm.load_marrow(a.weights, {"transform": ov} if ov else None)
        else:
            cfg = mm.make_config(min_size=a.min_size or 800, max_size=a.max_size or 1333,
                                 eps=a.eps if a.eps is not None else 0.0)
            model, cfg, arch = mm.load_pth(a.weights, cfg)
        if a.image:
            img = load_image(a.image)
            desc = os.path.basename(a.image)
        else:
            h, w = (int(s) for s in a.synthetic.lower().split("x"))
            img = synthetic_image(h, w, a.seed)
            desc = f"synthetic {h}x{w} seed {a.seed}"
        tensors, info = make_reference(model, cfg, img, a.out, desc, full=a.full, note=a.note)
    except (mm.MarrowError, OSError, RuntimeError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    for k, v in tensors.items():
        print(f"  {k:22s} {str(v.dtype):14s} {list(v.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
