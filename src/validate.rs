//! `marrow validate`: run the engine on a torchvision reference dump's input and compare every
//! stage present in both (docs/design.md §5 names), end-to-end from the image and teacher-forced
//! from the reference's own intermediate tensors, with the tolerances of
//! docs/torchvision-semantics.md §14.3.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::cpu::{self, Diff};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Nhwc};
use crate::model::backbone::FPN_NAMES;
use crate::model::config::{ModelConfig, CONFIG_KEY};
use crate::model::weights::WeightStore;
use crate::model::{Backbone, ImageF32};
use crate::seedgen::{SeedSpec, SEEDGEN_KEY};

/// One tensor of a reference dump.
#[derive(Debug, Clone)]
pub enum RefData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

#[derive(Debug, Clone)]
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub data: RefData,
}

impl RefTensor {
    pub fn f32(&self) -> Option<&[f32]> {
        match &self.data {
            RefData::F32(v) => Some(v),
            _ => None,
        }
    }
    pub fn i64(&self) -> Option<&[i64]> {
        match &self.data {
            RefData::I64(v) => Some(v),
            _ => None,
        }
    }
}

/// A reference dump written by `weights/make_reference.py`.
pub struct RefDump {
    pub path: PathBuf,
    pub tensors: HashMap<String, RefTensor>,
    pub metadata: HashMap<String, String>,
}

impl RefDump {
    pub fn open(path: &Path) -> Result<RefDump> {
        let err = |m: String| Error::Reference {
            path: path.to_path_buf(),
            message: m,
        };
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| err(format!("invalid safetensors: {e}")))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| err(format!("invalid safetensors: {e}")))?;
        let mut tensors = HashMap::new();
        for (name, v) in st.iter() {
            let b = v.data();
            let data = match v.dtype() {
                Dtype::F32 => RefData::F32(
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ),
                Dtype::I64 => RefData::I64(
                    b.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                        .collect(),
                ),
                d => {
                    return Err(err(format!(
                        "tensor {name}: dtype {d:?} (expected F32 or I64)"
                    )))
                }
            };
            tensors.insert(
                name.to_string(),
                RefTensor {
                    shape: v.shape().to_vec(),
                    data,
                },
            );
        }
        Ok(RefDump {
            path: path.to_path_buf(),
            tensors,
            metadata: meta.metadata().clone().unwrap_or_default(),
        })
    }

    fn err(&self, m: String) -> Error {
        Error::Reference {
            path: self.path.clone(),
            message: m,
        }
    }

    /// An f32 tensor that must be present with the given rank.
    pub fn f32(&self, name: &str, rank: usize) -> Result<(&[usize], &[f32])> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| self.err(format!("tensor {name} is missing")))?;
        let d = t
            .f32()
            .ok_or_else(|| self.err(format!("tensor {name} is not F32")))?;
        if t.shape.len() != rank {
            return Err(self.err(format!(
                "tensor {name} has shape {:?}, expected rank {rank}",
                t.shape
            )));
        }
        Ok((&t.shape, d))
    }

    /// The weights a fixture was made from, regenerated from its seedgen spec (no file needed).
    pub fn seeded_weights(&self) -> Result<Option<WeightStore>> {
        let Some(spec) = self.metadata.get(SEEDGEN_KEY) else {
            return Ok(None);
        };
        let spec = SeedSpec::from_json(spec)
            .map_err(|e| self.err(format!("metadata {SEEDGEN_KEY}: {e}")))?;
        let config = match self.metadata.get(CONFIG_KEY) {
            Some(c) => ModelConfig::from_json(c)
                .map_err(|e| self.err(format!("metadata {CONFIG_KEY}: {e}")))?,
            None => ModelConfig::default(),
        };
        let label = format!("seedgen(seed {}) from {}", spec.seed, self.path.display());
        WeightStore::from_seed_spec(&spec, config, &label).map(Some)
    }
}

/// One row of the comparison table.
#[derive(Debug, Clone)]
pub struct Row {
    pub stage: String,
    /// "from image", "teacher-forced", "exact"
    pub mode: &'static str,
    pub shape: String,
    pub diff: Option<Diff>,
    /// Tolerance on the row's metric (described in `metric`).
    pub tol: f64,
    pub metric: &'static str,
    pub pass: bool,
    pub note: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.rows.iter().all(|r| r.pass)
    }

    pub fn row(&self, stage: &str, mode: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.stage == stage && r.mode == mode)
    }

    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<18} {:<15} {:<20} {:>10} {:>13} {:>10} {:>9}  {}\n",
            "stage", "mode", "shape", "max abs", "max/max|ref|", "rel L2", "tol", "verdict"
        );
        for r in &self.rows {
            let (a, b, c) = match &r.diff {
                Some(d) => (
                    format!("{:.3e}", d.max_abs),
                    format!("{:.3e}", d.rel_max),
                    format!("{:.3e}", d.rel_l2),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            s.push_str(&format!(
                "{:<18} {:<15} {:<20} {:>10} {:>13} {:>10} {:>9}  {}{}\n",
                r.stage,
                r.mode,
                r.shape,
                a,
                b,
                c,
                match r.metric {
                    "exact" => "exact".to_string(),
                    "set" => format!("≥{}", r.tol),
                    _ => format!("{:.0e}", r.tol),
                },
                if r.pass { "ok" } else { "FAIL" },
                if r.note.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", r.note)
                }
            ));
        }
        s
    }
}

/// Compares an engine output (NHWC) with a reference NCHW tensor.
fn compare_nchw(
    stage: &str,
    mode: &'static str,
    got: (&Nhwc, &[f32]),
    want: (&[usize], &[f32]),
    tol: f64,
    metric: &'static str,
) -> Row {
    let (gs, gd) = got;
    let shape_ok = want.0 == [gs.n, gs.c, gs.h, gs.w];
    if !shape_ok {
        return Row {
            stage: stage.into(),
            mode,
            shape: format!("{:?}", want.0),
            diff: None,
            tol,
            metric,
            pass: false,
            note: format!(
                "engine shape [{}, {}, {}, {}] differs",
                gs.n, gs.c, gs.h, gs.w
            ),
        };
    }
    let g = cpu::nhwc_to_nchw(gd, *gs);
    let d = cpu::diff(&g, want.1);
    let value = match metric {
        "max abs" => d.max_abs,
        _ => d.rel_max.max(d.rel_l2),
    };
    Row {
        stage: stage.into(),
        mode,
        shape: format!("{:?}", want.0),
        diff: Some(d),
        tol,
        metric,
        pass: d.nonfinite == 0 && value <= tol,
        note: if d.nonfinite > 0 {
            format!("{} non-finite values", d.nonfinite)
        } else {
            String::new()
        },
    }
}

/// Tolerances (docs/torchvision-semantics.md §14.3). Named so tests and docs quote the same
/// numbers.
pub mod tol {
    /// normalize + resize + pad, max abs.
    pub const TRANSFORM_ABS: f64 = 2e-6;
    /// Whole body + FPN from the image: relative L2 and max-abs / max |ref| per level. ~50 conv
    /// layers of f32 accumulation in a different order from MKL-DNN/oneDNN compound to ~1e-5.
    pub const BACKBONE_REL: f64 = 1e-4;
    /// FPN teacher-forced from the reference C2..C5 (two conv layers deep).
    pub const FPN_TF_REL: f64 = 1e-5;
}

/// Runs every backbone-stage comparison the dump allows.
pub fn validate_backbone(gpu: &Gpu, weights: WeightStore, dump: &RefDump) -> Result<Report> {
    let mut report = Report::default();
    let (ishape, idata) = dump.f32("input.image", 3)?;
    if ishape[0] != 3 {
        return Err(dump.err(format!(
            "input.image has shape {ishape:?}, expected [3, H, W]"
        )));
    }
    let image = ImageF32 {
        h: ishape[1],
        w: ishape[2],
        data: idata.to_vec(),
    };
    let mut engine = Backbone::new(gpu, weights)?;
    let out = engine.run(&image)?;

    // Exact: resized size (the f64 truncation rule) and padded size.
    if let Some(t) = dump
        .tensors
        .get("transform.size")
        .and_then(|t| t.i64().map(|v| v.to_vec()))
    {
        let ours = [out.sizes.resized.0 as i64, out.sizes.resized.1 as i64];
        report.rows.push(Row {
            stage: "transform.size".into(),
            mode: "exact",
            shape: "[2]".into(),
            diff: None,
            tol: 0.0,
            metric: "exact",
            pass: t == ours,
            note: format!("ref {t:?}, engine {ours:?}"),
        });
    }
    if let Ok((ts, td)) = dump.f32("transform.image", 4) {
        let (gs, gd) = out.get("transform.image").expect("engine output");
        report.rows.push(compare_nchw(
            "transform.image",
            "from image",
            (gs, gd),
            (ts, td),
            tol::TRANSFORM_ABS,
            "max abs",
        ));
    }
    for name in FPN_NAMES {
        if let Ok(want) = dump.f32(name, 4) {
            let (gs, gd) = out.get(name).expect("engine output");
            report.rows.push(compare_nchw(
                name,
                "from image",
                (gs, gd),
                want,
                tol::BACKBONE_REL,
                "rel",
            ));
        }
    }
    // Teacher-forced body + FPN from the reference's transformed image (isolates the transform).
    if let Ok((ts, td)) = dump.f32("transform.image", 4) {
        let shape = Nhwc::new(ts[0], ts[2], ts[3], ts[1]);
        let x = cpu::nchw_to_nhwc(td, ts[0], ts[1], ts[2], ts[3]);
        let tf = engine.run_from_transformed(&x, shape)?;
        for name in FPN_NAMES {
            if let Ok(want) = dump.f32(name, 4) {
                if let Some((_, s, d)) = tf.iter().find(|(n, _, _)| n == name) {
                    report.rows.push(compare_nchw(
                        name,
                        "teacher-forced",
                        (s, d),
                        want,
                        tol::BACKBONE_REL,
                        "rel",
                    ));
                }
            }
        }
    }
    // Teacher-forced FPN from the reference's C2..C5, when the dump has them.
    let cs: Vec<_> = (2..=5)
        .filter_map(|i| dump.f32(&format!("body.c{i}"), 4).ok())
        .collect();
    if cs.len() == 4 {
        let inputs: Vec<(Nhwc, Vec<f32>)> = cs
            .iter()
            .map(|(s, d)| {
                (
                    Nhwc::new(s[0], s[2], s[3], s[1]),
                    cpu::nchw_to_nhwc(d, s[0], s[1], s[2], s[3]),
                )
            })
            .collect();
        let tf = engine.run_fpn(&inputs)?;
        for name in FPN_NAMES {
            if let Ok(want) = dump.f32(name, 4) {
                if let Some((_, s, d)) = tf.iter().find(|(n, _, _)| n == name) {
                    report.rows.push(compare_nchw(
                        name,
                        "TF from C2..C5",
                        (s, d),
                        want,
                        tol::FPN_TF_REL,
                        "rel",
                    ));
                }
            }
        }
    }
    Ok(report)
}

/// Stages in the dump that this engine does not produce yet (reported, not failed).
pub fn unchecked_stages(dump: &RefDump) -> Vec<String> {
    let mut v: Vec<String> = dump
        .tensors
        .keys()
        .filter(|k| k.starts_with("refine."))
        .cloned()
        .collect();
    v.sort();
    v
}

/// Set matching of proposals and detections (docs/torchvision-semantics.md §14.4).
pub mod matching {
    /// IoU in f64 (a measurement, not a model decision).
    pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f64 {
        let (a, b) = (a.map(|v| v as f64), b.map(|v| v as f64));
        let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
        let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
        let inter = iw * ih;
        let u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
        if u > 0.0 {
            inter / u
        } else if a == b {
            1.0
        } else {
            0.0
        }
    }

    fn linf(a: &[f32; 4], b: &[f32; 4]) -> f64 {
        (0..4)
            .map(|i| (a[i] as f64 - b[i] as f64).abs())
            .fold(0.0, f64::max)
    }

    #[derive(Debug, Clone, Copy, Default, PartialEq)]
    pub struct ProposalMatch {
        pub reference: usize,
        pub engine: usize,
        pub matched: usize,
        /// Largest |Δscore| over matched pairs.
        pub max_dscore: f64,
        pub mean_iou: f64,
    }

    impl ProposalMatch {
        pub fn fraction(&self) -> f64 {
            if self.reference == 0 {
                1.0
            } else {
                self.matched as f64 / self.reference as f64
            }
        }
    }

    /// Greedy one-to-one: each reference box (in reference order) takes the best unmatched engine
    /// box with IoU ≥ 0.99 or L∞ ≤ 0.05 px.
    pub fn proposals(
        got: &[[f32; 4]],
        got_scores: &[f32],
        want: &[[f32; 4]],
        want_scores: &[f32],
    ) -> ProposalMatch {
        let mut used = vec![false; got.len()];
        let mut m = ProposalMatch {
            reference: want.len(),
            engine: got.len(),
            ..Default::default()
        };
        let mut iou_sum = 0.0;
        for (i, w) in want.iter().enumerate() {
            let mut best: Option<(usize, f64)> = None;
            for (j, g) in got.iter().enumerate() {
                if used[j] {
                    continue;
                }
                let v = iou(w, g);
                if (v >= 0.99 || linf(w, g) <= 0.05) && best.is_none_or(|(_, b)| v > b) {
                    best = Some((j, v));
                }
            }
            if let Some((j, v)) = best {
                used[j] = true;
                m.matched += 1;
                iou_sum += v;
                m.max_dscore = m
                    .max_dscore
                    .max((got_scores[j] as f64 - want_scores[i] as f64).abs());
            }
        }
        m.mean_iou = if m.matched > 0 {
            iou_sum / m.matched as f64
        } else {
            1.0
        };
        m
    }

    /// One detection: box, score, label.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct Det {
        pub bbox: [f32; 4],
        pub score: f32,
        pub label: i64,
    }

    #[derive(Debug, Clone, Default, PartialEq)]
    pub struct DetMatch {
        pub reference: usize,
        pub engine: usize,
        pub matched: usize,
        /// Unmatched reference detections with an explanation (near the 0.05 score threshold,
        /// at the top-100 boundary, or with a same-label competitor at IoU ≈ NMS threshold).
        pub explainable: usize,
        pub unexplained: usize,
        pub max_dscore: f64,
        pub mean_iou: f64,
    }

    /// Matches engine detections to reference ones: same label, IoU ≥ `min_iou`, |Δscore| ≤
    /// `max_dscore`. `score_thresh`, `nms_thresh` and `max_det` are the model's, used only to
    /// decide whether a miss is explainable (δ = 1e-3).
    pub fn detections(
        got: &[Det],
        want: &[Det],
        min_iou: f64,
        max_dscore: f64,
        score_thresh: f32,
        nms_thresh: f32,
        max_det: usize,
    ) -> DetMatch {
        const DELTA: f64 = 1e-3;
        let mut used = vec![false; got.len()];
        let mut m = DetMatch {
            reference: want.len(),
            engine: got.len(),
            ..Default::default()
        };
        let mut iou_sum = 0.0;
        let last_score = want.iter().map(|d| d.score).fold(f32::INFINITY, f32::min) as f64;
        for (i, w) in want.iter().enumerate() {
            let mut best: Option<(usize, f64)> = None;
            for (j, g) in got.iter().enumerate() {
                if used[j]
                    || g.label != w.label
                    || (g.score as f64 - w.score as f64).abs() > max_dscore
                {
                    continue;
                }
                let v = iou(&w.bbox, &g.bbox);
                if v >= min_iou && best.is_none_or(|(_, b)| v > b) {
                    best = Some((j, v));
                }
            }
            match best {
                Some((j, v)) => {
                    used[j] = true;
                    m.matched += 1;
                    iou_sum += v;
                    m.max_dscore = m
                        .max_dscore
                        .max((got[j].score as f64 - w.score as f64).abs());
                }
                None => {
                    let s = w.score as f64;
                    let near_thresh = (s - score_thresh as f64).abs() <= DELTA;
                    let at_cut = want.len() >= max_det
                        && i + 5 >= max_det
                        && (s - last_score).abs() <= DELTA;
                    let nms_edge = want.iter().enumerate().any(|(k, o)| {
                        k != i
                            && o.label == w.label
                            && (iou(&o.bbox, &w.bbox) - nms_thresh as f64).abs() <= DELTA
                    });
                    if near_thresh || at_cut || nms_edge {
                        m.explainable += 1;
                    } else {
                        m.unexplained += 1;
                    }
                }
            }
        }
        m.mean_iou = if m.matched > 0 {
            iou_sum / m.matched as f64
        } else {
            1.0
        };
        m
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn proposals_match_one_to_one() {
            let want = [
                [0.0, 0.0, 10.0, 10.0],
                [0.0, 0.0, 10.0, 10.0],
                [50.0, 50.0, 60.0, 60.0],
            ];
            let got = [[0.0, 0.0, 10.0, 10.01], [100.0, 100.0, 110.0, 110.0]];
            let m = proposals(&got, &[0.5, 0.5], &want, &[0.5, 0.5, 0.5]);
            assert_eq!((m.matched, m.reference, m.engine), (1, 3, 2));
            assert!((m.fraction() - 1.0 / 3.0).abs() < 1e-12);
        }

        #[test]
        fn detections_classify_misses() {
            let d = |x: f32, s: f32, l: i64| Det {
                bbox: [x, 0.0, x + 10.0, 10.0],
                score: s,
                label: l,
            };
            let want = [
                d(0.0, 0.9, 1),
                d(20.0, 0.0505, 1),
                d(40.0, 0.8, 2),
                d(60.0, 0.7, 1),
            ];
            let got = [d(0.0, 0.9, 1), d(40.0, 0.8, 1)];
            let m = detections(&got, &want, 0.98, 1e-3, 0.05, 0.5, 100);
            assert_eq!(m.matched, 1);
            assert_eq!(m.explainable, 1, "0.0505 is within δ of the 0.05 threshold");
            assert_eq!(m.unexplained, 2, "a label mismatch and a plain miss");
        }
    }
}

/// Thresholds for the set-valued stages (§14.4).
pub mod set_tol {
    pub const PROPOSALS_E2E: f64 = 0.97;
    pub const PROPOSALS_TF: f64 = 0.995;
    pub const PROPOSAL_DSCORE: f64 = 1e-4;
    pub const DET_IOU_E2E: f64 = 0.98;
    pub const DET_IOU_TF: f64 = 0.99;
    pub const DET_DSCORE_E2E: f64 = 1e-3;
    pub const DET_DSCORE_TF: f64 = 1e-5;
    /// Box-head GEMMs from the reference proposals and FPN (rel to max |ref|).
    pub const BOX_HEAD_REL: f64 = 1e-5;
}

fn boxes4(v: &[f32]) -> Vec<[f32; 4]> {
    v.chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect()
}

fn set_row(
    stage: &str,
    mode: &'static str,
    shape: String,
    pass: bool,
    tol: f64,
    note: String,
) -> Row {
    Row {
        stage: stage.into(),
        mode,
        shape,
        diff: None,
        tol,
        metric: "set",
        pass,
        note,
    }
}

/// The detection heads: proposals and detections by set matching, end-to-end from the image and
/// teacher-forced (RPN from the reference FPN; box head from the reference FPN and proposals).
pub fn validate_heads(gpu: &Gpu, weights: WeightStore, dump: &RefDump) -> Result<Report> {
    use crate::model::detector::{Detections, Detector};
    use matching::Det;
    let mut report = Report::default();
    let cfg = weights.config.clone();
    let (ishape, idata) = dump.f32("input.image", 3)?;
    let image = ImageF32 {
        h: ishape[1],
        w: ishape[2],
        data: idata.to_vec(),
    };
    let mut det = Detector::new(gpu, weights)?;
    let (out, st) = det.detect_debug(&image)?;
    let to_dets = |d: &Detections| -> Vec<Det> {
        d.detections
            .iter()
            .map(|x| Det {
                bbox: x.bbox,
                score: x.score,
                label: x.label as i64,
            })
            .collect()
    };
    let ref_props = match (
        dump.tensors.get("rpn.proposals"),
        dump.tensors.get("rpn.scores"),
    ) {
        (Some(p), Some(s)) => Some((
            boxes4(p.f32().unwrap_or(&[])),
            s.f32().unwrap_or(&[]).to_vec(),
        )),
        _ => None,
    };
    let ref_dets = match (
        dump.tensors.get("det.boxes"),
        dump.tensors.get("det.scores"),
        dump.tensors.get("det.labels"),
    ) {
        (Some(b), Some(s), Some(l)) => {
            let b = boxes4(b.f32().unwrap_or(&[]));
            let s = s.f32().unwrap_or(&[]);
            let l = l.i64().unwrap_or(&[]);
            if b.len() != s.len() || b.len() != l.len() {
                return Err(dump.err("det.boxes / det.scores / det.labels lengths differ".into()));
            }
            Some(
                (0..b.len())
                    .map(|i| Det {
                        bbox: b[i],
                        score: s[i],
                        label: l[i],
                    })
                    .collect::<Vec<_>>(),
            )
        }
        _ => None,
    };
    let prop_row = |mode: &'static str, m: matching::ProposalMatch, need: f64| {
        set_row(
            "rpn.proposals",
            mode,
            format!("[{}, 4]", m.reference),
            m.fraction() >= need && m.max_dscore <= set_tol::PROPOSAL_DSCORE,
            need,
            format!(
                "matched {}/{} ({:.2}%), engine {}, max |Δscore| {:.1e}, mean IoU {:.6}",
                m.matched,
                m.reference,
                100.0 * m.fraction(),
                m.engine,
                m.max_dscore,
                m.mean_iou
            ),
        )
    };
    let det_row = |mode: &'static str, m: matching::DetMatch, iou: f64| {
        set_row(
            "det.*",
            mode,
            format!("[{}, 4]", m.reference),
            m.unexplained == 0,
            iou,
            format!(
                "matched {}/{}, explainable {}, unexplained {}, engine {}, max |Δscore| {:.1e}, mean IoU {:.6}",
                m.matched, m.reference, m.explainable, m.unexplained, m.engine, m.max_dscore, m.mean_iou
            ),
        )
    };
    let (st_, nt) = (cfg.box_head.score_thresh, cfg.box_head.nms_thresh);
    let maxd = cfg.box_head.detections_per_img as usize;
    // Exact: the anchor count (feature sizes × anchors per location, over all five levels).
    if let Some(l) = dump.tensors.get("rpn.logits") {
        let n = l.shape.iter().product::<usize>();
        report.rows.push(Row {
            stage: "anchors".into(),
            mode: "exact",
            shape: format!("[{n}]"),
            diff: None,
            tol: 0.0,
            metric: "exact",
            pass: n == st.anchors,
            note: format!("ref {n}, engine {}", st.anchors),
        });
    }
    if let Some((rp, rs)) = &ref_props {
        let m = matching::proposals(&st.proposals, &st.proposal_scores, rp, rs);
        report
            .rows
            .push(prop_row("from image", m, set_tol::PROPOSALS_E2E));
    }
    if let Some(rd) = &ref_dets {
        let m = matching::detections(
            &to_dets(&out),
            rd,
            set_tol::DET_IOU_E2E,
            set_tol::DET_DSCORE_E2E,
            st_,
            nt,
            maxd,
        );
        report
            .rows
            .push(det_row("from image", m, set_tol::DET_IOU_E2E));
    }
    // Teacher-forced.
    let fpn: Vec<(Nhwc, Vec<f32>)> = FPN_NAMES
        .iter()
        .filter_map(|n| dump.f32(n, 4).ok())
        .map(|(s, v)| {
            (
                Nhwc::new(s[0], s[2], s[3], s[1]),
                cpu::nchw_to_nhwc(v, s[0], s[1], s[2], s[3]),
            )
        })
        .collect();
    if fpn.len() == 5 {
        let props = ref_props.as_ref().map(|(p, _)| p.as_slice());
        let (tout, tst) = det.detect_teacher_forced((image.h, image.w), &fpn, props)?;
        if let Some((rp, rs)) = &ref_props {
            let m = matching::proposals(&tst.proposals, &tst.proposal_scores, rp, rs);
            report
                .rows
                .push(prop_row("TF from FPN", m, set_tol::PROPOSALS_TF));
            let c = det.num_classes;
            for (name, got, width) in [
                ("box.logits", &tst.box_logits, c),
                ("box.deltas", &tst.box_deltas, 4 * c),
            ] {
                if let Ok((ws, want)) = dump.f32(name, 2) {
                    let shape_ok = ws == [rp.len(), width] && got.len() == want.len();
                    let mut row = Row {
                        stage: name.into(),
                        mode: "TF proposals",
                        shape: format!("{ws:?}"),
                        diff: None,
                        tol: set_tol::BOX_HEAD_REL,
                        metric: "rel",
                        pass: false,
                        note: String::new(),
                    };
                    if shape_ok {
                        let d = cpu::diff(got, want);
                        row.pass = d.nonfinite == 0 && d.rel_max <= set_tol::BOX_HEAD_REL;
                        row.diff = Some(d);
                    } else {
                        row.note = format!("engine has {} values", got.len());
                    }
                    report.rows.push(row);
                }
            }
        }
        if let Some(rd) = &ref_dets {
            let m = matching::detections(
                &to_dets(&tout),
                rd,
                set_tol::DET_IOU_TF,
                set_tol::DET_DSCORE_TF,
                st_,
                nt,
                maxd,
            );
            report
                .rows
                .push(det_row("TF proposals", m, set_tol::DET_IOU_TF));
        }
    }
    Ok(report)
}
