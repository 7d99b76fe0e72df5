#!/usr/bin/env python3
"""Self-checks of the weights tooling (CPU, ~1 min):

    python3 weights/selftest.py [--fixtures tests/fixtures]

1. seedgen golden values (the same ones src/seedgen.rs tests).
2. Every fixture: the seeded model rebuilt from its "marrow.seedgen" metadata alone reproduces the
   stored "marrow.seedgen.check" values and the stored layer / stage outputs bit for bit.
3. convert.py: legacy names + "module." prefix + checkpoint dict + num_batches_tracked round trip to
   identical torchvision outputs; unknown / missing tensors refused; --drop-unknown; --half;
   resnet18 / resnet101 inference; eps inference (num_batches_tracked -> 1e-5, explicit --eps
   wins, unknown -> 0.0 with a warning); `field` / `lineage` config keys.
4. train.py on a tiny synthetic YOLO set: augmented boxes, one epoch + resume, export equivalence.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from collections import OrderedDict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert  # noqa: E402
import make_reference as mr  # noqa: E402
import marrow_model as mm  # noqa: E402
import seedgen  # noqa: E402


def check_seedgen():
    a = seedgen.generate(20261125, "backbone.body.conv1.weight", (64, 3, 7, 7)).reshape(-1)
    assert [hex(int(x)) for x in a[:2].view(np.uint32)] == ["0xbdc869d6", "0xbe04abaf"]
    assert float(np.cumsum(a.astype(np.float64))[-1]) == 5.061890343015875
    b = seedgen.generate(20261125, "backbone.body.bn1.running_var", (64,)).reshape(-1)
    assert float(np.cumsum(b.astype(np.float64))[-1]) == 78.88726621866226
    print("seedgen golden OK")


def model_from_spec(meta):
    spec = json.loads(meta[mm.SEEDGEN_KEY])
    cfg = mm.merge_config(json.loads(meta[mm.CONFIG_KEY]))
    arch = mm.infer_arch({n: tuple(s) for n, s in spec["tensors"]})
    model = mm.build_model(cfg, arch)
    assert [(n, tuple(s)) for n, s in spec["tensors"]] == mm.model_tensor_shapes(model), "spec order != state_dict"
    gen = seedgen.generate_all(spec)
    sd = OrderedDict((n, torch.from_numpy(v)) for n, _, v in gen)
    for name, ent in json.loads(meta.get(mm.SEEDGEN_CHECK_KEY, "{}")).items():
        assert seedgen.check_entry(sd[name].numpy()) == ent, name
    mm.load_state_into(model, sd)
    return model, cfg


@torch.no_grad()
def check_fixtures(d):
    for f in sorted(os.listdir(d)):
        if not f.endswith(".safetensors"):
            continue
        t, meta = mm.read_safetensors(os.path.join(d, f))
        if mm.SEEDGEN_KEY not in meta:  # op fixtures (nms / roi_align / rpn): checked by the Rust tests
            print(f"fixture {f}: no seeded model, skipped")
            continue
        model, cfg = model_from_spec(meta)
        if not t:  # a weights-only fixture (seeded_model): the model builds; nothing stored to compare
            print(f"fixture {f}: seeded weights only, model rebuilt OK")
            continue
        if "marrow.layers" in meta:
            b, fpn = model.backbone.body, model.backbone.fpn
            y = b.relu(b.bn1(b.conv1(t["stem.in"])))
            assert torch.equal(y, t["stem.conv_bn_relu"]) and torch.equal(b.maxpool(y), t["stem.out"])
            for name, mod in [("layer1.1", b.layer1[1]), ("layer2.0", b.layer2[0]), ("layer4.0", b.layer4[0])]:
                assert torch.equal(mod(t[f"{name}.in"]), t[f"{name}.out"]), name
            for tag in ("fpn", "fpn_odd"):
                res = fpn(OrderedDict((str(i), t[f"{tag}.in.{i}"]) for i in range(4)))
                for k, v in res.items():
                    assert torch.equal(v, t[f"{tag}.out.{k}"]), f"{tag}.out.{k}"
        else:
            got, _ = mr.run_reference(model, t["input.image"])
            for k, v in got.items():
                assert torch.equal(v, t[k]), f"{f}: {k}"
            assert len(got) == len(t)
        print(f"fixture {f} OK ({len(t)} tensors)")


@torch.no_grad()
def check_convert():
    torch.set_num_threads(2)
    cfg = mm.make_config("resnet50", ["bg", "a", "b"], 160, 300, 0.0)
    arch = mm.arch_for("resnet50", 32, 3, 256)
    import make_fixtures as mf
    model, _, _, sd = mm.build_seeded_model(cfg, arch, 5, mf.SCALES)
    img = mr.to_input(mr.synthetic_image(90, 110, 9))
    ref = model([img])[0]
    with tempfile.TemporaryDirectory() as tmp:
        # legacy names, module. prefix, checkpoint dict, num_batches_tracked
        legacy = OrderedDict()
        for k, v in sd.items():
            k2 = k.replace(".0.weight", ".weight").replace(".0.bias", ".bias") if k.startswith("backbone.fpn.") else k
            k2 = k2.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
            legacy["module." + k2] = v.clone()
            if k.endswith("running_var"):
                legacy["module." + k2[:-len("running_var")] + "num_batches_tracked"] = torch.tensor(7)
        assert "module.backbone.fpn.inner_blocks.0.weight" in legacy and "module.rpn.head.conv.weight" in legacy
        p = os.path.join(tmp, "ckpt.pth")
        torch.save({"model": legacy, "epoch": 3, "optimizer": {}}, p)
        out = os.path.join(tmp, "m.safetensors")
        convert.convert(p, out, class_names=["bg", "a", "b"], eps=0.0, min_size=160, max_size=300, log=lambda *a: None)
        t, meta = mm.read_safetensors(out)
        assert set(t) == set(sd), "names differ"
        assert all(torch.equal(t[k], sd[k]) for k in sd)
        assert json.loads(meta[mm.SOURCE_KEY])["sha256"] == mm.sha256_file(p)
        m2, cfg2, arch2, _ = mm.load_marrow(out)
        assert arch2 == arch and cfg2 == cfg, (arch2, cfg2)
        r2 = m2([img])[0]
        assert all(torch.equal(ref[k], r2[k]) for k in ref), "round trip outputs differ"
        # direct .pth loading in make_reference
        m3, _, _ = mm.load_pth(p, mm.make_config(min_size=160, max_size=300))
        assert all(torch.equal(ref[k], m3([img])[0][k]) for k in ref)
        print(f"convert round trip OK ({len(ref['boxes'])} detections identical)")
        # half
        out16 = os.path.join(tmp, "h.safetensors")
        convert.convert(p, out16, half=True, class_names=["bg", "a", "b"], eps=0.0, min_size=160, max_size=300,
                        log=lambda *a: None)
        t16, _ = mm.read_safetensors(out16)
        assert all(v.dtype == torch.float16 for v in t16.values())
        mm.load_marrow(out16)
        print("convert --half OK")
        # A checkpoint trained with its own AnchorGenerator (5 ratios): refused without the
        # anchors, converted with them, and the config carries them to torchvision and the engine.
        anchors = {"anchor_sizes": [16.0, 40.0, 80.0, 160.0, 320.0], "aspect_ratios": [0.5, 0.7, 1.0, 1.4, 2.0]}
        cfg_a = mm.make_config("resnet50", ["bg", "a", "b"], 160, 300, 0.0, **anchors)
        model_a, _, _, sd_a = mm.build_seeded_model(cfg_a, mm.arch_for("resnet50", 32, 3, 256, anchors=5), 6, mf.SCALES)
        torch.save(sd_a, p)
        try:
            convert.convert(p, out, eps=0.0, min_size=160, max_size=300, log=lambda *a: None)
            raise AssertionError("5 anchors per location accepted with the default 3 aspect ratios")
        except mm.MarrowError as e:
            assert "5 anchors per location" in str(e) and "aspect" in str(e), e
        convert.convert(p, out, eps=0.0, min_size=160, max_size=300, log=lambda *a: None, **anchors)
        m_a, cfg_a2, _, meta_a = mm.load_marrow(out)
        assert json.loads(meta_a[mm.CONFIG_KEY])["rpn"]["aspect_ratios"] == anchors["aspect_ratios"]
        assert cfg_a2["rpn"]["anchor_sizes"] == anchors["anchor_sizes"]
        ref_a = model_a([img])[0]
        assert all(torch.equal(ref_a[k], m_a([img])[0][k]) for k in ref_a), "custom-anchor round trip differs"
        for bad in ({"anchor_sizes": [32.0, 64.0]}, {"aspect_ratios": [0.0, 1.0, 2.0]}):
            try:
                mm.make_config(**bad)
                raise AssertionError(f"{bad} accepted")
            except mm.MarrowError as e:
                assert next(iter(bad)) in str(e), e
        print("convert with custom anchors OK (refused without them, round trip identical with them)")
        # unknown / missing / wrong class count
        extra = OrderedDict(sd)
        extra["roi_heads.mask_head.0.weight"] = torch.zeros(2, 2)
        torch.save(extra, p)
        try:
            convert.convert(p, out, log=lambda *a: None)
            raise AssertionError("unknown tensor accepted")
        except mm.MarrowError as e:
            assert "mask_head" in str(e) and "--drop-unknown" in str(e)
        convert.convert(p, out, drop_unknown=True, log=lambda *a: None)
        try:
            convert.convert(p, out, drop_unknown=True, class_names=["bg", "a"], log=lambda *a: None)
            raise AssertionError("wrong class count accepted")
        except mm.MarrowError as e:
            assert "class_names" in str(e)
        missing = OrderedDict((k, v) for k, v in sd.items() if "layer3.2.bn2.weight" not in k)
        torch.save(missing, p)
        try:
            convert.convert(p, out, log=lambda *a: None)
            raise AssertionError("missing tensor accepted")
        except mm.MarrowError as e:
            assert "layer3.2.bn2.weight" in str(e)
        print("convert refusals OK")

    for bb, counts in [("resnet18", (2, 2, 2, 2)), ("resnet34", (3, 4, 6, 3)), ("resnet101", (3, 4, 23, 3))]:
        a = mm.arch_for(bb, 16, 2, 64)
        m = mm.build_model(mm.make_config(), a)
        got = mm.infer_arch(dict(mm.model_tensor_shapes(m)))
        assert got == a, (got, a)
    print("arch inference resnet18/34/101 OK")

    # A BatchNorm2d export (torchvision builder without weights): eps 1e-5 inferred from its
    # num_batches_tracked buffers.
    import torchvision
    bn_model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                    num_classes=3, min_size=160, max_size=300).eval()
    sh = [(k, tuple(v.shape)) for k, v in bn_model.state_dict().items() if not k.endswith("num_batches_tracked")]
    bn_model.load_state_dict(mm.seeded_state_dict(sh, 11, mf.SCALES), strict=False)
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "bn.pth")
        torch.save(bn_model.state_dict(), p)
        out = os.path.join(tmp, "bn.safetensors")
        msgs = []
        convert.convert(p, out, min_size=160, max_size=300, log=msgs.append)
        assert any("num_batches_tracked" in x and "1e-05" in x for x in msgs), msgs
        m, cfg, _, _ = mm.load_marrow(out)
        assert cfg["frozen_bn_eps"] == 1e-5
        images, _ = m.transform([img])
        f1 = m.backbone(images.tensors)
        f0 = bn_model.backbone(images.tensors)
        rel = max(((f1[k] - f0[k]).abs().max() / f0[k].abs().max()).item() for k in f0)
        assert rel < 1e-5, rel
        print(f"BatchNorm2d export, eps 1e-5 inferred OK (FPN max rel diff {rel:.2e})")
        # an explicit eps wins over the inference
        out0 = os.path.join(tmp, "bn0.safetensors")
        msgs = []
        convert.convert(p, out0, eps=0.0, min_size=160, max_size=300, log=msgs.append)
        assert mm.load_marrow(out0)[1]["frozen_bn_eps"] == 0.0 and any("given with --eps" in x for x in msgs), msgs
        # no num_batches_tracked (FrozenBatchNorm2d state_dict): default 0.0 with a warning
        p2 = os.path.join(tmp, "frozen.pth")
        torch.save(OrderedDict((k, v) for k, v in bn_model.state_dict().items()
                               if not k.endswith("num_batches_tracked")), p2)
        msgs = []
        convert.convert(p2, out0, min_size=160, max_size=300, log=msgs.append)
        assert mm.load_marrow(out0)[1]["frozen_bn_eps"] == 0.0
        assert any(x.startswith("warning:") and "could not tell" in x for x in msgs), msgs
        # CLI: the chosen eps and why are printed
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = convert.main([p, out0, "--min-size", "160", "--max-size", "300", "--field", "575",
                               "--lineage", "1=myeloid,2=erythroid", "--class-names", "bg,1,2"])
        assert rc == 0 and "num_batches_tracked" in buf.getvalue(), buf.getvalue()
        _, meta = mm.read_safetensors(out0)
        j = json.loads(meta[mm.CONFIG_KEY])
        assert j["field"] == 575 and j["lineage"] == {"1": "myeloid", "2": "erythroid"}, j
        assert j["frozen_bn_eps"] == 1e-5
        cfg0 = mm.load_marrow(out0)[1]
        assert cfg0["field"] == 575 and cfg0["lineage"]["2"] == "erythroid"
        # field / lineage are omitted when None, and validated
        assert "field" not in json.loads(mm.config_json(mm.make_config()))
        assert "lineage" not in json.loads(mm.config_json(mm.make_config()))
        for bad in [{"field": 0}, {"field": 1.5}, {"field": True}, {"lineage": {"bg": 3}}, {"lineage": ["myeloid"]}]:
            try:
                mm.merge_config(bad)
                raise AssertionError(f"accepted {bad}")
            except mm.MarrowError:
                pass
        assert mm.merge_config({"lineage": {"lymph": "lymphoid"}})["lineage"] == {"lymph": "lymphoid"}  # as config.rs
        try:
            mm.make_config(class_names=["bg", "a"], lineage={"x": "myeloid"})
            raise AssertionError("lineage of an unknown class written")
        except mm.MarrowError as e:
            assert "'x'" in str(e)
        print("eps inference (BatchNorm2d / explicit / unknown + warning), field, lineage OK")


def check_train():
    """weights/train.py on a tiny synthetic YOLO set: augmentation keeps boxes on the cells, one
    epoch runs and evaluates, resume refuses/continues, and the export (FrozenBatchNorm2d eps 1e-5)
    computes what the BatchNorm2d training model computes in eval mode."""
    import random
    import train as T
    from PIL import Image, ImageDraw
    # augmentation: a box drawn into the image stays the box after flips / rotations
    img = torch.zeros(3, 50, 80)
    img[:, 5:20, 10:30] = 1
    b = torch.tensor([[10., 5., 30., 20.]])
    for s in range(16):
        im2, b2 = T.augment(img, b, random.Random(s), colour=False)
        ys, xs = torch.nonzero(im2[0] > 0.5, as_tuple=True)
        got = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert got == b2[0].tolist(), (s, got, b2)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        rng = np.random.default_rng(3)
        for split, n in (("train", 4), ("val", 2)):
            os.makedirs(os.path.join(data, "images", split))
            os.makedirs(os.path.join(data, "labels", split))
            for i in range(n):
                w, h = (160, 120) if i % 2 else (128, 128)
                im = Image.new("RGB", (w, h), (230, 200, 210))
                d = ImageDraw.Draw(im)
                lines = []
                for _ in range(3):
                    c = int(rng.integers(0, 2))
                    r = 14 if c == 0 else 9
                    cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
                    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(120, 60, 160) if c == 0 else (200, 90, 90))
                    lines.append(f"{c} {cx / w:.6f} {cy / h:.6f} {2 * r / w:.6f} {2 * r / h:.6f}")
                p = os.path.join(data, "images", split, f"{split}{i}.png")
                if i == 0:
                    im.convert("RGBA").save(p, format="PNG")  # alpha dropped
                else:
                    im.save(p, format="JPEG")  # JPEG inside .png, as in TXL-PBC
                with open(os.path.join(data, "labels", split, f"{split}{i}.txt"), "w") as f:
                    f.write("\n".join(lines) + "\n")
        with open(os.path.join(data, "classes.txt"), "w") as f:
            f.write("0 big\n1 small\n")
        wd = os.path.join(tmp, "wd")
        args = ["--data", data, "--work-dir", wd, "--class-names", "big,small", "--lr", "0.002",
                "--warmup-iters", "2", "--log-every", "1", "--no-export"]
        with contextlib.redirect_stdout(io.StringIO()):
            T.main(args + ["--epochs", "1"])  # one epoch
            try:
                T.main(args + ["--epochs", "2"])
                raise AssertionError("an existing last.pt was overwritten without --resume")
            except SystemExit as e:
                assert "--resume" in str(e)
            T.main(["--resume", "--work-dir", wd, "--epochs", "2"])  # continues into epoch 2
        lines = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
        assert [x["epoch"] for x in lines] == [1, 2] and "AP50_per_class" in lines[0], lines
        ck = torch.load(os.path.join(wd, "last.pt"), weights_only=False)
        # field = the median SHORT side of the training images (120, 128, 120, 128 -> 124)
        assert ck["state"]["global_iter"] == 4 and ck["field"] == 124, (ck["state"], ck["field"])
        out = os.path.join(wd, "m.safetensors")
        with contextlib.redirect_stdout(io.StringIO()):
            T.main(["export", "--work-dir", wd, "--out", out, "--from", "last"])
        m, cfg, arch, _ = mm.load_marrow(out)
        assert cfg["class_names"] == ["__background__", "big", "small"] and cfg["frozen_bn_eps"] == 1e-5
        assert cfg["field"] == 124 and cfg["transform"]["min_size"] == 384 and cfg["transform"]["max_size"] == 640
        assert arch["backbone"] == "resnet18" and arch["fpn_width"] == 128 and arch["representation_size"] == 256
        tm = T.build_train_model(ck["config"], 3)
        tm.load_state_dict(ck["model"])
        x = mr.to_input(mr.synthetic_image(120, 160, 4))
        with T.eval_mode(tm, ck["config"]), torch.no_grad():
            images, _ = m.transform([x])
            i2, _ = tm.transform([x])
            assert torch.equal(images.tensors, i2.tensors)
            f0, f1 = tm.backbone(images.tensors), m.backbone(images.tensors)
        rel = max(((f1[k] - f0[k]).abs().max() / f0[k].abs().max()).item() for k in f0)
        assert rel < 1e-4, rel
    print(f"train.py: augmentation boxes, 1 epoch + resume, export (FPN max rel diff {rel:.2e}) OK")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fixtures", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    a = ap.parse_args()
    check_seedgen()
    check_fixtures(a.fixtures)
    check_convert()
    check_train()
    print("all OK")


if __name__ == "__main__":
    main()
