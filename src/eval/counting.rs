//! Counting metrics: how far the per-image cell counts are from the ground truth, and which
//! classes are taken for which.
//!
//! Definitions (also in `docs/evaluation.md`):
//! - A detection *counts* when its score is ≥ `score_threshold`. Ground truth counts unless it is
//!   a crowd region (`iscrowd`), which is not one cell. Boxes whose class is outside
//!   `1..class_names.len()` are left out.
//! - Per class, over all images: absolute count error `|#det − #gt|` averaged over every image
//!   (MAE); relative error `|#det − #gt| / #gt` averaged over the images that have ground truth of
//!   that class (MRE; `None` when no image has any); the share of images counted exactly.
//!   `total` is the same with all classes pooled (the per-image total cell count).
//! - Confusion matrix at IoU ≥ `iou` (0.5 by default): per image, the counting detections in
//!   descending score order (ties in input order) each take the still-unmatched ground truth of
//!   any class with the highest IoU (first on ties), one-to-one. Row = ground-truth class, column
//!   = detected class; the extra column `missed` counts ground truth left unmatched and the extra
//!   row `spurious` counts detections left unmatched.

use serde::Serialize;

use super::{iou_xyxy, DetBox, EvalImage, GtBox, NamedMap};

/// The label of the confusion matrix's extra column (ground truth no detection took).
pub const MISSED: &str = "missed";
/// The label of the confusion matrix's extra row (detections that took no ground truth).
pub const SPURIOUS: &str = "spurious";

/// Count errors of one class (or of all classes pooled).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CountError {
    /// Ground-truth boxes over all images (crowd regions excluded).
    pub gt: usize,
    /// Detections with score ≥ the threshold over all images.
    pub det: usize,
    /// Mean over all images of |#det − #gt|; `None` with no images.
    pub mae: Option<f64>,
    /// Mean of |#det − #gt| / #gt over the images with #gt > 0; `None` when there are none.
    pub mre: Option<f64>,
    /// How many images the relative error is averaged over (those with #gt > 0).
    pub mre_images: usize,
    /// Share of images where #det == #gt; `None` with no images.
    pub exact: Option<f64>,
}

/// Ground-truth class × detected class, at one IoU threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Confusion {
    /// Row labels: the class names (background excluded), then [`SPURIOUS`].
    pub rows: Vec<String>,
    /// Column labels: the class names (background excluded), then [`MISSED`].
    pub cols: Vec<String>,
    /// `matrix[row][col]`; the `spurious`/`missed` corner is always 0.
    pub matrix: Vec<Vec<usize>>,
}

/// Result of [`count_metrics`]. Serializes with serde as
/// `{"images":…,"score_threshold":…,"iou_threshold":…,"per_class":{name:{…}},"total":{…},
/// "confusion":{"rows":[…],"cols":[…],"matrix":[[…]]}}`; undefined means are `null`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CountMetrics {
    pub images: usize,
    pub score_threshold: f64,
    pub iou_threshold: f64,
    pub per_class: NamedMap<CountError>,
    pub total: CountError,
    pub confusion: Confusion,
}

fn count_error(pairs: &[(usize, usize)]) -> CountError {
    let n = pairs.len();
    let abs: Vec<f64> = pairs.iter().map(|&(d, g)| d.abs_diff(g) as f64).collect();
    let rel: Vec<f64> = pairs
        .iter()
        .filter(|&&(_, g)| g > 0)
        .map(|&(d, g)| d.abs_diff(g) as f64 / g as f64)
        .collect();
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    CountError {
        gt: pairs.iter().map(|p| p.1).sum(),
        det: pairs.iter().map(|p| p.0).sum(),
        mae: mean(&abs),
        mre: mean(&rel),
        mre_images: rel.len(),
        exact: (n > 0).then(|| pairs.iter().filter(|(d, g)| d == g).count() as f64 / n as f64),
    }
}

/// Counting metrics of `images` at `score_threshold`, with the confusion matrix at IoU ≥ `iou`
/// (use 0.5 unless there is a reason). `class_names[0]` is the background.
pub fn count_metrics(
    images: &[EvalImage],
    class_names: &[String],
    score_threshold: f64,
    iou: f64,
) -> CountMetrics {
    let n_k = class_names.len().saturating_sub(1);
    let in_range = |c: usize| (1..=n_k).contains(&c);
    // (det, gt) per image, per class and pooled.
    let mut per_class_pairs = vec![Vec::with_capacity(images.len()); n_k];
    let mut total_pairs = Vec::with_capacity(images.len());
    let mut matrix = vec![vec![0usize; n_k + 1]; n_k + 1];

    for img in images {
        let gts: Vec<&GtBox> = img
            .gt
            .iter()
            .filter(|g| !g.iscrowd && in_range(g.class))
            .collect();
        let mut dets: Vec<&DetBox> = img
            .dets
            .iter()
            .filter(|d| d.score >= score_threshold && in_range(d.class))
            .collect();
        for (k, pairs) in per_class_pairs.iter_mut().enumerate() {
            let d = dets.iter().filter(|x| x.class == k + 1).count();
            let g = gts.iter().filter(|x| x.class == k + 1).count();
            pairs.push((d, g));
        }
        total_pairs.push((dets.len(), gts.len()));

        // Greedy one-to-one matching by descending score, any class.
        dets.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut taken = vec![false; gts.len()];
        for d in &dets {
            let mut best: Option<(usize, f64)> = None;
            for (gi, g) in gts.iter().enumerate() {
                if taken[gi] {
                    continue;
                }
                let v = iou_xyxy(&d.bbox, &g.bbox);
                if v >= iou && best.is_none_or(|(_, b)| v > b) {
                    best = Some((gi, v));
                }
            }
            match best {
                Some((gi, _)) => {
                    taken[gi] = true;
                    matrix[gts[gi].class - 1][d.class - 1] += 1;
                }
                None => matrix[n_k][d.class - 1] += 1,
            }
        }
        for (g, t) in gts.iter().zip(&taken) {
            if !t {
                matrix[g.class - 1][n_k] += 1;
            }
        }
    }

    let names: Vec<String> = class_names.iter().skip(1).cloned().collect();
    let mut rows = names.clone();
    rows.push(SPURIOUS.into());
    let mut cols = names.clone();
    cols.push(MISSED.into());
    CountMetrics {
        images: images.len(),
        score_threshold,
        iou_threshold: iou,
        per_class: NamedMap(
            names
                .into_iter()
                .zip(per_class_pairs.iter().map(|p| count_error(p)))
                .collect(),
        ),
        total: count_error(&total_pairs),
        confusion: Confusion { rows, cols, matrix },
    }
}
