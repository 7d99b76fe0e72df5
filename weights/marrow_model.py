"""Shared Python side of marrow's weights tooling.

Builds torchvision Faster R-CNN + FPN models that match a marrow safetensors file (tensor names =
torchvision state_dict names, config JSON in the `marrow.config` metadata key), infers the
architecture from tensor shapes, normalises checkpoint names, and builds seeded models with
seedgen v1. Used by convert.py, make_reference.py and make_fixtures.py. Run on CPU only.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import re
import sys
from collections import OrderedDict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seedgen  # noqa: E402

CONFIG_KEY = "marrow.config"
SEEDGEN_KEY = "marrow.seedgen"
SEEDGEN_CHECK_KEY = "marrow.seedgen.check"
SOURCE_KEY = "marrow.source"
CONFIG_FORMAT_VERSION = 1

# Mirrors src/model/config.rs (serde deny_unknown_fields): only these fields exist.
DEFAULT_CONFIG = {
    "format_version": CONFIG_FORMAT_VERSION,
    "backbone": None,
    "class_names": None,
    "transform": {
        "min_size": 800,
        "max_size": 1333,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "size_divisible": 32,
    },
    "frozen_bn_eps": 0.0,
    # anchor_sizes: one AnchorGenerator size per FPN level (P2..P6); aspect_ratios (h / w) shared by
    # every level. Omitted from a written config when they are torchvision's defaults.
    "rpn": {"pre_nms_top_n": 1000, "post_nms_top_n": 1000, "nms_thresh": 0.7, "score_thresh": 0.0, "min_size": 0.001,
            "anchor_sizes": [32.0, 64.0, 128.0, 256.0, 512.0], "aspect_ratios": [0.5, 1.0, 2.0]},
    "box_head": {"score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 100, "min_size": 0.01},
    "refine": None,
    # Optional (omitted from the JSON when None): the field size in native pixels the model was
    # trained on (median of max(width, height) over the training images; used for tiling), and a
    # class name -> "myeloid" | "erythroid" map.
    "field": None,
    "lineage": None,
}
OPTIONAL_KEYS = ("refine", "field", "lineage")
FPN_LEVELS = 5  # P2..P5 + the max-pool P6: one anchor size each
MAX_ANCHORS_PER_LOCATION = 8  # src/ops/rpn.rs: the cell anchors travel in a uniform
LINEAGES = ("myeloid", "erythroid")

# The refinement head's config object (docs/design.md §6, docs/refinement.md). cell, hidden, key
# and steps are required; the two thresholds default to 0.5.
REFINE_REQUIRED = ("cell", "hidden", "key", "steps")
REFINE_DEFAULTS = {"stop_threshold": 0.5, "nms_thresh": 0.5}
REFINE_CELLS = {"gru": 3, "lstm": 4}  # G, gates per cell (PyTorch GRUCell / LSTMCell layout)
REFINE_PREFIX = "refine."

# ResNet layer block counts, keyed by (bottleneck?, counts).
RESNETS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
}


class MarrowError(Exception):
    """A user-facing error with a clear message."""


# ----------------------------------------------------------------------------------------------
# config


def merge_config(partial: dict | None) -> dict:
    """Fill torchvision defaults into a (possibly partial) config; refuse unknown fields."""
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    for k, v in (partial or {}).items():
        if k not in cfg:
            raise MarrowError(f"{CONFIG_KEY}: unknown field {k!r}")
        if isinstance(cfg[k], dict) and k not in OPTIONAL_KEYS:
            if not isinstance(v, dict):
                raise MarrowError(f"{CONFIG_KEY}: field {k!r} must be an object")
            for kk, vv in v.items():
                if kk not in cfg[k]:
                    raise MarrowError(f"{CONFIG_KEY}: unknown field {k}.{kk!r}")
                cfg[k][kk] = vv
        else:
            cfg[k] = v
    if cfg["format_version"] > CONFIG_FORMAT_VERSION:
        raise MarrowError(f"{CONFIG_KEY}: format_version {cfg['format_version']} is newer than supported")
    check_optional(cfg)
    check_anchors(cfg)
    if cfg["refine"] is not None:
        cfg["refine"] = check_refine_config(cfg["refine"])
    return cfg


def check_refine_config(r) -> dict:
    """Validate and complete a `refine` config object: {"cell": "gru"|"lstm", "hidden": H,
    "key": K, "steps": T, "stop_threshold": 0.5, "nms_thresh": 0.5}. Returns a new dict in that
    key order."""
    if not isinstance(r, dict):
        raise MarrowError(f"{CONFIG_KEY}: refine must be an object or null, got {type(r).__name__}")
    for k in r:
        if k not in REFINE_REQUIRED and k not in REFINE_DEFAULTS:
            raise MarrowError(f"{CONFIG_KEY}: unknown field refine.{k!r}")
    for k in REFINE_REQUIRED:
        if k not in r:
            raise MarrowError(f"{CONFIG_KEY}: refine.{k} is missing (refine needs cell, hidden, key, steps)")
    out = {}
    if r["cell"] not in REFINE_CELLS:
        raise MarrowError(f"{CONFIG_KEY}: refine.cell is {r['cell']!r}, expected \"gru\" or \"lstm\"")
    out["cell"] = r["cell"]
    for k in ("hidden", "key", "steps"):
        v = r[k]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise MarrowError(f"{CONFIG_KEY}: refine.{k} must be a positive integer, got {v!r}")
        out[k] = v
    for k, d in REFINE_DEFAULTS.items():
        v = r.get(k, d)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
            raise MarrowError(f"{CONFIG_KEY}: refine.{k} must be a number in [0, 1], got {v!r}")
        out[k] = float(v)
    return out


def refine_tensor_shapes(rcfg: dict, arch: dict) -> list:
    """[(full name, shape)] of the head's tensors in the canonical (state_dict) order, for a refine
    config and the detector's architecture (C = FPN width, R = representation size, N = classes)."""
    H, K, G = rcfg["hidden"], rcfg["key"], REFINE_CELLS[rcfg["cell"]]
    C, R, N = arch["fpn_width"], arch["representation_size"], arch["num_classes"]
    p = REFINE_PREFIX
    return [
        (p + "init.weight", (H, R)), (p + "init.bias", (H,)),
        (p + "key.weight", (K, C)), (p + "key.bias", (K,)),
        (p + "value.weight", (K, C)), (p + "value.bias", (K,)),
        (p + "query.weight", (K, H)), (p + "query.bias", (K,)),
        (p + "beta", (1,)),
        (p + "cell.weight_ih", (G * H, K)), (p + "cell.weight_hh", (G * H, H)),
        (p + "cell.bias_ih", (G * H,)), (p + "cell.bias_hh", (G * H,)),
        (p + "delta.weight", (4, H)), (p + "delta.bias", (4,)),
        (p + "stop.weight", (1, H)), (p + "stop.bias", (1,)),
        (p + "critic.weight", (1, H)), (p + "critic.bias", (1,)),
        (p + "cls.weight", (N, H)), (p + "cls.bias", (N,)),
    ]


def _refine_explain(name, shape, want, rcfg, arch):
    """Which config / architecture fact a wrong refine tensor shape disagrees with."""
    facts = {
        "init.weight": "[hidden H, representation R]", "init.bias": "[H]",
        "key.weight": "[key K, FPN width C]", "value.weight": "[K, C]", "key.bias": "[K]", "value.bias": "[K]",
        "query.weight": "[K, H]", "query.bias": "[K]", "beta": "[1]",
        "cell.weight_ih": "[G*H, K] (G = 3 gru, 4 lstm)", "cell.weight_hh": "[G*H, H]",
        "cell.bias_ih": "[G*H]", "cell.bias_hh": "[G*H]",
        "delta.weight": "[4, H]", "delta.bias": "[4]", "stop.weight": "[1, H]", "stop.bias": "[1]",
        "critic.weight": "[1, H]", "critic.bias": "[1]", "cls.weight": "[classes N, H]", "cls.bias": "[N]",
    }
    short = name[len(REFINE_PREFIX):]
    return (f"{name}: shape {tuple(shape)}, expected {tuple(want)} = {facts.get(short, '')} for refine "
            f"{{cell {rcfg['cell']}, hidden {rcfg['hidden']}, key {rcfg['key']}}}, FPN width "
            f"{arch['fpn_width']}, representation {arch['representation_size']}, {arch['num_classes']} classes")


def split_refine(tensors: dict, cfg: dict, arch: dict, what: str = "weights"):
    """Split `refine.*` tensors off a name->tensor dict and check them against cfg["refine"] and
    the detector's architecture. Returns (detector tensors, OrderedDict of refine tensors in
    canonical order, or None when there is no head). Every problem is a MarrowError naming the
    tensor."""
    det = OrderedDict((k, v) for k, v in tensors.items() if not k.startswith(REFINE_PREFIX))
    ref = OrderedDict((k, v) for k, v in tensors.items() if k.startswith(REFINE_PREFIX))
    rcfg = cfg.get("refine")
    if rcfg is None:
        if ref:
            raise MarrowError(f"{what}: {len(ref)} refine.* tensors ({next(iter(ref))}, ...) but the config "
                              "has no `refine` object (cell, hidden, key, steps)")
        return det, None
    if not ref:
        raise MarrowError(f"{what}: the config has a `refine` object but there are no refine.* tensors")
    want = refine_tensor_shapes(rcfg, arch)
    names = {n for n, _ in want}
    for k in ref:
        if k not in names:
            raise MarrowError(f"{what}: unknown refinement-head tensor {k!r}")
    out = OrderedDict()
    for n, shape in want:
        if n not in ref:
            raise MarrowError(f"{what}: missing refinement-head tensor {n!r} (shape {tuple(shape)})")
        t = ref[n]
        if tuple(t.shape) != tuple(shape):
            raise MarrowError(f"{what}: " + _refine_explain(n, t.shape, shape, rcfg, arch))
        if not t.is_floating_point():
            raise MarrowError(f"{what}: {n}: dtype {t.dtype} is not floating point")
        if not torch.isfinite(t.float()).all():
            raise MarrowError(f"{what}: {n}: contains NaN or Inf")
        out[n] = t
    return det, out


def check_optional(cfg: dict, writing=False):
    """Validate `field` (a positive integer) and `lineage` ({class name: string}; "myeloid" and
    "erythroid" are the values marrow uses, others are allowed and ignored, as in config.rs). When
    writing a config, lineage keys must also be class names (a typo would silently drop the ratio)."""
    f = cfg.get("field")
    if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f <= 0):
        raise MarrowError(f"{CONFIG_KEY}: field must be a positive integer (pixels), got {f!r}")
    lin = cfg.get("lineage")
    if lin is not None:
        if not isinstance(lin, dict):
            raise MarrowError(f"{CONFIG_KEY}: lineage must be an object {{class name: lineage}}")
        for k, v in lin.items():
            if not isinstance(v, str):
                raise MarrowError(f"{CONFIG_KEY}: lineage of {k!r} is {v!r}, expected a string "
                                  f"({' or '.join(LINEAGES)})")
            names = cfg.get("class_names")
            if writing and names is not None and k not in names:
                raise MarrowError(f"{CONFIG_KEY}: lineage names class {k!r}, which is not in class_names {names}")


def config_json(cfg: dict) -> str:
    """Serialise a config for the metadata (drops `refine`, `field` and `lineage` when None)."""
    out = {k: v for k, v in cfg.items() if not (k in OPTIONAL_KEYS and v is None)}
    # Default anchors are left out, so files written before the anchor keys existed keep their
    # bytes and older marrow binaries still read default-anchor files.
    rpn = dict(out["rpn"])
    for k in ("anchor_sizes", "aspect_ratios"):
        if [float(x) for x in rpn[k]] == DEFAULT_CONFIG["rpn"][k]:
            del rpn[k]
    out["rpn"] = rpn
    return json.dumps(out, separators=(",", ":"))


def make_config(backbone=None, class_names=None, min_size=800, max_size=1333, eps=0.0, field=None,
                lineage=None, anchor_sizes=None, aspect_ratios=None) -> dict:
    cfg = merge_config({})
    cfg["backbone"] = backbone
    cfg["class_names"] = list(class_names) if class_names is not None else None
    cfg["transform"]["min_size"] = int(min_size)
    cfg["transform"]["max_size"] = int(max_size)
    cfg["frozen_bn_eps"] = float(eps)
    cfg["field"] = None if field is None else int(field)
    cfg["lineage"] = None if lineage is None else dict(lineage)
    if anchor_sizes is not None:
        cfg["rpn"]["anchor_sizes"] = [float(x) for x in anchor_sizes]
    if aspect_ratios is not None:
        cfg["rpn"]["aspect_ratios"] = [float(x) for x in aspect_ratios]
    check_optional(cfg, writing=True)
    check_anchors(cfg)
    return cfg


def check_anchors(cfg: dict):
    """rpn.anchor_sizes: one size per FPN level in 1..8192 px; rpn.aspect_ratios: 1..8 ratios in
    1/64..64 (the ranges src/model/config.rs accepts)."""
    r = cfg["rpn"]
    sizes, ratios = r["anchor_sizes"], r["aspect_ratios"]
    if not isinstance(sizes, list) or len(sizes) != FPN_LEVELS:
        raise MarrowError(f"{CONFIG_KEY}: rpn.anchor_sizes must list {FPN_LEVELS} sizes, one per FPN level "
                          f"(P2..P6), got {sizes!r}; several sizes per level are not supported")
    for x in sizes:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not 1 <= x <= 8192:
            raise MarrowError(f"{CONFIG_KEY}: rpn.anchor_sizes: {x!r} is not a size in 1..8192 pixels")
    if not isinstance(ratios, list) or not 1 <= len(ratios) <= MAX_ANCHORS_PER_LOCATION:
        raise MarrowError(f"{CONFIG_KEY}: rpn.aspect_ratios must list 1..{MAX_ANCHORS_PER_LOCATION} ratios, "
                          f"got {ratios!r}")
    for x in ratios:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not 1 / 64 <= x <= 64:
            raise MarrowError(f"{CONFIG_KEY}: rpn.aspect_ratios: {x!r} is not a ratio (h / w) in 1/64..64")


# ----------------------------------------------------------------------------------------------
# checkpoint names


_LEGACY = [
    (re.compile(r"^backbone\.fpn\.inner_blocks\.(\d+)\.(weight|bias)$"), r"backbone.fpn.inner_blocks.\1.0.\2"),
    (re.compile(r"^backbone\.fpn\.layer_blocks\.(\d+)\.(weight|bias)$"), r"backbone.fpn.layer_blocks.\1.0.\2"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
]


def extract_state_dict(obj) -> "OrderedDict[str, torch.Tensor]":
    """A state_dict from torch.load output: the dict itself, or a training checkpoint holding one."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise MarrowError(f"checkpoint is a {type(obj).__name__}, not a state_dict or checkpoint dict")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return OrderedDict(obj)
    for k in ("model", "state_dict", "model_state_dict", "model_state", "net", "weights"):
        if k in obj:
            return extract_state_dict(obj[k])
    tensor_keys = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    if len(tensor_keys) > 10:
        return OrderedDict((k, obj[k]) for k in tensor_keys)
    raise MarrowError("no state_dict found in checkpoint (looked for keys model, state_dict, "
                      f"model_state_dict; top-level keys: {sorted(map(str, obj))[:20]})")


def normalise_names(sd) -> "OrderedDict[str, torch.Tensor]":
    """Strip `module.`, rename legacy FPN / RPN names (docs/torchvision-semantics.md §11.2), drop
    `*.num_batches_tracked`."""
    out = OrderedDict()
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        if k.endswith("num_batches_tracked"):
            continue
        for pat, rep in _LEGACY:
            if pat.match(k):
                k = pat.sub(rep, k)
                break
        if k in out:
            raise MarrowError(f"tensor {k!r} appears twice (legacy and current name?)")
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------
# architecture


def infer_arch(shapes: dict) -> dict:
    """Architecture facts from {name: shape}. Raises MarrowError when it is not a model marrow
    supports."""
    def need(name):
        if name not in shapes:
            raise MarrowError(f"missing tensor {name!r}: not a torchvision Faster R-CNN + ResNet-FPN state_dict")
        return tuple(shapes[name])

    need("backbone.body.conv1.weight")
    bottleneck = "backbone.body.layer1.0.conv3.weight" in shapes
    counts = []
    for L in range(1, 5):
        idx = {int(m.group(1)) for n in shapes for m in [re.match(rf"^backbone\.body\.layer{L}\.(\d+)\.", n)] if m}
        if not idx or idx != set(range(len(idx))):
            raise MarrowError(f"backbone.body.layer{L}: block indices {sorted(idx)} are not 0..n-1")
        counts.append(len(idx))
    counts = tuple(counts)
    backbone = RESNETS.get((bottleneck, counts))
    if backbone is None:
        raise MarrowError(f"unsupported ResNet: {'Bottleneck' if bottleneck else 'BasicBlock'} with layer "
                          f"block counts {counts}; marrow supports resnet18/34/50/101")
    fpn_w, c2 = need("backbone.fpn.inner_blocks.0.0.weight")[:2]
    rep, fc6_in = need("roi_heads.box_head.fc6.weight")
    if fc6_in != fpn_w * 49:
        raise MarrowError(f"roi_heads.box_head.fc6.weight in_features {fc6_in} != FPN width {fpn_w} * 7 * 7")
    num_classes = need("roi_heads.box_predictor.cls_score.weight")[0]
    a = need("rpn.head.cls_logits.weight")[0]
    if not 1 <= a <= MAX_ANCHORS_PER_LOCATION:
        raise MarrowError(f"rpn.head.cls_logits has {a} anchors per location; marrow supports "
                          f"1..{MAX_ANCHORS_PER_LOCATION}")
    return {"backbone": backbone, "bottleneck": bottleneck, "layers": counts, "fpn_width": int(fpn_w),
            "num_classes": int(num_classes), "representation_size": int(rep), "anchors": int(a)}


def build_model(cfg: dict, arch: dict):
    """An eval-mode torchvision FasterRCNN with FrozenBatchNorm2d(eps=cfg.frozen_bn_eps)."""
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    eps = float(cfg["frozen_bn_eps"])
    norm = functools.partial(FrozenBatchNorm2d, eps=eps)
    body = getattr(torchvision.models, arch["backbone"])(weights=None, norm_layer=norm)
    in_channels_list = [256, 512, 1024, 2048] if arch["bottleneck"] else [64, 128, 256, 512]
    w = arch["fpn_width"]
    backbone = BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               in_channels_list, w, extra_blocks=LastLevelMaxPool())
    t, r, b = cfg["transform"], cfg["rpn"], cfg["box_head"]
    if abs(float(b["min_size"]) - 0.01) > 1e-9:
        raise MarrowError("box_head.min_size != 0.01 cannot be reproduced by torchvision (hard-coded)")
    rep = arch["representation_size"]
    model = FasterRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchor_generator(cfg),
        min_size=int(t["min_size"]), max_size=int(t["max_size"]),
        image_mean=[float(x) for x in t["image_mean"]], image_std=[float(x) for x in t["image_std"]],
        size_divisible=int(t["size_divisible"]),
        rpn_pre_nms_top_n_test=int(r["pre_nms_top_n"]), rpn_post_nms_top_n_test=int(r["post_nms_top_n"]),
        rpn_nms_thresh=float(r["nms_thresh"]), rpn_score_thresh=float(r["score_thresh"]),
        box_head=TwoMLPHead(w * 7 * 7, rep), box_predictor=FastRCNNPredictor(rep, arch["num_classes"]),
        box_score_thresh=float(b["score_thresh"]), box_nms_thresh=float(b["nms_thresh"]),
        box_detections_per_img=int(b["detections_per_img"]),
    )
    model.rpn.min_size = float(r["min_size"])
    return model.eval()


def anchor_generator(cfg: dict):
    """torchvision's AnchorGenerator for the config's rpn.anchor_sizes / aspect_ratios."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    r = cfg["rpn"]
    return AnchorGenerator(sizes=tuple((float(s),) for s in r["anchor_sizes"]),
                           aspect_ratios=(tuple(float(x) for x in r["aspect_ratios"]),) * len(r["anchor_sizes"]))


def check_config_vs_arch(cfg: dict, arch: dict):
    a, ratios = arch["anchors"], cfg["rpn"]["aspect_ratios"]
    if a != len(ratios):
        raise MarrowError(f"rpn.head.cls_logits has {a} anchors per location but rpn.aspect_ratios {ratios} "
                          f"makes {len(ratios)}: give the checkpoint's AnchorGenerator aspect ratios "
                          "(convert.py --aspect-ratios)")
    if cfg.get("backbone") not in (None, arch["backbone"]):
        raise MarrowError(f"config backbone {cfg['backbone']!r} but the tensors are a {arch['backbone']}")
    names = cfg.get("class_names")
    if names is not None and len(names) != arch["num_classes"]:
        raise MarrowError(f"config has {len(names)} class_names but the box predictor has {arch['num_classes']} classes")


def model_tensor_shapes(model) -> list:
    """[(name, shape)] in state_dict order, without num_batches_tracked."""
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]


def load_state_into(model, sd: dict):
    """strict load of an f32/f16 name->tensor dict."""
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise MarrowError(f"state_dict mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}")


# ----------------------------------------------------------------------------------------------
# safetensors I/O


def read_safetensors(path: str):
    """(OrderedDict name->torch tensor in file order, metadata dict)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
    return tensors, meta


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.int32: "I32",
              torch.uint8: "U8", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_safetensors(path: str, tensors: dict, meta: dict):
    """Write a safetensors file byte-for-byte deterministically: tensors in the given order (so a
    model file keeps state_dict order), metadata keys sorted, header padded with spaces to 8 bytes.
    (safetensors.torch.save_file orders metadata through a hash map, so its bytes vary per run.)"""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    header = {"__metadata__": {k: str(meta[k]) for k in sorted(meta)}} if meta else {}
    blobs, off = [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        if t.dtype not in _ST_DTYPES:
            raise MarrowError(f"{name}: dtype {t.dtype} cannot be stored")
        b = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def load_marrow(path: str, overrides: dict | None = None):
    """Load a marrow safetensors into torchvision. Returns (model, cfg, arch, metadata)."""
    tensors, meta = read_safetensors(path)
    if "backbone.body.conv1.weight" not in tensors and SEEDGEN_KEY in meta:
        # A fixture: the weights are rebuilt from its seedgen spec.
        spec = json.loads(meta[SEEDGEN_KEY])
        tensors = OrderedDict((n, torch.from_numpy(v)) for n, _, v in seedgen.generate_all(spec))
    cfg = merge_config(json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None)
    for sect, vals in (overrides or {}).items():
        if isinstance(vals, dict):
            cfg[sect].update(vals)
        else:
            cfg[sect] = vals
    arch = infer_arch({k: tuple(v.shape) for k, v in tensors.items() if not k.startswith(REFINE_PREFIX)})
    check_config_vs_arch(cfg, arch)
    tensors, refine = split_refine(tensors, cfg, arch, os.path.basename(path))
    model = build_model(cfg, arch)
    load_state_into(model, tensors)
    # The refinement head (if any) is not part of torchvision's model: its checked tensors ride along
    # as a plain attribute (OrderedDict full name -> tensor, or None); refine.head_from_model builds it.
    model.marrow_refine = refine
    return model, cfg, arch, meta


def load_pth(path: str, cfg: dict | None = None):
    """Load a torchvision checkpoint (.pth) directly, with the same name handling as convert.py."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a bad file)
        raise MarrowError(f"cannot read checkpoint: {e}") from e
    sd = normalise_names(extract_state_dict(obj))
    arch = infer_arch({k: tuple(v.shape) for k, v in sd.items()})
    cfg = merge_config(cfg)
    check_config_vs_arch(cfg, arch)
    sd, refine = split_refine(sd, cfg, arch, os.path.basename(path))
    model = build_model(cfg, arch)
    load_state_into(model, sd)
    model.marrow_refine = refine
    return model, cfg, arch


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# seeded models


def seeded_state_dict(tensor_shapes, seed: int, scales: dict) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((n, torch.from_numpy(seedgen.generate(seed, n, s, scales))) for n, s in tensor_shapes)


def build_seeded_model(cfg: dict, arch: dict, seed: int, scales: dict):
    """(model, seedgen spec JSON, check JSON) with every tensor from seedgen v1."""
    model = build_model(cfg, arch)
    shapes = model_tensor_shapes(model)
    sd = seeded_state_dict(shapes, seed, scales)
    load_state_into(model, sd)
    spec = seedgen.spec_json(seed, scales, shapes)
    check_names = [shapes[0][0], "backbone.body.bn1.running_var", "roi_heads.box_predictor.cls_score.weight"]
    check = json.dumps({n: seedgen.check_entry(sd[n].numpy()) for n in check_names}, separators=(",", ":"))
    return model, spec, check, sd


def arch_for(backbone: str, fpn_width: int, num_classes: int, representation_size: int = 1024,
             anchors: int = 3) -> dict:
    for (bott, counts), name in RESNETS.items():
        if name == backbone:
            return {"backbone": name, "bottleneck": bott, "layers": counts, "fpn_width": int(fpn_width),
                    "num_classes": int(num_classes), "representation_size": int(representation_size),
                    "anchors": int(anchors)}
    raise MarrowError(f"unknown backbone {backbone!r}")
