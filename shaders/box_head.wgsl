// Box-head post-processing (torchvision RoIHeads.postprocess_detections), in three entry points:
//
//   decode_classes:  one invocation per (proposal, class): softmax over the class logits (max
//                    subtracted, exp, times the reciprocal of the sum, as the CPU kernel does),
//                    per-class box decode with weights (10, 10, 5, 5) and the ln(1000/16) clip,
//                    clip to the resized image; writes score and box per (proposal, class).
//   compact:         ONE workgroup walks (proposal, class >= 1) in proposal-major, class-minor
//                    order, keeps score > SCORE_THRESH (strict, f32) and width/height >= MIN_SIZE,
//                    and compacts survivors in that order (a workgroup prefix sum per 256-chunk),
//                    so the candidate order equals torchvision's flatten order exactly.
//   finalize:        gathers the NMS survivors (already in score order, at most MAX_DET) and
//                    rescales boxes to the original image: x * f32(W / w), y * f32(H / h)
//                    (ratios computed on the host in f32, as torchvision's resize_boxes).
//
// Prepended consts: NUM_CLASSES (incl. background), SCORE_THRESH, MIN_SIZE, MAX_DET.

struct Params {
    capacity: u32,      // proposal rows
    img_h: f32,         // resized (unpadded) size, for clipping
    img_w: f32,
    ratio_h: f32,       // original / resized, for the final rescale
    ratio_w: f32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

#if DECODE
@group(0) @binding(1) var<storage, read> logits: array<f32>;      // [K, C]
@group(0) @binding(2) var<storage, read> deltas: array<f32>;      // [K, 4C]
@group(0) @binding(3) var<storage, read> proposals: array<vec4<f32>>; // [K]
@group(0) @binding(4) var<storage, read> proposal_count: array<u32>;
@group(0) @binding(5) var<storage, read_write> cls_scores: array<f32>;       // [K, C]
@group(0) @binding(6) var<storage, read_write> cls_boxes: array<vec4<f32>>;  // [K, C]

#include "box_decode.wgsl"

@compute @workgroup_size(64, 1, 1)
fn decode_classes(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.y;
    let c = gid.x;
    if (k >= proposal_count[0] || c >= NUM_CLASSES) {
        return;
    }
    let row = k * NUM_CLASSES;
    var m = logits[row];
    for (var j = 1u; j < NUM_CLASSES; j++) {
        m = max(m, logits[row + j]);
    }
    var sum = 0.0;
    for (var j = 0u; j < NUM_CLASSES; j++) {
        sum += exp(logits[row + j] - m);
    }
    cls_scores[row + c] = exp(logits[row + c] - m) * (1.0 / sum);

    let d = 4u * (row + c);
    let delta = vec4<f32>(deltas[d], deltas[d + 1u], deltas[d + 2u], deltas[d + 3u]);
    cls_boxes[row + c] = decode_clip_box(proposals[k], delta, p.img_h, p.img_w);
}
#endif

#if COMPACT
@group(0) @binding(1) var<storage, read> cls_scores: array<f32>;
@group(0) @binding(2) var<storage, read> cls_boxes: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> proposal_count: array<u32>;
@group(0) @binding(4) var<storage, read_write> cand_boxes: array<vec4<f32>>;  // [K*(C-1)]
@group(0) @binding(5) var<storage, read_write> cand_scores: array<f32>;
@group(0) @binding(6) var<storage, read_write> cand_labels: array<u32>;
@group(0) @binding(7) var<storage, read_write> cand_rows: array<u32>;   // proposal of each candidate
@group(0) @binding(8) var<storage, read_write> cand_count: array<u32>;

#include "scan.wgsl"

@compute @workgroup_size(256, 1, 1)
fn compact(@builtin(local_invocation_index) t: u32) {
    let per = NUM_CLASSES - 1u;
    let total = proposal_count[0] * per;
    var base = 0u;
    for (var start = 0u; start < total; start += 256u) {
        let i = start + t;
        var keep = 0u;
        var s = 0.0;
        var b = vec4<f32>(0.0);
        var label = 0u;
        if (i < total) {
            let k = i / per;
            label = i % per + 1u;
            s = cls_scores[k * NUM_CLASSES + label];
            b = cls_boxes[k * NUM_CLASSES + label];
            // score > thresh (strict); remove_small_boxes keeps w >= min and h >= min (NaN drops).
            if (s > SCORE_THRESH && (b.z - b.x) >= MIN_SIZE && (b.w - b.y) >= MIN_SIZE) {
                keep = 1u;
            }
        }
        // Inclusive prefix sum of the keep flags (and their total).
        let sums = workgroup_scan_256(t, keep);
        if (keep == 1u) {
            let o = base + sums.x - 1u;
            cand_boxes[o] = b;
            cand_scores[o] = s;
            cand_labels[o] = label;
            cand_rows[o] = i / per;
        }
        base += sums.y;
    }
    if (t == 0u) {
        cand_count[0] = base;
    }
}
#endif

#if FINALIZE
@group(0) @binding(1) var<storage, read> cand_boxes: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> cand_scores: array<f32>;
@group(0) @binding(3) var<storage, read> cand_labels: array<u32>;
@group(0) @binding(4) var<storage, read> keep: array<u32>;
@group(0) @binding(5) var<storage, read> keep_count: array<u32>;
// [MAX_DET] rows of (x1, y1, x2, y2, score, label as f32, 0, 0), then the count in det_count.
@group(0) @binding(6) var<storage, read_write> dets: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> det_count: array<u32>;

@compute @workgroup_size(64, 1, 1)
fn finalize(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = min(keep_count[0], MAX_DET);
    let i = gid.x;
    if (i == 0u) {
        det_count[0] = n;
    }
    if (i >= n) {
        return;
    }
    let j = keep[i];
    let b = cand_boxes[j];
    dets[2u * i] = vec4<f32>(b.x * p.ratio_w, b.y * p.ratio_h, b.z * p.ratio_w, b.w * p.ratio_h);
    dets[2u * i + 1u] = vec4<f32>(cand_scores[j], f32(cand_labels[j]), 0.0, 0.0);
}
#endif

#if GATHER
// Selected rows: out[i] = rows[keep[i]] (box and score) for i < min(keep_count, MAX_DET);
// out_count = that count. Turns NMS keep lists into the next stage's compact inputs (RPN
// proposals for RoIAlign).
@group(0) @binding(1) var<storage, read> src_boxes: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> src_scores: array<f32>;
@group(0) @binding(3) var<storage, read> keep: array<u32>;
@group(0) @binding(4) var<storage, read> keep_count: array<u32>;
@group(0) @binding(5) var<storage, read_write> out_boxes: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> out_scores: array<f32>;
@group(0) @binding(7) var<storage, read_write> out_count: array<u32>;

@compute @workgroup_size(64, 1, 1)
fn gather_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = min(keep_count[0], MAX_DET);
    let i = gid.x;
    if (i == 0u) {
        out_count[0] = n;
    }
    if (i >= n) {
        return;
    }
    out_boxes[i] = src_boxes[keep[i]];
    out_scores[i] = src_scores[keep[i]];
}
#endif
