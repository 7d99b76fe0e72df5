// The refinement head's per-detection kernels (docs/design.md §6). The dense projections (init,
// key/value, query, the cells' input and hidden gates, the delta/stop and class heads) are
// `linear` dispatches of linalg.wgsl; RoIAlign is the detector's own kernel (roi_align.wgsl); the
// final per-class NMS is nms.wgsl and the gather + rescale is box_head.wgsl's finalize. What is
// left lives here, one entry point per variant flag:
//
//   gather_dets   (GATHER)    the box head's NMS survivors (keep list, at most CAP) -> input rows
//                             (x1, y1, x2, y2, score, label, source proposal row, 0) and the count.
//   start         (START)     input rows -> current boxes, the features of each detection's
//                             proposal (rows of the TwoMLPHead output), active = 1, stop step 0,
//                             and c = 0 for an LSTM.
//   attention     (ATTENTION) one workgroup per detection: scores beta * K_t q / sqrt(KEY) over the
//                             49 bins, max-subtracted softmax, ctx = alpha^T V_t.
//   gru_cell      (GRU)       PyTorch GRUCell (gates r, z, n) on precomputed input / hidden gates.
//   lstm_cell     (LSTM)      PyTorch LSTMCell (gates i, f, g, o).
//   step          (STEP)      delta decode + clip of the current box, stop probability, per-box stop.
//   classify      (CLASSIFY)  terminal softmax over all classes, label = first argmax over c >= 1,
//                             the small-box filter, and ordered compaction into NMS candidates.
//
// A detection that has stopped is frozen: the cells and the step leave its h, c and box alone
// (its RoIAlign and projections are still computed with the batch and ignored).
//
// Prepended consts: CAP (u32, detection rows), HIDDEN (u32), KEY (u32), FEAT (u32, the box
// representation R), CLASSES (u32, including background), and one true flag of GATHER, START,
// ATTENTION, GRU, LSTM, STEP, CLASSIFY; START also reads LSTM.

// The params uniform, read by attention (step), step (clip window, stop rule, step) and classify
// (small-box filter); the gather, start and cell entry points take none.
struct Params {
    img_h: f32,           // resized (unpadded) image size: the clip window
    img_w: f32,
    stop_threshold: f32,  // a detection stops when its stop probability exceeds this
    min_size: f32,        // refined boxes narrower or lower than this are dropped
    step: u32,            // 1-based step index (STEP)
    steps: u32,           // T
    pad0: u32,
    pad1: u32,
}

#include "activations.wgsl"

#if GATHER
@group(0) @binding(1) var<storage, read> keep: array<u32>;
@group(0) @binding(2) var<storage, read> keep_count: array<u32>;
@group(0) @binding(3) var<storage, read> cand_boxes: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> cand_scores: array<f32>;
@group(0) @binding(5) var<storage, read> cand_labels: array<u32>;
@group(0) @binding(6) var<storage, read> cand_rows: array<u32>;
@group(0) @binding(7) var<storage, read_write> input: array<vec4<f32>>;  // [CAP, 2]
@group(0) @binding(8) var<storage, read_write> count: array<u32>;

@compute @workgroup_size(64, 1, 1)
fn gather_dets(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = min(keep_count[0], CAP);
    let i = gid.x;
    if (i == 0u) {
        count[0] = n;
    }
    if (i >= n) {
        return;
    }
    let j = keep[i];
    input[2u * i] = cand_boxes[j];
    input[2u * i + 1u] = vec4<f32>(cand_scores[j], f32(cand_labels[j]), f32(cand_rows[j]), 0.0);
}
#endif

#if START
@group(0) @binding(1) var<storage, read> input: array<vec4<f32>>;      // [CAP, 2]
@group(0) @binding(2) var<storage, read> count: array<u32>;
@group(0) @binding(3) var<storage, read> features: array<f32>;         // [rows, FEAT]
@group(0) @binding(4) var<storage, read_write> feat: array<f32>;       // [CAP, FEAT]
@group(0) @binding(5) var<storage, read_write> boxes: array<vec4<f32>>; // [CAP]
@group(0) @binding(6) var<storage, read_write> state: array<u32>;      // [CAP, 2]: active, stop step
#if LSTM
@group(0) @binding(7) var<storage, read_write> c: array<f32>;          // [CAP, HIDDEN]
#endif

// One invocation per (detection, feature); column 0 also resets the detection's state.
@compute @workgroup_size(64, 1, 1)
fn start(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y;
    let r = gid.x;
    if (i >= min(count[0], CAP)) {
        return;
    }
    let src = u32(input[2u * i + 1u].z);
    if (r < FEAT) {
        feat[i * FEAT + r] = features[src * FEAT + r];
    }
    if (r == 0u) {
        boxes[i] = input[2u * i];
        state[2u * i] = 1u;
        state[2u * i + 1u] = 0u;
    }
#if LSTM
    if (r < HIDDEN) {
        c[i * HIDDEN + r] = 0.0;
    }
#endif
}
#endif

#if ATTENTION
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> kv: array<f32>;       // [CAP * 49, 2 * KEY]: key | value
@group(0) @binding(2) var<storage, read> q: array<f32>;        // [CAP, KEY]
@group(0) @binding(3) var<storage, read> beta: array<f32>;     // [1]
@group(0) @binding(4) var<storage, read> count: array<u32>;
@group(0) @binding(5) var<storage, read> state: array<u32>;    // [CAP, 2]
@group(0) @binding(6) var<storage, read_write> ctx: array<f32>;  // [CAP, KEY]
@group(0) @binding(7) var<storage, read_write> attn: array<f32>; // [T, CAP, 49]

var<workgroup> alpha: array<f32, 64>;

// One workgroup of 64 per detection: invocation j < 49 scores bin j, then every invocation sums
// context features k = j, j + 64, ...
@compute @workgroup_size(64, 1, 1)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) j: u32) {
    let i = wg.x;
    // Uniform per workgroup: a finished (or absent) detection skips the whole workgroup.
    if (i >= min(count[0], CAP) || state[2u * i] == 0u) {
        return;
    }
    let kw = 2u * KEY;
    var s = -3.0e38;
    if (j < 49u) {
        let row = (i * 49u + j) * kw;
        var dot = 0.0;
        for (var k = 0u; k < KEY; k++) {
            dot += kv[row + k] * q[i * KEY + k];
        }
        s = beta[0] * dot / sqrt(f32(KEY));
    }
    alpha[j] = s;
    workgroupBarrier();
    // Max and sum over the 49 scores; every invocation reads the same 49 values, so the results
    // are identical across the workgroup without a second reduction pass.
    var m = alpha[0];
    for (var t = 1u; t < 49u; t++) {
        m = max(m, alpha[t]);
    }
    var sum = 0.0;
    for (var t = 0u; t < 49u; t++) {
        sum += exp(alpha[t] - m);
    }
    workgroupBarrier();
    if (j < 49u) {
        alpha[j] = exp(s - m) / sum;
        attn[(p.step - 1u) * CAP * 49u + i * 49u + j] = alpha[j];
    }
    workgroupBarrier();
    for (var k = j; k < KEY; k += 64u) {
        var acc = 0.0;
        for (var t = 0u; t < 49u; t++) {
            acc += alpha[t] * kv[(i * 49u + t) * kw + KEY + k];
        }
        ctx[i * KEY + k] = acc;
    }
}
#endif

#if GRU
@group(0) @binding(1) var<storage, read> gi: array<f32>;     // [CAP, 3H]: W_ih x + b_ih
@group(0) @binding(2) var<storage, read> gh: array<f32>;     // [CAP, 3H]: W_hh h + b_hh
@group(0) @binding(3) var<storage, read> count: array<u32>;
@group(0) @binding(4) var<storage, read> state: array<u32>;
@group(0) @binding(5) var<storage, read_write> h: array<f32>; // [CAP, H]

@compute @workgroup_size(64, 1, 1)
fn gru_cell(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y;
    let u = gid.x;
    if (i >= min(count[0], CAP) || u >= HIDDEN || state[2u * i] == 0u) {
        return;
    }
    let g = i * 3u * HIDDEN;
    let r = sigmoid_stable(gi[g + u] + gh[g + u]);
    let z = sigmoid_stable(gi[g + HIDDEN + u] + gh[g + HIDDEN + u]);
    let n = tanh_stable(gi[g + 2u * HIDDEN + u] + r * gh[g + 2u * HIDDEN + u]);
    let hp = h[i * HIDDEN + u];
    h[i * HIDDEN + u] = (1.0 - z) * n + z * hp;
}
#endif

#if LSTM
#if !START
@group(0) @binding(1) var<storage, read> gi: array<f32>;     // [CAP, 4H]: W_ih x + b_ih
@group(0) @binding(2) var<storage, read> gh: array<f32>;     // [CAP, 4H]: W_hh h + b_hh
@group(0) @binding(3) var<storage, read> count: array<u32>;
@group(0) @binding(4) var<storage, read> state: array<u32>;
@group(0) @binding(5) var<storage, read_write> h: array<f32>; // [CAP, H]
@group(0) @binding(6) var<storage, read_write> c: array<f32>; // [CAP, H]

@compute @workgroup_size(64, 1, 1)
fn lstm_cell(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y;
    let u = gid.x;
    if (i >= min(count[0], CAP) || u >= HIDDEN || state[2u * i] == 0u) {
        return;
    }
    let g = i * 4u * HIDDEN;
    let ig = sigmoid_stable(gi[g + u] + gh[g + u]);
    let fg = sigmoid_stable(gi[g + HIDDEN + u] + gh[g + HIDDEN + u]);
    let cg = tanh_stable(gi[g + 2u * HIDDEN + u] + gh[g + 2u * HIDDEN + u]);
    let og = sigmoid_stable(gi[g + 3u * HIDDEN + u] + gh[g + 3u * HIDDEN + u]);
    let cn = fg * c[i * HIDDEN + u] + ig * cg;
    c[i * HIDDEN + u] = cn;
    h[i * HIDDEN + u] = og * tanh_stable(cn);
}
#endif
#endif

#if STEP
@group(0) @binding(0) var<uniform> p: Params;
#include "box_decode.wgsl"

@group(0) @binding(1) var<storage, read> heads: array<f32>;              // [CAP, 5]: delta, stop logit
@group(0) @binding(2) var<storage, read> count: array<u32>;
@group(0) @binding(3) var<storage, read_write> state: array<u32>;        // [CAP, 2]
@group(0) @binding(4) var<storage, read_write> boxes: array<vec4<f32>>;  // [CAP]
@group(0) @binding(5) var<storage, read_write> step_boxes: array<vec4<f32>>; // [T, CAP]
@group(0) @binding(6) var<storage, read_write> stop_prob: array<f32>;    // [T, CAP]

@compute @workgroup_size(64, 1, 1)
fn step(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= min(count[0], CAP)) {
        return;
    }
    let o = (p.step - 1u) * CAP + i;
    if (state[2u * i] == 0u) {
        // Frozen: the box carries over; no stop probability is drawn at this step.
        step_boxes[o] = boxes[i];
        stop_prob[o] = -1.0;
        return;
    }
    let d = vec4<f32>(heads[5u * i], heads[5u * i + 1u], heads[5u * i + 2u], heads[5u * i + 3u]);
    let b = decode_clip_box(boxes[i], d, p.img_h, p.img_w);
    let s = sigmoid_stable(heads[5u * i + 4u]);
    boxes[i] = b;
    step_boxes[o] = b;
    stop_prob[o] = s;
    if (s > p.stop_threshold) {
        state[2u * i] = 0u;
        state[2u * i + 1u] = p.step;
    }
}
#endif

#if CLASSIFY
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;             // [CAP, CLASSES]
@group(0) @binding(2) var<storage, read> boxes: array<vec4<f32>>;        // [CAP]
@group(0) @binding(3) var<storage, read> count: array<u32>;
@group(0) @binding(4) var<storage, read_write> cand_boxes: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> cand_scores: array<f32>;
@group(0) @binding(6) var<storage, read_write> cand_labels: array<u32>;
@group(0) @binding(7) var<storage, read_write> cand_count: array<u32>;
@group(0) @binding(8) var<storage, read_write> terminal: array<vec2<f32>>; // [CAP]: score, label

#include "scan.wgsl"

// ONE workgroup walks the detections in order, so candidates keep the detection order (what a
// stable NMS tie-break sees).
@compute @workgroup_size(256, 1, 1)
fn classify(@builtin(local_invocation_index) t: u32) {
    let n = min(count[0], CAP);
    var base = 0u;
    for (var start = 0u; start < n; start += 256u) {
        let i = start + t;
        var keep = 0u;
        var score = 0.0;
        var label = 1u;
        var b = vec4<f32>(0.0);
        if (i < n) {
            let row = i * CLASSES;
            var m = logits[row];
            for (var c = 1u; c < CLASSES; c++) {
                m = max(m, logits[row + c]);
            }
            var sum = 0.0;
            for (var c = 0u; c < CLASSES; c++) {
                sum += exp(logits[row + c] - m);
            }
            // First maximum over the foreground classes (ties: the lowest index), on the logits,
            // which order exactly as the probabilities do.
            var best = logits[row + 1u];
            for (var c = 2u; c < CLASSES; c++) {
                if (logits[row + c] > best) {
                    best = logits[row + c];
                    label = c;
                }
            }
            score = exp(best - m) * (1.0 / sum);
            b = boxes[i];
            terminal[i] = vec2<f32>(score, f32(label));
            // remove_small_boxes keeps w >= min and h >= min (a NaN box is dropped).
            if ((b.z - b.x) >= p.min_size && (b.w - b.y) >= p.min_size) {
                keep = 1u;
            }
        }
        let sums = workgroup_scan_256(t, keep);
        if (keep == 1u) {
            let o = base + sums.x - 1u;
            cand_boxes[o] = b;
            cand_scores[o] = score;
            cand_labels[o] = label;
        }
        base += sums.y;
    }
    if (t == 0u) {
        cand_count[0] = base;
    }
}
#endif
