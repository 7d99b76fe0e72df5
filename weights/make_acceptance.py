#!/usr/bin/env python3
"""Build the (uncommitted) acceptance dump: a full-size randomly initialised torchvision
fasterrcnn_resnet50_fpn (FPN 256, default 800/1333 transform, FrozenBN eps 0, non-trivial BN
statistics from seedgen), saved as a .pth state_dict, converted with convert.py (f32 and --half),
and a reference dump on a real image.

    python3 weights/make_acceptance.py [--out marrow-accept] [--image IMG | --data TXL-PBC] [--num-classes 4]
        [--user-case [--resize HxW]]

Writes OUT/model.pth, OUT/model.safetensors, OUT/model_f16.safetensors, OUT/ref.safetensors.

--user-case builds instead the model a new user makes with torchvision and no pretrained weights
(the case a "validate must not cry wolf" report came from): `fasterrcnn_resnet50_fpn(weights=None,
weights_backbone=None)`, whose body uses plain BatchNorm2d (eps 1e-5, exported as FrozenBN eps
1e-5), torchvision's own random init, and BN running statistics taken from real activations (the
body run in train mode, cumulative averages, over the first 8 training images of --data, or the
image alone). --resize HxW resizes the image first (e.g. 413x587, which the default transform
turns into 800x1137). Its reference dump is made with --float64-floor, so `marrow validate`
judges every stage against torch's own float32 error.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert  # noqa: E402
import make_fixtures as mf  # noqa: E402
import make_reference as mr  # noqa: E402
import marrow_model as mm  # noqa: E402

ACCEPT_SEED = 777
# The fixture scales, with the RPN objectness and class logits damped further: at FPN width 256 and
# 800 px the fixture's multipliers leave every kept proposal's objectness above 0.985.
ACCEPT_SCALES = dict(mf.SCALES, **{"rpn.head.cls_logits.": 0.1, "roi_heads.box_predictor.cls_score.": 0.1})


def torchvision_model(num_classes: int):
    """Built the way torchvision's pretrained builder builds it (FrozenBN, then overwrite_eps 0)."""
    import torchvision
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.faster_rcnn import FasterRCNN
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.ops import FrozenBatchNorm2d
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    model = FasterRCNN(_resnet_fpn_extractor(body, 3), num_classes=num_classes)
    overwrite_eps(model, 0.0)
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="marrow-accept")
    ap.add_argument("--image", help="default: the first image of DATA/images/val")
    ap.add_argument("--data", help="TXL-PBC root (its YOLO layout)")
    ap.add_argument("--num-classes", type=int, default=4)
    ap.add_argument("--user-case", action="store_true", help="torchvision random init, BN stats from real images")
    ap.add_argument("--resize", help="HxW: resize the image first (PIL bilinear)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    image = a.image
    if image is None:
        if a.data is None:
            raise SystemExit("error: pass --image IMG or --data TXL-PBC_ROOT")
        d = os.path.join(a.data, "images", "val")
        image = os.path.join(d, sorted(os.listdir(d))[0])

    if a.resize:
        from PIL import Image
        h, w = (int(v) for v in a.resize.lower().split("x"))
        resized = os.path.join(a.out, f"image_{h}x{w}.png")
        Image.open(image).convert("RGB").resize((w, h), Image.BILINEAR).save(resized)
        image = resized
    if a.user_case:
        return user_case(a, image)

    model = torchvision_model(a.num_classes)
    shapes = mm.model_tensor_shapes(model)
    sd = mm.seeded_state_dict(shapes, ACCEPT_SEED, ACCEPT_SCALES)
    mm.load_state_into(model, sd)
    pth = os.path.join(a.out, "model.pth")
    torch.save(model.state_dict(), pth)

    names = mf.CLASS_NAMES if a.num_classes == 4 else None
    st = os.path.join(a.out, "model.safetensors")
    convert.convert(pth, st, class_names=names)
    st16 = os.path.join(a.out, "model_f16.safetensors")
    convert.convert(pth, st16, half=True, class_names=names)

    # Round trip: the converted file in torchvision gives exactly the original model's outputs.
    img = mr.to_input(mr.load_image(image))
    loaded, cfg, arch, _ = mm.load_marrow(st)
    with torch.no_grad():
        r0 = model([img])[0]
        r1 = loaded([img])[0]
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"round trip differs in {k}"
    print(f"round trip OK: {len(r0['boxes'])} detections identical")
    half, _, _, _ = mm.load_marrow(st16)
    with torch.no_grad():
        r2 = half([img])[0]
    print(f"f16 file loads: {len(r2['boxes'])} detections")

    ref = os.path.join(a.out, "ref.safetensors")
    t, info = mr.make_reference(loaded, cfg, mr.load_image(image), ref, os.path.basename(image), full=True,
                                note="acceptance dump: random fasterrcnn_resnet50_fpn, real image")
    print(info)
    for k, v in t.items():
        print(f"  {k:22s} {str(v.dtype):14s} {list(v.shape)}")
    for p in (pth, st, st16, ref):
        print(f"{p}: {os.path.getsize(p)} bytes")


def user_case(a, image):
    """A fresh torchvision model (random init, BatchNorm2d eps 1e-5) with BN statistics from real
    activations, converted, and its float64-floored reference dump on `image`."""
    import torchvision
    torch.manual_seed(ACCEPT_SEED)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=a.num_classes)
    calib = [image]
    if a.data:
        d = os.path.join(a.data, "images", "train")
        calib += [os.path.join(d, f) for f in sorted(os.listdir(d))[:8]]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration passes
    model.eval()
    model.backbone.body.train()
    with torch.no_grad():
        for p in calib:
            x = mr.to_input(mr.load_image(p))
            images, _ = model.transform([x])
            model.backbone.body(images.tensors)
    model.eval()
    print(f"BN statistics from {len(calib)} image(s); {len(bns)} BatchNorm2d layers, eps {bns[0].eps}")
    pth = os.path.join(a.out, "model.pth")
    torch.save(model.state_dict(), pth)
    names = mf.CLASS_NAMES if a.num_classes == 4 else None
    st = os.path.join(a.out, "model.safetensors")
    convert.convert(pth, st, class_names=names)
    loaded, cfg, _, _ = mm.load_marrow(st)
    img = mr.to_input(mr.load_image(image))
    with torch.no_grad():
        r0, r1 = model([img])[0], loaded([img])[0]
    # BatchNorm2d (eval) and FrozenBatchNorm2d round differently in f32, so the converted model is
    # not bit-identical to the original here (it is for the FrozenBN models above): report it.
    same = len(r0["boxes"]) == len(r1["boxes"])
    dmax = (r0["boxes"] - r1["boxes"]).abs().max().item() if same and len(r0["boxes"]) else 0.0
    print(f"round trip: {len(r0['boxes'])} vs {len(r1['boxes'])} detections (BatchNorm2d vs FrozenBN), "
          f"max |Δbox| {dmax:.3g}")
    ref = os.path.join(a.out, "ref.safetensors")
    _, info = mr.make_reference(loaded, cfg, mr.load_image(image), ref, os.path.basename(image), full=True,
                                note="user case: torchvision random init, BN stats from real images",
                                floor=True)
    print(info)


if __name__ == "__main__":
    main()
