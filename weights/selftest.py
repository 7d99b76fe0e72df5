#!/usr/bin/env python3
"""Self-checks of the weights tooling (CPU, ~1 min):

    python3 weights/selftest.py [--fixtures tests/fixtures]

1. seedgen golden values (the same ones src/seedgen.rs tests).
2. Every fixture: the seeded model rebuilt from its "marrow.seedgen" metadata alone reproduces the
   stored "marrow.seedgen.check" values and the stored layer / stage outputs bit for bit.
3. convert.py: legacy names + "module." prefix + checkpoint dict + num_batches_tracked round trip to
   identical torchvision outputs; unknown / missing tensors refused; --drop-unknown; --half;
   resnet18 / resnet101 inference; BatchNorm2d export with --eps 1e-5.
"""
from __future__ import annotations

import argparse
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
    for name, ent in json.loads(meta[mm.SEEDGEN_CHECK_KEY]).items():
        assert seedgen.check_entry(sd[name].numpy()) == ent, name
    mm.load_state_into(model, sd)
    return model, cfg


@torch.no_grad()
def check_fixtures(d):
    for f in sorted(os.listdir(d)):
        if not f.endswith(".safetensors"):
            continue
        t, meta = mm.read_safetensors(os.path.join(d, f))
        model, cfg = model_from_spec(meta)
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
        convert.convert(p, out, class_names=["bg", "a", "b"], min_size=160, max_size=300, log=lambda *a: None)
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
        convert.convert(p, out16, half=True, class_names=["bg", "a", "b"], min_size=160, max_size=300, log=lambda *a: None)
        t16, _ = mm.read_safetensors(out16)
        assert all(v.dtype == torch.float16 for v in t16.values())
        mm.load_marrow(out16)
        print("convert --half OK")
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

    # A BatchNorm2d export (torchvision builder without weights) converted with --eps 1e-5.
    import torchvision
    bn_model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                    num_classes=3, min_size=160, max_size=300).eval()
    sh = [(k, tuple(v.shape)) for k, v in bn_model.state_dict().items() if not k.endswith("num_batches_tracked")]
    bn_model.load_state_dict(mm.seeded_state_dict(sh, 11, mf.SCALES), strict=False)
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "bn.pth")
        torch.save(bn_model.state_dict(), p)
        out = os.path.join(tmp, "bn.safetensors")
        convert.convert(p, out, eps=1e-5, min_size=160, max_size=300, log=lambda *a: None)
        m, cfg, _, _ = mm.load_marrow(out)
        assert cfg["frozen_bn_eps"] == 1e-5
        images, _ = m.transform([img])
        f1 = m.backbone(images.tensors)
        f0 = bn_model.backbone(images.tensors)
        rel = max(((f1[k] - f0[k]).abs().max() / f0[k].abs().max()).item() for k in f0)
        assert rel < 1e-5, rel
        print(f"BatchNorm2d export --eps 1e-5 OK (FPN max rel diff {rel:.2e})")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fixtures", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    a = ap.parse_args()
    check_seedgen()
    check_fixtures(a.fixtures)
    check_convert()
    print("all OK")


if __name__ == "__main__":
    main()
