#!/usr/bin/env python3
"""Seeded, self-contained fixtures for the refinement head's GPU tests (tests/fixtures/refine/).

    python3 weights/make_refine_fixture.py [--out tests/fixtures/refine] [--case NAME ...]
    python3 weights/make_refine_fixture.py --check [--out tests/fixtures/refine]

Each case file is a safetensors file that needs no torch at test time (format: docs/refinement.md
and tests/fixtures/refine/README.md): metadata `marrow.refine_fixture` = JSON {cell, hidden, key,
steps, stop_threshold, nms_thresh, num_classes, fpn_channels, representation, resized, orig,
detections_per_img, case, seed}; tensors fpn.0..fpn.3 [1,C,h,w], input.boxes [D,4] (resized
coords), input.labels [D] I32, input.scores [D], input.features [D,R], the head's parameters
refine.* (F32), and the expected outputs expect.step_boxes [T,D,4], expect.stop_prob [T,D],
expect.attention [T,D,49], expect.stop_step [D] I32, expect.hidden [D,H], expect.logits [D,N],
expect.boxes [M,4] (original coords), expect.scores [M], expect.labels [M] I32.

Inputs and parameters are drawn with numpy's PCG64 (version-stable) and rounded to f32; the
expected outputs are computed from those f32 values by refine.RefineHead in float64 and stored as
f32. A draw is rejected (the next seed is tried) unless it is numerically robust for an f32 GPU:
every stop probability at least 2e-3 from the threshold, every IoU between two same-class final
candidates at least 1e-3 from nms_thresh, all terminal scores at least 1e-5 apart, the top-2 gap of
every terminal class distribution (classes >= 1) at least 1e-4, every box fed to RoIAlign at least
0.1 % (in sqrt(area)) from a level-mapper boundary (112, 224, 448 px), every final box at least
0.1 px wide and high; plus each case's own shape requirement (which stop steps occur, NMS
suppresses something, clipping acts). --check regenerates every committed case from its recorded
seed and compares: inputs and parameters bit for bit, expected floats to 1e-6 relative (float64
libm may differ in the last bit between torch builds), integers exactly.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zlib
from collections import OrderedDict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import marrow_model as mm  # noqa: E402
import refine as rf  # noqa: E402

META_KEY = "marrow.refine_fixture"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "refine")
N_CLASSES = 4
REPRESENTATION = 24
DETS_PER_IMG = 100

# name: cell, hidden H, key K, steps T, detections D, FPN width C, resized (h, w), original (h, w),
# kind (the shape requirement, see accept()), base seed.
CASES = OrderedDict([
    ("gru_mix", dict(cell="gru", H=13, K=12, T=3, D=20, C=16, resized=(200, 256), orig=(300, 384), kind="mix")),
    ("lstm_mix", dict(cell="lstm", H=30, K=9, T=3, D=20, C=8, resized=(200, 256), orig=(250, 400), kind="mix",
                         stop_scale=15.0, cls_scale=15.0)),
    ("gru_allstop", dict(cell="gru", H=7, K=20, T=3, D=12, C=8, resized=(120, 160), orig=(180, 240), kind="allstop")),
    ("lstm_nostop", dict(cell="lstm", H=13, K=9, T=3, D=12, C=8, resized=(200, 256), orig=(300, 384), kind="nostop",
                            cls_scale=15.0)),
    ("gru_single", dict(cell="gru", H=30, K=12, T=5, D=1, C=8, resized=(160, 96), orig=(240, 144), kind="single")),
    ("lstm_many", dict(cell="lstm", H=7, K=20, T=5, D=100, C=8, resized=(200, 256), orig=(300, 384), kind="many",
                          stop_scale=80.0, cls_scale=30.0)),
    ("gru_t1", dict(cell="gru", H=16, K=8, T=1, D=15, C=8, resized=(200, 256), orig=(300, 384), kind="free")),
    ("lstm_zero", dict(cell="lstm", H=13, K=12, T=3, D=0, C=8, resized=(100, 128), orig=(150, 192), kind="free")),
])
BASE_SEED = 20261202

# Margins (docs/refinement.md "Fixtures").
STOP_MARGIN = 2e-3
IOU_MARGIN = 1e-3
SCORE_GAP = 1e-5
TOP2_GAP = 1e-4
LEVEL_MARGIN = 1e-3
LEVEL_BOUNDS = (112.0, 224.0, 448.0)
MIN_SIDE = 0.1


def fpn_shapes(resized):
    """Level shapes of a torchvision FPN for an image padded to multiples of 32."""
    hp, wp = (int(math.ceil(s / 32.0)) * 32 for s in resized)
    return [(hp // s, wp // s) for s in (4, 8, 16, 32)]


def draw_boxes(rng, D, resized, kind):
    """D boxes in resized coords: sqrt(area) log-uniform in 8..200 px (clipped to the image),
    aspect 1:2..2:1, centres anywhere (so some touch the borders), a few near-duplicates (NMS has
    something to suppress once labels change) and, when it fits, one near-full-image box (level
    index 2)."""
    h, w = resized
    out = []
    while len(out) < D:
        if out and rng.uniform() < 0.15:  # near-duplicate of an earlier box
            b = np.array(out[rng.integers(len(out))]) + rng.uniform(-3, 3, 4)
        elif len(out) == 1 and kind in ("mix", "many") and h * w > 50176 * 1.01:
            b = np.array([rng.uniform(0, .5), rng.uniform(0, .5), w - rng.uniform(0, .5), h - rng.uniform(0, .5)])
        else:
            s = math.exp(rng.uniform(math.log(8), math.log(200)))
            ar = math.exp(rng.uniform(-math.log(2), math.log(2)))
            bw, bh = s * math.sqrt(ar), s / math.sqrt(ar)
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            b = np.array([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
        b = np.array([np.clip(b[0], 0, w), np.clip(b[1], 0, h), np.clip(b[2], 0, w), np.clip(b[3], 0, h)])
        if b[2] - b[0] < 4 or b[3] - b[1] < 4:
            continue
        out.append(b)
    return np.array(out, dtype=np.float64).reshape(D, 4)


def draw_case(name: str, seed: int):
    """(spec, tensors in file order without expectations, head f32)."""
    c = CASES[name]
    rng = np.random.default_rng([BASE_SEED, zlib.crc32(name.encode()), int(seed)])
    C, D, R, N = c["C"], c["D"], REPRESENTATION, N_CLASSES
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    t = OrderedDict()
    for i, (fh, fw) in enumerate(fpn_shapes(c["resized"])):
        t[f"fpn.{i}"] = f32(rng.standard_normal((1, C, fh, fw)))
    boxes = draw_boxes(rng, D, c["resized"], c["kind"])
    t["input.boxes"] = f32(boxes)
    t["input.labels"] = torch.from_numpy(rng.integers(1, N, size=D).astype(np.int32))
    t["input.scores"] = f32(np.sort(rng.uniform(0.05, 1.0, size=D))[::-1])
    t["input.features"] = f32(np.maximum(rng.standard_normal((D, R)) * 1.5, 0.0))
    head = rf.RefineHead(C, R, N, c["cell"], c["H"], c["K"], c["T"], 0.5, 0.5, DETS_PER_IMG)
    # PyTorch default init, scaled: larger key/query (attention visibly non-uniform), deltas (boxes
    # move a few px per step), stop (a spread of stop probabilities) and cls (a clear class decision).
    ss = c.get("stop_scale", 6.0)  # LSTM hidden states are smaller: larger scale there
    scales = {"key.weight": 3.0, "query.weight": 3.0, "delta.weight": 3.0, "delta.bias": 2.0,
              "stop.weight": ss, "cls.weight": c.get("cls_scale", 5.0)}
    if c["kind"] == "allstop":
        scales["stop.bias"] = ("const", 12.0)
    elif c["kind"] == "nostop":
        scales["stop.bias"] = ("const", -12.0)
    else:
        scales["stop.bias"] = ("const", float(rng.uniform(-1.5, 0.0)) * ss / 6.0)
    rf.init_params_numpy(head, rng, scales, beta=float(rng.uniform(1.0, 2.0)))
    for k, v in head.marrow_tensors().items():
        t[k] = v
    spec = {"cell": c["cell"], "hidden": c["H"], "key": c["K"], "steps": c["T"], "stop_threshold": 0.5,
            "nms_thresh": 0.5, "num_classes": N, "fpn_channels": C, "representation": R,
            "resized": list(c["resized"]), "orig": list(c["orig"]), "detections_per_img": DETS_PER_IMG,
            "case": name, "seed": int(seed)}
    return spec, t, head.eval()


@torch.no_grad()
def expected(spec, t, head):
    """The head in float64 on the f32 inputs; returns (expect tensors (f32/i32), f64 details)."""
    h64 = head.double()
    fpn = OrderedDict((str(i), t[f"fpn.{i}"].double()) for i in range(4))
    out, dbg = h64(fpn, tuple(spec["resized"]), t["input.boxes"].double(), t["input.features"].double(),
                   orig_size=tuple(spec["orig"]))
    e = OrderedDict()
    e["expect.step_boxes"] = dbg["step_boxes"]
    e["expect.stop_prob"] = dbg["stop_prob"]
    e["expect.attention"] = dbg["attention"]
    e["expect.stop_step"] = dbg["stop_step"].to(torch.int32)
    e["expect.hidden"] = dbg["hidden"]
    e["expect.logits"] = dbg["logits"]
    e["expect.boxes"] = out["boxes"]
    e["expect.scores"] = out["scores"]
    e["expect.labels"] = out["labels"].to(torch.int32)
    e = OrderedDict((k, (v.to(torch.float32) if v.is_floating_point() else v).contiguous()) for k, v in e.items())
    return e, (out, dbg)


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / u if u > 0 else 0.0


def accept(spec, t, details):
    """None when the draw is robust and has the case's shape, else the reason to re-draw."""
    out, dbg = details
    kind = CASES[spec["case"]]["kind"]
    T, thr = spec["steps"], spec["stop_threshold"]
    D = t["input.boxes"].shape[0]
    st = dbg["stop_step"].numpy()
    sp = dbg["stop_prob"].numpy()
    sb = dbg["step_boxes"].numpy()
    b0 = t["input.boxes"].double().numpy()
    # stop probabilities (every step a detection was still active in)
    for i in range(D):
        last = st[i] if st[i] > 0 else T
        for k in range(last):
            if abs(sp[k, i] - thr) < STOP_MARGIN:
                return f"stop prob {sp[k, i]:.6f} of det {i} at step {k + 1} is near {thr}"
    # level mapper: every box RoIAlign sees (b_0 .. b_{T-1})
    fed = [b0] + [sb[k] for k in range(T - 1)]
    for k, bb in enumerate(fed):
        for i in range(D):
            s = math.sqrt(max(0.0, (bb[i, 2] - bb[i, 0]) * (bb[i, 3] - bb[i, 1])))
            for lb in LEVEL_BOUNDS:
                if abs(s - lb) < LEVEL_MARGIN * lb:
                    return f"box {i} at step {k + 1} has sqrt(area) {s:.4f}, near the level boundary {lb}"
    fb = dbg["boxes"].numpy()
    if D and (np.min(fb[:, 2] - fb[:, 0]) < MIN_SIDE or np.min(fb[:, 3] - fb[:, 1]) < MIN_SIDE):
        return "a final box is degenerate"
    lab = dbg["labels"].numpy()
    for i in range(D):
        for j in range(i + 1, D):
            if lab[i] == lab[j] and abs(_iou(fb[i], fb[j]) - spec["nms_thresh"]) < IOU_MARGIN:
                return f"IoU of dets {i}, {j} (class {lab[i]}) is near nms_thresh"
    sc = np.sort(dbg["scores"].numpy())
    if D > 1 and np.min(np.diff(sc)) < SCORE_GAP:
        return "two terminal scores are within 1e-5"
    if D:
        p = np.sort(dbg["probs"].numpy()[:, 1:], axis=1)
        if np.min(p[:, -1] - p[:, -2]) < TOP2_GAP:
            return "a terminal class top-2 gap is below 1e-4"
    M = out["scores"].shape[0]
    n = {s: int(np.sum(st == s)) for s in range(T + 1)}
    clipped = bool(np.any(sb[..., 0] == 0) or np.any(sb[..., 1] == 0)
                   or np.any(sb[..., 2] == spec["resized"][1]) or np.any(sb[..., 3] == spec["resized"][0]))
    if kind == "mix":
        if n[1] < 2 or n[2] < 2 or n[0] < 2:
            return f"mix needs >= 2 detections stopping at step 1, at step 2 and never (got {n})"
        if M >= D:
            return "mix: NMS suppressed nothing"
        if not clipped:
            return "mix: clipping never acted"
    elif kind == "many":
        if sum(1 for s in range(T + 1) if n[s] >= 3) < 4:
            return f"many needs >= 4 stop steps (incl. never) with >= 3 detections each (got {n})"
        if M >= D:
            return "many: NMS suppressed nothing"
        if not clipped:
            return "many: clipping never acted"
    elif kind == "allstop" and n[1] != D:
        return "allstop: not every detection stopped at step 1"
    elif kind == "nostop" and n[0] != D:
        return "nostop: a detection stopped"
    elif kind == "single" and n[1] == 1:
        return "single: should run past step 1"
    if D >= 10 and np.sort(np.bincount(lab, minlength=spec["num_classes"]))[-2] < D // 10:
        return "(almost) every detection got the same class"
    if D:
        moved = np.abs(sb[0] - b0).max(axis=1)
        if np.median(moved) < 0.5:
            return f"boxes hardly move (median max |step-1 move| {np.median(moved):.3f} px)"
    return None


def build(name, seed=None, max_tries=2000, log=print):
    """(tensors, meta, seed, tries) for a case: the first robust seed >= the given one (default 0)."""
    s0 = 0 if seed is None else int(seed)
    for k in range(max_tries):
        spec, t, head = draw_case(name, s0 + k)
        e, det = expected(spec, t, head)
        why = accept(spec, t, det)
        if why is None:
            t.update(e)
            return t, {META_KEY: json.dumps(spec, separators=(",", ":"))}, s0 + k, k + 1
    raise RuntimeError(f"{name}: no robust draw in {max_tries} tries (last: {why})")


def summary(name, t):
    st = t["expect.stop_step"]
    D = int(t["input.boxes"].shape[0])
    mv = (t["expect.step_boxes"][0] - t["input.boxes"]).abs().amax(1) if D else torch.zeros(0)
    att = t["expect.attention"].amax(-1) if D else torch.zeros(0)
    return (f"{name}: D={D} M={int(t['expect.scores'].shape[0])} stop_step counts "
            f"{torch.bincount(st.long(), minlength=int(t['expect.step_boxes'].shape[0]) + 1).tolist()} "
            f"step-1 move median {float(mv.median()) if D else 0:.2f} px, max attention median "
            f"{float(att.median()) if D else 0:.3f}, labels {t['expect.labels'].tolist()[:12]}")


def check(out_dir, names, log=print) -> int:
    bad = 0
    for name in names:
        path = os.path.join(out_dir, f"{name}.safetensors")
        if not os.path.exists(path):
            log(f"{name}: MISSING {path}")
            bad += 1
            continue
        got, meta = mm.read_safetensors(path)
        spec = json.loads(meta[META_KEY])
        spec2, t, head = draw_case(name, spec["seed"])
        e, det = expected(spec2, t, head)
        why = accept(spec2, t, det)
        t.update(e)
        errs = []
        if spec2 != spec:
            errs.append(f"metadata {spec} != regenerated {spec2}")
        if why is not None:
            errs.append(f"regenerated draw is not robust: {why}")
        if set(got) != set(t):
            errs.append(f"tensor names differ: {sorted(set(got) ^ set(t))}")
        for k, v in t.items():
            if k not in got:
                continue
            g = got[k]
            if g.dtype != v.dtype or tuple(g.shape) != tuple(v.shape):
                errs.append(f"{k}: {g.dtype}{list(g.shape)} vs regenerated {v.dtype}{list(v.shape)}")
            elif k.startswith("expect.") and v.is_floating_point():
                if v.numel():
                    d = float((g.double() - v.double()).abs().max())
                    ref = float(v.double().abs().max())
                    if d > 1e-6 * max(ref, 1.0):
                        errs.append(f"{k}: max |diff| {d:.3g} (max |ref| {ref:.3g})")
            elif not torch.equal(g, v):
                errs.append(f"{k}: differs")
        log(f"{name}: {'OK' if not errs else 'FAIL'}" + "".join(f"\n  {x}" for x in errs))
        bad += bool(errs)
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--case", action="append", choices=list(CASES), help="only these cases (repeatable)")
    ap.add_argument("--check", action="store_true", help="verify the files in --out reproduce")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = a.case or list(CASES)
    if a.check:
        bad = check(a.out, names)
        return 1 if bad else 0
    total = 0
    for name in names:
        t, meta, seed, tries = build(name)
        path = os.path.join(a.out, f"{name}.safetensors")
        mm.write_safetensors(path, t, meta)
        total += os.path.getsize(path)
        print(f"{summary(name, t)}; seed {seed} ({tries} draws); {os.path.getsize(path)} bytes")
    print(f"total {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
