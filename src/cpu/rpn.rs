//! CPU reference for the RPN's post-head stages (docs/torchvision-semantics.md §5–§6): anchors, box
//! decode, the per-level top-k of the raw logits and the filter chain that produces the candidates
//! handed to batched NMS. Every decision (rounding, clamps, comparisons) mirrors torchvision's f32
//! semantics; only exp/sigmoid are evaluated in f64 and rounded once, which makes them a better
//! reference than torch's few-ULP vectorised versions.
//!
//! Also used on the host by `ops::rpn` for the tiny exact constants (cell anchors, strides).

use std::cmp::Ordering;

/// torchvision's `BoxCoder.bbox_xform_clip` = ln(1000 / 16), as the f32 that torch compares with.
pub const BBOX_XFORM_CLIP: f32 = 4.135_166_556_742_356_f64 as f32;

/// torchvision's default anchor sizes (one per FPN level, P2..P6) and aspect ratios (h / w).
pub const DEFAULT_SIZES: [f32; 5] = [32.0, 64.0, 128.0, 256.0, 512.0];
pub const DEFAULT_RATIOS: [f32; 3] = [0.5, 1.0, 2.0];

/// Zero-centred base anchors of one level (`AnchorGenerator.generate_anchors` with one size), in
/// f32 exactly as torch computes them: `hr = sqrt(r)`, `wr = 1 / hr`, `ws = wr·s`, `hs = hr·s`,
/// `round([-ws, -hs, ws, hs] / 2)` with round-half-to-even. Ratio-major order.
pub fn cell_anchors(size: f32, ratios: &[f32]) -> Vec<[f32; 4]> {
    ratios
        .iter()
        .map(|&r| {
            let hr = r.sqrt();
            let wr = 1.0 / hr;
            let ws = wr * size;
            let hs = hr * size;
            [-ws, -hs, ws, hs].map(|v| (v / 2.0).round_ties_even())
        })
        .collect()
}

/// Anchor strides per level: integer floor division of the padded size by the feature size, per
/// axis (so the pool level of an 800-high image has stride 800 // 13 = 61, not 64).
pub fn strides(padded: (usize, usize), feat_sizes: &[(usize, usize)]) -> Vec<(usize, usize)> {
    feat_sizes
        .iter()
        .map(|&(h, w)| (padded.0 / h.max(1), padded.1 / w.max(1)))
        .collect()
}

/// All anchors, levels concatenated, each level in (y, x, anchor) order — bit-exact to
/// torchvision's `AnchorGenerator` for one image (`sizes[l]` is level l's single size).
pub fn anchors(
    padded: (usize, usize),
    feat_sizes: &[(usize, usize)],
    sizes: &[f32],
    ratios: &[f32],
) -> Vec<[f32; 4]> {
    let mut out = Vec::new();
    for (l, (&(gh, gw), (sh, sw))) in feat_sizes
        .iter()
        .zip(strides(padded, feat_sizes))
        .enumerate()
    {
        let cell = cell_anchors(sizes[l], ratios);
        for y in 0..gh {
            for x in 0..gw {
                // int32 shifts, converted to f32 when added to the f32 base anchors (exact).
                let (sx, sy) = ((x * sw) as i32 as f32, (y * sh) as i32 as f32);
                for c in &cell {
                    out.push([sx + c[0], sy + c[1], sx + c[2], sy + c[3]]);
                }
            }
        }
    }
    out
}

/// `BoxCoder.decode_single` with weights (1, 1, 1, 1): f32 operations in torch's order. The
/// dw/dh clamp is an upper clamp only and lets NaN through, as `torch.clamp(max=…)` does.
pub fn decode(anchor: [f32; 4], d: [f32; 4]) -> [f32; 4] {
    let w = anchor[2] - anchor[0];
    let h = anchor[3] - anchor[1];
    let cx = anchor[0] + 0.5 * w;
    let cy = anchor[1] + 0.5 * h;
    let clamp = |v: f32| {
        if v.is_nan() {
            v
        } else {
            v.min(BBOX_XFORM_CLIP)
        }
    };
    let (dw, dh) = (clamp(d[2]), clamp(d[3]));
    let pcx = d[0] * w + cx;
    let pcy = d[1] * h + cy;
    let pw = exp_f32(dw) * w;
    let ph = exp_f32(dh) * h;
    let (hw, hh) = (0.5 * pw, 0.5 * ph);
    [pcx - hw, pcy - hh, pcx + hw, pcy + hh]
}

fn exp_f32(x: f32) -> f32 {
    (x as f64).exp() as f32
}

/// `torch.sigmoid` (evaluated in f64, rounded once).
pub fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-(x as f64)).exp())) as f32
}

/// Descending order as `torch.topk(largest=True)` ranks values: NaN above everything, -0 == +0.
/// Used with a stable sort, so ties keep the lower index first.
pub fn cmp_desc(a: f32, b: f32) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        _ => b.partial_cmp(&a).unwrap_or(Ordering::Equal),
    }
}

/// The `min(k, n)` largest of `x`, as indices in descending order, ties by lower index first.
pub fn topk_desc(x: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&i, &j| cmp_desc(x[i], x[j]));
    idx.truncate(k.min(x.len()));
    idx
}

/// `RegionProposalNetwork._get_top_n_idx` for one image: per level `k = min(pre_nms_top_n, n_l)`,
/// global indices into the concatenated logits, level-major, each level logit-descending.
pub fn topk_per_level(logits: &[f32], counts: &[usize], pre_nms_top_n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut off = 0;
    for &n in counts {
        out.extend(
            topk_desc(&logits[off..off + n], pre_nms_top_n)
                .into_iter()
                .map(|i| i + off),
        );
        off += n;
    }
    out
}

/// `clip_boxes_to_image` with the resized (unpadded) size: x to [0, w], y to [0, h], NaN kept.
pub fn clip_box(b: [f32; 4], size: (usize, usize)) -> [f32; 4] {
    let (h, w) = (size.0 as f32, size.1 as f32);
    let c = |v: f32, hi: f32| if v.is_nan() { v } else { v.max(0.0).min(hi) };
    [c(b[0], w), c(b[1], h), c(b[2], w), c(b[3], h)]
}

/// The candidates that torchvision's `filter_proposals` hands to `batched_nms`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Candidates {
    pub boxes: Vec<[f32; 4]>,
    pub scores: Vec<f32>,
    pub levels: Vec<u32>,
    /// Global anchor index of each candidate (for diagnostics).
    pub anchor_index: Vec<usize>,
}

/// The RPN filter chain up to (not including) NMS: per-level top-k of the raw logits, decode of
/// the selected anchors, sigmoid, clip to the resized image, `remove_small_boxes(min_size)`
/// (`>=`), `score >= score_thresh`. `logits` and `deltas` are the concatenated head outputs in
/// torchvision's order (`deltas[i]` = (dx, dy, dw, dh) of anchor i).
#[allow(clippy::too_many_arguments)]
pub fn candidates(
    logits: &[f32],
    deltas: &[[f32; 4]],
    anchors: &[[f32; 4]],
    counts: &[usize],
    resized: (usize, usize),
    pre_nms_top_n: usize,
    min_size: f32,
    score_thresh: f32,
) -> Candidates {
    let mut level_of = Vec::with_capacity(logits.len());
    for (l, &n) in counts.iter().enumerate() {
        level_of.extend(std::iter::repeat_n(l as u32, n));
    }
    let mut c = Candidates::default();
    for i in topk_per_level(logits, counts, pre_nms_top_n) {
        let b = clip_box(decode(anchors[i], deltas[i]), resized);
        let s = sigmoid(logits[i]);
        let (ws, hs) = (b[2] - b[0], b[3] - b[1]);
        // NaN fails every comparison, as in torch.
        if ws >= min_size && hs >= min_size && s >= score_thresh {
            c.boxes.push(b);
            c.scores.push(s);
            c.levels.push(level_of[i]);
            c.anchor_index.push(i);
        }
    }
    c
}
