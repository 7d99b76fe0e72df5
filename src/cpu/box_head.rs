//! CPU reference for the box-head post-processing (docs/torchvision-semantics.md §9.2): softmax,
//! per-class decode with weights (10, 10, 5, 5), clip, drop background, flatten
//! proposal-major/class-minor, score > thresh, remove_small_boxes, and the final rescale.

/// ln(1000/16) as torchvision's BoxCoder uses it (f32).
pub const BBOX_XFORM_CLIP: f32 = 4.135_166_6;

/// BoxCoder.decode_single for one box with weights `wts`, in torchvision's f32 operation order.
pub fn decode(b: [f32; 4], d: [f32; 4], wts: [f32; 4]) -> [f32; 4] {
    let w = b[2] - b[0];
    let h = b[3] - b[1];
    let cx = b[0] + 0.5 * w;
    let cy = b[1] + 0.5 * h;
    let dx = d[0] / wts[0];
    let dy = d[1] / wts[1];
    let dw = (d[2] / wts[2]).min(BBOX_XFORM_CLIP);
    let dh = (d[3] / wts[3]).min(BBOX_XFORM_CLIP);
    let pcx = dx * w + cx;
    let pcy = dy * h + cy;
    let pw = dw.exp() * w;
    let ph = dh.exp() * h;
    [
        pcx - 0.5 * pw,
        pcy - 0.5 * ph,
        pcx + 0.5 * pw,
        pcy + 0.5 * ph,
    ]
}

/// clip_boxes_to_image: x to [0, w], y to [0, h].
pub fn clip(b: [f32; 4], (h, w): (f32, f32)) -> [f32; 4] {
    [
        b[0].clamp(0.0, w),
        b[1].clamp(0.0, h),
        b[2].clamp(0.0, w),
        b[3].clamp(0.0, h),
    ]
}

/// Softmax as the CPU kernel computes it: max subtracted, exp, times the reciprocal of the sum.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
    let e: Vec<f32> = logits.iter().map(|v| (v - m).exp()).collect();
    let inv = 1.0 / e.iter().sum::<f32>();
    e.iter().map(|v| v * inv).collect()
}

/// One pre-NMS detection candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub bbox: [f32; 4],
    pub score: f32,
    pub label: u32,
    /// The proposal it came from.
    pub row: u32,
}

/// Candidates in torchvision's order (proposal-major, class-minor, background dropped).
pub fn candidates(
    logits: &[f32],
    deltas: &[f32],
    proposals: &[[f32; 4]],
    num_classes: usize,
    resized: (usize, usize),
    score_thresh: f32,
    min_size: f32,
) -> Vec<Candidate> {
    let img = (resized.0 as f32, resized.1 as f32);
    let mut out = Vec::new();
    for (k, p) in proposals.iter().enumerate() {
        let s = softmax(&logits[k * num_classes..(k + 1) * num_classes]);
        for c in 1..num_classes {
            let d = &deltas[(k * num_classes + c) * 4..(k * num_classes + c) * 4 + 4];
            let b = clip(
                decode(*p, [d[0], d[1], d[2], d[3]], [10.0, 10.0, 5.0, 5.0]),
                img,
            );
            if s[c] > score_thresh && (b[2] - b[0]) >= min_size && (b[3] - b[1]) >= min_size {
                out.push(Candidate {
                    bbox: b,
                    score: s[c],
                    label: c as u32,
                    row: k as u32,
                });
            }
        }
    }
    out
}

/// transform.postprocess: boxes scaled by f32(orig / resized) per axis, not re-clipped.
pub fn rescale(b: [f32; 4], orig: (usize, usize), resized: (usize, usize)) -> [f32; 4] {
    let rh = orig.0 as f32 / resized.0 as f32;
    let rw = orig.1 as f32 / resized.1 as f32;
    [b[0] * rw, b[1] * rh, b[2] * rw, b[3] * rh]
}
