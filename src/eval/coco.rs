//! COCO bbox evaluation: a port of pycocotools' `COCOeval` (iouType `'bbox'`, `useCats=1`),
//! `evaluate()` + `accumulate()` + `summarize()`, step for step, including its quirks (each one
//! is marked "pycocotools:" below). On the committed fixtures every number is bit-identical to
//! pycocotools 2.0.11's (`tests/eval_coco.rs`, `docs/evaluation.md`).
//!
//! Correspondence: one [`EvalImage`] is one COCO image (image ids in slice order); class `k`
//! (1-based) is category id `k`, and the categories are exactly `class_names[1..]` (a class with no
//! ground truth is still a category; a box whose class is outside the list is dropped, as
//! pycocotools drops annotations of unknown categories). Boxes reach pycocotools as
//! `[x1, y1, x2 - x1, y2 - y1]` (xywh), and this module computes from that same xywh.
//!
//! One deliberate difference: pycocotools' first stat (AP @[.50:.95]) is always read at
//! maxDets = 100, so with `max_dets = [1, 10, 300]` it prints −1. Here AP is read at
//! `max_dets[2]`, like every other AP stat; with the default `[1, 10, 100]` the two are identical.

use std::cmp::Ordering;

use serde::Serialize;

use super::{DetBox, EvalImage, GtBox, NamedMap};

/// pycocotools' default `maxDets`.
pub const DEFAULT_MAX_DETS: [usize; 3] = [1, 10, 100];

/// pycocotools' `areaRng` (on the ground truth's `area`; bounds inclusive):
/// all `[0², 1e5²]`, small `[0², 32²]`, medium `[32², 96²]`, large `[96², 1e5²]`.
pub const AREA_RANGES: [[f64; 2]; 4] =
    [[0.0, 1e10], [0.0, 1024.0], [1024.0, 9216.0], [9216.0, 1e10]];

/// Names of the area ranges, in [`AREA_RANGES`] order.
pub const AREA_NAMES: [&str; 4] = ["all", "small", "medium", "large"];

/// numpy's `linspace(start, stop, num)` to the bit: `arange(num) * step + start` with
/// `step = (stop - start) / (num - 1)`, and the last element set to `stop`. (So the IoU thresholds
/// are not the decimal values: the ninth is 0.8999999999999999.)
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|k| k as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// pycocotools' `iouThrs`: `np.linspace(.5, 0.95, 10)`.
pub fn iou_thresholds() -> Vec<f64> {
    linspace(0.5, 0.95, 10)
}

/// pycocotools' `recThrs`: `np.linspace(.0, 1.00, 101)`.
pub fn recall_thresholds() -> Vec<f64> {
    linspace(0.0, 1.0, 101)
}

/// numpy's pairwise summation (`pairwise_sum_DOUBLE`, the loop behind `np.sum`/`np.mean` of a
/// contiguous float64 array): blocks under 8 summed in order, up to 128 with eight interleaved
/// accumulators, larger ones split in halves rounded down to a multiple of 8.
fn numpy_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &x in a {
            res += x;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_sum(&a[..n2]) + numpy_sum(&a[n2..])
    }
}

/// `np.mean` of the entries that are not −1 (pycocotools' `np.mean(s[s > -1])`), or −1 if none.
fn mean_valid(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.filter(|&x| x > -1.0).collect();
    if v.is_empty() {
        -1.0
    } else {
        numpy_sum(&v) / v.len() as f64
    }
}

/// The order of `np.argsort(-scores, kind='mergesort')`: descending score, ties kept in input
/// order (a stable sort), NaN last (numpy sorts NaN after every number).
fn score_order(a: f64, b: f64) -> Ordering {
    let (ka, kb) = (-a, -b);
    match (ka.is_nan(), kb.is_nan()) {
        (false, false) => ka.partial_cmp(&kb).unwrap_or(Ordering::Equal),
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
    }
}

fn xywh(b: &[f64; 4]) -> [f64; 4] {
    [b[0], b[1], b[2] - b[0], b[3] - b[1]]
}

/// pycocotools' `bbIou` (maskApi.c) on xywh boxes, including its crowd rule: against a crowd
/// ground truth the union is the detection's own area. Returns `ious[d][g]`.
fn bb_iou(dt: &[[f64; 4]], gt: &[[f64; 4]], crowd: &[bool]) -> Vec<Vec<f64>> {
    let mut o = vec![vec![0.0; gt.len()]; dt.len()];
    for (g, (gb, &c)) in gt.iter().zip(crowd).enumerate() {
        let ga = gb[2] * gb[3];
        for (d, db) in dt.iter().enumerate() {
            let da = db[2] * db[3];
            // C's fmin/fmax return the other operand when one is NaN.
            let w = c_fmin(db[2] + db[0], gb[2] + gb[0]) - c_fmax(db[0], gb[0]);
            if w <= 0.0 {
                continue;
            }
            let h = c_fmin(db[3] + db[1], gb[3] + gb[1]) - c_fmax(db[1], gb[1]);
            if h <= 0.0 {
                continue;
            }
            let i = w * h;
            let u = if c { da } else { da + ga - i };
            o[d][g] = i / u;
        }
    }
    o
}

fn c_fmin(a: f64, b: f64) -> f64 {
    a.min(b) // Rust's min/max already follow C99 fmin/fmax on NaN.
}

fn c_fmax(a: f64, b: f64) -> f64 {
    a.max(b)
}

/// `evaluateImg`'s result for one (category, area range, image) that has ground truth or
/// detections.
struct ImgEval {
    /// Detection scores, sorted, cut to the largest maxDets.
    scores: Vec<f64>,
    /// `dtMatches != 0`, `[t][d]`.
    matched: Vec<Vec<bool>>,
    /// `dtIgnore`, `[t][d]`.
    ignored: Vec<Vec<bool>>,
    /// Ground truths that are not ignored in this area range.
    not_ignored_gt: usize,
}

/// pycocotools' `evaluateImg` for one area range. `gts` in the input order, `dts` already sorted
/// and cut, `ious[d][g]` in the input ground-truth order.
fn evaluate_img(
    gts: &[&GtBox],
    dts_xywh: &[[f64; 4]],
    scores: &[f64],
    ious: &[Vec<f64>],
    range: [f64; 2],
    iou_thrs: &[f64],
) -> ImgEval {
    // pycocotools: `ignore` is iscrowd; `_ignore` adds "area outside the range" (bounds inclusive).
    let ignore_of = |g: &GtBox| g.iscrowd || g.area < range[0] || g.area > range[1];
    // pycocotools: ground truths sorted by `_ignore` (stable), so ignored ones come last.
    let mut perm: Vec<usize> = (0..gts.len()).collect();
    perm.sort_by_key(|&g| ignore_of(gts[g]));
    let gt_ig: Vec<bool> = perm.iter().map(|&g| ignore_of(gts[g])).collect();
    let crowd: Vec<bool> = perm.iter().map(|&g| gts[g].iscrowd).collect();

    let n_d = dts_xywh.len();
    let n_g = perm.len();
    let mut matched = vec![vec![false; n_d]; iou_thrs.len()];
    let mut ignored = vec![vec![false; n_d]; iou_thrs.len()];
    for (t, &thr) in iou_thrs.iter().enumerate() {
        let mut gt_matched = vec![false; n_g];
        for d in 0..n_d {
            // pycocotools: `iou = min([t, 1-1e-10])`, and a later ground truth with an IoU equal
            // to the best so far replaces it (`if ious < iou: continue`, so `>=` wins).
            let mut best = thr.min(1.0 - 1e-10);
            let mut m: Option<usize> = None;
            for gp in 0..n_g {
                // A matched ground truth is taken unless it is a crowd (crowds match many).
                if gt_matched[gp] && !crowd[gp] {
                    continue;
                }
                // Once matched to a regular ground truth, stop at the first ignored one.
                if let Some(mm) = m {
                    if !gt_ig[mm] && gt_ig[gp] {
                        break;
                    }
                }
                let v = ious[d][perm[gp]];
                if v < best {
                    continue;
                }
                best = v;
                m = Some(gp);
            }
            if let Some(mm) = m {
                ignored[t][d] = gt_ig[mm];
                matched[t][d] = true;
                gt_matched[mm] = true;
            }
        }
    }
    // pycocotools: an unmatched detection whose own area (w*h) is outside the range is ignored.
    for d in 0..n_d {
        let area = dts_xywh[d][2] * dts_xywh[d][3];
        if area < range[0] || area > range[1] {
            for t in 0..iou_thrs.len() {
                if !matched[t][d] {
                    ignored[t][d] = true;
                }
            }
        }
    }
    ImgEval {
        scores: scores.to_vec(),
        matched,
        ignored,
        not_ignored_gt: gt_ig.iter().filter(|&&i| !i).count(),
    }
}

/// AP and AP50 of one class: pycocotools' `eval['precision'][:, :, k, area all, last maxDets]`
/// (and `[0, :, k, …]` for AP50), averaged over the entries that are not −1; −1 when none are
/// (a class with no ground truth).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassAp {
    #[serde(rename = "AP")]
    pub ap: f64,
    #[serde(rename = "AP50")]
    pub ap50: f64,
}

/// The twelve COCO summary numbers plus per-class AP/AP50. Serializes as
/// `{"AP":…,"AP50":…,"AP75":…,"APs":…,"APm":…,"APl":…,"AR1":…,"AR10":…,"AR100":…,"ARs":…,
/// "ARm":…,"ARl":…,"per_class":{name:{"AP":…,"AP50":…}}}`, the AR keys named after the actual
/// `max_dets` (`"AR300"` for `--max-dets 300`). −1 where undefined, as pycocotools.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoMetrics {
    /// The maxDets used, sorted ascending (pycocotools sorts them).
    pub max_dets: [usize; 3],
    /// pycocotools' `stats` order: AP, AP50, AP75, APs, APm, APl, AR@max_dets[0],
    /// AR@max_dets[1], AR@max_dets[2], ARs, ARm, ARl. All but the AR@max_dets[0..2] are at
    /// `max_dets[2]`.
    pub stats: [f64; 12],
    /// Per class, in class order (background excluded).
    pub per_class: NamedMap<ClassAp>,
}

impl CocoMetrics {
    /// The JSON key of each entry of [`CocoMetrics::stats`].
    pub fn stat_names(&self) -> [String; 12] {
        let [m0, m1, m2] = self.max_dets;
        [
            "AP".into(),
            "AP50".into(),
            "AP75".into(),
            "APs".into(),
            "APm".into(),
            "APl".into(),
            format!("AR{m0}"),
            format!("AR{m1}"),
            format!("AR{m2}"),
            "ARs".into(),
            "ARm".into(),
            "ARl".into(),
        ]
    }

    /// AP @[IoU .50:.95, all areas, max_dets[2]].
    pub fn ap(&self) -> f64 {
        self.stats[0]
    }

    /// AP @[IoU .50, all areas, max_dets[2]].
    pub fn ap50(&self) -> f64 {
        self.stats[1]
    }

    /// The summary as pycocotools prints it (twelve lines).
    pub fn summary(&self) -> String {
        let [m0, m1, m2] = self.max_dets;
        let rows: [(bool, &str, &str, usize); 12] = [
            (true, "0.50:0.95", "all", m2),
            (true, "0.50", "all", m2),
            (true, "0.75", "all", m2),
            (true, "0.50:0.95", "small", m2),
            (true, "0.50:0.95", "medium", m2),
            (true, "0.50:0.95", "large", m2),
            (false, "0.50:0.95", "all", m0),
            (false, "0.50:0.95", "all", m1),
            (false, "0.50:0.95", "all", m2),
            (false, "0.50:0.95", "small", m2),
            (false, "0.50:0.95", "medium", m2),
            (false, "0.50:0.95", "large", m2),
        ];
        let mut s = String::new();
        for ((ap, iou, area, md), v) in rows.iter().zip(self.stats) {
            let (title, kind) = if *ap {
                ("Average Precision", "(AP)")
            } else {
                ("Average Recall", "(AR)")
            };
            s.push_str(&format!(
                " {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6} | maxDets={md:>3} ] = {v:0.3}\n"
            ));
        }
        s
    }
}

impl Serialize for CocoMetrics {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(13))?;
        for (k, v) in self.stat_names().iter().zip(self.stats) {
            m.serialize_entry(k, &v)?;
        }
        m.serialize_entry("per_class", &self.per_class)?;
        m.end()
    }
}

/// COCO bbox evaluation of `images` (pycocotools `COCOeval(gt, dt, 'bbox')` with
/// `params.maxDets = max_dets`, then `evaluate(); accumulate(); summarize()`). `class_names[0]` is
/// the background; the categories are `1..class_names.len()`. `max_dets` is normally
/// [`DEFAULT_MAX_DETS`]; `marrow eval --max-dets N` sets the last one.
pub fn evaluate(images: &[EvalImage], class_names: &[String], max_dets: [usize; 3]) -> CocoMetrics {
    let mut md = max_dets;
    md.sort_unstable(); // pycocotools: `p.maxDets = sorted(p.maxDets)`
    let max_det = md[2];
    let n_k = class_names.len().saturating_sub(1);
    let n_a = AREA_RANGES.len();
    let n_m = md.len();
    let n_i = images.len();
    let iou_thrs = iou_thresholds();
    let rec_thrs = recall_thresholds();
    let n_t = iou_thrs.len();
    let n_r = rec_thrs.len();

    // evaluate(): evals[(k * n_a + a) * n_i + i], None where the image has neither ground truth
    // nor detections of the class.
    let mut evals: Vec<Option<ImgEval>> = Vec::with_capacity(n_k * n_a * n_i);
    evals.resize_with(n_k * n_a * n_i, || None);
    for k in 0..n_k {
        let cat = k + 1;
        for (i, img) in images.iter().enumerate() {
            let gts: Vec<&GtBox> = img.gt.iter().filter(|g| g.class == cat).collect();
            let mut dts: Vec<&DetBox> = img.dets.iter().filter(|d| d.class == cat).collect();
            if gts.is_empty() && dts.is_empty() {
                continue;
            }
            // pycocotools (computeIoU): detections sorted by score with a stable mergesort and
            // cut to the largest maxDets before anything else.
            dts.sort_by(|a, b| score_order(a.score, b.score));
            dts.truncate(max_det);
            let d_xywh: Vec<[f64; 4]> = dts.iter().map(|d| xywh(&d.bbox)).collect();
            let g_xywh: Vec<[f64; 4]> = gts.iter().map(|g| xywh(&g.bbox)).collect();
            let crowd: Vec<bool> = gts.iter().map(|g| g.iscrowd).collect();
            let scores: Vec<f64> = dts.iter().map(|d| d.score).collect();
            let ious = bb_iou(&d_xywh, &g_xywh, &crowd);
            for (a, &range) in AREA_RANGES.iter().enumerate() {
                evals[(k * n_a + a) * n_i + i] = Some(evaluate_img(
                    &gts, &d_xywh, &scores, &ious, range, &iou_thrs,
                ));
            }
        }
    }

    // accumulate(): precision[t][r][k][a][m] and recall[t][k][a][m], −1 where undefined.
    let p_idx = |t: usize, r: usize, k: usize, a: usize, m: usize| {
        (((t * n_r + r) * n_k + k) * n_a + a) * n_m + m
    };
    let r_idx = |t: usize, k: usize, a: usize, m: usize| ((t * n_k + k) * n_a + a) * n_m + m;
    let mut precision = vec![-1.0f64; n_t * n_r * n_k * n_a * n_m];
    let mut recall = vec![-1.0f64; n_t * n_k * n_a * n_m];
    for k in 0..n_k {
        for a in 0..n_a {
            let e: Vec<&ImgEval> = evals[(k * n_a) * n_i + a * n_i..][..n_i]
                .iter()
                .flatten()
                .collect();
            if e.is_empty() {
                continue;
            }
            let npig: usize = e.iter().map(|x| x.not_ignored_gt).sum();
            if npig == 0 {
                continue; // pycocotools: no ground truth left in this range → stays −1
            }
            for (m, &mdet) in md.iter().enumerate() {
                // Concatenate each image's first maxDet detections (in image order), then one
                // stable sort by score across images.
                let mut cat: Vec<(f64, &ImgEval, usize)> = Vec::new();
                for x in &e {
                    for d in 0..x.scores.len().min(mdet) {
                        cat.push((x.scores[d], x, d));
                    }
                }
                cat.sort_by(|p, q| score_order(p.0, q.0));
                let nd = cat.len();
                for t in 0..n_t {
                    let mut tp = 0usize;
                    let mut fp = 0usize;
                    let mut rc = Vec::with_capacity(nd);
                    let mut pr = Vec::with_capacity(nd);
                    for &(_, x, d) in &cat {
                        if !x.ignored[t][d] {
                            if x.matched[t][d] {
                                tp += 1;
                            } else {
                                fp += 1;
                            }
                        }
                        let (tpf, fpf) = (tp as f64, fp as f64);
                        rc.push(tpf / npig as f64);
                        // pycocotools: `tp / (fp + tp + np.spacing(1))`
                        pr.push(tpf / (fpf + tpf + f64::EPSILON));
                    }
                    recall[r_idx(t, k, a, m)] = rc.last().copied().unwrap_or(0.0);
                    // The monotone (non-increasing) precision envelope.
                    for i in (1..nd).rev() {
                        if pr[i] > pr[i - 1] {
                            pr[i - 1] = pr[i];
                        }
                    }
                    // pycocotools: `np.searchsorted(rc, recThrs, side='left')`; past the end
                    // the IndexError ends the loop, leaving the remaining precisions at 0.
                    for (ri, &thr) in rec_thrs.iter().enumerate() {
                        let pi = rc.partition_point(|&x| x < thr);
                        let q = if pi < nd { pr[pi] } else { 0.0 };
                        precision[p_idx(t, ri, k, a, m)] = q;
                    }
                }
            }
        }
    }

    // summarize(): the means over the selected slices, in numpy's C order (t, r, k, a, m).
    let m_of = |max_det: usize| -> Vec<usize> { (0..n_m).filter(|&m| md[m] == max_det).collect() };
    let t_of = |thr: Option<f64>| -> Vec<usize> {
        match thr {
            None => (0..n_t).collect(),
            // pycocotools: `np.where(iouThr == p.iouThrs)`, an exact float comparison.
            Some(x) => (0..n_t).filter(|&t| iou_thrs[t] == x).collect(),
        }
    };
    let ap = |thr: Option<f64>, a: usize, max_det: usize| -> f64 {
        let (ts, ms) = (t_of(thr), m_of(max_det));
        let mut v = Vec::new();
        for &t in &ts {
            for r in 0..n_r {
                for k in 0..n_k {
                    for &m in &ms {
                        v.push(precision[p_idx(t, r, k, a, m)]);
                    }
                }
            }
        }
        mean_valid(v.into_iter())
    };
    let ar = |a: usize, max_det: usize| -> f64 {
        let ms = m_of(max_det);
        let mut v = Vec::new();
        for t in 0..n_t {
            for k in 0..n_k {
                for &m in &ms {
                    v.push(recall[r_idx(t, k, a, m)]);
                }
            }
        }
        mean_valid(v.into_iter())
    };
    let stats = [
        ap(None, 0, md[2]), // pycocotools reads this one at maxDets=100 (see the module doc)
        ap(Some(0.5), 0, md[2]),
        ap(Some(0.75), 0, md[2]),
        ap(None, 1, md[2]),
        ap(None, 2, md[2]),
        ap(None, 3, md[2]),
        ar(0, md[0]),
        ar(0, md[1]),
        ar(0, md[2]),
        ar(1, md[2]),
        ar(2, md[2]),
        ar(3, md[2]),
    ];

    let per_class = NamedMap(
        (0..n_k)
            .map(|k| {
                let m = n_m - 1;
                let all = (0..n_t)
                    .flat_map(|t| (0..n_r).map(move |r| (t, r)))
                    .map(|(t, r)| precision[p_idx(t, r, k, 0, m)]);
                let at50 = (0..n_r).map(|r| precision[p_idx(0, r, k, 0, m)]);
                (
                    class_names[k + 1].clone(),
                    ClassAp {
                        ap: mean_valid(all),
                        ap50: mean_valid(at50),
                    },
                )
            })
            .collect(),
    );

    CocoMetrics {
        max_dets: md,
        stats,
        per_class,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_numpy_linspace() {
        let t = iou_thresholds();
        assert_eq!(t.len(), 10);
        assert_eq!(t[0], 0.5);
        assert_eq!(t[5], 0.75);
        assert_eq!(t[8], 0.8999999999999999);
        assert_eq!(t[9], 0.95);
        let r = recall_thresholds();
        assert_eq!((r.len(), r[0], r[100]), (101, 0.0, 1.0));
    }

    #[test]
    fn numpy_sum_small_and_blocked() {
        assert_eq!(numpy_sum(&[]), 0.0);
        assert_eq!(numpy_sum(&[1.0, 2.0, 3.0]), 6.0);
        let v: Vec<f64> = (0..1000).map(|i| i as f64).collect();
        assert_eq!(numpy_sum(&v), 499500.0);
    }

    #[test]
    fn perfect_detections_score_one() {
        let names: Vec<String> = ["bg", "a"].iter().map(|s| s.to_string()).collect();
        let img = EvalImage {
            file: "x".into(),
            width: 100,
            height: 100,
            gt: vec![GtBox::new([0.0, 0.0, 10.0, 10.0], 1)],
            dets: vec![DetBox {
                bbox: [0.0, 0.0, 10.0, 10.0],
                class: 1,
                score: 0.9,
            }],
        };
        let m = evaluate(&[img], &names, DEFAULT_MAX_DETS);
        // pycocotools' precision is tp / (fp + tp + eps), a hair under 1.
        let one = |x: f64| x < 1.0 && x > 1.0 - 1e-15;
        assert!(one(m.stats[0]) && one(m.stats[3])); // all, small
        assert_eq!(m.stats[8], 1.0); // recall
        assert_eq!(m.stats[4], -1.0); // no medium ground truth
        assert!(one(m.per_class.get("a").unwrap().ap50));
    }

    #[test]
    fn no_images_is_all_undefined() {
        let names: Vec<String> = ["bg", "a"].iter().map(|s| s.to_string()).collect();
        let m = evaluate(&[], &names, DEFAULT_MAX_DETS);
        assert!(m.stats.iter().all(|&s| s == -1.0));
        let m = evaluate(&[], &[], DEFAULT_MAX_DETS);
        assert!(m.stats.iter().all(|&s| s == -1.0));
    }
}
