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
use crate::model::refine::{RefineDebug, RefineInput};
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
    /// torch's own f32 error per stage (relative L2 of f32 vs float64), from the metadata key
    /// [`FLOOR_KEY`] that `make_reference.py --float64-floor` writes; empty without it.
    pub floor: HashMap<String, f64>,
}

/// Metadata key of the float64 floor ({stage: rel L2 of torch f32 vs float64}).
pub const FLOOR_KEY: &str = "marrow.reference.floor";

/// A stage's verdict uses max(tolerance, FLOOR_MULT × the dump's float64 floor for that stage):
/// validate never demands more agreement with torch's f32 than a few times torch's own f32
/// error. The engine and torch each carry their own f32 rounding error against the exact
/// (float64) result, so even a perfect engine differs from torch by ~√2 × floor; 4× leaves room
/// for a different summation order without hiding a real bug (a wrong kernel is off by orders of
/// magnitude more).
pub const FLOOR_MULT: f64 = 4.0;

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
        let metadata = meta.metadata().clone().unwrap_or_default();
        let floor = match metadata.get(FLOOR_KEY) {
            Some(j) => serde_json::from_str::<HashMap<String, f64>>(j)
                .map_err(|e| err(format!("metadata {FLOOR_KEY}: {e}")))?,
            None => HashMap::new(),
        };
        Ok(RefDump {
            path: path.to_path_buf(),
            tensors,
            metadata,
            floor,
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
        self.typed(name, rank, "F32", |t| t.f32())
    }

    /// A tensor of one dtype (`read` gives its data when it has that dtype), present with `rank`.
    fn typed<'a, T: 'a>(
        &'a self,
        name: &str,
        rank: usize,
        dtype: &str,
        read: impl Fn(&'a RefTensor) -> Option<&'a [T]>,
    ) -> Result<(&'a [usize], &'a [T])> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| self.err(format!("tensor {name} is missing")))?;
        let d = read(t).ok_or_else(|| self.err(format!("tensor {name} is not {dtype}")))?;
        if t.shape.len() != rank {
            return Err(self.err(format!(
                "tensor {name} has shape {:?}, expected rank {rank}",
                t.shape
            )));
        }
        Ok((&t.shape, d))
    }

    /// The dump's float64 floor for a stage (see [`FLOOR_KEY`]).
    pub fn floor(&self, stage: &str) -> Option<f64> {
        self.floor.get(stage).copied().filter(|f| f.is_finite())
    }

    /// An i64 tensor that must be present with the given rank.
    pub fn i64(&self, name: &str, rank: usize) -> Result<(&[usize], &[i64])> {
        self.typed(name, rank, "I64", |t| t.i64())
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
    /// "from image", "teacher-forced", "exact", ...
    pub mode: &'static str,
    pub shape: String,
    pub diff: Option<Diff>,
    /// Tolerance on the row's metric (described in `metric`).
    pub tol: f64,
    pub metric: &'static str,
    /// The dump's float64 floor for this stage, when it applies to the row (from-image rows of
    /// continuous stages); the verdict then uses [`Row::limit`].
    pub floor: Option<f64>,
    pub pass: bool,
    pub note: String,
}

impl Row {
    /// The limit the verdict used: max(tol, FLOOR_MULT × floor).
    pub fn limit(&self) -> f64 {
        match self.floor {
            Some(f) => self.tol.max(FLOOR_MULT * f),
            None => self.tol,
        }
    }

    /// The value compared with the limit: max(max |Δ| / max |ref|, rel L2) for "rel", max |Δ|
    /// for "max abs"; None for set and exact rows.
    pub fn value(&self) -> Option<f64> {
        let d = self.diff.as_ref()?;
        match self.metric {
            "max abs" => Some(d.max_abs),
            "rel" => Some(d.rel_max.max(d.rel_l2)),
            _ => None,
        }
    }

    /// "ok", "ok (floor)" (passes only because of the float64 floor) or "FAIL".
    pub fn verdict(&self) -> &'static str {
        if !self.pass {
            "FAIL"
        } else if self.value().is_some_and(|v| v > self.tol) {
            "ok (floor)"
        } else {
            "ok"
        }
    }
}

/// A continuous row: pass when every value is finite and `metric` ≤ max(tol, FLOOR_MULT × floor).
#[allow(clippy::too_many_arguments)]
fn diff_row(
    stage: &str,
    mode: &'static str,
    shape: String,
    d: Diff,
    tol: f64,
    metric: &'static str,
    floor: Option<f64>,
    note: String,
) -> Row {
    let mut r = Row {
        stage: stage.into(),
        mode,
        shape,
        diff: Some(d),
        tol,
        metric,
        floor,
        pass: false,
        note,
    };
    let v = r.value().unwrap_or(f64::INFINITY);
    r.pass = d.nonfinite == 0 && v <= r.limit();
    if d.nonfinite > 0 {
        let n = format!("{} non-finite values", d.nonfinite);
        r.note = if r.note.is_empty() {
            n
        } else {
            format!("{n}; {}", r.note)
        };
    }
    r
}

#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Dump stages that were not compared, with the reason.
    pub unchecked: Vec<(String, String)>,
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
            "{:<18} {:<15} {:<16} {:>10} {:>13} {:>10} {:>9} {:>10}  {}\n",
            "stage",
            "mode",
            "shape",
            "max abs",
            "max/max|ref|",
            "rel L2",
            "tol",
            "4×floor",
            "verdict"
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
                "{:<18} {:<15} {:<16} {:>10} {:>13} {:>10} {:>9} {:>10}  {}{}\n",
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
                match r.floor {
                    Some(f) => format!("{:.2e}", FLOOR_MULT * f),
                    None => "-".into(),
                },
                r.verdict(),
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
    floor: Option<f64>,
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
            floor: None,
            pass: false,
            note: format!(
                "engine shape [{}, {}, {}, {}] differs",
                gs.n, gs.c, gs.h, gs.w
            ),
        };
    }
    let g = cpu::nhwc_to_nchw(gd, *gs);
    let d = cpu::diff(&g, want.1);
    diff_row(
        stage,
        mode,
        format!("{:?}", want.0),
        d,
        tol,
        metric,
        floor,
        String::new(),
    )
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
            floor: None,
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
            None,
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
                dump.floor(name),
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
                        dump.floor(name),
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
                        None,
                    ));
                }
            }
        }
    }
    Ok(report)
}

/// The dump's refinement-head stages (compared only when the weights carry a head and it runs;
/// otherwise reported as not compared, never failed).
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

    /// Why a detection has no partner on the other side (or `Matched`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub enum Why {
        #[default]
        Matched,
        /// Score within δ of the score threshold.
        NearThreshold,
        /// At its own side's top-N cut with a score within δ of the last one.
        AtCut,
        /// A same-label neighbour at IoU within δ of the NMS threshold.
        NmsEdge,
        /// Its source differed upstream: the proposal it came from has no IoU-matching proposal
        /// on the other side (det.*), or its input detection was itself unmatched (refine.*).
        Upstream,
        /// A discrete decision of the refinement head within δ of its threshold (a stop
        /// probability near stop_threshold, or a near-tie between the top two classes).
        NearDecision,
        /// Knock-on of an explained difference: suppressed by NMS on one side by an explained
        /// unmatched detection of the other side, or pushed below the other side's top-N cut.
        KnockOn,
        Unexplained,
    }

    impl Why {
        pub fn explained(self) -> bool {
            !matches!(self, Why::Unexplained)
        }
    }

    #[derive(Debug, Clone, Default, PartialEq)]
    pub struct DetMatch {
        pub reference: usize,
        pub engine: usize,
        pub matched: usize,
        /// Unmatched reference detections with an explanation (near the 0.05 score threshold,
        /// at the top-100 boundary, a same-label competitor at IoU ≈ NMS threshold, an upstream
        /// difference, or a knock-on of one; see [`Why`]).
        pub explainable: usize,
        pub unexplained: usize,
        /// Of `explainable` (reference side) and `extra_explained`: how many are upstream
        /// differences or their knock-ons.
        pub upstream: usize,
        /// Unmatched engine detections, explained or not (same rules, seen from the engine).
        pub extra_explained: usize,
        pub extra_unexplained: usize,
        pub max_dscore: f64,
        pub mean_iou: f64,
        /// Per reference / engine detection: Matched or why not.
        pub want_why: Vec<Why>,
        pub got_why: Vec<Why>,
        /// The engine partner of each reference detection.
        pub want_to_got: Vec<Option<usize>>,
    }

    impl DetMatch {
        /// Every unmatched detection, on either side, is explained.
        pub fn ok(&self) -> bool {
            self.unexplained == 0 && self.extra_unexplained == 0
        }
    }

    /// The model's decision parameters the explanations refer to.
    #[derive(Debug, Clone, Copy)]
    pub struct DetRules {
        pub min_iou: f64,
        pub max_dscore: f64,
        pub score_thresh: f32,
        pub nms_thresh: f32,
        pub max_det: usize,
    }

    /// δ for "near a decision boundary" (scores, IoUs).
    pub const DELTA: f64 = 1e-3;

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
        let rules = DetRules {
            min_iou,
            max_dscore,
            score_thresh,
            nms_thresh,
            max_det,
        };
        detections_explained(got, want, &rules, &[], &[])
    }

    /// [`detections`] with per-detection hints from upstream (`got_hint[j]` / `want_hint[i]`:
    /// Some(why) when that detection's source already differs, e.g. [`Why::Upstream`]; empty
    /// slices for none). An unmatched detection on either side is explained by its own side's
    /// rules (score threshold, top-N cut, NMS edge), by its hint, or as a knock-on of an
    /// explained unmatched detection on the other side (same label, IoU ≥ nms_thresh − δ and a
    /// score ≥ its own − δ: NMS on that side would have suppressed it; or a score ≤ the other
    /// side's last kept score + δ when that side is full: pushed past the cut).
    #[allow(clippy::needless_range_loop)]
    pub fn detections_explained(
        got: &[Det],
        want: &[Det],
        r: &DetRules,
        got_hint: &[Option<Why>],
        want_hint: &[Option<Why>],
    ) -> DetMatch {
        let mut used = vec![false; got.len()];
        let mut m = DetMatch {
            reference: want.len(),
            engine: got.len(),
            want_why: vec![Why::Matched; want.len()],
            got_why: vec![Why::Matched; got.len()],
            want_to_got: vec![None; want.len()],
            ..Default::default()
        };
        let mut iou_sum = 0.0;
        for (i, w) in want.iter().enumerate() {
            let mut best: Option<(usize, f64)> = None;
            for (j, g) in got.iter().enumerate() {
                if used[j]
                    || g.label != w.label
                    || (g.score as f64 - w.score as f64).abs() > r.max_dscore
                {
                    continue;
                }
                let v = iou(&w.bbox, &g.bbox);
                if v >= r.min_iou && best.is_none_or(|(_, b)| v > b) {
                    best = Some((j, v));
                }
            }
            if let Some((j, v)) = best {
                used[j] = true;
                m.matched += 1;
                m.want_to_got[i] = Some(j);
                iou_sum += v;
                m.max_dscore = m
                    .max_dscore
                    .max((got[j].score as f64 - w.score as f64).abs());
            }
        }
        // Own-side rules.
        let own = |list: &[Det], i: usize, hint: &[Option<Why>]| -> Why {
            let d = &list[i];
            let s = d.score as f64;
            let last = list.iter().map(|d| d.score).fold(f32::INFINITY, f32::min) as f64;
            if (s - r.score_thresh as f64).abs() <= DELTA {
                Why::NearThreshold
            } else if list.len() >= r.max_det && i + 5 >= r.max_det && (s - last).abs() <= DELTA {
                Why::AtCut
            } else if list.iter().enumerate().any(|(k, o)| {
                k != i
                    && o.label == d.label
                    && (iou(&o.bbox, &d.bbox) - r.nms_thresh as f64).abs() <= DELTA
            }) {
                Why::NmsEdge
            } else if let Some(Some(h)) = hint.get(i) {
                *h
            } else {
                Why::Unexplained
            }
        };
        for i in 0..want.len() {
            if m.want_to_got[i].is_none() {
                m.want_why[i] = own(want, i, want_hint);
            }
        }
        for j in 0..got.len() {
            if !used[j] {
                m.got_why[j] = own(got, j, got_hint);
            }
        }
        // Knock-ons, to a fixed point.
        let knock = |x: &Det, other: &[Det], other_why: &[Why]| -> bool {
            let suppressed = other.iter().zip(other_why).any(|(y, w)| {
                !matches!(w, Why::Matched | Why::Unexplained)
                    && y.label == x.label
                    && iou(&y.bbox, &x.bbox) >= r.nms_thresh as f64 - DELTA
                    && y.score as f64 >= x.score as f64 - DELTA
            });
            let other_last = other.iter().map(|d| d.score).fold(f32::INFINITY, f32::min) as f64;
            let below_cut = other.len() >= r.max_det && x.score as f64 <= other_last + DELTA;
            suppressed || below_cut
        };
        loop {
            let mut changed = false;
            for i in 0..want.len() {
                if m.want_why[i] == Why::Unexplained && knock(&want[i], got, &m.got_why) {
                    m.want_why[i] = Why::KnockOn;
                    changed = true;
                }
            }
            for j in 0..got.len() {
                if m.got_why[j] == Why::Unexplained && knock(&got[j], want, &m.want_why) {
                    m.got_why[j] = Why::KnockOn;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        for w in &m.want_why {
            match w {
                Why::Matched => {}
                Why::Unexplained => m.unexplained += 1,
                w => {
                    m.explainable += 1;
                    if matches!(w, Why::Upstream | Why::KnockOn) {
                        m.upstream += 1;
                    }
                }
            }
        }
        for w in &m.got_why {
            match w {
                Why::Matched => {}
                Why::Unexplained => m.extra_unexplained += 1,
                w => {
                    m.extra_explained += 1;
                    if matches!(w, Why::Upstream | Why::KnockOn) {
                        m.upstream += 1;
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

    /// Whether a proposal has a geometric partner (IoU ≥ 0.99 or L∞ ≤ 0.05 px, the proposal
    /// matching rule without the score condition) among `others`.
    pub fn has_partner(p: &[f32; 4], others: &[[f32; 4]]) -> bool {
        others
            .iter()
            .any(|o| iou(p, o) >= 0.99 || linf(p, o) <= 0.05)
    }

    /// The proposal each detection came from, recovered from the box head's outputs: the
    /// proposal k whose softmax(logits[k])[label] is within 1e-4 of the score (the closest) and
    /// whose class-`label` box (torchvision's BoxCoder (10, 10, 5, 5) decode, clipped to the
    /// resized image, rescaled to the original) is at IoU ≥ 0.99 with the detection's box
    /// (original coordinates). None when no proposal fits.
    pub fn source_proposals(
        dets: &[Det],
        proposals: &[[f32; 4]],
        logits: &[f32],
        deltas: &[f32],
        classes: usize,
        resized: (usize, usize),
        orig: (usize, usize),
    ) -> Vec<Option<usize>> {
        let k = proposals.len();
        if classes == 0 || logits.len() != k * classes || deltas.len() != k * classes * 4 {
            return vec![None; dets.len()];
        }
        let probs: Vec<f64> = logits
            .chunks_exact(classes)
            .flat_map(|row| {
                let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                let e: Vec<f64> = row.iter().map(|&v| (v as f64 - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                e.into_iter().map(move |v| v / sum)
            })
            .collect();
        let clip = (1000.0f64 / 16.0).ln();
        let (rh, rw) = (
            orig.0 as f64 / resized.0 as f64,
            orig.1 as f64 / resized.1 as f64,
        );
        let decode = |p: &[f32; 4], d: &[f32]| -> [f32; 4] {
            let (x1, y1, x2, y2) = (p[0] as f64, p[1] as f64, p[2] as f64, p[3] as f64);
            let (w, h) = (x2 - x1, y2 - y1);
            let (cx, cy) = (x1 + 0.5 * w, y1 + 0.5 * h);
            let dx = d[0] as f64 / 10.0;
            let dy = d[1] as f64 / 10.0;
            let dw = (d[2] as f64 / 5.0).min(clip);
            let dh = (d[3] as f64 / 5.0).min(clip);
            let (pcx, pcy) = (dx * w + cx, dy * h + cy);
            let (pw, ph) = (dw.exp() * w, dh.exp() * h);
            let cw = |v: f64| v.clamp(0.0, resized.1 as f64) * rw;
            let ch = |v: f64| v.clamp(0.0, resized.0 as f64) * rh;
            [
                cw(pcx - 0.5 * pw) as f32,
                ch(pcy - 0.5 * ph) as f32,
                cw(pcx + 0.5 * pw) as f32,
                ch(pcy + 0.5 * ph) as f32,
            ]
        };
        dets.iter()
            .map(|det| {
                let c = det.label;
                if c < 1 || c as usize >= classes {
                    return None;
                }
                let c = c as usize;
                let mut best: Option<(usize, f64)> = None;
                for (i, p) in proposals.iter().enumerate() {
                    let ds = (probs[i * classes + c] - det.score as f64).abs();
                    if ds > 1e-4 || best.is_some_and(|(_, b)| ds >= b) {
                        continue;
                    }
                    let b = decode(p, &deltas[(i * classes + c) * 4..(i * classes + c) * 4 + 4]);
                    if iou(&b, &det.bbox) >= 0.99 {
                        best = Some((i, ds));
                    }
                }
                best.map(|(i, _)| i)
            })
            .collect()
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
    /// The counting threshold at which per-class counts are compared (the paper's 0.7).
    pub const COUNT_THRESHOLD: f32 = 0.7;
}

/// Tolerances of the refinement head's rows (docs/validation.md). Teacher-forced on the
/// reference's detections, features and FPN levels, the GPU matches the PyTorch fixtures to
/// ≤ 1e-4 relative on boxes and logits and ≤ 1e-5 on stop probabilities and attention.
pub mod refine_tol {
    /// Step boxes, final hidden state, terminal logits: max(max |Δ| / max |ref|, rel L2).
    pub const BOX_REL: f64 = 1e-4;
    pub const HIDDEN_REL: f64 = 1e-4;
    pub const LOGITS_REL: f64 = 1e-4;
    /// Stop probabilities and attention weights (values in [0, 1]), at active steps only.
    pub const STOP_PROB_REL: f64 = 1e-5;
    pub const ATTENTION_REL: f64 = 1e-5;
    /// |Δscore| of the final refined detections when teacher-forced (softmax probabilities of
    /// the terminal logits).
    pub const DSCORE_TF: f64 = 1e-4;
    /// A stop probability this close to stop_threshold, or a gap this small between the two
    /// most probable classes, is a decision that f32 noise may flip: a difference that follows
    /// from it is explained, not a failure.
    pub const NEAR_STOP: f64 = 1e-3;
    pub const NEAR_CLASS: f64 = 1e-4;
}

/// What `marrow validate` compares.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Run the weights' refinement head and compare refine.* (false: det.* only, `--no-refine`).
    pub refine: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { refine: true }
    }
}

/// Every comparison the dump allows: [`validate_backbone`], then [`validate_heads_with`] when
/// the dump has detection stages. Stages not compared are in `Report::unchecked`.
pub fn validate_all(
    gpu: &Gpu,
    weights: WeightStore,
    dump: &RefDump,
    opts: &Options,
) -> Result<Report> {
    let mut report = validate_backbone(gpu, weights.clone(), dump)?;
    let has_heads = ["rpn.proposals", "box.logits", "det.boxes"]
        .iter()
        .any(|n| dump.tensors.contains_key(*n));
    if has_heads {
        let h = validate_heads_with(gpu, weights, dump, opts)?;
        report.rows.extend(h.rows);
        report.unchecked = h.unchecked;
    } else {
        report.unchecked = unchecked_stages(dump)
            .into_iter()
            .map(|s| (s, "the dump has no detection stages".to_string()))
            .collect();
    }
    Ok(report)
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
        floor: None,
        pass,
        note,
    }
}

fn det_row(stage: &str, mode: &'static str, m: &matching::DetMatch, iou: f64) -> Row {
    let mut note = format!(
        "matched {}/{}, explained {}, unexplained {}; engine {}, extra explained {}, extra unexplained {}; max |Δscore| {:.1e}, mean IoU {:.6}",
        m.matched,
        m.reference,
        m.explainable,
        m.unexplained,
        m.engine,
        m.extra_explained,
        m.extra_unexplained,
        m.max_dscore,
        m.mean_iou
    );
    let mut whys: Vec<(matching::Why, usize)> = Vec::new();
    for w in m.want_why.iter().chain(&m.got_why) {
        if *w == matching::Why::Matched {
            continue;
        }
        match whys.iter_mut().find(|(x, _)| x == w) {
            Some((_, n)) => *n += 1,
            None => whys.push((*w, 1)),
        }
    }
    if !whys.is_empty() {
        let v: Vec<String> = whys.iter().map(|(w, n)| format!("{w:?} {n}")).collect();
        note.push_str(&format!("; unmatched: {}", v.join(", ")));
    }
    if m.upstream > 0 && m.ok() {
        note.push_str(&format!(
            "; {} explained by an upstream difference, not an engine error at this stage",
            m.upstream
        ));
    }
    set_row(
        stage,
        mode,
        format!("[{}, 4]", m.reference),
        m.ok(),
        iou,
        note,
    )
}

/// Per-class counts at [`set_tol::COUNT_THRESHOLD`] (score ≥ 0.7). Equal counts pass; a
/// difference passes only when explained detections account for it: per class, |Δcount| ≤ the
/// explained unmatched detections (either side) scoring ≥ 0.7 − δ plus the matched pairs that
/// straddle 0.7.
fn count_row(
    stage: &str,
    mode: &'static str,
    got: &[Det],
    want: &[Det],
    m: &matching::DetMatch,
) -> Row {
    use matching::Why;
    let thr = set_tol::COUNT_THRESHOLD;
    let mut labels: Vec<i64> = got.iter().chain(want).map(|d| d.label).collect();
    labels.sort_unstable();
    labels.dedup();
    let count = |v: &[Det], c: i64| v.iter().filter(|d| d.label == c && d.score >= thr).count();
    let mut pass = true;
    let mut parts = Vec::new();
    for &c in &labels {
        let (g, w) = (count(got, c), count(want, c));
        let near = |d: &Det, why: &Why| {
            *why != Why::Matched
                && why.explained()
                && d.label == c
                && d.score as f64 >= thr as f64 - matching::DELTA
        };
        let mut allowed = want
            .iter()
            .zip(&m.want_why)
            .filter(|(d, y)| near(d, y))
            .count()
            + got
                .iter()
                .zip(&m.got_why)
                .filter(|(d, y)| near(d, y))
                .count();
        for (i, j) in m.want_to_got.iter().enumerate() {
            if let Some(j) = j {
                if want[i].label == c && ((want[i].score >= thr) != (got[*j].score >= thr)) {
                    allowed += 1;
                }
            }
        }
        if g != w {
            pass &= g.abs_diff(w) <= allowed;
        }
        parts.push(format!("{c}: {w} vs {g}"));
    }
    set_row(
        stage,
        mode,
        format!("[{}]", labels.len()),
        pass,
        (thr as f64 * 1e4).round() / 1e4,
        format!(
            "per-label counts at score ≥ {thr}, reference vs engine: {}",
            if parts.is_empty() {
                "none".to_string()
            } else {
                parts.join(", ")
            }
        ),
    )
}

use matching::Det;

fn to_dets(v: &[crate::model::detector::Detection]) -> Vec<Det> {
    v.iter()
        .map(|x| Det {
            bbox: x.bbox,
            score: x.score,
            label: x.label as i64,
        })
        .collect()
}

fn dump_dets(dump: &RefDump, prefix: &str) -> Result<Option<Vec<Det>>> {
    let (b, s, l) = (
        dump.tensors.get(&format!("{prefix}.boxes")),
        dump.tensors.get(&format!("{prefix}.scores")),
        dump.tensors.get(&format!("{prefix}.labels")),
    );
    let (Some(b), Some(s), Some(l)) = (b, s, l) else {
        return Ok(None);
    };
    let b = boxes4(b.f32().unwrap_or(&[]));
    let s = s.f32().unwrap_or(&[]);
    let l = l.i64().unwrap_or(&[]);
    if b.len() != s.len() || b.len() != l.len() {
        return Err(dump.err(format!(
            "{prefix}.boxes / {prefix}.scores / {prefix}.labels lengths differ"
        )));
    }
    Ok(Some(
        (0..b.len())
            .map(|i| Det {
                bbox: b[i],
                score: s[i],
                label: l[i],
            })
            .collect(),
    ))
}

/// The reference's refinement-head stages (docs/refinement.md §3).
struct RefRefine<'a> {
    t: usize,
    d: usize,
    n: usize,
    step_boxes: &'a [f32],
    stop_prob: &'a [f32],
    attention: &'a [f32],
    stop_step: &'a [i64],
    logits: &'a [f32],
    hidden: &'a [f32],
    input_boxes: &'a [f32],
    input_scores: &'a [f32],
    input_labels: &'a [i64],
    input_features: &'a [f32],
    proposal_index: &'a [i64],
}

impl<'a> RefRefine<'a> {
    fn load(dump: &'a RefDump) -> Result<Option<RefRefine<'a>>> {
        if !dump.tensors.contains_key("refine.step_boxes") {
            return Ok(None);
        }
        let (sb, step_boxes) = dump.f32("refine.step_boxes", 3)?;
        let (t, d) = (sb[0], sb[1]);
        let (_, stop_prob) = dump.f32("refine.stop_prob", 2)?;
        let (_, attention) = dump.f32("refine.attention", 3)?;
        let (_, stop_step) = dump.i64("refine.stop_step", 1)?;
        let (ls, logits) = dump.f32("refine.logits", 2)?;
        let (_, hidden) = dump.f32("refine.hidden", 2)?;
        let (_, input_boxes) = dump.f32("refine.input.boxes", 2)?;
        let (_, input_scores) = dump.f32("refine.input.scores", 1)?;
        let (_, input_labels) = dump.i64("refine.input.labels", 1)?;
        let (_, input_features) = dump.f32("refine.input.features", 2)?;
        let (_, proposal_index) = dump.i64("refine.input.proposal_index", 1)?;
        let n = ls[1];
        let ok = stop_prob.len() == t * d
            && attention.len() == t * d * 49
            && stop_step.len() == d
            && ls[0] == d
            && input_boxes.len() == 4 * d
            && input_scores.len() == d
            && input_labels.len() == d
            && proposal_index.len() == d
            && (d == 0 || (input_features.len() % d == 0 && hidden.len() % d == 0));
        if !ok {
            return Err(dump.err(format!(
                "refine.* shapes disagree (T {t}, D {d}: stop_prob {}, attention {}, stop_step {}, logits {ls:?}, input.boxes {})",
                stop_prob.len(),
                attention.len(),
                stop_step.len(),
                input_boxes.len()
            )));
        }
        Ok(Some(RefRefine {
            t,
            d,
            n,
            step_boxes,
            stop_prob,
            attention,
            stop_step,
            logits,
            hidden,
            input_boxes,
            input_scores,
            input_labels,
            input_features,
            proposal_index,
        }))
    }
}

type StepFn<'a, T> = Box<dyn Fn(usize, usize) -> T + 'a>;

/// One side's view of the head's per-detection decisions (reference or engine).
struct HeadSide<'a> {
    steps: usize,
    n: usize,
    /// stop_prob(t, d), step_box(t, d) (resized coords).
    stop_prob: StepFn<'a, f32>,
    step_box: StepFn<'a, [f32; 4]>,
    /// 1-based, 0 = never.
    stop_step: Vec<usize>,
    logits: &'a [f32],
}

impl HeadSide<'_> {
    fn final_step(&self, d: usize) -> usize {
        match self.stop_step[d] {
            0 => self.steps.saturating_sub(1),
            s => s - 1,
        }
    }

    /// Label (argmax over c ≥ 1, first maximum) and the gap between the two most probable
    /// classes among c ≥ 1.
    fn label_gap(&self, d: usize) -> (i64, f64) {
        let row = &self.logits[d * self.n..(d + 1) * self.n];
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let e: Vec<f64> = row.iter().map(|&v| (v as f64 - mx).exp()).collect();
        let sum: f64 = e.iter().sum();
        let (mut b1, mut b2, mut l) = (f64::NEG_INFINITY, f64::NEG_INFINITY, 0usize);
        for (c, &v) in e.iter().enumerate().skip(1) {
            let p = v / sum;
            if p > b1 {
                b2 = b1;
                b1 = p;
                l = c;
            } else if p > b2 {
                b2 = p;
            }
        }
        (l as i64, b1 - b2)
    }

    /// A decision of detection d within δ of its boundary (see [`refine_tol`]).
    fn near_decision(&self, d: usize, stop_threshold: f32) -> bool {
        let near_stop = (0..=self.final_step(d)).any(|t| {
            let p = (self.stop_prob)(t, d) as f64;
            p >= 0.0 && (p - stop_threshold as f64).abs() <= refine_tol::NEAR_STOP
        });
        near_stop || (self.n > 2 && self.label_gap(d).1 <= refine_tol::NEAR_CLASS)
    }

    /// Which input detection each refined output came from: same label and the best final box
    /// (rescaled to original coordinates) at IoU ≥ 0.99.
    fn sources(
        &self,
        outs: &[Det],
        resized: (usize, usize),
        orig: (usize, usize),
    ) -> Vec<Option<usize>> {
        let (rh, rw) = (
            orig.0 as f64 / resized.0 as f64,
            orig.1 as f64 / resized.1 as f64,
        );
        let finals: Vec<([f32; 4], i64)> = (0..self.stop_step.len())
            .map(|d| {
                let b = (self.step_box)(self.final_step(d), d);
                (
                    [
                        (b[0] as f64 * rw) as f32,
                        (b[1] as f64 * rh) as f32,
                        (b[2] as f64 * rw) as f32,
                        (b[3] as f64 * rh) as f32,
                    ],
                    self.label_gap(d).0,
                )
            })
            .collect();
        outs.iter()
            .map(|o| {
                let mut best: Option<(usize, f64)> = None;
                for (d, (b, l)) in finals.iter().enumerate() {
                    let v = matching::iou(b, &o.bbox);
                    if *l == o.label && v >= 0.99 && best.is_none_or(|(_, x)| v > x) {
                        best = Some((d, v));
                    }
                }
                best.map(|(d, _)| d)
            })
            .collect()
    }
}

fn ref_side<'a>(r: &'a RefRefine<'a>) -> HeadSide<'a> {
    let d = r.d;
    HeadSide {
        steps: r.t,
        n: r.n,
        stop_prob: Box::new(move |t, i| r.stop_prob[t * d + i]),
        step_box: Box::new(move |t, i| {
            let o = (t * d + i) * 4;
            [
                r.step_boxes[o],
                r.step_boxes[o + 1],
                r.step_boxes[o + 2],
                r.step_boxes[o + 3],
            ]
        }),
        stop_step: r.stop_step.iter().map(|&s| s.max(0) as usize).collect(),
        logits: r.logits,
    }
}

fn engine_side(g: &RefineDebug, steps: usize, n: usize) -> HeadSide<'_> {
    HeadSide {
        steps,
        n,
        stop_prob: Box::new(move |t, i| g.stop_prob[t][i]),
        step_box: Box::new(move |t, i| {
            let b = &g.step_boxes[t][i * 4..i * 4 + 4];
            [b[0], b[1], b[2], b[3]]
        }),
        stop_step: g.stop_step.iter().map(|&s| s as usize).collect(),
        logits: &g.logits,
    }
}

/// Hints for one side's refined detections: an output whose input detection was itself
/// unmatched at the det.* level (`input_why`) is `Upstream`; one whose input took a decision
/// within δ of its boundary, on this side or on the other (`partner`: the other side's input
/// matched to this one), is `NearDecision`.
struct HintCtx<'a> {
    side: &'a HeadSide<'a>,
    other: &'a HeadSide<'a>,
    input_why: &'a [matching::Why],
    partner: &'a [Option<usize>],
    stop_threshold: f32,
    resized: (usize, usize),
    orig: (usize, usize),
}

fn refine_hints(outs: &[Det], c: &HintCtx) -> Vec<Option<matching::Why>> {
    use matching::Why;
    c.side
        .sources(outs, c.resized, c.orig)
        .into_iter()
        .map(|src| {
            let d = src?;
            if c.input_why.get(d).is_some_and(|w| *w != Why::Matched) {
                return Some(Why::Upstream);
            }
            let near = c.side.near_decision(d, c.stop_threshold)
                || c.partner.get(d).copied().flatten().is_some_and(|j| {
                    j < c.other.stop_step.len() && c.other.near_decision(j, c.stop_threshold)
                });
            near.then_some(Why::NearDecision)
        })
        .collect()
}

fn invert(want_to_got: &[Option<usize>], n_got: usize) -> Vec<Option<usize>> {
    let mut v = vec![None; n_got];
    for (i, j) in want_to_got.iter().enumerate() {
        if let Some(j) = j {
            if *j < n_got {
                v[*j] = Some(i);
            }
        }
    }
    v
}

/// The engine's refined detections (and the head's debug outputs `g`) matched against the
/// reference's (`want`, `r`): [`match_refined`] with both sides built from what a run returns.
/// The third group is (stop threshold, steps, classes with background).
#[allow(clippy::too_many_arguments)]
fn match_engine_refined(
    detections: &[crate::model::detector::Detection],
    g: &RefineDebug,
    want: &[Det],
    r: &RefRefine,
    plain: Option<&matching::DetMatch>,
    rules: &matching::DetRules,
    (stop_threshold, steps, classes): (f32, usize, usize),
    sizes: ((usize, usize), (usize, usize)),
) -> (Vec<Det>, matching::DetMatch) {
    let got = to_dets(detections);
    let (rs, es) = (ref_side(r), engine_side(g, steps, classes));
    let m = match_refined(&got, &es, want, &rs, plain, rules, stop_threshold, sizes);
    (got, m)
}

/// The refined detections of both sides, set-matched with the hints above.
#[allow(clippy::too_many_arguments)]
fn match_refined(
    got: &[Det],
    es: &HeadSide,
    want: &[Det],
    rs: &HeadSide,
    plain: Option<&matching::DetMatch>,
    rules: &matching::DetRules,
    stop_threshold: f32,
    (resized, orig): ((usize, usize), (usize, usize)),
) -> matching::DetMatch {
    let (want_why, want_to_got, got_why) = match plain {
        Some(m) => (m.want_why.clone(), m.want_to_got.clone(), m.got_why.clone()),
        None => (Vec::new(), Vec::new(), Vec::new()),
    };
    let got_to_want = invert(&want_to_got, got_why.len());
    let wh = refine_hints(
        want,
        &HintCtx {
            side: rs,
            other: es,
            input_why: &want_why,
            partner: &want_to_got,
            stop_threshold,
            resized,
            orig,
        },
    );
    let gh = refine_hints(
        got,
        &HintCtx {
            side: es,
            other: rs,
            input_why: &got_why,
            partner: &got_to_want,
            stop_threshold,
            resized,
            orig,
        },
    );
    matching::detections_explained(got, want, rules, &gh, &wh)
}

/// The detection heads: proposals and detections by set matching, end-to-end from the image and
/// teacher-forced (RPN from the reference FPN; box head from the reference FPN and proposals),
/// and the refinement head when the weights carry one (see [`validate_heads_with`]).
pub fn validate_heads(gpu: &Gpu, weights: WeightStore, dump: &RefDump) -> Result<Report> {
    validate_heads_with(gpu, weights, dump, &Options::default())
}

/// [`validate_heads`] with options. With a refinement head (and `opts.refine`): refine.* from
/// the image (set-matched, counts at 0.7), from the reference proposals, and teacher-forced on
/// the reference's own detections, features and FPN levels (step boxes, stop probabilities and
/// attention at the steps where a detection is still active, stop steps exactly, hidden,
/// logits, and the final detections).
pub fn validate_heads_with(
    gpu: &Gpu,
    weights: WeightStore,
    dump: &RefDump,
    opts: &Options,
) -> Result<Report> {
    use crate::model::detector::Detector;
    use matching::Why;
    let mut report = Report::default();
    let cfg = weights.config.clone();
    let (ishape, idata) = dump.f32("input.image", 3)?;
    let image = ImageF32 {
        h: ishape[1],
        w: ishape[2],
        data: idata.to_vec(),
    };
    let orig = (image.h, image.w);
    let mut det = Detector::new(gpu, weights)?;
    det.set_refine(opts.refine);
    let head = det
        .refine_head()
        .map(|h| (h.config.stop_threshold, h.config.nms_thresh, h.config.steps));
    let refining = opts.refine && head.is_some();
    let (out, st) = det.detect_debug(&image)?;
    let resized = out.sizes.resized;
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
    let ref_dets = dump_dets(dump, "det")?;
    let ref_refined = dump_dets(dump, "refine")?;
    let rr = RefRefine::load(dump)?;
    let refine_names = unchecked_stages(dump);
    if !refine_names.is_empty() && !refining {
        let why = if !opts.refine {
            "--no-refine"
        } else {
            "the weights have no refinement head"
        };
        report
            .unchecked
            .extend(refine_names.iter().map(|n| (n.clone(), why.to_string())));
    }
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
    let (st_, nt) = (cfg.box_head.score_thresh, cfg.box_head.nms_thresh);
    let maxd = cfg.box_head.detections_per_img as usize;
    let rules = |min_iou, max_dscore| matching::DetRules {
        min_iou,
        max_dscore,
        score_thresh: st_,
        nms_thresh: nt,
        max_det: maxd,
    };
    let refine_rules = |min_iou, max_dscore| matching::DetRules {
        min_iou,
        max_dscore,
        score_thresh: f32::NEG_INFINITY,
        nms_thresh: head.map_or(0.5, |h| h.1),
        max_det: maxd,
    };
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
            floor: None,
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
    // det.* from the image: the plain detector's output (the head's input when it ran).
    let plain = to_dets(st.plain.as_deref().unwrap_or(&out.detections));
    let mut plain_match: Option<matching::DetMatch> = None;
    if let Some(rd) = &ref_dets {
        // Upstream hints: a detection whose source proposal has no partner on the other side.
        let (want_hint, got_hint) = match &ref_props {
            Some((rp, _)) => {
                let ref_src: Vec<Option<usize>> = match &rr {
                    Some(r) if r.d == rd.len() => r
                        .proposal_index
                        .iter()
                        .map(|&k| (k >= 0 && (k as usize) < rp.len()).then_some(k as usize))
                        .collect(),
                    _ => match (dump.f32("box.logits", 2), dump.f32("box.deltas", 2)) {
                        (Ok((ls, l)), Ok((_, d))) => {
                            matching::source_proposals(rd, rp, l, d, ls[1], resized, orig)
                        }
                        _ => vec![None; rd.len()],
                    },
                };
                let eng_src = matching::source_proposals(
                    &plain,
                    &st.proposals,
                    &st.box_logits,
                    &st.box_deltas,
                    det.num_classes,
                    resized,
                    orig,
                );
                let hint = |src: &[Option<usize>], mine: &[[f32; 4]], theirs: &[[f32; 4]]| {
                    src.iter()
                        .map(|s| {
                            s.filter(|&k| !matching::has_partner(&mine[k], theirs))
                                .map(|_| Why::Upstream)
                        })
                        .collect::<Vec<_>>()
                };
                (
                    hint(&ref_src, rp, &st.proposals),
                    hint(&eng_src, &st.proposals, rp),
                )
            }
            None => (Vec::new(), Vec::new()),
        };
        let m = matching::detections_explained(
            &plain,
            rd,
            &rules(set_tol::DET_IOU_E2E, set_tol::DET_DSCORE_E2E),
            &got_hint,
            &want_hint,
        );
        report
            .rows
            .push(det_row("det.*", "from image", &m, set_tol::DET_IOU_E2E));
        report
            .rows
            .push(count_row("det.count@0.7", "from image", &plain, rd, &m));
        plain_match = Some(m);
    }
    // refine.* from the image.
    if let (true, Some(want), Some(r), Some(g)) = (refining, &ref_refined, &rr, &st.refine) {
        let (stop_thr, _, steps) = head.expect("refining");
        let (got, m) = match_engine_refined(
            &out.detections,
            g,
            want,
            r,
            plain_match.as_ref(),
            &refine_rules(set_tol::DET_IOU_E2E, set_tol::DET_DSCORE_E2E),
            (stop_thr, steps, det.num_classes),
            (resized, orig),
        );
        report
            .rows
            .push(det_row("refine.*", "from image", &m, set_tol::DET_IOU_E2E));
        report
            .rows
            .push(count_row("refine.count@0.7", "from image", &got, want, &m));
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
    if fpn.len() != 5 {
        return Ok(report);
    }
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
                    metric: "rel max",
                    floor: None,
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
    let tplain = to_dets(tst.plain.as_deref().unwrap_or(&tout.detections));
    let mut tplain_match = None;
    if let Some(rd) = &ref_dets {
        let m = matching::detections_explained(
            &tplain,
            rd,
            &rules(set_tol::DET_IOU_TF, set_tol::DET_DSCORE_TF),
            &[],
            &[],
        );
        report
            .rows
            .push(det_row("det.*", "TF proposals", &m, set_tol::DET_IOU_TF));
        tplain_match = Some(m);
    }
    if let (true, Some(want), Some(r), Some(g)) = (refining, &ref_refined, &rr, &tst.refine) {
        let (stop_thr, _, steps) = head.expect("refining");
        let (_, m) = match_engine_refined(
            &tout.detections,
            g,
            want,
            r,
            tplain_match.as_ref(),
            &refine_rules(set_tol::DET_IOU_TF, refine_tol::DSCORE_TF),
            (stop_thr, steps, det.num_classes),
            (resized, orig),
        );
        report
            .rows
            .push(det_row("refine.*", "TF proposals", &m, set_tol::DET_IOU_TF));
    }
    if let (true, Some(r)) = (refining, &rr) {
        let (stop_thr, _, steps) = head.expect("refining");
        report.rows.extend(refine_teacher_forced_rows(
            &mut det,
            &fpn,
            r,
            ref_refined.as_deref(),
            (stop_thr, steps),
            &refine_rules(set_tol::DET_IOU_TF, refine_tol::DSCORE_TF),
            ((image.h, image.w), resized),
        )?);
    }
    Ok(report)
}

/// The head alone on the reference's detections, features and FPN levels ("TF detections").
#[allow(clippy::needless_range_loop)]
fn refine_teacher_forced_rows(
    det: &mut crate::model::detector::Detector,
    fpn: &[(Nhwc, Vec<f32>)],
    r: &RefRefine,
    want: Option<&[Det]>,
    (stop_thr, steps): (f32, usize),
    rules: &matching::DetRules,
    (orig, resized): ((usize, usize), (usize, usize)),
) -> Result<Vec<Row>> {
    use matching::Why;
    const MODE: &str = "TF detections";
    let mut rows = Vec::new();
    let inputs: Vec<RefineInput> = (0..r.d)
        .map(|i| RefineInput {
            bbox: [
                r.input_boxes[i * 4],
                r.input_boxes[i * 4 + 1],
                r.input_boxes[i * 4 + 2],
                r.input_boxes[i * 4 + 3],
            ],
            score: r.input_scores[i],
            label: r.input_labels[i].max(0) as usize,
        })
        .collect();
    let (tdet, g) = det.refine_teacher_forced(orig, fpn, &inputs, r.input_features)?;
    let n = r.n;
    let shape_ok = g.detections == r.d
        && r.t == steps
        && g.step_boxes.len() == steps
        && g.stop_prob.len() == steps
        && g.attention.len() == steps
        && g.stop_step.len() == r.d
        && g.logits.len() == r.d * n
        && g.hidden.len() == r.hidden.len();
    if !shape_ok {
        rows.push(set_row(
            "refine.*",
            MODE,
            format!("[{}, {}]", r.t, r.d),
            false,
            0.0,
            format!(
                "engine shapes differ: {} detections, {} steps, {} logits, {} hidden (reference {} detections, {} steps)",
                g.detections,
                g.step_boxes.len(),
                g.logits.len(),
                g.hidden.len(),
                r.d,
                r.t
            ),
        ));
        return Ok(rows);
    }
    let rs = ref_side(r);
    let es = engine_side(&g, steps, n);
    // Stop steps, exactly. A difference is explained when, at the first step where the two
    // sides decided differently, both stop probabilities are within δ of the threshold.
    // `cut[d]`: the last step (0-based) at which detection d is comparable.
    let mut cut = vec![usize::MAX; r.d];
    let (mut differ, mut explained) = (0, 0);
    for d in 0..r.d {
        let (a, b) = (rs.stop_step[d], es.stop_step[d]);
        if a == b {
            continue;
        }
        differ += 1;
        let t = match (a, b) {
            (0, s) | (s, 0) => s - 1,
            (x, y) => x.min(y) - 1,
        };
        cut[d] = t;
        let near = |p: f32| (p as f64 - stop_thr as f64).abs() <= refine_tol::NEAR_STOP;
        if near((rs.stop_prob)(t, d)) && near((es.stop_prob)(t, d)) {
            explained += 1;
        }
    }
    rows.push(Row {
        stage: "refine.stop_step".into(),
        mode: MODE,
        shape: format!("[{}]", r.d),
        diff: None,
        tol: 0.0,
        metric: "exact",
        floor: None,
        pass: differ == explained,
        note: format!(
            "{} of {} equal, {} differ ({} explained: both stop probabilities within {:.0e} of the threshold){}",
            r.d - differ,
            r.d,
            differ,
            explained,
            refine_tol::NEAR_STOP,
            if differ > 0 {
                "; later steps of those detections are left out below"
            } else {
                ""
            }
        ),
    });
    // (t, d) is compared when both sides are still running at step t (0-based) and no earlier
    // stop decision differed.
    let active = |t: usize, d: usize| {
        (cut[d] == usize::MAX || t <= cut[d])
            && (rs.stop_step[d] == 0 || t < rs.stop_step[d])
            && (es.stop_step[d] == 0 || t < es.stop_step[d])
    };
    let mut stepwise = |name: &str,
                        width: usize,
                        tol: f64,
                        got: &dyn Fn(usize, usize) -> Vec<f32>,
                        want: &dyn Fn(usize, usize) -> Vec<f32>| {
        let (mut gv, mut wv, mut cells) = (Vec::new(), Vec::new(), 0usize);
        for t in 0..steps {
            for d in 0..r.d {
                if active(t, d) {
                    gv.extend(got(t, d));
                    wv.extend(want(t, d));
                    cells += 1;
                }
            }
        }
        rows.push(diff_row(
            name,
            MODE,
            format!("[{}, {}, {}]", steps, r.d, width),
            cpu::diff(&gv, &wv),
            tol,
            "rel",
            None,
            format!("{cells} of {} (step, detection) pairs active", steps * r.d),
        ));
    };
    stepwise(
        "refine.step_boxes",
        4,
        refine_tol::BOX_REL,
        &|t, d| g.step_boxes[t][d * 4..d * 4 + 4].to_vec(),
        &|t, d| r.step_boxes[(t * r.d + d) * 4..(t * r.d + d) * 4 + 4].to_vec(),
    );
    stepwise(
        "refine.stop_prob",
        1,
        refine_tol::STOP_PROB_REL,
        &|t, d| vec![g.stop_prob[t][d]],
        &|t, d| vec![r.stop_prob[t * r.d + d]],
    );
    stepwise(
        "refine.attention",
        49,
        refine_tol::ATTENTION_REL,
        &|t, d| g.attention[t][d * 49..d * 49 + 49].to_vec(),
        &|t, d| r.attention[(t * r.d + d) * 49..(t * r.d + d) * 49 + 49].to_vec(),
    );
    // Final hidden state and terminal logits: the detections whose stop step agrees.
    let same: Vec<usize> = (0..r.d).filter(|&d| cut[d] == usize::MAX).collect();
    let h = r.hidden.len().checked_div(r.d).unwrap_or(0);
    for (name, width, gsrc, wsrc, tol) in [
        (
            "refine.hidden",
            h,
            &g.hidden[..],
            r.hidden,
            refine_tol::HIDDEN_REL,
        ),
        (
            "refine.logits",
            n,
            &g.logits[..],
            r.logits,
            refine_tol::LOGITS_REL,
        ),
    ] {
        let pick = |src: &[f32]| -> Vec<f32> {
            same.iter()
                .flat_map(|&d| src[d * width..(d + 1) * width].iter().copied())
                .collect()
        };
        rows.push(diff_row(
            name,
            MODE,
            format!("[{}, {}]", r.d, width),
            cpu::diff(&pick(gsrc), &pick(wsrc)),
            tol,
            "rel",
            None,
            if same.len() < r.d {
                format!(
                    "{} of {} detections (the stop step differs for the rest)",
                    same.len(),
                    r.d
                )
            } else {
                String::new()
            },
        ));
    }
    if let Some(want) = want {
        let got = to_dets(&tdet.detections);
        // The same inputs on both sides: an input whose stop decision differed (explained or
        // not, that is the stop_step row's verdict) or that sits near a decision explains the
        // difference of its output.
        let diverged: Vec<Why> = (0..r.d)
            .map(|d| {
                if cut[d] == usize::MAX {
                    Why::Matched
                } else {
                    Why::NearDecision
                }
            })
            .collect();
        let plain = matching::DetMatch {
            want_why: diverged.clone(),
            got_why: diverged,
            want_to_got: (0..r.d).map(Some).collect(),
            ..Default::default()
        };
        let mut m = match_refined(
            &got,
            &es,
            want,
            &rs,
            Some(&plain),
            rules,
            stop_thr,
            (resized, orig),
        );
        // Here "upstream" can only mean a differing stop decision.
        m.upstream = 0;
        rows.push(det_row("refine.*", MODE, &m, rules.min_iou));
        rows.push(count_row("refine.count@0.7", MODE, &got, want, &m));
    }
    Ok(rows)
}
