#!/usr/bin/env python3
"""Self-tests of the refinement head's Python side (CPU, ~1-2 min):

    python3 weights/test_refine.py [--data TXL-PBC] [--weights weights/marrow-txlpbc-compact.safetensors]

1. RefineHead's state_dict names and shapes are docs/design.md §6's, for a GRU and an LSTM cell,
   and marrow_tensors() writes them in §6 order.
2. An independent numpy float64 implementation of §6 (RoIAlign from docs/torchvision-semantics.md
   §8.4, the level mapper of §8.2, PyTorch's GRUCell / LSTMCell equations, BoxCoder decode, clip,
   greedy per-class NMS, resize_boxes) reproduces every committed fixture in
   tests/fixtures/refine/, and the fixtures regenerate (make_refine_fixture --check).
3. detect_refined on the built-in model with zero detections (box score threshold 1.0) gives zero
   refined detections and empty debug tensors of the right shapes.
4. The proposal-index recovery: on 2 TXL-PBC val images (--data, the dataset's YOLO layout with
   images/val; without it 2 synthetic images) detect_refined's detections equal torchvision's
   model([img]) bit for bit, and every detection's box is exactly its proposal decoded with its
   class's deltas and clipped.
5. add_refine_head + load_marrow round trip (f32 and --half), convert.py with a head, and the
   refine config / shape errors.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import math
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import add_refine_head  # noqa: E402
import convert  # noqa: E402
import make_reference as mr  # noqa: E402
import make_refine_fixture as mrf  # noqa: E402
import marrow_model as mm  # noqa: E402
import refine as rf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BUILTIN = os.path.join(HERE, "marrow-txlpbc-compact.safetensors")

SEC6 = [  # docs/design.md §6, verbatim order; G*H written as ("G", k)
    ("init.weight", ("H", "R")), ("init.bias", ("H",)),
    ("key.weight", ("K", "C")), ("key.bias", ("K",)),
    ("value.weight", ("K", "C")), ("value.bias", ("K",)),
    ("query.weight", ("K", "H")), ("query.bias", ("K",)),
    ("beta", (1,)),
    ("cell.weight_ih", ("GH", "K")), ("cell.weight_hh", ("GH", "H")),
    ("cell.bias_ih", ("GH",)), ("cell.bias_hh", ("GH",)),
    ("delta.weight", (4, "H")), ("delta.bias", (4,)),
    ("stop.weight", (1, "H")), ("stop.bias", (1,)),
    ("critic.weight", (1, "H")), ("critic.bias", (1,)),
    ("cls.weight", ("N", "H")), ("cls.bias", ("N",)),
]


def check_names():
    for cell, G in (("gru", 3), ("lstm", 4)):
        C, R, N, H, K = 16, 24, 4, 13, 9
        head = rf.RefineHead(C, R, N, cell, H, K, 3)
        dims = {"H": H, "K": K, "C": C, "R": R, "N": N, "GH": G * H}
        want = [(n, tuple(dims.get(d, d) for d in s)) for n, s in SEC6]
        got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        assert got == dict(want), (cell, got)
        assert [(k, tuple(v.shape)) for k, v in head.marrow_tensors().items()] == \
            [("refine." + n, s) for n, s in want]
        assert [(n, tuple(s)) for n, s in mm.refine_tensor_shapes(head.config(), head.arch())] == \
            [("refine." + n, s) for n, s in want]
        assert float(head.beta.detach()) == 1.0
    print("state_dict names / shapes = design §6 (gru, lstm) OK")


# ---------------------------------------------------------------------------------------------
# an independent numpy float64 implementation


def np_roi_align(feat, scale, box, P=7, sr=2):
    """docs/torchvision-semantics.md §8.4 (aligned=False), feat [C,H,W] -> [P*P, C]."""
    C, H, W = feat.shape
    sx, sy, ex, ey = box[0] * scale, box[1] * scale, box[2] * scale, box[3] * scale
    rw, rh = max(ex - sx, 1.0), max(ey - sy, 1.0)
    bw, bh = rw / P, rh / P
    out = np.zeros((P * P, C))
    for ph in range(P):
        for pw in range(P):
            acc = np.zeros(C)
            for iy in range(sr):
                y = sy + ph * bh + (iy + 0.5) * bh / sr
                for ix in range(sr):
                    x = sx + pw * bw + (ix + 0.5) * bw / sr
                    if y < -1.0 or y > H or x < -1.0 or x > W:
                        continue
                    yy, xx = max(y, 0.0), max(x, 0.0)
                    y0, x0 = int(yy), int(xx)
                    if y0 >= H - 1:
                        y0 = y1 = H - 1
                        yy = float(y0)
                    else:
                        y1 = y0 + 1
                    if x0 >= W - 1:
                        x0 = x1 = W - 1
                        xx = float(x0)
                    else:
                        x1 = x0 + 1
                    ly, lx = yy - y0, xx - x0
                    hy, hx = 1 - ly, 1 - lx
                    acc += hy * hx * feat[:, y0, x0] + hy * lx * feat[:, y0, x1] \
                        + ly * hx * feat[:, y1, x0] + ly * lx * feat[:, y1, x1]
            out[ph * P + pw] = acc / (sr * sr)
    return out


def np_level(box):
    s = math.sqrt(max((box[2] - box[0]) * (box[3] - box[1]), 0.0))
    if s == 0:
        return 0
    lvl = math.floor(4 + math.log2(s / 224) + 1e-6)
    return min(max(lvl, 2), 5) - 2


def sig(x):
    return 1 / (1 + np.exp(-x))


def np_head(spec, t):
    """The §6 recurrence + postprocess in numpy float64 from a fixture's tensors."""
    g = {k[len("refine."):]: v.double().numpy() for k, v in t.items() if k.startswith("refine.")}
    fpn = [t[f"fpn.{i}"].double().numpy()[0] for i in range(4)]
    rh, rw = spec["resized"]
    scales = [2.0 ** round(math.log2(f.shape[1] / rh)) for f in fpn]
    boxes = t["input.boxes"].double().numpy().copy()
    feats = t["input.features"].double().numpy()
    D, T, H, K = boxes.shape[0], spec["steps"], spec["hidden"], spec["key"]
    lstm = spec["cell"] == "lstm"
    sb, sp, at = np.zeros((T, D, 4)), np.zeros((T, D)), np.zeros((T, D, 49))
    stop = np.zeros(D, dtype=np.int64)
    hid = np.zeros((D, H))
    logits = np.zeros((D, spec["num_classes"]))
    clip = math.log(1000.0 / 16)
    for i in range(D):
        h = np.tanh(g["init.weight"] @ feats[i] + g["init.bias"])
        c = np.zeros(H)
        b = boxes[i]
        stopped = False
        for t_ in range(T):
            if stopped:
                sb[t_, i], sp[t_, i], at[t_, i] = sb[t_ - 1, i], sp[t_ - 1, i], at[t_ - 1, i]
                continue
            lv = np_level(b)
            X = np_roi_align(fpn[lv], scales[lv], b)  # [49, C]
            Kt = X @ g["key.weight"].T + g["key.bias"]
            Vt = X @ g["value.weight"].T + g["value.bias"]
            q = g["query.weight"] @ h + g["query.bias"]
            z = g["beta"][0] * (Kt @ q) / math.sqrt(K)
            a = np.exp(z - z.max())
            a /= a.sum()
            ctx = a @ Vt
            gi = g["cell.weight_ih"] @ ctx + g["cell.bias_ih"]
            gh = g["cell.weight_hh"] @ h + g["cell.bias_hh"]
            if lstm:  # gates i, f, g, o
                ii, ff = sig(gi[:H] + gh[:H]), sig(gi[H:2 * H] + gh[H:2 * H])
                gg, oo = np.tanh(gi[2 * H:3 * H] + gh[2 * H:3 * H]), sig(gi[3 * H:] + gh[3 * H:])
                c = ff * c + ii * gg
                h = oo * np.tanh(c)
            else:  # gates r, z, n
                r, zz = sig(gi[:H] + gh[:H]), sig(gi[H:2 * H] + gh[H:2 * H])
                n = np.tanh(gi[2 * H:] + r * gh[2 * H:])
                h = (1 - zz) * n + zz * h
            d = g["delta.weight"] @ h + g["delta.bias"]
            w_, h_ = b[2] - b[0], b[3] - b[1]
            cx, cy = b[0] + 0.5 * w_, b[1] + 0.5 * h_
            dx, dy, dw, dh = d[0] / 10, d[1] / 10, min(d[2] / 5, clip), min(d[3] / 5, clip)
            pcx, pcy, pw, ph = dx * w_ + cx, dy * h_ + cy, math.exp(dw) * w_, math.exp(dh) * h_
            b = np.array([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph])
            b = np.array([min(max(b[0], 0), rw), min(max(b[1], 0), rh), min(max(b[2], 0), rw), min(max(b[3], 0), rh)])
            s = sig(g["stop.weight"] @ h + g["stop.bias"])[0]
            sb[t_, i], sp[t_, i], at[t_, i] = b, s, a
            if s > spec["stop_threshold"]:
                stop[i], stopped = t_ + 1, True
        hid[i] = h
        logits[i] = g["cls.weight"] @ h + g["cls.bias"]
    p = np.exp(logits - logits.max(1, keepdims=True)) if D else logits
    p = p / p.sum(1, keepdims=True) if D else p
    lab = (np.argmax(p[:, 1:], 1) + 1) if D else np.zeros(0, dtype=np.int64)
    score = p[np.arange(D), lab] if D else np.zeros(0)
    fb = sb[-1] if D else np.zeros((0, 4))
    ok = [i for i in range(D) if fb[i, 2] - fb[i, 0] >= 1e-2 and fb[i, 3] - fb[i, 1] >= 1e-2]
    order = sorted(ok, key=lambda i: -score[i])
    keep = []
    for i in order:  # greedy per class, suppress IoU > thr
        if all(lab[j] != lab[i] or mrf._iou(fb[i], fb[j]) <= spec["nms_thresh"] for j in keep):
            keep.append(i)
    keep = keep[: spec["detections_per_img"]]
    ratio_h = np.float32(spec["orig"][0]) / np.float32(spec["resized"][0])
    ratio_w = np.float32(spec["orig"][1]) / np.float32(spec["resized"][1])
    ob = fb[keep] * np.array([ratio_w, ratio_h, ratio_w, ratio_h], dtype=np.float64) if keep else np.zeros((0, 4))
    return {"expect.step_boxes": sb, "expect.stop_prob": sp, "expect.attention": at, "expect.stop_step": stop,
            "expect.hidden": hid, "expect.logits": logits, "expect.boxes": ob, "expect.scores": score[keep],
            "expect.labels": lab[keep]}


def check_fixtures_independent():
    d = mrf.DEFAULT_OUT
    for name in mrf.CASES:
        t, meta = mm.read_safetensors(os.path.join(d, f"{name}.safetensors"))
        spec = json.loads(meta[mrf.META_KEY])
        want = np_head(spec, t)
        for k, v in want.items():
            g = t[k]
            assert tuple(g.shape) == tuple(v.shape), (name, k, g.shape, v.shape)
            if g.dtype == torch.int32:
                assert np.array_equal(g.numpy(), v), (name, k)
            elif v.size:
                err = np.abs(g.double().numpy() - v).max()
                assert err <= 1e-6 * max(1.0, np.abs(v).max()), (name, k, err)
    print(f"fixtures = independent numpy float64 implementation ({len(mrf.CASES)} cases) OK")
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        bad = mrf.check(d, list(mrf.CASES))
    assert bad == 0, buf.getvalue()
    print("fixtures regenerate (make_refine_fixture --check) OK")


# ---------------------------------------------------------------------------------------------
# detector side


def _builtin_with_head(tmp, cell="gru", half=False):
    path = os.path.join(tmp, f"head_{cell}{'_h' if half else ''}.safetensors")
    with contextlib.redirect_stdout(io.StringIO()):
        add_refine_head.add_head(BUILTIN, path, cell, 30, 20, 3, seed=5, half=half)
    return path


@torch.no_grad()
def check_zero(tmp):
    model, cfg, arch, _ = mm.load_marrow(_builtin_with_head(tmp, "lstm"))
    head = rf.head_from_model(model, cfg, arch)
    model.roi_heads.score_thresh = 1.0  # nothing passes
    img = mr.to_input(mr.synthetic_image(120, 160, 3))
    out = rf.detect_refined(model, head, img)
    r, dbg = out["refine"], out["refine_debug"]
    assert out["det_boxes"].shape == (0, 4) and r["boxes"].shape == (0, 4) and r["scores"].shape == (0,)
    assert dbg["step_boxes"].shape == (3, 0, 4) and dbg["attention"].shape == (3, 0, 49)
    assert dbg["hidden"].shape == (0, 30) and dbg["logits"].shape == (0, 4) and dbg["stop_step"].shape == (0,)
    print("detect_refined with zero detections OK")


@torch.no_grad()
def check_proposal_index(tmp, data):
    torch.set_num_threads(2)
    model, cfg, arch, _ = mm.load_marrow(_builtin_with_head(tmp, "gru"))
    head = rf.head_from_model(model, cfg, arch)
    if data:
        paths = sorted(glob.glob(os.path.join(data, "images", "val", "*")))[:2]
        imgs = [(os.path.basename(p), mr.load_image(p)) for p in paths]
    else:
        imgs = [(f"synthetic seed {s}", mr.synthetic_image(300, 400, s)) for s in (1, 2)]
    for desc, u8 in imgs:
        img = mr.to_input(u8)
        out = rf.detect_refined(model, head, img)
        ref = model([img])[0]
        for k, mine in (("boxes", out["det_boxes"]), ("scores", out["det_scores"]), ("labels", out["det_labels"])):
            assert torch.equal(ref[k], mine), (desc, k)
        # each detection = its proposal decoded with its class's deltas, clipped
        from torchvision.ops import boxes as box_ops
        p = out["proposal_index"]
        lab = out["det_labels"]
        d = out["box_deltas"].reshape(out["box_deltas"].shape[0], -1, 4)[p, lab]
        dec = model.roi_heads.box_coder.decode_single(d, out["proposals"][p])
        dec = box_ops.clip_boxes_to_image(dec, out["image_size"])
        assert torch.equal(dec, out["det_boxes_resized"]), desc
        assert torch.equal(out["det_features"], out["box_features"][p])
        print(f"proposal index: {desc}: {len(p)} detections = torchvision's, each its proposal's decode OK "
              f"({out['refine']['scores'].shape[0]} after the random head)")


def check_files(tmp):
    # add_refine_head round trip, f16, refusal of a second head
    for half in (False, True):
        p = _builtin_with_head(tmp, "lstm", half)
        model, cfg, arch, _ = mm.load_marrow(p)
        head = rf.head_from_model(model, cfg, arch)
        assert head.config() == {"cell": "lstm", "hidden": 30, "key": 20, "steps": 3, "stop_threshold": 0.5,
                                 "nms_thresh": 0.5}
        t, _ = mm.read_safetensors(p)
        assert t["refine.init.weight"].dtype == (torch.float16 if half else torch.float32)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            add_refine_head.add_head(p, os.path.join(tmp, "x.safetensors"), "gru", 8, 8, 2)
        raise AssertionError("second head accepted")
    except mm.MarrowError as e:
        assert "--replace" in str(e)
    # convert.py with a head, and its errors
    t, meta = mm.read_safetensors(p)
    rc = json.loads(meta[mm.CONFIG_KEY])["refine"]
    sd = {k: v.float() for k, v in t.items()}
    ck = os.path.join(tmp, "ck.pt")
    torch.save({"model": sd, "refine_config": rc}, ck)
    out = os.path.join(tmp, "conv.safetensors")
    with contextlib.redirect_stdout(io.StringIO()):
        convert.convert(ck, out, eps=1e-5)
    t2, _ = mm.read_safetensors(out)
    assert [k for k in t2 if k.startswith("refine.")] == [k for k in t if k.startswith("refine.")]
    assert all(torch.equal(t2[k], t[k].float()) for k in t if k.startswith("refine."))

    def refused(sd_, rc_, needle):
        torch.save({"model": sd_, "refine_config": rc_} if rc_ is not None else {"model": sd_}, ck)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                convert.convert(ck, out, eps=1e-5)
        except mm.MarrowError as e:
            assert needle in str(e), (needle, str(e))
            return
        raise AssertionError(f"accepted ({needle})")
    refused(sd, None, "no `refine` object")
    refused(sd, dict(rc, cell="gru"), "refine.cell.weight_ih")
    refused(sd, dict(rc, hidden=31), "refine.init.weight")
    refused(sd, dict(rc, cell="rnn"), "refine.cell is")
    refused(sd, dict(rc, extra=1), "unknown field refine.")
    bad = dict(sd)
    bad["refine.cls.weight"] = torch.zeros(5, 30)
    refused(bad, rc, "refine.cls.weight")
    bad = dict(sd)
    bad["refine.gate.weight"] = torch.zeros(2)
    refused(bad, rc, "refine.gate.weight")
    bad = {k: v for k, v in sd.items() if k != "refine.beta"}
    refused(bad, rc, "refine.beta")
    det_only = {k: v for k, v in sd.items() if not k.startswith("refine.")}
    refused(det_only, rc, "no refine.* tensors")
    print("add_refine_head / load_marrow / convert.py with a head, and their errors OK")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("MARROW_TXLPBC"),
                    help="TXL-PBC in YOLO layout (images/val); default $MARROW_TXLPBC, else synthetic images")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    check_names()
    check_fixtures_independent()
    with tempfile.TemporaryDirectory() as tmp:
        check_files(tmp)
        check_zero(tmp)
        check_proposal_index(tmp, a.data)
    print("test_refine OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
