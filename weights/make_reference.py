#!/usr/bin/env python3
"""Write a reference dump (docs/design.md §5) of torchvision's Faster R-CNN on one image.

    python weights/make_reference.py --weights W.safetensors|W.pth (--image IMG | --synthetic HxW --seed S)
        --out R.safetensors [--min-size N] [--max-size N] [--eps E] [--full] [--note TEXT]
        [--no-refine] [--float64-floor]

CPU, float32, torch.set_num_threads(1), eval mode. Tensors (NCHW, f32 unless said):
  input.image [3,H,W] (uint8/255, RGB, alpha dropped), transform.image [1,3,Hp,Wp],
  transform.size [2] i64, fpn.0..fpn.3, fpn.pool, rpn.proposals [K,4], rpn.scores [K]
  (sigmoid of the kept objectness logits), box.logits [K,C], box.deltas [K,4C],
  det.boxes [D,4] (original-image coords) det.scores [D] det.labels [D] i64.
Extras: rpn.logits [A] (all anchors' objectness logits, torchvision's concat order),
  det.boxes_resized [D,4] (before transform.postprocess), transform.padded_size [2] i64,
  original_size [2] i64; with --full also body.c2..body.c5, rpn.deltas [A,4], box.features [K,R]
  (TwoMLPHead output).
Refinement head (docs/design.md §6, docs/refinement.md): when the weights carry one (refine.*
  tensors + config `refine`) and --no-refine is not given, weights/refine.py runs it on the box
  head's detections and the dump also holds refine.boxes [M,4] (original-image coords),
  refine.scores [M], refine.labels [M] i64 and the debug stages refine.input.boxes [D,4] (resized
  coords), refine.input.labels [D] i64, refine.input.scores [D], refine.input.features [D,R]
  (TwoMLPHead output of each detection's proposal), refine.input.proposal_index [D] i64,
  refine.step_boxes [T,D,4], refine.stop_prob [T,D], refine.attention [T,D,49],
  refine.stop_step [D] i64 (1-based, 0 = never), refine.logits [D,N], refine.hidden [D,H].
  The proposal index comes from a re-implementation of torchvision's postprocess_detections that
  keeps it; the run asserts that it reproduces torchvision's detections bit for bit.
Metadata: marrow.config (as used), marrow.reference = JSON {torch, torchvision, image, original_size,
  resized_size, padded_size, ties...}; marrow.fixture.note when --note is given.

Float64 floor (--float64-floor): "validate must not cry wolf". The whole model (and head) runs a
second time in float64 (model.double(), the same input image widened), and for every dumped
floating-point stage whose float64 counterpart lines up, torch's own float32 error is recorded as
the relative L2  ||f32 - f64|| / ||f64||  (computed in float64) in the metadata key
marrow.reference.floor = JSON {stage: rel L2}. A validator can then never demand more of marrow
than torch's own f32 achieves: a stage's tolerance should not be below a small multiple of its
floor. Stages that cannot be compared are listed with the reason in
marrow.reference.floor_skipped = JSON {stage: reason}: integer stages ("integer: equal" or
"integer: N differ"), empty ones, and set-valued stages whose rows do not line up: rpn.proposals /
rpn.scores (and box.logits, box.deltas, box.features, which are per proposal) need the same count
and every row's f32 box at IoU >= 0.99 with the f64 box of the same row; det.* and refine.input.*
the same for the detections plus equal labels; refine.boxes / refine.scores the same for the
refined detections. refine.step_boxes & co. are compared whenever the detections line up; if the
f32 and f64 runs took different stop decisions, the floor includes that and the reason list says
"note: stop_step differs for n detections".
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
import refine as rf  # noqa: E402

REFERENCE_KEY = "marrow.reference"
FLOOR_KEY = "marrow.reference.floor"
FLOOR_SKIPPED_KEY = "marrow.reference.floor_skipped"
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
def run_reference(model, img: torch.Tensor, full: bool = False, head=None, keep_dtype=False):
    """Runs the model stage by stage; returns (tensors, info). Checks the staged run against
    model([img]) so the dump is exactly what torchvision's forward produces. With `head` (a
    refine.RefineHead in the model's dtype) also the refine.* stages. Floating-point outputs are
    f32 unless keep_dtype (the float64 floor run)."""
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
    if head is not None:
        size = (int(hs), int(ws))
        b, sc, lb, pidx = rf.postprocess_with_index(model.roi_heads, cap["box.logits"], cap["box.deltas"],
                                                    proposals[0], size)
        if not (torch.equal(b, out["det.boxes_resized"]) and torch.equal(sc, post["scores"])
                and torch.equal(lb, post["labels"])):
            raise RuntimeError("proposal-index postprocess differs from torchvision's detections")
        f = cap["box.features"][pidx]
        res, dbg = head(feats, size, b, f, orig_size=(H, W), pooler=model.roi_heads.box_roi_pool)
        out["refine.boxes"] = res["boxes"]
        out["refine.scores"] = res["scores"]
        out["refine.labels"] = res["labels"].to(torch.int64)
        out["refine.input.boxes"] = b
        out["refine.input.labels"] = lb.to(torch.int64)
        out["refine.input.scores"] = sc
        out["refine.input.features"] = f
        out["refine.input.proposal_index"] = pidx.to(torch.int64)
        out["refine.step_boxes"] = dbg["step_boxes"]
        out["refine.stop_prob"] = dbg["stop_prob"]
        out["refine.attention"] = dbg["attention"]
        out["refine.stop_step"] = dbg["stop_step"].to(torch.int64)
        out["refine.logits"] = dbg["logits"]
        out["refine.hidden"] = dbg["hidden"]

    # The staged run must equal torchvision's own forward.
    ref = model([img])[0]
    for k in ("boxes", "scores", "labels"):
        if not torch.equal(ref[k], post[k]):
            raise RuntimeError(f"staged run differs from model.forward in det.{k}")

    out = {k: (v.detach().to(torch.float32) if v.is_floating_point() and not keep_dtype else v.detach()).contiguous()
           for k, v in out.items()}
    info = {
        "original_size": [H, W],
        "resized_size": [int(hs), int(ws)],
        "padded_size": list(images.tensors.shape[-2:]),
        "num_proposals": int(out["rpn.proposals"].shape[0]),
        "num_detections": int(out["det.scores"].shape[0]),
        "rpn_score_ties": _ties(out["rpn.scores"]),
        "det_score_ties": _ties(out["det.scores"]),
    }
    if head is not None:
        info["refine"] = dict(head.config(), num_input=int(out["refine.input.boxes"].shape[0]),
                              num_output=int(out["refine.scores"].shape[0]),
                              stop_step_counts=torch.bincount(out["refine.stop_step"],
                                                              minlength=head.steps + 1).tolist())
    return out, info


def _rows_match(a: torch.Tensor, b: torch.Tensor, thr=0.99) -> bool:
    """Same count and row i of a at IoU >= thr with row i of b (boxes [n,4])."""
    from torchvision.ops import box_iou
    if a.shape != b.shape:
        return False
    if a.shape[0] == 0:
        return True
    iou = box_iou(a.double(), b.double()).diagonal()
    return bool((iou >= thr).all())


def float64_floor(t32: dict, t64: dict):
    """({stage: rel L2 of f32 vs f64}, {stage: reason skipped}) over the stages of t32; see the
    module docstring for the rules."""
    floor, skipped = {}, {}
    props = "rpn.proposals" in t64 and _rows_match(t32["rpn.proposals"], t64["rpn.proposals"])
    dets = _rows_match(t32["det.boxes"], t64["det.boxes"]) and torch.equal(t32["det.labels"], t64["det.labels"])
    refd = ("refine.boxes" in t32 and "refine.boxes" in t64 and _rows_match(t32["refine.boxes"], t64["refine.boxes"])
            and torch.equal(t32["refine.labels"], t64["refine.labels"]))
    for k, a in t32.items():
        b = t64.get(k)
        if b is None:
            skipped[k] = "no float64 counterpart"
            continue
        if not a.is_floating_point():
            if a.shape == b.shape:
                n = int((a != b).sum())
                skipped[k] = "integer: equal" if n == 0 else f"integer: {n} differ"
            else:
                skipped[k] = f"integer: shapes differ {list(a.shape)} vs {list(b.shape)}"
            continue
        if k in ("rpn.proposals", "rpn.scores", "box.logits", "box.deltas", "box.features") and not props:
            skipped[k] = "proposals differ between f32 and f64 (count or order)"
            continue
        if (k.startswith("det.") or (k.startswith("refine.") and k not in ("refine.boxes", "refine.scores"))) \
                and not dets:
            skipped[k] = "detections differ between f32 and f64 (count, order or labels)"
            continue
        if k in ("refine.boxes", "refine.scores") and not refd:
            skipped[k] = "refined detections differ between f32 and f64 (count, order or labels)"
            continue
        if a.shape != b.shape:
            skipped[k] = f"shapes differ {list(a.shape)} vs {list(b.shape)}"
            continue
        if a.numel() == 0:
            skipped[k] = "empty"
            continue
        a64, b64 = a.double(), b.double()
        den = float(torch.linalg.vector_norm(b64))
        num = float(torch.linalg.vector_norm(a64 - b64))
        if den == 0.0:
            if num == 0.0:
                floor[k] = 0.0
            else:
                skipped[k] = f"float64 stage is all zero, f32 differs by {num:.3g} (L2)"
            continue
        floor[k] = num / den
    if "refine.stop_step" in t32 and "refine.stop_step" in t64 and t32["refine.stop_step"].shape == t64["refine.stop_step"].shape:
        n = int((t32["refine.stop_step"] != t64["refine.stop_step"]).sum())
        if n:
            skipped["refine.stop_step"] = f"note: stop_step differs for {n} detections (floor of refine.* includes it)"
    return floor, skipped


def make_reference(model, cfg: dict, img_u8: np.ndarray, out_path: str, image_desc: str,
                   full=False, note=None, extra_meta=None, refine=True, floor=False):
    """Write the dump. refine: run the weights' refinement head when they carry one (cfg["refine"]
    and model.marrow_refine from marrow_model.load_marrow). floor: add the float64 floor."""
    import copy

    import torchvision
    head = rf.head_from_model(model, cfg) if refine else None
    img = to_input(img_u8)
    tensors, info = run_reference(model, img, full=full, head=head)
    info.update({"torch": torch.__version__, "torchvision": torchvision.__version__, "image": image_desc,
                 "device": "cpu", "threads": 1})
    if cfg.get("refine") is not None and head is None:
        info["refine"] = "not run (--no-refine)"
    meta = {mm.CONFIG_KEY: mm.config_json(cfg), REFERENCE_KEY: json.dumps(info)}
    if floor:
        m64 = copy.deepcopy(model).double()
        h64 = copy.deepcopy(head).double() if head is not None else None
        t64, _ = run_reference(m64, img.double(), full=full, head=h64, keep_dtype=True)
        fl, sk = float64_floor(tensors, t64)
        meta[FLOOR_KEY] = json.dumps(fl, separators=(",", ":"))
        meta[FLOOR_SKIPPED_KEY] = json.dumps(sk, separators=(",", ":"))
        info["float64_floor"] = {"stages": len(fl), "skipped": len(sk)}
    meta[REFERENCE_KEY] = json.dumps(info)
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
    ap.add_argument("--no-refine", action="store_true", help="do not run the weights' refinement head")
    ap.add_argument("--float64-floor", action="store_true",
                    help="also run in float64 and record torch's own f32 error per stage (marrow.reference.floor)")
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
        tensors, info = make_reference(model, cfg, img, a.out, desc, full=a.full, note=a.note,
                                       refine=not a.no_refine, floor=a.float64_floor)
    except (mm.MarrowError, OSError, RuntimeError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    for k, v in tensors.items():
        print(f"  {k:22s} {str(v.dtype):14s} {list(v.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
