"""The refinement head of docs/design.md §6: the Python reference (docs/refinement.md).

    from refine import RefineHead, detect_refined, head_from_model
    model, cfg, arch, _ = marrow_model.load_marrow("W.safetensors")   # a file with refine.* tensors
    head = head_from_model(model, cfg, arch)
    out = detect_refined(model, head, image)        # image: f32 [3,H,W] in [0,1]

`RefineHead` holds exactly the §6 parameters: its state_dict() keys are `init.weight`,
`init.bias`, `key.*`, `value.*`, `query.*`, `beta`, `cell.weight_ih`, `cell.weight_hh`,
`cell.bias_ih`, `cell.bias_hh`, `delta.*`, `stop.*`, `critic.*`, `cls.*` (stored with the prefix
`refine.` in a marrow file). Default init: PyTorch's own for Linear / GRUCell / LSTMCell, beta = 1;
`init_params_numpy` draws the same distributions from a numpy Generator (version-stable, used for
seeded heads and fixtures). Everything follows the module's dtype: `.double()` the head (and the
detector) for the float64 reference. CPU, deterministic.

Per detection (all D at once, masked):
    h0 = tanh(W_init f + b)            (LSTM: c0 = 0)
    for t = 1..T:
      X = MultiScaleRoIAlign(b_{t-1})  7x7, sampling 2, the detector's level mapper; [49, C] row-major bins
      K_t, V_t = X W_key^T + b, X W_value^T + b
      q = W_query h_{t-1} + b;  alpha = softmax(beta * K_t q / sqrt(K));  ctx = alpha^T V_t
      h_t = cell(ctx, h_{t-1});  delta_t = W_delta h_t + b
      b_t = clip(BoxCoder((10,10,5,5)).decode(delta_t, b_{t-1}))
      s_t = sigmoid(W_stop h_t + b);  s_t > stop_threshold: stops at step t
    A stopped detection is frozen: box, h (and c) and its recorded stop prob and attention are
    carried unchanged into the later steps' debug rows (its RoIAlign is computed and discarded).
    p = softmax(W_cls h_final + b);  label = argmax_{c>=1} p (first on ties), score = p_label
    then remove_small_boxes(1e-2), batched_nms(nms_thresh), first detections_per_img, resize_boxes.
"""
from __future__ import annotations

import math
import os
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import marrow_model as mm  # noqa: E402

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
FEATMAP_NAMES = ["0", "1", "2", "3"]


def make_pooler(like=None):
    """A fresh MultiScaleRoIAlign configured as the detector's box_roi_pool (featmap names '0'..'3',
    7x7, sampling ratio 2, canonical 224 / level 4), or as `like` when given. Fresh, so that its
    level scales are inferred from the image it is called on (torchvision caches them on the
    first call)."""
    from torchvision.ops import MultiScaleRoIAlign
    if like is None:
        return MultiScaleRoIAlign(FEATMAP_NAMES, 7, 2)
    return MultiScaleRoIAlign(list(like.featmap_names), like.output_size, like.sampling_ratio,
                              canonical_scale=like.canonical_scale, canonical_level=like.canonical_level)


class RefineHead(nn.Module):
    def __init__(self, fpn_channels: int, representation: int, num_classes: int, cell="gru", hidden=64,
                 key=32, steps=3, stop_threshold=0.5, nms_thresh=0.5, detections_per_img=100):
        super().__init__()
        if cell not in mm.REFINE_CELLS:
            raise mm.MarrowError(f"refine cell {cell!r}: expected gru or lstm")
        self.cell_kind = cell
        self.hidden, self.key_size, self.steps = int(hidden), int(key), int(steps)
        self.stop_threshold, self.nms_thresh = float(stop_threshold), float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.fpn_channels, self.representation, self.num_classes = int(fpn_channels), int(representation), int(num_classes)
        H, K = self.hidden, self.key_size
        # Registration order = state_dict order = docs/design.md §6 order.
        self.init = nn.Linear(representation, H)
        self.key = nn.Linear(fpn_channels, K)
        self.value = nn.Linear(fpn_channels, K)
        self.query = nn.Linear(H, K)
        self.beta = nn.Parameter(torch.ones(1))
        self.cell = nn.GRUCell(K, H) if cell == "gru" else nn.LSTMCell(K, H)
        self.delta = nn.Linear(H, 4)
        self.stop = nn.Linear(H, 1)
        self.critic = nn.Linear(H, 1)  # training only (advantage actor-critic); carried in files
        self.cls = nn.Linear(H, num_classes)

    # ------------------------------------------------------------------ config / names

    def config(self) -> dict:
        """The `refine` config object (docs/design.md §6)."""
        return {"cell": self.cell_kind, "hidden": self.hidden, "key": self.key_size, "steps": self.steps,
                "stop_threshold": self.stop_threshold, "nms_thresh": self.nms_thresh}

    def arch(self) -> dict:
        return {"fpn_width": self.fpn_channels, "representation_size": self.representation,
                "num_classes": self.num_classes}

    def marrow_tensors(self, dtype=torch.float32) -> "OrderedDict[str, torch.Tensor]":
        """The head's tensors under their marrow names (`refine.` + state_dict key), in the
        docs/design.md §6 order (state_dict() itself lists `beta` first: torch puts a module's own
        parameters before its children's)."""
        sd = self.state_dict()
        names = [n for n, _ in mm.refine_tensor_shapes(self.config(), self.arch())]
        return OrderedDict((n, sd[n[len(mm.REFINE_PREFIX):]].detach().to(dtype).contiguous().cpu()) for n in names)

    # ------------------------------------------------------------------ the recurrence

    def _decode(self, d, b, image_size):
        from torchvision.models.detection._utils import BoxCoder
        from torchvision.ops import boxes as box_ops
        coder = BoxCoder(BOX_WEIGHTS, BBOX_XFORM_CLIP)
        nb = coder.decode_single(d, b)
        return box_ops.clip_boxes_to_image(nb, image_size)

    def run_steps(self, fpn, image_size, boxes, features, pooler=None):
        """The recurrence for D detections. fpn: {'0'..'3': [1,C,h,w]} (more keys are ignored);
        image_size: resized (h, w); boxes [D,4] resized coords; features [D,R]. Returns the debug
        dict: step_boxes [T,D,4], stop_prob [T,D], attention [T,D,P*P], stop_step [D] i64 (1-based,
        0 = never stopped), hidden [D,H] (final), cell_state [D,H] (LSTM only), logits [D,N]
        (terminal class logits), boxes [D,4] (final), values [T,D] (critic, for training)."""
        dt = self.init.weight.dtype
        T, H = self.steps, self.hidden
        boxes = boxes.to(dt)
        features = features.to(dt)
        D = int(boxes.shape[0])
        image_size = (int(image_size[0]), int(image_size[1]))
        pooler = make_pooler(pooler)
        lvl = OrderedDict((k, fpn[k].to(dt)) for k in pooler.featmap_names)
        P = pooler.output_size[0] if isinstance(pooler.output_size, (tuple, list)) else pooler.output_size
        h = torch.tanh(self.init(features))
        c = torch.zeros_like(h) if self.cell_kind == "lstm" else None
        b = boxes
        stopped = torch.zeros(D, dtype=torch.bool)
        stop_step = torch.zeros(D, dtype=torch.int64)
        s_prev = torch.zeros(D, dtype=dt)
        a_prev = torch.zeros(D, P * P, dtype=dt)
        rec_b, rec_s, rec_a, rec_v = [], [], [], []
        scale = 1.0 / math.sqrt(self.key_size)
        for t in range(1, T + 1):
            if D:
                X = pooler(lvl, [b], [image_size])  # [D, C, P, P]
            else:
                X = torch.zeros(0, self.fpn_channels, P, P, dtype=dt)
            X = X.flatten(2).transpose(1, 2)  # [D, 49, C], bin index ph*7+pw
            Kt, Vt = self.key(X), self.value(X)  # [D, 49, K]
            q = self.query(h)  # [D, K]
            logit = self.beta * torch.bmm(Kt, q.unsqueeze(-1)).squeeze(-1) * scale
            a = torch.softmax(logit, dim=-1)  # max-subtracted inside
            ctx = torch.bmm(a.unsqueeze(1), Vt).squeeze(1)  # [D, K]
            if c is None:
                hn, cn = self.cell(ctx, h), None
            else:
                hn, cn = self.cell(ctx, (h, c))
            bn = self._decode(self.delta(hn), b, image_size)
            s = torch.sigmoid(self.stop(hn)).squeeze(-1)
            v = self.critic(hn).squeeze(-1)
            act = ~stopped
            a1 = act[:, None]
            b = torch.where(a1, bn, b)
            h = torch.where(a1, hn, h)
            if c is not None:
                c = torch.where(a1, cn, c)
            s_prev = torch.where(act, s, s_prev)
            a_prev = torch.where(a1, a, a_prev)
            rec_v.append(torch.where(act, v, rec_v[-1]) if rec_v else v)
            newly = act & (s > self.stop_threshold)
            stop_step[newly] = t
            stopped = stopped | newly
            rec_b.append(b)
            rec_s.append(s_prev)
            rec_a.append(a_prev)
        logits = self.cls(h)
        dbg = {
            "step_boxes": torch.stack(rec_b) if T else torch.zeros(0, D, 4, dtype=dt),
            "stop_prob": torch.stack(rec_s) if T else torch.zeros(0, D, dtype=dt),
            "attention": torch.stack(rec_a) if T else torch.zeros(0, D, P * P, dtype=dt),
            "values": torch.stack(rec_v) if T else torch.zeros(0, D, dtype=dt),
            "stop_step": stop_step,
            "hidden": h,
            "logits": logits,
            "boxes": b,
        }
        if c is not None:
            dbg["cell_state"] = c
        return dbg

    def classify(self, logits):
        """(label [D] i64 in 1..N-1, score [D], probs [D,N]): softmax over all N, argmax over c >= 1
        (the first maximum on ties), score = p_label."""
        p = torch.softmax(logits, dim=-1)
        if p.shape[0] == 0:
            return torch.zeros(0, dtype=torch.int64), p.new_zeros(0), p
        lab = torch.argmax(p[:, 1:], dim=1) + 1
        return lab, p.gather(1, lab[:, None]).squeeze(1), p

    def postprocess(self, boxes, scores, labels, image_size, orig_size=None):
        """remove_small_boxes(1e-2), batched_nms(nms_thresh), the first detections_per_img,
        resize_boxes to orig_size. Returns dict boxes (orig coords when orig_size is given),
        boxes_resized, scores, labels, keep (indices into the D inputs)."""
        from torchvision.models.detection.transform import resize_boxes
        from torchvision.ops import boxes as box_ops
        idx = torch.arange(boxes.shape[0])
        keep = box_ops.remove_small_boxes(boxes, 1e-2)
        boxes, scores, labels, idx = boxes[keep], scores[keep], labels[keep], idx[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        boxes, scores, labels, idx = boxes[keep], scores[keep], labels[keep], idx[keep]
        out = {"boxes_resized": boxes, "scores": scores, "labels": labels, "keep": idx}
        out["boxes"] = resize_boxes(boxes, list(image_size), list(orig_size)) if orig_size is not None else boxes
        return out

    def forward(self, fpn, image_size, boxes, features, orig_size=None, pooler=None):
        """(detections, debug): detections = postprocess of the refined boxes (see postprocess);
        debug = run_steps' dict plus probs [D,N], labels [D], scores [D] (before NMS)."""
        dbg = self.run_steps(fpn, image_size, boxes, features, pooler)
        lab, score, p = self.classify(dbg["logits"])
        dbg.update({"probs": p, "labels": lab, "scores": score})
        return self.postprocess(dbg["boxes"], score, lab, image_size, orig_size), dbg


# ---------------------------------------------------------------------------------------------
# construction


def init_params_numpy(head: RefineHead, rng: np.random.Generator, scales: dict | None = None, beta=1.0):
    """Fill the head with PyTorch's default-init distributions drawn from `rng` in state_dict order
    (Linear weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)); GRUCell / LSTMCell all ~ U(-1/sqrt(H),
    1/sqrt(H)); beta = `beta`), rounded to f32. `scales` multiplies named tensors after drawing
    (e.g. {"delta.weight": 3.0}) and may also set a tensor to a constant with ("const", v)."""
    scales = scales or {}
    sd = OrderedDict()
    for k, v in head.state_dict().items():
        if k == "beta":
            a = np.full(tuple(v.shape), beta, dtype=np.float64)
        else:
            fan = head.hidden if k.startswith("cell.") else getattr(head, k.split(".")[0]).in_features
            bound = 1.0 / math.sqrt(fan)
            a = rng.uniform(-bound, bound, size=tuple(v.shape))
        sc = scales.get(k)
        if isinstance(sc, tuple) and sc[0] == "const":
            a = np.full(tuple(v.shape), sc[1], dtype=np.float64)
        elif sc is not None:
            a = a * sc
        sd[k] = torch.from_numpy(a.astype(np.float32))
    head.load_state_dict(sd)
    return head


def head_from_tensors(rcfg: dict, tensors: dict, arch: dict, detections_per_img=100) -> RefineHead:
    """A float32 RefineHead from checked marrow tensors (full names) and the refine config."""
    head = RefineHead(arch["fpn_width"], arch["representation_size"], arch["num_classes"], rcfg["cell"],
                      rcfg["hidden"], rcfg["key"], rcfg["steps"], rcfg["stop_threshold"], rcfg["nms_thresh"],
                      detections_per_img)
    sd = OrderedDict((k[len(mm.REFINE_PREFIX):], v.to(torch.float32)) for k, v in tensors.items())
    head.load_state_dict(sd, strict=True)
    return head.eval()


def head_from_model(model, cfg: dict, arch: dict | None = None):
    """The RefineHead carried by a model from marrow_model.load_marrow / load_pth, or None.
    (load_marrow already checked the tensors against the detector; arch defaults to their shapes.)"""
    t = getattr(model, "marrow_refine", None)
    if t is None:
        return None
    p = mm.REFINE_PREFIX
    arch = arch or {"fpn_width": int(t[p + "key.weight"].shape[1]),
                    "representation_size": int(t[p + "init.weight"].shape[1]),
                    "num_classes": int(t[p + "cls.weight"].shape[0])}
    return head_from_tensors(cfg["refine"], t, arch, int(cfg["box_head"]["detections_per_img"]))


# ---------------------------------------------------------------------------------------------
# detector side: torchvision's postprocess_detections with the proposal index kept


def postprocess_with_index(roi_heads, class_logits, box_regression, proposals, image_size):
    """torchvision RoIHeads.postprocess_detections for one image, also returning for every
    detection the index of the proposal it came from. Same ops in the same order, so boxes, scores
    and labels are bit-identical to torchvision's (detect_refined asserts it).
    Returns (boxes [D,4] resized coords, scores [D], labels [D] i64, proposal_index [D] i64)."""
    from torchvision.ops import boxes as box_ops
    num_classes = class_logits.shape[-1]
    pred_boxes = roi_heads.box_coder.decode(box_regression, [proposals])
    pred_scores = F.softmax(class_logits, -1)
    boxes = box_ops.clip_boxes_to_image(pred_boxes, image_size)
    labels = torch.arange(num_classes).view(1, -1).expand_as(pred_scores)
    prop = torch.arange(pred_scores.shape[0]).view(-1, 1).expand_as(pred_scores)
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = pred_scores[:, 1:].reshape(-1)
    labels = labels[:, 1:].reshape(-1)
    prop = prop[:, 1:].reshape(-1)
    inds = torch.where(scores > roi_heads.score_thresh)[0]
    boxes, scores, labels, prop = boxes[inds], scores[inds], labels[inds], prop[inds]
    keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
    boxes, scores, labels, prop = boxes[keep], scores[keep], labels[keep], prop[keep]
    keep = box_ops.batched_nms(boxes, scores, labels, roi_heads.nms_thresh)
    keep = keep[: roi_heads.detections_per_img]
    return boxes[keep], scores[keep], labels[keep], prop[keep]


@torch.no_grad()
def run_detector(model, image: torch.Tensor, check=True) -> dict:
    """The detector stage by stage on one image [3,H,W] (model's dtype): fpn levels, resized and
    original size, proposals, box features (TwoMLPHead output), logits, deltas, detections in
    resized coords with their proposal index, and the detections rescaled to the original image.
    check=True asserts the detections equal torchvision's own postprocess_detections."""
    model.eval()
    H, W = int(image.shape[-2]), int(image.shape[-1])
    images, _ = model.transform([image])
    feats = model.backbone(images.tensors)
    proposals, _ = model.rpn(images, feats)
    rh = model.roi_heads
    bf = rh.box_head(rh.box_roi_pool(feats, proposals, images.image_sizes))
    logits, deltas = rh.box_predictor(bf)
    size = tuple(int(s) for s in images.image_sizes[0])
    boxes, scores, labels, pidx = postprocess_with_index(rh, logits, deltas, proposals[0], size)
    if check:
        tb, ts, tl = rh.postprocess_detections(logits, deltas, proposals, images.image_sizes)
        if not (torch.equal(tb[0], boxes) and torch.equal(ts[0], scores) and torch.equal(tl[0], labels)):
            raise RuntimeError("proposal-index postprocess differs from torchvision's postprocess_detections")
    from torchvision.models.detection.transform import resize_boxes
    return {"fpn": feats, "image_size": size, "orig_size": (H, W), "proposals": proposals[0],
            "box_features": bf, "box_logits": logits, "box_deltas": deltas,
            "det_boxes_resized": boxes, "det_scores": scores, "det_labels": labels, "proposal_index": pidx,
            "det_features": bf[pidx], "det_boxes": resize_boxes(boxes, list(size), [H, W])}


@torch.no_grad()
def detect_refined(model, head: RefineHead, image: torch.Tensor, check=True) -> dict:
    """Detector + refinement head on one image (f32 [3,H,W] in [0,1], or f64 with both modules
    .double()). Returns run_detector's dict plus `refine` (postprocessed detections, original
    coords under "boxes") and `refine_debug` (run_steps' dict + probs/labels/scores)."""
    head.eval()
    det = run_detector(model, image.to(head.init.weight.dtype), check=check)
    out, dbg = head(det["fpn"], det["image_size"], det["det_boxes_resized"], det["det_features"],
                    orig_size=det["orig_size"], pooler=model.roi_heads.box_roi_pool)
    det["refine"], det["refine_debug"] = out, dbg
    return det
