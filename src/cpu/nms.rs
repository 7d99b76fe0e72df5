//! CPU reference for non-maximum suppression: torchvision's CPU `nms` kernel and both `batched_nms`
//! paths (docs/torchvision-semantics.md §7), in f32 exactly as torchvision computes them. Rust
//! never contracts `a * b + c` into an FMA, so every f32 operation here rounds exactly once, like
//! the compiled torchvision kernel; decisions (sort order, `>` tests) are therefore bit-equal.

use std::cmp::Ordering;

/// `batched_nms` on a CPU tensor uses the coordinate trick while `boxes.numel() <= 4000`, i.e.
/// for at most 1000 boxes, and the per-class ("vanilla") loop above that (§7.2).
pub const CPU_TRICK_MAX_BOXES: usize = 1000;

/// torchvision's score order: `scores.sort(descending=True, stable=True)`. NaN sorts first (torch
/// treats NaN as the largest value), -0.0 and +0.0 are equal, and equal scores keep their input
/// order.
pub fn score_order(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // `sort_by` is a stable sort.
    order.sort_by(|&a, &b| descending(scores[a], scores[b]));
    order
}

/// Descending order with NaN first; equal values compare Equal (so a stable sort keeps index
/// order).
fn descending(a: f32, b: f32) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => b.partial_cmp(&a).expect("not NaN"),
    }
}

/// `std::max(a, b)`, which returns `a` unless `a < b` (so a NaN `b` is dropped).
fn std_max(a: f32, b: f32) -> f32 {
    if a < b {
        b
    } else {
        a
    }
}

/// `std::min(a, b)`, which returns `a` unless `b < a`.
fn std_min(a: f32, b: f32) -> f32 {
    if b < a {
        b
    } else {
        a
    }
}

/// `(x2 - x1) * (y2 - y1)` in f32, no +1 (§7.1).
pub fn area(b: &[f32; 4]) -> f32 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// The IoU exactly as the CPU kernel evaluates it: `inter / (area_a + area_b - inter)` in f32,
/// with the intersection extents clamped by `std::max(0, ·)`. Zero-area pairs give 0/0 = NaN.
pub fn iou(a: &[f32; 4], area_a: f32, b: &[f32; 4], area_b: f32) -> f32 {
    let xx1 = std_max(a[0], b[0]);
    let yy1 = std_max(a[1], b[1]);
    let xx2 = std_min(a[2], b[2]);
    let yy2 = std_min(a[3], b[3]);
    let w = std_max(0.0, xx2 - xx1);
    let h = std_max(0.0, yy2 - yy1);
    let inter = w * h;
    inter / (area_a + area_b - inter)
}

/// Greedy NMS (torchvision `ops.nms` on CPU): walk the boxes in [`score_order`], keep each one not
/// yet suppressed and suppress every later box whose IoU with it is strictly greater than
/// `iou_thresh`. Returns the kept indices in score order.
///
/// torchvision compares the f32 IoU against a double threshold; comparing in f32 against
/// `iou_thresh` gives the same decisions when `iou_thresh` is the f32 rounded *down* from the
/// double, which is what the literals 0.5 and 0.7 round to (§7.1).
pub fn nms(boxes: &[[f32; 4]], scores: &[f32], iou_thresh: f32) -> Vec<usize> {
    assert_eq!(
        boxes.len(),
        scores.len(),
        "nms: boxes and scores differ in length"
    );
    let areas: Vec<f32> = boxes.iter().map(area).collect();
    let order = score_order(scores);
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for (pos, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        for &j in &order[pos + 1..] {
            if !suppressed[j] && iou(&boxes[i], areas[i], &boxes[j], areas[j]) > iou_thresh {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// torchvision `ops.batched_nms` as it runs on a CPU tensor: the coordinate trick for at most
/// [`CPU_TRICK_MAX_BOXES`] boxes, the per-class loop above that. NMS never crosses classes
/// (`idxs`: class or level id per box). Kept indices in score order.
pub fn batched_nms(
    boxes: &[[f32; 4]],
    scores: &[f32],
    idxs: &[u32],
    iou_thresh: f32,
) -> Vec<usize> {
    if boxes.len() <= CPU_TRICK_MAX_BOXES {
        batched_nms_trick(boxes, scores, idxs, iou_thresh)
    } else {
        batched_nms_vanilla(boxes, scores, idxs, iou_thresh)
    }
}

/// `_batched_nms_coordinate_trick`: shift every box by `f32(idx) * (max_coordinate + 1)`, all in
/// f32, and run one [`nms`] on the shifted (re-rounded) boxes. The max propagates NaN like
/// `Tensor.max()`.
pub fn batched_nms_trick(
    boxes: &[[f32; 4]],
    scores: &[f32],
    idxs: &[u32],
    iou_thresh: f32,
) -> Vec<usize> {
    assert_eq!(
        boxes.len(),
        idxs.len(),
        "batched_nms: boxes and idxs differ in length"
    );
    if boxes.is_empty() {
        return Vec::new();
    }
    let max =
        boxes.iter().flatten().fold(
            f32::NEG_INFINITY,
            |m, &v| if v.is_nan() || v > m { v } else { m },
        );
    let max_plus_one = max + 1.0;
    let shifted: Vec<[f32; 4]> = boxes
        .iter()
        .zip(idxs)
        .map(|(b, &c)| {
            let offset = c as f32 * max_plus_one;
            [b[0] + offset, b[1] + offset, b[2] + offset, b[3] + offset]
        })
        .collect();
    nms(&shifted, scores, iou_thresh)
}

/// `_batched_nms_vanilla`: [`nms`] per class (ascending class id) on that class's boxes, then the
/// union of the kept boxes ordered by score. torchvision's final sort is not stable; this one is
/// (equal scores in index order), as the GPU op does.
pub fn batched_nms_vanilla(
    boxes: &[[f32; 4]],
    scores: &[f32],
    idxs: &[u32],
    iou_thresh: f32,
) -> Vec<usize> {
    assert_eq!(
        boxes.len(),
        idxs.len(),
        "batched_nms: boxes and idxs differ in length"
    );
    let mut classes = idxs.to_vec();
    classes.sort_unstable();
    classes.dedup();
    let mut marked = vec![false; boxes.len()];
    for c in classes {
        let members: Vec<usize> = (0..boxes.len()).filter(|&i| idxs[i] == c).collect();
        let sub_boxes: Vec<[f32; 4]> = members.iter().map(|&i| boxes[i]).collect();
        let sub_scores: Vec<f32> = members.iter().map(|&i| scores[i]).collect();
        for k in nms(&sub_boxes, &sub_scores, iou_thresh) {
            marked[members[k]] = true;
        }
    }
    let mut keep: Vec<usize> = (0..boxes.len()).filter(|&i| marked[i]).collect();
    keep.sort_by(|&a, &b| descending(scores[a], scores[b]));
    keep
}
