//! The refinement head (docs/design.md §6) as a detector stage: its weights, checked against its
//! config and the detector, and the per-size stage that owns its buffers and records its
//! dispatches: start → the step graph (init → T × (RoIAlign → key/value and query projections →
//! attention → cell gates → cell → delta/stop head → step) → class head), planned by the graph
//! IR like the backbone → classify → per-class NMS → gather + rescale. Everything runs for all
//! detections at once with no read-back between steps.

use serde::Deserialize;

use crate::error::{Error, Result};
use std::sync::Arc;

use crate::gpu::{Buffer, Dispatch, Gpu, Nhwc, Tensor};
use crate::model::graph::{Graph, Plan, ValueId};
use crate::model::stages::Ledger;
use crate::model::weights::WeightStore;
use crate::ops::box_head::{BoxPostprocess, Candidates};
use crate::ops::linalg::{Activation, Linear, LinearWeights};
use crate::ops::nms::{Nms, NmsIo, NmsScratch};
use crate::ops::refine::{CellKind, RefineKernels, RefineState, StepParams};
use crate::ops::roi_align::MultiScaleRoiAlign;

/// Bins per RoI: the detector's 7×7 pooling.
pub const BINS: usize = 49;

/// The `refine` object of the model config.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RefineConfig {
    pub cell: String,
    pub hidden: usize,
    pub key: usize,
    pub steps: usize,
    #[serde(default = "half")]
    pub stop_threshold: f32,
    #[serde(default = "half")]
    pub nms_thresh: f32,
}

fn half() -> f32 {
    0.5
}

/// Largest number of refinement steps accepted (the paper uses a few; each is ~10 dispatches).
pub const MAX_STEPS: usize = 64;

/// The head's weights on the GPU, with the fused layouts the kernels use: key and value stacked
/// into one [2K, C] projection, delta and stop into one [5, H] head.
pub struct RefineHead {
    pub config: RefineConfig,
    pub cell: CellKind,
    /// H, K, C (FPN width), R (box representation), N (classes with background).
    pub hidden: usize,
    pub key: usize,
    pub channels: usize,
    pub representation: usize,
    pub classes: usize,
    init: Arc<LinearWeights>,
    kv: Arc<LinearWeights>,
    query: Arc<LinearWeights>,
    beta: Arc<Buffer>,
    ih: Arc<LinearWeights>,
    hh: Arc<LinearWeights>,
    heads: Arc<LinearWeights>,
    cls: Arc<LinearWeights>,
}

impl RefineHead {
    /// The head a weight file carries, if any. `refine.*` tensors without a `refine` config (or
    /// the reverse), a config that disagrees with the tensors, or tensors that disagree with the
    /// detector (C, R, N) are load errors naming the tensor.
    pub fn load(
        gpu: &Gpu,
        ws: &WeightStore,
        channels: usize,
        representation: usize,
        classes: usize,
    ) -> Result<Option<RefineHead>> {
        let err = |m: String| Error::Weights {
            path: ws.source.clone(),
            message: m,
        };
        let has_tensors = ws.names().any(|n| n.starts_with("refine."));
        let cfg_value = ws.config.refine.as_ref().filter(|v| !v.is_null()).cloned();
        let config: RefineConfig =
            match (cfg_value, has_tensors) {
                (None, false) => return Ok(None),
                (None, true) => return Err(err(
                    "has refine.* tensors but no `refine` object in marrow.config (cell, hidden, \
                     key, steps): re-export it with weights/convert.py"
                        .into(),
                )),
                (Some(_), false) => {
                    return Err(err(
                        "marrow.config has a `refine` object but the file has no refine.* tensors"
                            .into(),
                    ))
                }
                (Some(v), true) => serde_json::from_value(v)
                    .map_err(|e| err(format!("marrow.config `refine`: {e}")))?,
            };
        let cell = match config.cell.as_str() {
            "gru" => CellKind::Gru,
            "lstm" => CellKind::Lstm,
            other => {
                return Err(err(format!(
                    "marrow.config `refine.cell` is {other:?}; expected \"gru\" or \"lstm\""
                )))
            }
        };
        if config.steps == 0 || config.steps > MAX_STEPS {
            return Err(err(format!(
                "marrow.config `refine.steps` is {}; expected 1..={MAX_STEPS}",
                config.steps
            )));
        }
        if !(config.stop_threshold.is_finite() && config.nms_thresh.is_finite()) {
            return Err(err("marrow.config `refine`: non-finite threshold".into()));
        }
        // H and K from the tensors, checked against the config.
        let shape_of = |name: &str| -> Result<Vec<usize>> {
            ws.shape(name).map(|s| s.to_vec()).ok_or_else(|| {
                err(format!(
                    "tensor {name} is missing (the refinement head needs it)"
                ))
            })
        };
        let init_shape = shape_of("refine.init.weight")?;
        let key_shape = shape_of("refine.key.weight")?;
        let (h, k) = (
            init_shape.first().copied().unwrap_or(0),
            key_shape.first().copied().unwrap_or(0),
        );
        if h != config.hidden {
            return Err(err(format!(
                "tensor refine.init.weight has {h} rows but marrow.config `refine.hidden` is {}",
                config.hidden
            )));
        }
        if k != config.key {
            return Err(err(format!(
                "tensor refine.key.weight has {k} rows but marrow.config `refine.key` is {}",
                config.key
            )));
        }
        if h == 0 || k == 0 {
            return Err(err("refinement head with hidden or key size 0".into()));
        }
        let g = cell.gates() * h;
        // Shapes are checked by `get`; finiteness by the store at load (`check_finite`).
        let pair = |name: &str, rows: usize, cols: usize| -> Result<Arc<LinearWeights>> {
            let w = ws.get(&format!("{name}.weight"), &[rows, cols])?;
            let b = ws.get(&format!("{name}.bias"), &[rows])?;
            Ok(Arc::new(LinearWeights::upload(gpu, name, w, b)?))
        };
        let stacked =
            |a: &str, ra: usize, b: &str, rb: usize, cols: usize| -> Result<Arc<LinearWeights>> {
                let mut w = ws.get(&format!("{a}.weight"), &[ra, cols])?.to_vec();
                w.extend_from_slice(ws.get(&format!("{b}.weight"), &[rb, cols])?);
                let mut bias = ws.get(&format!("{a}.bias"), &[ra])?.to_vec();
                bias.extend_from_slice(ws.get(&format!("{b}.bias"), &[rb])?);
                Ok(Arc::new(LinearWeights::upload(
                    gpu,
                    &format!("{a}+{b}"),
                    &w,
                    &bias,
                )?))
            };
        let cell_part = |part: &str, cols: usize| -> Result<Arc<LinearWeights>> {
            let w = ws.get(&format!("refine.cell.weight_{part}"), &[g, cols])?;
            let b = ws.get(&format!("refine.cell.bias_{part}"), &[g])?;
            Ok(Arc::new(LinearWeights::upload(
                gpu,
                &format!("refine.cell.{part}"),
                w,
                b,
            )?))
        };
        let head = RefineHead {
            cell,
            hidden: h,
            key: k,
            channels,
            representation,
            classes,
            init: pair("refine.init", h, representation)?,
            kv: stacked("refine.key", k, "refine.value", k, channels)?,
            query: pair("refine.query", k, h)?,
            beta: Arc::new(gpu.upload("refine.beta", ws.get("refine.beta", &[1])?)?),
            ih: cell_part("ih", k)?,
            hh: cell_part("hh", h)?,
            heads: stacked("refine.delta", 4, "refine.stop", 1, h)?,
            cls: pair("refine.cls", classes, h)?,
            config,
        };
        // The critic is used in training only; it is carried, and must still fit the head.
        ws.get("refine.critic.weight", &[1, h])?;
        ws.get("refine.critic.bias", &[1])?;
        ws.check_all_used("refine.")?;
        Ok(Some(head))
    }

    fn kernels(&self, cap: usize) -> RefineKernels {
        RefineKernels {
            cap,
            hidden: self.hidden,
            key: self.key,
            feat: self.representation,
            classes: self.classes,
            cell: self.cell,
        }
    }
}

/// The refinement stage of one size plan: owns its buffers and its dispatches.
pub struct RefineStage {
    pub kernels: RefineKernels,
    pub steps: usize,
    pub max_det: usize,
    pub state: RefineState,
    /// Per-step debug outputs: boxes [T, cap, 4], stop probabilities [T, cap], attention
    /// [T, cap, 49]; terminal logits [cap, N] and (score, label) [cap, 2].
    pub step_boxes: Tensor,
    pub stop_prob: Tensor,
    pub attn: Tensor,
    pub logits: Tensor,
    pub terminal: Buffer,
    /// Final detections: [max_det, 8] rows as the box head's finalize writes them, and the count.
    pub dets: Buffer,
    pub det_count: Buffer,
    /// The planned step graph (init → T steps → class head); holds its activation buffers.
    pub plan: Plan,
    _scratch: Vec<Buffer>,
    _nms_scratch: NmsScratch,
    /// Every buffer the stage allocated, by label (the graph's activations as one entry).
    pub ledger: Ledger,
    /// Dispatches from the input rows to the final detections (run after the input is filled,
    /// by the detector's gather or by teacher forcing), with each one's FLOPs.
    pub dispatches: Vec<(Dispatch, f64)>,
}

/// What the stage reads from the detector.
pub struct RefineInputs<'a> {
    /// FPN levels P2..P5 (NHWC), as the box head's RoIAlign reads them.
    pub levels: [&'a Tensor; 4],
    /// Resized (unpadded) and original image sizes.
    pub resized: (usize, usize),
    pub orig: (usize, usize),
    /// Rows of box-head representations that input rows index (the TwoMLPHead output).
    pub features: &'a Buffer,
}

/// The graph's inputs: the detector's FPN levels and the stage's state and debug tensors.
const GRAPH_INPUTS: [&str; 12] = [
    "fpn.0",
    "fpn.1",
    "fpn.2",
    "fpn.3",
    "refine.count",
    "refine.state",
    "refine.features",
    "refine.boxes",
    "refine.hidden",
    "refine.cell_state",
    "refine.step_boxes",
    "refine.stop_prob",
];

impl RefineHead {
    /// The head's per-step computation as a graph for `cap` detections: the hidden state's
    /// initialisation, then T × (RoIAlign → key/value and query projections → attention → cell
    /// gates → cell → delta/stop head → step), then the class head. Its inputs are
    /// [`GRAPH_INPUTS`] followed by "refine.attention" and "refine.logits", which it writes.
    pub fn graph(&self, cap: usize, roi: MultiScaleRoiAlign, sp: StepParams) -> Graph {
        let k = self.kernels(cap);
        let (h, kk, c, n) = (self.hidden, self.key, self.channels, self.classes);
        let gates = self.cell.gates() * h;
        let mut g = Graph::default();
        let ins: Vec<ValueId> = GRAPH_INPUTS.iter().map(|name| g.input(name)).collect();
        let attn = g.input("refine.attention");
        let logits = g.input("refine.logits");
        let levels = [ins[0], ins[1], ins[2], ins[3]];
        let [count, flags, feat, boxes, hidden, cell_state, step_boxes, stop_prob] = [
            ins[4], ins[5], ins[6], ins[7], ins[8], ins[9], ins[10], ins[11],
        ];
        let lin = |i: usize, o: usize| Linear::new(i, o, Activation::None);
        g.linear_into(
            "refine.init",
            Linear::new(self.representation, h, Activation::Tanh),
            self.init.clone(),
            feat,
            count,
            1,
            hidden,
        );
        let state: Vec<ValueId> = match self.cell {
            CellKind::Gru => vec![hidden],
            CellKind::Lstm => vec![hidden, cell_state],
        };
        for step in 1..=sp.steps {
            let l = |what: &str| format!("refine.{what} (step {step})");
            let x = g.roi_align(&l("roi_align"), roi, sp.resized, levels, boxes, count);
            let kv = g.linear(
                &l("key_value"),
                lin(c, 2 * kk),
                self.kv.clone(),
                x,
                count,
                BINS,
            );
            let q = g.linear(
                &l("query"),
                lin(h, kk),
                self.query.clone(),
                hidden,
                count,
                1,
            );
            let ctx = g.attention(
                &l("attention"),
                k,
                sp,
                step,
                self.beta.clone(),
                [kv, q, count, flags],
                attn,
            );
            let gi = g.linear(
                &l("cell.ih"),
                lin(kk, gates),
                self.ih.clone(),
                ctx,
                count,
                1,
            );
            let gh = g.linear(
                &l("cell.hh"),
                lin(h, gates),
                self.hh.clone(),
                hidden,
                count,
                1,
            );
            g.cell(&l("cell"), k, [gi, gh, count, flags], &state);
            let heads = g.linear(
                &l("delta_stop"),
                lin(h, 5),
                self.heads.clone(),
                hidden,
                count,
                1,
            );
            g.refine_step(
                &l("step"),
                k,
                sp,
                step,
                [heads, count],
                [flags, boxes, step_boxes, stop_prob],
            );
        }
        g.linear_into(
            "refine.cls",
            lin(h, n),
            self.cls.clone(),
            hidden,
            count,
            1,
            logits,
        );
        g
    }
}

impl RefineStage {
    /// Plans the stage for at most `max_det` detections; `box_min_size` is the small-box filter
    /// (torchvision's 1e-2).
    pub fn new(
        gpu: &Gpu,
        head: &RefineHead,
        inputs: &RefineInputs,
        max_det: usize,
        box_min_size: f32,
    ) -> Result<RefineStage> {
        let cap = max_det.max(1);
        let k = head.kernels(cap);
        let t = head.config.steps;
        let n = head.classes;
        let sp = StepParams {
            resized: inputs.resized,
            stop_threshold: head.config.stop_threshold,
            min_size: box_min_size,
            steps: t,
        };
        let state = k.state(gpu, "refine")?;
        let mut ledger = Ledger::default();
        for (what, t) in [
            "input",
            "count",
            "features",
            "boxes",
            "state",
            "hidden",
            "cell state",
        ]
        .iter()
        .zip(state.tensors())
        {
            ledger.buffer(&format!("refine {what}"), &t.buf);
        }
        let rows = |r: usize, c: usize| Nhwc::new(r.max(1), 1, 1, c);
        let step_boxes = ledger.tensor(gpu, "refine step boxes [T,D,4]", rows(t * cap, 4))?;
        let stop_prob = ledger.tensor(gpu, "refine stop probabilities [T,D]", rows(t * cap, 1))?;
        let attn = ledger.tensor(gpu, "refine attention [T,D,49]", rows(t * cap, BINS))?;
        let logits = ledger.tensor(gpu, "refine class logits [D,N]", rows(cap, n))?;
        let mut alloc = |label: &str, elems: usize| -> Result<Buffer> {
            ledger.storage(gpu, label, elems.max(1) as u64 * 4)
        };
        let terminal = alloc("refine terminal (score, label) [D,2]", cap * 2)?;
        let cand_boxes = alloc("refine candidate boxes", cap * 4)?;
        let cand_scores = alloc("refine candidate scores", cap)?;
        let cand_labels = alloc("refine candidate labels", cap)?;
        let cand_count = alloc("refine candidate count", 1)?;
        let keep = alloc("refine nms keep", cap)?;
        let keep_count = alloc("refine nms keep count", 1)?;
        let dets = alloc("refine detections [max_det,8]", max_det.max(1) * 8)?;
        let det_count = alloc("refine detections count", 1)?;
        let nms = Nms::new(cap, head.config.nms_thresh, max_det, true);
        let nms_scratch = nms.scratch(gpu, "refine nms")?;
        ledger.bytes("refine nms scratch", nms.scratch_bytes());

        let mut d: Vec<(Dispatch, f64)> = Vec::new();
        d.push((
            k.encode_start(gpu, "refine.start", inputs.features, &state)?,
            0.0,
        ));
        let graph = head.graph(cap, MultiScaleRoiAlign::box_head(cap, head.channels), sp);
        let st = &state;
        let [p2, p3, p4, p5] = inputs.levels;
        let bound = graph.bind(&[
            ("fpn.0", p2),
            ("fpn.1", p3),
            ("fpn.2", p4),
            ("fpn.3", p5),
            ("refine.count", &st.count),
            ("refine.state", &st.state),
            ("refine.features", &st.feat),
            ("refine.boxes", &st.boxes),
            ("refine.hidden", &st.h),
            ("refine.cell_state", &st.c),
            ("refine.step_boxes", &step_boxes),
            ("refine.stop_prob", &stop_prob),
            ("refine.attention", &attn),
            ("refine.logits", &logits),
        ])?;
        let plan = graph.plan(gpu, "refine", &bound)?;
        ledger.bytes("refine step graph activations", plan.activation_bytes);
        d.extend(plan.ops.iter().map(|o| (o.dispatch.clone(), o.flops)));
        let cand = Candidates {
            boxes: &cand_boxes,
            scores: &cand_scores,
            labels: &cand_labels,
        };
        d.push((
            k.encode_classify(
                gpu,
                "refine.classify",
                &sp,
                &logits.buf,
                &state,
                cand,
                &cand_count,
                &terminal,
            )?,
            0.0,
        ));
        for nd in nms.encode(
            gpu,
            "refine.nms",
            &NmsIo {
                boxes: &cand_boxes,
                scores: &cand_scores,
                ids: Some(&cand_labels),
                count: &cand_count,
                count_index: 0,
                keep: &keep,
                keep_count: &keep_count,
                keep_count_index: 0,
            },
            &nms_scratch,
        )? {
            d.push((nd, 0.0));
        }
        let fin = BoxPostprocess {
            num_classes: n,
            capacity: cap,
            score_thresh: 0.0,
            min_size: box_min_size,
            max_det,
        };
        d.push((
            fin.encode_finalize(
                gpu,
                cand,
                &keep,
                &keep_count,
                inputs.resized,
                inputs.orig,
                &dets,
                &det_count,
            )?,
            0.0,
        ));
        Ok(RefineStage {
            kernels: k,
            steps: t,
            max_det,
            state,
            step_boxes,
            stop_prob,
            attn,
            logits,
            terminal,
            dets,
            det_count,
            plan,
            _scratch: vec![
                cand_boxes,
                cand_scores,
                cand_labels,
                cand_count,
                keep,
                keep_count,
            ],
            _nms_scratch: nms_scratch,
            ledger,
            dispatches: d,
        })
    }

    /// Bytes of every buffer the stage allocated.
    pub fn bytes(&self) -> u64 {
        self.ledger.total()
    }

    /// The stage's dispatches in run order (without the detector's gather).
    pub fn dispatch_list(&self) -> impl Iterator<Item = &Dispatch> {
        self.dispatches.iter().map(|(d, _)| d)
    }

    /// The detector's gather into this stage: the box head's NMS survivors (`keep`, candidates
    /// and their proposal rows) become the input rows.
    pub fn gather(
        &self,
        gpu: &Gpu,
        keep: &Buffer,
        keep_count: &Buffer,
        cand: Candidates<'_>,
        cand_rows: &Buffer,
    ) -> Result<Dispatch> {
        self.kernels.encode_gather(
            gpu,
            "refine.gather",
            keep,
            keep_count,
            cand,
            cand_rows,
            &self.state,
        )
    }

    /// Teacher forcing: writes `rows` input detections (box, score, label in resized coordinates)
    /// whose features are rows 0..n of the stage's `features` buffer, which the caller fills.
    pub fn write_input(&self, gpu: &Gpu, rows: &[RefineInput]) -> Result<()> {
        if rows.len() > self.kernels.cap {
            return Err(Error::shape(
                "refine input",
                format!("{} detections > capacity {}", rows.len(), self.kernels.cap),
            ));
        }
        let data: Vec<f32> = rows
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                [
                    r.bbox[0],
                    r.bbox[1],
                    r.bbox[2],
                    r.bbox[3],
                    r.score,
                    r.label as f32,
                    i as f32,
                    0.0,
                ]
            })
            .collect();
        if !data.is_empty() {
            gpu.queue
                .write_buffer(&self.state.input.buf, 0, bytemuck::cast_slice(&data));
        }
        gpu.queue.write_buffer(
            &self.state.count.buf,
            0,
            bytemuck::bytes_of(&(rows.len() as u32)),
        );
        Ok(())
    }

    /// Reads the final detections (original-image coordinates).
    pub fn read_detections(&self, gpu: &Gpu) -> Result<Vec<RefinedDetection>> {
        let r = gpu.read_back_many(&[
            (&self.det_count, 4),
            (&self.dets, self.max_det.max(1) as u64 * 32),
        ])?;
        let n = (bytemuck::pod_read_unaligned::<u32>(&r[0][..4]) as usize).min(self.max_det);
        let rows: Vec<f32> = bytemuck::pod_collect_to_vec(&r[1]);
        Ok(rows
            .chunks_exact(8)
            .take(n)
            .map(|r| RefinedDetection {
                bbox: [r[0], r[1], r[2], r[3]],
                score: r[4],
                label: r[5] as usize,
            })
            .collect())
    }

    /// Reads every per-detection debug output for the live detections.
    pub fn read_debug(&self, gpu: &Gpu) -> Result<RefineDebug> {
        let k = &self.kernels;
        let cap = k.cap;
        let t = self.steps;
        let r = gpu.read_back_many(&[
            (&self.state.count.buf, 4),
            (&self.state.input.buf, (cap * 32) as u64),
            (&self.state.state.buf, (cap * 8) as u64),
            (&self.state.h.buf, (cap * k.hidden * 4) as u64),
            (&self.step_boxes.buf, (t * cap * 16) as u64),
            (&self.stop_prob.buf, (t * cap * 4) as u64),
            (&self.attn.buf, (t * cap * BINS * 4) as u64),
            (&self.logits.buf, (cap * k.classes * 4) as u64),
            (&self.terminal, (cap * 8) as u64),
        ])?;
        let f = |b: &[u8]| -> Vec<f32> { bytemuck::pod_collect_to_vec(b) };
        let d = (bytemuck::pod_read_unaligned::<u32>(&r[0][..4]) as usize).min(cap);
        let input = f(&r[1]);
        let state: Vec<u32> = bytemuck::pod_collect_to_vec(&r[2]);
        let h = f(&r[3]);
        let sb = f(&r[4]);
        let sprob = f(&r[5]);
        let at = f(&r[6]);
        let lg = f(&r[7]);
        let term = f(&r[8]);
        let per_step = |v: &[f32], w: usize| -> Vec<Vec<f32>> {
            (0..t)
                .map(|s| v[s * cap * w..(s * cap + d) * w].to_vec())
                .collect()
        };
        Ok(RefineDebug {
            detections: d,
            input_rows: input[..d * 8].to_vec(),
            stop_step: (0..d).map(|i| state[2 * i + 1]).collect(),
            hidden: h[..d * k.hidden].to_vec(),
            step_boxes: per_step(&sb, 4),
            stop_prob: per_step(&sprob, 1),
            attention: per_step(&at, BINS),
            logits: lg[..d * k.classes].to_vec(),
            terminal: (0..d)
                .map(|i| (term[2 * i], term[2 * i + 1] as usize))
                .collect(),
        })
    }

    /// Detections that stopped at each step (index 0 = step 1) and those that never stopped.
    pub fn stop_counts(debug: &RefineDebug, steps: usize) -> (Vec<usize>, usize) {
        let mut per = vec![0usize; steps];
        let mut never = 0;
        for &s in &debug.stop_step {
            match s as usize {
                0 => never += 1,
                s if s <= steps => per[s - 1] += 1,
                _ => never += 1,
            }
        }
        (per, never)
    }
}

/// One teacher-forced input detection (resized-image coordinates).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefineInput {
    pub bbox: [f32; 4],
    pub score: f32,
    pub label: usize,
}

/// A refined detection in original-image coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefinedDetection {
    pub bbox: [f32; 4],
    pub score: f32,
    pub label: usize,
}

/// The head's intermediate outputs for the D live detections.
#[derive(Debug, Clone, Default)]
pub struct RefineDebug {
    pub detections: usize,
    /// [D, 8]: box (resized coords), score, label, source row, 0.
    pub input_rows: Vec<f32>,
    /// 1-based step each detection stopped at; 0 = never.
    pub stop_step: Vec<u32>,
    /// [D, H] final hidden states.
    pub hidden: Vec<f32>,
    /// Per step: [D, 4] boxes, [D] stop probabilities (−1 once stopped), [D, 49] attention
    /// (stale once stopped).
    pub step_boxes: Vec<Vec<f32>>,
    pub stop_prob: Vec<Vec<f32>>,
    pub attention: Vec<Vec<f32>>,
    /// [D, N] terminal class logits and the (score, label) they give.
    pub logits: Vec<f32>,
    pub terminal: Vec<(f32, usize)>,
}
