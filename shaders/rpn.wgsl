// RPN post-head stages (docs/torchvision-semantics.md §5–§6): anchors, decode of the top-k selected
// anchors, and the pre-NMS filter chain with order-preserving compaction.
//
// Anchors are never stored: anchor i of a level is (x·stride_w, y·stride_h, same) + cell[a] with
// (y, x, a) from i = (y·gw + x)·A + a; every term is an integer-valued f32 below 2^24, so the sum
// is exact and bit-equal to torchvision's int32-shift + f32-base anchors. The cell anchors (the
// rounded base anchors) and strides come from the host, where they are exact f32 / integer math.
// NaN tests use the bit pattern: a backend may fold `x != x` away.
// Prepended consts: K_LEVEL (anchors or decode), K_ANCHORS, K_DECODE, K_FILTER (bool).

const WG: u32 = 256u;

fn is_nan_f(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

#if K_LEVEL
struct LevelParams {
    level: u32,
    anchor_offset: u32,
    n: u32,
    k: u32,
    out_offset: u32,
    gw: u32,
    stride_h: u32,
    stride_w: u32,
    a: u32,
    clip: f32,
    pad0: u32,
    pad1: u32,
    cell: array<vec4<f32>, 8>,
}
@group(0) @binding(0) var<uniform> lp: LevelParams;

fn anchor_at(i: u32) -> vec4<f32> {
    let a = i % lp.a;
    let loc = i / lp.a;
    let sx = f32((loc % lp.gw) * lp.stride_w);
    let sy = f32((loc / lp.gw) * lp.stride_h);
    return vec4<f32>(sx, sy, sx, sy) + lp.cell[a];
}
#endif

#if K_ANCHORS
@group(0) @binding(1) var<storage, read_write> anchors: array<vec4<f32>>;

// All anchors of one level, into its slice of the concatenated [N, 4] array.
@compute @workgroup_size(256, 1, 1)
fn rpn_anchors(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= lp.n) {
        return;
    }
    anchors[lp.anchor_offset + i] = anchor_at(i);
}
#endif

#if K_DECODE
@group(0) @binding(1) var<storage, read> order: array<u32>;
@group(0) @binding(2) var<storage, read> objectness: array<f32>;
@group(0) @binding(3) var<storage, read> deltas: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> raw_boxes: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> raw_scores: array<f32>;

// BoxCoder.decode_single, weights (1,1,1,1) (so no division), torch's operation order. The
// dw/dh clamp is an upper clamp that lets NaN through.
fn decode(an: vec4<f32>, d: vec4<f32>) -> vec4<f32> {
    let w = an.z - an.x;
    let h = an.w - an.y;
    let cx = an.x + 0.5 * w;
    let cy = an.y + 0.5 * h;
    let dw = select(min(d.z, lp.clip), d.z, is_nan_f(d.z));
    let dh = select(min(d.w, lp.clip), d.w, is_nan_f(d.w));
    let pcx = d.x * w + cx;
    let pcy = d.y * h + cy;
    let hw = 0.5 * (exp(dw) * w);
    let hh = 0.5 * (exp(dh) * h);
    return vec4<f32>(pcx - hw, pcy - hh, pcx + hw, pcy + hh);
}

// One level: slot j of the level's top-k → its decoded box (unclipped) and sigmoid score.
// objectness / deltas are this level's NHWC head outputs [1,H,W,A] / [1,H,W,4A], whose flat order
// is torchvision's (y, x, a) anchor order.
@compute @workgroup_size(256, 1, 1)
fn rpn_decode(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = gid.x + gid.y * nwg.x * WG;
    if (j >= lp.k) {
        return;
    }
    let slot = lp.out_offset + j;
    let i = order[slot] - lp.anchor_offset;
    raw_boxes[slot] = decode(anchor_at(i), deltas[i]);
    raw_scores[slot] = 1.0 / (1.0 + exp(-objectness[i]));
}
#endif

#if K_FILTER
struct FilterParams {
    kmax: u32,
    n_levels: u32,
    img_h: f32,
    img_w: f32,
    min_size: f32,
    score_thresh: f32,
    pad0: u32,
    pad1: u32,
    // per level: (first slot, k, 0, 0)
    lv: array<vec4<u32>, 8>,
}
@group(0) @binding(0) var<uniform> fp: FilterParams;
@group(0) @binding(1) var<storage, read> raw_boxes: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> raw_scores: array<f32>;
@group(0) @binding(3) var<storage, read_write> boxes: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;
@group(0) @binding(5) var<storage, read_write> levels: array<u32>;
@group(0) @binding(6) var<storage, read_write> count: array<u32>;

#include "scan.wgsl"

// torch.clamp(min=0, max=hi) that lets NaN through.
fn clamp_keep_nan(v: f32, hi: f32) -> f32 {
    return select(min(max(v, 0.0), hi), v, is_nan_f(v));
}

fn clipped(s: u32) -> vec4<f32> {
    let b = raw_boxes[s];
    return vec4<f32>(
        clamp_keep_nan(b.x, fp.img_w),
        clamp_keep_nan(b.y, fp.img_h),
        clamp_keep_nan(b.z, fp.img_w),
        clamp_keep_nan(b.w, fp.img_h),
    );
}

// remove_small_boxes (>=) and score >= thresh, in f32; NaN fails, as in torch.
fn keep(b: vec4<f32>, score: f32) -> bool {
    let ws = b.z - b.x;
    let hs = b.w - b.y;
    return !is_nan_f(ws) && !is_nan_f(hs) && !is_nan_f(score) && ws >= fp.min_size && hs >= fp.min_size
        && score >= fp.score_thresh;
}

fn level_of(s: u32) -> u32 {
    var l = 0u;
    for (var j = 1u; j < fp.n_levels; j++) {
        if (s >= fp.lv[j].x) {
            l = j;
        }
    }
    return l;
}

// One workgroup: clip + filter every slot, then compact the survivors in slot order (level-major,
// logit-descending) with a workgroup prefix sum over per-invocation contiguous ranges.
@compute @workgroup_size(256, 1, 1)
fn rpn_filter(@builtin(local_invocation_index) t: u32) {
    let per = (fp.kmax + WG - 1u) / WG;
    let start = min(t * per, fp.kmax);
    let end = min(start + per, fp.kmax);
    var n = 0u;
    for (var s = start; s < end; s++) {
        if (keep(clipped(s), raw_scores[s])) {
            n += 1u;
        }
    }
    let sums = workgroup_scan_256(t, n);
    var w = sums.x - n;
    for (var s = start; s < end; s++) {
        let b = clipped(s);
        let sc = raw_scores[s];
        if (keep(b, sc)) {
            boxes[w] = b;
            scores[w] = sc;
            levels[w] = level_of(s);
            w += 1u;
        }
    }
    if (t == WG - 1u) {
        count[0] = sums.y;
    }
}
#endif
