#!/usr/bin/env python3
"""Train the refinement head (docs/design.md §6, docs/refinement.md) on top of a FROZEN detector.

    python3 weights/train_refine.py --weights DET.safetensors --data TXL-PBC --work-dir WORK
        --cell gru|lstm [--hidden 64] [--key 32] [--steps 3] [--sup-epochs 3] [--rl-epochs 3]
        [--time-budget MINUTES] [--limit N] [--val-limit N] [--resume]
    python3 weights/train_refine.py export --work-dir WORK --out OUT.safetensors [--half] [--from best|last]
    python3 weights/train_refine.py eval --work-dir WORK [--from best|last] [--val-limit N]

Data: TXL-PBC in YOLO layout (images/{train,val}, labels/{train,val}, classes.txt), as train.py.
WORK (keep it outside git): cache/{train,val}/NNNNN.pt = the detector's outputs per image, computed
once (FPN levels '0'..'3' in f16, resized / original size, the box head's detections in resized
coords with labels, scores and the TwoMLPHead features of their proposals (proposal index
recovered by refine.postprocess_with_index), the ground truth scaled to resized coords), so that
epochs never rerun the backbone; last.pt (head, optimiser, phase, epoch, position, permutation,
RNG states; every epoch and every --ckpt-minutes), best.pt (best val AP, or with --select count the best worst-class count error), train.log,
metrics.jsonl. --resume continues where last.pt stopped (mid-epoch included).

Training, per image, all its detections at once (CPU, torch.set_num_threads(2),
OMP_WAIT_POLICY=PASSIVE):
1. supervised warm start (--sup-epochs): every detection is matched to the ground-truth box of
   highest IoU (match if IoU >= 0.5, else background); all T steps run without stopping; loss =
   smooth-L1 (beta 1/9) between each step's deltas and BoxCoder((10,10,5,5)).encode(gt, b_{t-1})
   (matched detections) + cross-entropy of the terminal class logits (background for unmatched)
   + BCE of the stop head towards "IoU(b_t, gt) >= 0.85 or unmatched" (a warm start for stopping).
2. advantage actor-critic (--rl-epochs): box actions delta_t ~ N(W_delta h_t + b, sigma^2) per
   coordinate (--sigma, in delta units), stop action ~ Bernoulli(s_t) which ends the episode;
   reward r_t = IoU(b_t, gt) - IoU(b_{t-1}, gt) (0 for unmatched detections) plus a terminal bonus
   (--bonus, 1.0) when the terminal class (argmax over c >= 1) is the matched ground truth's class
   at IoU >= 0.7; returns G_t with --gamma (0.95); critic V(h_t) = refine.critic; loss = -A_t log pi
   + 0.5 (G_t - V)^2 - 0.01 entropy(stop) + cross-entropy of the terminal class (kept from the
   warm start). Adam, --lr 1e-3 (supervised) and --rl-lr 2e-4.
Evaluation on val (--val-limit images): pycocotools COCO AP / AP50 / AP75, per-class AP / AP50 and
count MAE per class at score 0.7, for the detector alone (its cached detections) and detector +
head (the head run in its deterministic inference form, refine.RefineHead.forward, on the cached
FPN levels — stored in f16, so the head's RoIAlign differs from a live run by ~1e-3 relative).
Export writes the detector file + the head (`refine.*` + config) as a marrow file
(add_refine_head.write_with_head).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import add_refine_head  # noqa: E402
import marrow_model as mm  # noqa: E402
import refine as rf  # noqa: E402
import train as tr  # noqa: E402


class Log:
    def __init__(self, path):
        self.f = open(path, "a", encoding="utf-8")

    def __call__(self, *a):
        s = " ".join(str(x) for x in a)
        line = f"{time.strftime('%H:%M:%S')} {s}"
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


# ---------------------------------------------------------------------------------------------
# cache of the frozen detector's outputs


@torch.no_grad()
def build_cache(model, split, cache_dir, n, log):
    os.makedirs(cache_dir, exist_ok=True)
    t0, done = time.time(), 0
    for i in range(n):
        p = os.path.join(cache_dir, f"{i:05d}.pt")
        if os.path.exists(p):
            continue
        img = tr.to_tensor(split.image(i))
        d = rf.run_detector(model, img, check=False)
        (h, w), (H, W) = d["image_size"], d["orig_size"]
        gt = torch.as_tensor(split.boxes[i], dtype=torch.float32).reshape(-1, 4)
        gt = gt * torch.tensor([w / W, h / H, w / W, h / H], dtype=torch.float32)
        obj = {"fpn": {k: d["fpn"][k].half() for k in rf.FEATMAP_NAMES}, "image_size": (h, w), "orig_size": (H, W),
               "boxes": d["det_boxes_resized"], "labels": d["det_labels"], "scores": d["det_scores"],
               "features": d["det_features"], "proposal_index": d["proposal_index"],
               "gt_boxes": gt, "gt_labels": torch.as_tensor(split.labels[i], dtype=torch.int64)}
        tmp = p + ".tmp"
        torch.save(obj, tmp)
        os.replace(tmp, p)
        done += 1
        if done % 25 == 0:
            log(f"cache {cache_dir}: {i + 1}/{n}, {(time.time() - t0) / done:.2f} s/image")
    if done:
        log(f"cache {cache_dir}: built {done} images in {time.time() - t0:.0f} s")


def load_cached(cache_dir, i):
    o = torch.load(os.path.join(cache_dir, f"{i:05d}.pt"), weights_only=False)
    o["fpn"] = {k: v.float() for k, v in o["fpn"].items()}
    return o


# ---------------------------------------------------------------------------------------------
# rollouts


def match(boxes, gt_boxes, gt_labels):
    """(target box [D,4], target class [D] (0 = background), matched [D] bool) at IoU >= 0.5."""
    from torchvision.ops import box_iou
    D = boxes.shape[0]
    if D == 0 or gt_boxes.shape[0] == 0:
        return torch.zeros(D, 4), torch.zeros(D, dtype=torch.int64), torch.zeros(D, dtype=torch.bool)
    iou = box_iou(boxes, gt_boxes)
    best, j = iou.max(1)
    m = best >= 0.5
    return gt_boxes[j], torch.where(m, gt_labels[j], torch.zeros_like(j)), m


def pair_iou(a, b):
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    u = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / u.clamp(min=1e-9)


def step_core(head, pooler, lvl, size, b, h, c):
    """One recurrence step (grad-enabled): (h, c, delta mean, stop logit, value)."""
    import math
    X = pooler(lvl, [b], [size]).flatten(2).transpose(1, 2)
    Kt, Vt = head.key(X), head.value(X)
    q = head.query(h)
    a = torch.softmax(head.beta * torch.bmm(Kt, q.unsqueeze(-1)).squeeze(-1) / math.sqrt(head.key_size), -1)
    ctx = torch.bmm(a.unsqueeze(1), Vt).squeeze(1)
    if c is None:
        h = head.cell(ctx, h)
    else:
        h, c = head.cell(ctx, (h, c))
    return h, c, head.delta(h), head.stop(h).squeeze(-1), head.critic(h).squeeze(-1)


def decode(head, d, b, size):
    return head._decode(d, b, size)


def loss_supervised(head, o):
    from torchvision.models.detection._utils import BoxCoder
    coder = BoxCoder(rf.BOX_WEIGHTS)
    b = o["boxes"]
    if b.shape[0] == 0:
        return None, {}
    g, cls, m = match(b, o["gt_boxes"], o["gt_labels"])
    pooler = rf.make_pooler()
    lvl = o["fpn"]
    h = torch.tanh(head.init(o["features"]))
    c = torch.zeros_like(h) if head.cell_kind == "lstm" else None
    lb = lst = 0.0
    for _ in range(head.steps):
        h, c, d, sl, _ = step_core(head, pooler, lvl, o["image_size"], b, h, c)
        if m.any():
            tgt = coder.encode_single(g[m], b[m])
            lb = lb + F.smooth_l1_loss(d[m], tgt, beta=1 / 9, reduction="sum") / max(1, int(m.sum()))
        b = decode(head, d.detach(), b, o["image_size"]).detach()
        done = (~m) | (pair_iou(b, g) >= 0.85)
        lst = lst + F.binary_cross_entropy_with_logits(sl, done.float())
    lc = F.cross_entropy(head.cls(h), cls)
    loss = lb / head.steps + lc + 0.5 * lst / head.steps
    return loss, {"box": float(lb.detach() if torch.is_tensor(lb) else lb) / head.steps, "cls": float(lc.detach()),
                  "stop": float(lst.detach()) / head.steps}


def loss_a2c(head, o, a, gen):
    b = o["boxes"]
    D = b.shape[0]
    if D == 0:
        return None, {}
    g, cls, m = match(b, o["gt_boxes"], o["gt_labels"])
    pooler = rf.make_pooler()
    h = torch.tanh(head.init(o["features"]))
    c = torch.zeros_like(h) if head.cell_kind == "lstm" else None
    alive = torch.ones(D, dtype=torch.bool)
    iou_prev = torch.where(m, pair_iou(b, g), torch.zeros(D))
    logps, values, rewards, masks, ents = [], [], [], [], []
    hfin = h
    for t in range(head.steps):
        h, c, mu, sl, v = step_core(head, pooler, o["fpn"], o["image_size"], b, h, c)
        dist = torch.distributions.Normal(mu, a.sigma)
        d = (mu + a.sigma * torch.randn(mu.shape, generator=gen)).detach()
        sdist = torch.distributions.Bernoulli(logits=sl)
        stop = (torch.rand(D, generator=gen) < torch.sigmoid(sl)).float().detach()
        if t == head.steps - 1:
            stop = torch.ones(D)  # the episode ends at T whatever the stop head says
        logp = dist.log_prob(d).sum(-1) + (sdist.log_prob(stop) if t < head.steps - 1 else 0.0)
        nb = decode(head, d, b, o["image_size"]).detach()
        iou = torch.where(m, pair_iou(nb, g), torch.zeros(D))
        r = torch.where(alive, iou - iou_prev, torch.zeros(D))
        logps.append(logp)
        values.append(v)
        ents.append(sdist.entropy())
        masks.append(alive.clone())
        b = torch.where(alive[:, None], nb, b)
        iou_prev = torch.where(alive, iou, iou_prev)
        hfin = torch.where(alive[:, None], h, hfin)
        newly = alive & (stop > 0.5)
        rewards.append(r)
        alive = alive & ~newly
    logits = head.cls(hfin)
    pred = torch.argmax(logits[:, 1:], 1) + 1
    bonus = ((pred == cls) & m & (iou_prev >= 0.7)).float() * a.bonus
    # the terminal bonus is paid at the step each detection's episode ended at
    T = len(rewards)
    ended = torch.zeros(D, dtype=torch.long)
    for t in range(T):
        ended = torch.where(masks[t], torch.full_like(ended, t), ended)
    for t in range(T):
        rewards[t] = rewards[t] + torch.where(ended == t, bonus, torch.zeros(D))
    G = torch.zeros(D)
    lp = lv = le = 0.0
    n = 0
    for t in reversed(range(T)):
        G = rewards[t] + a.gamma * G * masks[t + 1].float() if t + 1 < T else rewards[t]
        mk = masks[t].float()
        adv = (G - values[t]).detach()
        lp = lp - (adv * logps[t] * mk).sum()
        lv = lv + 0.5 * ((G - values[t]) ** 2 * mk).sum()
        le = le - (ents[t] * mk).sum()
        n += int(mk.sum())
    n = max(n, 1)
    lc = F.cross_entropy(logits, cls)
    loss = (lp + lv + 0.01 * le) / n + lc
    return loss, {"pg": float(lp.detach()) / n, "v": float(lv.detach()) / n, "cls": float(lc.detach()),
                  "ret": float(sum(float((r * mk.float()).sum()) for r, mk in zip(rewards, masks)) / D)}


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(head, val, cache_dir, n, names, threshold=0.7):
    from torchvision.models.detection.transform import resize_boxes
    k = len(names)
    gt = tr.coco_gt(val, k + 1, names)
    runs = {"detector": [], "detector+head": []}
    counts = {r: np.zeros((n, k), int) for r in runs}
    cgt = np.zeros((n, k), int)
    head.eval()
    for i in range(n):
        o = load_cached(cache_dir, i)
        det = (resize_boxes(o["boxes"], list(o["image_size"]), list(o["orig_size"])), o["scores"], o["labels"])
        out, _ = head(o["fpn"], o["image_size"], o["boxes"], o["features"], orig_size=o["orig_size"])
        for r, (bb, ss, ll) in (("detector", det), ("detector+head", (out["boxes"], out["scores"], out["labels"]))):
            for b, s, l in zip(bb.tolist(), ss.tolist(), ll.tolist()):
                runs[r].append({"image_id": i, "category_id": int(l), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                "score": float(s)})
                if s >= threshold:
                    counts[r][i, int(l) - 1] += 1
        for l in val.labels[i].tolist():
            cgt[i, int(l) - 1] += 1
    res = {}
    for r, dets in runs.items():
        m = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "per_class": {}}
        if dets:
            st, pc = tr.coco_bbox_eval(gt, dets, n, names)
            m.update(AP=st[0], AP50=st[1], AP75=st[2])
            m["per_class"] = {nm: {"AP": v["AP"], "AP50": v["AP50"]} for nm, v in pc.items()}
        for j, nm in enumerate(names):
            m["per_class"].setdefault(nm, {})["count_mae"] = float(np.abs(counts[r][:, j] - cgt[:, j]).mean())
        res[r] = m
    res["images"], res["threshold"] = n, threshold
    res["count_ratio"] = count_ratio(res, names)
    return res


def count_ratio(ev: dict, names) -> float:
    """The head's worst class, as a multiple of the detector's count error: max over classes of
    count MAE (detector + head) / count MAE (detector alone). Below 1 the head counts every class
    better than the detector — the model card's condition for shipping a head."""
    worst = 0.0
    for nm in names:
        d, h = ev["detector"]["per_class"][nm]["count_mae"], ev["detector+head"]["per_class"][nm]["count_mae"]
        worst = max(worst, h / d if d > 0 else (1.0 if h == 0 else math.inf))
    return worst


def selection_score(ev: dict, select: str) -> float:
    """Larger is better: val AP (`--select ap`) or minus the count ratio (`--select count`)."""
    return ev["detector+head"]["AP"] if select == "ap" else -ev["count_ratio"]


# ---------------------------------------------------------------------------------------------
# training loop


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def make_head(arch, a):
    head = rf.RefineHead(arch["fpn_width"], arch["representation_size"], arch["num_classes"], a.cell, a.hidden,
                         a.key, a.steps, a.stop_threshold, 0.5)
    rf.init_params_numpy(head, np.random.default_rng(a.seed))
    return head


def run(a):
    torch.set_num_threads(a.threads)
    os.makedirs(a.work_dir, exist_ok=True)
    log = Log(os.path.join(a.work_dir, "train.log"))
    last = os.path.join(a.work_dir, "last.pt")
    state = None
    if a.resume:
        state = torch.load(last, weights_only=False)
        for k, v in state["args"].items():  # the recipe comes from the checkpoint
            if k not in ("resume", "time_budget", "data", "work_dir", "threads"):
                setattr(a, k, v)
        log(f"resume from {last}: phase {state['phase']}, epoch {state['epoch']}, position {state['pos']}")
    t_start = time.time()
    model, cfg, arch, _ = mm.load_marrow(a.weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    names = cfg["class_names"][1:] if cfg["class_names"] else [f"class_{i}" for i in range(1, arch["num_classes"])]
    trs = tr.load_yolo(a.data, "train", arch["num_classes"])
    val = tr.load_yolo(a.data, "val", arch["num_classes"])
    ntr = len(trs) if a.limit is None else min(a.limit, len(trs))
    nva = len(val) if a.val_limit is None else min(a.val_limit, len(val))
    ctr, cva = os.path.join(a.work_dir, "cache", "train"), os.path.join(a.work_dir, "cache", "val")
    build_cache(model, trs, ctr, ntr, log)
    build_cache(model, val, cva, nva, log)
    head = make_head(arch, a)
    opt = torch.optim.Adam(head.parameters(), lr=a.lr)
    phase, epoch, pos, perm, best = "sup", 0, 0, None, None  # best: selection score of best.pt
    gen = torch.Generator().manual_seed(a.seed)
    if state is not None:
        head.load_state_dict(state["head"])
        phase, epoch, pos, perm, best = state["phase"], state["epoch"], state["pos"], state["perm"], state["best"]
        opt = torch.optim.Adam(head.parameters(), lr=a.lr if phase == "sup" else a.rl_lr)
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        random.setstate(state["py_rng"])
    else:
        log(f"recipe {json.dumps(vars(a))}")
        ev = evaluate(head, val, cva, nva, names)
        log(f"val before training: {json.dumps(ev)}")
    budget = a.time_budget * 60 if a.time_budget else None
    last_ckpt = time.time()

    def checkpoint(tag=""):
        save_atomic({"head": head.state_dict(), "opt": opt.state_dict(), "phase": phase, "epoch": epoch, "pos": pos,
                     "perm": perm, "best": best, "gen": gen.get_state(), "py_rng": random.getstate(),
                     "args": vars(a), "refine_config": head.config(), "arch": arch}, last)
        log(f"checkpoint {last} {tag}")

    while phase != "done":
        n_ep = a.sup_epochs if phase == "sup" else a.rl_epochs
        if epoch >= n_ep:
            if phase == "sup":
                phase, epoch, pos, perm = "rl", 0, 0, None
                opt = torch.optim.Adam(head.parameters(), lr=a.rl_lr)
                continue
            phase = "done"
            break
        if perm is None:
            perm = list(range(ntr))
            random.Random(a.seed * 1000 + epoch + (0 if phase == "sup" else 500)).shuffle(perm)
        head.train()
        t0, agg = time.time(), {}
        while pos < len(perm):
            o = load_cached(ctr, perm[pos])
            loss, parts = loss_supervised(head, o) if phase == "sup" else loss_a2c(head, o, a, gen)
            if loss is not None:
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(head.parameters(), 5.0)
                opt.step()
                for k, v in parts.items():
                    agg[k] = agg.get(k, 0.0) + v
            pos += 1
            if pos % 50 == 0:
                log(f"{phase} epoch {epoch} {pos}/{len(perm)} " + " ".join(f"{k} {v / 50:.4f}" for k, v in agg.items())
                    + f" {(time.time() - t0) / pos:.3f} s/image")
                agg = {}
            if time.time() - last_ckpt > a.ckpt_minutes * 60:
                checkpoint("(periodic)")
                last_ckpt = time.time()
            if budget and time.time() - t_start > budget:
                checkpoint("(time budget reached)")
                log("time budget reached; --resume continues")
                return 0
        ev = evaluate(head, val, cva, nva, names)
        ap = ev["detector+head"]["AP"]
        rec = {"phase": phase, "epoch": epoch, "val": ev, "minutes": (time.time() - t_start) / 60}
        with open(os.path.join(a.work_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        maes = " / ".join(f"{ev['detector+head']['per_class'][nm]['count_mae']:.3f}" for nm in names)
        log(f"val {phase} epoch {epoch}: detector AP {ev['detector']['AP']:.4f} AP50 {ev['detector']['AP50']:.4f}; "
            f"detector+head AP {ap:.4f} AP50 {ev['detector+head']['AP50']:.4f} AP75 {ev['detector+head']['AP75']:.4f}; "
            f"count MAE {maes}, count ratio {ev['count_ratio']:.3f}")
        score = selection_score(ev, a.select)
        if best is None or score > best:
            best = score
            save_atomic({"head": head.state_dict(), "refine_config": head.config(), "arch": arch, "val": ev,
                         "phase": phase, "epoch": epoch, "select": a.select}, os.path.join(a.work_dir, "best.pt"))
            log(f"best.pt ({a.select}): AP {ap:.4f}, count ratio {ev['count_ratio']:.3f}")
        epoch, pos, perm = epoch + 1, 0, None
        checkpoint("(epoch end)")
        last_ckpt = time.time()
    log("done")
    return 0


def load_ckpt_head(work_dir, which):
    ck = torch.load(os.path.join(work_dir, f"{which}.pt"), weights_only=False)
    arch = ck["arch"]
    rc = ck["refine_config"]
    head = rf.RefineHead(arch["fpn_width"], arch["representation_size"], arch["num_classes"], rc["cell"],
                         rc["hidden"], rc["key"], rc["steps"], rc["stop_threshold"], rc["nms_thresh"])
    head.load_state_dict(ck["head"])
    return head.eval(), ck


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("export", "eval"):
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("--work-dir", required=True)
        ap.add_argument("--from", dest="which", default="best", choices=["best", "last"])
        ap.add_argument("--out")
        ap.add_argument("--half", action="store_true")
        ap.add_argument("--val-limit", type=int)
        ap.add_argument("--data")
        a = ap.parse_args(argv)
        head, ck = load_ckpt_head(a.work_dir, a.which)
        last = torch.load(os.path.join(a.work_dir, "last.pt"), weights_only=False)
        weights = last["args"]["weights"]
        if a.cmd == "export":
            if not a.out:
                ap.error("export needs --out")
            add_refine_head.write_with_head(weights, a.out, head, half=a.half, replace=True,
                                            init_meta={"trained": f"train_refine.py ({a.which}.pt)"})
            return 0
        torch.set_num_threads(2)
        _, cfg, arch, _ = mm.load_marrow(weights)
        data = a.data or last["args"]["data"]
        val = tr.load_yolo(data, "val", arch["num_classes"])
        cva = os.path.join(a.work_dir, "cache", "val")
        n = len([f for f in os.listdir(cva) if f.endswith(".pt")])
        n = min(n, a.val_limit) if a.val_limit else n
        print(json.dumps(evaluate(head, val, cva, n, cfg["class_names"][1:]), indent=1))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="the detector (marrow safetensors); required unless --resume")
    ap.add_argument("--data", required=True, help="TXL-PBC root in YOLO layout")
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--cell", choices=["gru", "lstm"], default="gru")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--key", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--stop-threshold", type=float, default=0.5)
    ap.add_argument("--sup-epochs", type=int, default=3)
    ap.add_argument("--rl-epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rl-lr", type=float, default=2e-4)
    ap.add_argument("--sigma", type=float, default=0.3, help="std of the Gaussian box policy, in delta units")
    ap.add_argument("--gamma", type=float, default=0.95)
    ap.add_argument("--bonus", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, help="use the first N training images")
    ap.add_argument("--val-limit", type=int, help="evaluate on the first N val images")
    ap.add_argument("--time-budget", type=float, help="minutes; checkpoint and stop when reached")
    ap.add_argument("--ckpt-minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--select", choices=["ap", "count"], default="ap",
                    help="which epoch best.pt keeps: the best val AP, or the best worst-class count error "
                         "relative to the detector alone (count MAE at 0.7; below 1 = better on every class)")
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    if not a.resume and not a.weights:
        ap.error("--weights is required (unless --resume)")
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
