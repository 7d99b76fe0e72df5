#!/usr/bin/env python3
"""Write tests/fixtures/roi_align_cases.safetensors: torchvision's own RoIAlign, MultiScaleRoIAlign
and LevelMapper on random NCHW features and adversarial boxes, to validate marrow's CPU reference
(src/cpu/roi_align.rs), which in turn validates the WGSL kernel.

    python3 weights/make_roi_align_fixture.py [--out tests/fixtures/roi_align_cases.safetensors]

CPU, f32, one thread, fixed seeds: the file is byte-identical across runs (~230 KB).

The level thresholds are a property of the torch build and CPU that made them: torch evaluates sqrt
and log2 of float tensors with MKL's vector math on x86, which is not correctly rounded
(torch.sqrt(200703.65625) = 447.99963, IEEE 447.99960), so the 448² threshold sits one f32 ulp
below the IEEE formula's. Made with torch 2.x + torchvision 0.29.2, MKL, AVX-512; if a rebuild on
another machine moves a threshold, tests/roi_align.rs says so and TORCHVISION_LEVEL_THRESHOLDS in
src/cpu/roi_align.rs must follow the reference machine.

Contents (NCHW as torchvision; all f32 unless marked i64):
  levels.thresholds   [3]    the smallest f32 box area that LevelMapper(2, 5) sends to level index
                             1, 2, 3 (found by sweeping every f32 area near 112², 224², 448²
                             through torch's own formula, vectorised and one element at a time)
  levels.boxes        [N,4]  boxes at and around those thresholds (sqrt(area) = 112, 224, 448
                             exactly and ±1 ulp, areas at the threshold ±3 ulp), random, degenerate,
                             inverted (negative area) and NaN boxes
  levels.ids          [N]    i64, torchvision's LevelMapper output as torch computes it (NaN areas
                             give an out-of-range garbage id: those rows are never pooled)
  ms.image_size       [2]    i64, the resized unpadded (h, w) handed to MultiScaleRoIAlign
  ms.p2 .. ms.p5      [1,C,h,w] FPN-like features of the padded image (strides 4 .. 32)
  ms.boxes            [K,4]  proposals in resized-image coordinates
  ms.out              [K,C,7,7] MultiScaleRoIAlign(['0','1','2','3'], 7, 2) output
  ra{i}.input         [N,C,H,W] (N = 2: the batch index is exercised)
  ra{i}.rois          [K,5]  (batch index, x1, y1, x2, y2)
  ra{i}.scale         [1]    spatial_scale
  ra{i}.cfg           [3]    i64: output size, sampling_ratio, aligned
  ra{i}.out           [K,C,out,out] torchvision.ops.roi_align
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from marrow_model import write_safetensors  # noqa: E402

F32 = np.float32


def f32_range(lo: float, hi: float) -> np.ndarray:
    """Every positive f32 in [lo, hi] (positive floats are ordered like their bit patterns)."""
    a = np.array([lo, hi], dtype=F32).view(np.int32)
    return np.arange(a[0], a[1] + 1, dtype=np.int32).view(F32)


def mapper_ids(mapper: LevelMapper, areas: np.ndarray, one_by_one: bool) -> np.ndarray:
    """LevelMapper on boxes (0, 0, area, 1), whose box_area is exactly `area`. torch evaluates
    log2 with a vectorised routine on whole vectors and the scalar libm one on short tails, so the
    sweep runs both ways."""
    boxes = np.zeros((len(areas), 4), dtype=F32)
    boxes[:, 2] = areas
    boxes[:, 3] = 1.0
    if one_by_one:
        return np.array([int(mapper([torch.from_numpy(b[None])])[0]) for b in boxes])
    return mapper([torch.from_numpy(boxes)]).numpy()


def thresholds(mapper: LevelMapper) -> np.ndarray:
    out = []
    for i, side in enumerate([112.0, 224.0, 448.0]):
        t = side * side
        areas = f32_range(t * (1 - 1e-5), t * (1 + 1e-5))
        vec = mapper_ids(mapper, areas, one_by_one=False)
        one = mapper_ids(mapper, areas, one_by_one=True)
        assert (vec == one).all(), "torch's vectorised and scalar log2 disagree near a threshold"
        assert (np.diff(vec) >= 0).all(), "LevelMapper is not monotone in the area here"
        assert vec[0] == i and vec[-1] == i + 1
        out.append(areas[np.argmax(vec == i + 1)])
    return np.array(out, dtype=F32)


def level_boxes(rng: np.random.RandomState, thr: np.ndarray) -> np.ndarray:
    rows = []
    for side in [112.0, 224.0, 448.0]:
        s = F32(side)
        for v in [np.nextafter(s, F32(0)), s, np.nextafter(s, F32(1e9))]:
            rows.append([0, 0, v, v])
            # An offset square: box_area is computed from the coordinates, whatever they round to.
            x1, y1 = F32(3.25), F32(17.5)
            rows.append([x1, y1, x1 + v, y1 + v])
    for t in thr:
        a = t
        for _ in range(3):
            a = np.nextafter(a, F32(0))
        for _ in range(7):
            rows.append([0, 0, a, 1])
            rows.append([0, 0, 1, a])
            a = np.nextafter(a, F32(1e9))
    for _ in range(40):
        x1, y1 = rng.uniform(-50, 400, 2)
        w, h = np.exp(rng.uniform(np.log(0.01), np.log(900), 2))
        rows.append([x1, y1, x1 + w, y1 + h])
    rows += [
        [5, 5, 5, 5],  # zero area: log2(0) = -inf, level 2
        [5, 5, 5, 900],  # degenerate width
        [10, 10, 4, 30],  # inverted in x: negative area, sqrt NaN
        [10, 30, 4, 10],  # inverted in both: positive area
        [np.nan, 0, 10, 10],
        [0, 0, 1e30, 1e30],  # area inf: level 5
    ]
    return np.array(rows, dtype=F32)


def adversarial_boxes(rng: np.random.RandomState, h: float, w: float, n_random: int) -> list:
    """Boxes in the coordinates that get multiplied by spatial_scale."""
    rows = []
    for _ in range(n_random):
        x1, y1 = rng.uniform(-0.2 * w, 1.1 * w), rng.uniform(-0.2 * h, 1.1 * h)
        bw, bh = np.exp(rng.uniform(np.log(0.05), np.log(1.5 * max(h, w)), 2))
        rows.append([x1, y1, x1 + bw, y1 + bh])
    rows += [
        [2 * w, 2 * h, 3 * w, 3 * h],  # entirely outside (right, below)
        [-3 * w, -3 * h, -2 * w, -2 * h],  # entirely outside (negative)
        [-0.5 * w, -0.5 * h, 0.5 * w, 0.5 * h],  # partially outside
        [0.5 * w, 0.5 * h, 1.5 * w, 1.5 * h],
        [0.3 * w, 0.2 * h, 0.3 * w, 0.9 * h],  # x1 == x2
        [0.3 * w, 0.2 * h, 0.3 * w, 0.2 * h],  # a point
        [0.41 * w, 0.37 * h, 0.41 * w + 0.013, 0.37 * h + 0.007],  # tiny, sub-pixel
        [-10 * w, -10 * h, 10 * w, 10 * h],  # huge
        [0, 0, w, h],  # the whole image
        [0.7 * w, 0.6 * h, 0.2 * w, 0.1 * h],  # inverted
        [-4.0, -3.0, -1.0, -0.5],  # negative, near the -1 sample cut
    ]
    return rows


def exact_edge_rois(scale: float, H: int, W: int) -> list:
    """RoIs whose sample points land exactly on the out-of-range cuts (y = -1, y = H) and on the
    y_lo = H - 1 edge, and 1/64 feature px beyond, with every operation exact in f32 (aligned=False,
    sampling_ratio 2, output 7: roi = 7 feature px, so bin = 1 and samples at +0.25 / +0.75)."""
    s = 1.0 / scale
    e = 1.0 / 64
    rows = []
    for d in [0.0, e, -e]:
        # last sample row y = start + 6.75 = H (+d): start = H - 6.75
        st = H - 6.75 + d
        rows.append([0.5 * W * s, st * s, (0.5 * W + 7) * s, (st + 7) * s])
        stx = W - 6.75 + d
        rows.append([stx * s, 0.25 * H * s, (stx + 7) * s, (0.25 * H + 7) * s])
        # first sample y = start + 0.25 = -1 (-d): start = -1.25
        st = -1.25 - d
        rows.append([1.0 * s, st * s, 8.0 * s, (st + 7) * s])
        rows.append([st * s, 1.0 * s, (st + 7) * s, 8.0 * s])
        # a sample exactly on y = H - 1 (the clamp edge): start + 6.25 = H - 1
        st = H - 7.25 + d
        rows.append([2.0 * s, st * s, 9.0 * s, (st + 7) * s])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                  "roi_align_cases.safetensors"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(20261126)
    rng = np.random.RandomState(20261126)
    tensors: dict[str, torch.Tensor] = {}

    mapper = LevelMapper(2, 5)
    thr = thresholds(mapper)
    lb = level_boxes(rng, thr)
    tensors["levels.thresholds"] = torch.from_numpy(thr)
    tensors["levels.boxes"] = torch.from_numpy(lb)
    tensors["levels.ids"] = mapper([torch.from_numpy(lb)]).to(torch.int64)

    # MultiScaleRoIAlign: resized image 250 x 190 (h, w), padded to 256 x 192.
    img_h, img_w, c = 250, 190, 3
    feats = {}
    for i, stride in enumerate([4, 8, 16, 32]):
        feats[str(i)] = torch.randn(1, c, 256 // stride, 192 // stride)
        tensors[f"ms.p{i + 2}"] = feats[str(i)]
    rows = adversarial_boxes(rng, img_h, img_w, 40)
    # proposal-like boxes across all four levels, and boxes straddling the level thresholds
    for t in thr:
        for k in (-2, 0, 2):
            side = np.sqrt(np.float64(t)) * (1 + k * 1e-3)
            x1, y1 = rng.uniform(-20, 150, 2)
            rows.append([x1, y1, x1 + side, y1 + side])
    boxes = torch.tensor(np.array(rows, dtype=F32))
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    tensors["ms.image_size"] = torch.tensor([img_h, img_w], dtype=torch.int64)
    tensors["ms.boxes"] = boxes
    tensors["ms.out"] = pooler(feats, [boxes], [(img_h, img_w)])

    # Single-level roi_align configurations: (H, W, C, scale, out, sampling_ratio, aligned)
    configs = [
        (13, 11, 3, 0.5, 7, 2, False),
        (13, 11, 3, 0.5, 7, 2, True),
        (9, 14, 5, 0.25, 7, 0, False),
        (9, 14, 5, 0.25, 7, 0, True),
        (12, 7, 2, 0.125, 5, 3, False),
        (6, 10, 3, 1.0, 7, 1, True),
    ]
    for i, (H, W, C, scale, out, sr, aligned) in enumerate(configs):
        x = torch.randn(2, C, H, W)
        rows = adversarial_boxes(rng, H / scale, W / scale, 16)
        if out == 7 and sr == 2 and not aligned:
            rows += exact_edge_rois(scale, H, W)
        b = np.array(rows, dtype=F32)
        ids = rng.randint(0, 2, size=(len(b), 1)).astype(F32)
        rois = torch.from_numpy(np.concatenate([ids, b], axis=1))
        tensors[f"ra{i}.input"] = x
        tensors[f"ra{i}.rois"] = rois
        tensors[f"ra{i}.scale"] = torch.tensor([scale], dtype=torch.float32)
        tensors[f"ra{i}.cfg"] = torch.tensor([out, sr, int(aligned)], dtype=torch.int64)
        tensors[f"ra{i}.out"] = roi_align(x, rois, out, scale, sr, aligned)

    meta = {
        "marrow.fixture.note": "torchvision RoIAlign / MultiScaleRoIAlign / LevelMapper cases for "
                               "tests/roi_align.rs (weights/make_roi_align_fixture.py)",
        "marrow.reference": f"torch {torch.__version__} torchvision {torchvision.__version__} CPU f32",
    }
    write_safetensors(args.out, tensors, meta)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes), thresholds {thr.tolist()}")


if __name__ == "__main__":
    main()
