//! The refinement head (docs/design.md §6) as a detector stage: its weights, checked against its
//! config and the detector, and the per-size stage that owns its buffers and records its
//! dispatches: start → T × (RoIAlign → key/value and query projections → attention → cell gates
//! → cell → delta/stop head → step) → class head → classify → per-class NMS → gather + rescale.
//! Everything runs for all detections at once with no read-back between steps.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::gpu::{Buffer, Dispatch, Gpu, Tensor};
use crate::model::weights::WeightStore;
use crate::ops::box_head::{BoxPostprocess, Candidates};
use crate::ops::linalg::{Activation, Linear, LinearIo};
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
    init: (Buffer, Buffer),
    kv: (Buffer, Buffer),
    query: (Buffer, Buffer),
    beta: Buffer,
    ih: (Buffer, Buffer),
    hh: (Buffer, Buffer),
    heads: (Buffer, Buffer),
    cls: (Buffer, Buffer),
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
        let up = |name: &str, shape: &[usize]| -> Result<Buffer> {
            gpu.upload(name, ws.get(name, shape)?)
        };
        let pair = |name: &str, rows: usize, cols: usize| -> Result<(Buffer, Buffer)> {
            Ok((
                up(&format!("{name}.weight"), &[rows, cols])?,
                up(&format!("{name}.bias"), &[rows])?,
            ))
        };
        let stacked =
            |a: &str, ra: usize, b: &str, rb: usize, cols: usize| -> Result<(Buffer, Buffer)> {
                let mut w = ws.get(&format!("{a}.weight"), &[ra, cols])?.to_vec();
                w.extend_from_slice(ws.get(&format!("{b}.weight"), &[rb, cols])?);
                let mut bias = ws.get(&format!("{a}.bias"), &[ra])?.to_vec();
                bias.extend_from_slice(ws.get(&format!("{b}.bias"), &[rb])?);
                Ok((
                    gpu.upload(&format!("{a}+{b}.weight"), &w)?,
                    gpu.upload(&format!("{a}+{b}.bias"), &bias)?,
                ))
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
            beta: up("refine.beta", &[1])?,
            ih: (
                up("refine.cell.weight_ih", &[g, k])?,
                up("refine.cell.bias_ih", &[g])?,
            ),
            hh: (
                up("refine.cell.weight_hh", &[g, h])?,
                up("refine.cell.bias_hh", &[g])?,
            ),
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
    pub step_boxes: Buffer,
    pub stop_prob: Buffer,
    pub attn: Buffer,
    pub logits: Buffer,
    pub terminal: Buffer,
    /// Final detections: [max_det, 8] rows as the box head's finalize writes them, and the count.
    pub dets: Buffer,
    pub det_count: Buffer,
    _scratch: Vec<Buffer>,
    _nms_scratch: NmsScratch,
    /// Bytes of every buffer the stage allocated.
    pub bytes: u64,
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
        let (h, kk, c, n) = (head.hidden, head.key, head.channels, head.classes);
        let g = head.cell.gates() * h;
        let sp = StepParams {
            resized: inputs.resized,
            stop_threshold: head.config.stop_threshold,
            min_size: box_min_size,
            steps: t,
        };
        let state = k.state(gpu, "refine")?;
        let mut bytes = [
            &state.input,
            &state.count,
            &state.feat,
            &state.boxes,
            &state.state,
            &state.h,
            &state.c,
        ]
        .iter()
        .map(|b| b.size())
        .sum::<u64>();
        let mut alloc = |label: &str, elems: usize| -> Result<Buffer> {
            let b = gpu.storage(label, elems.max(1) as u64 * 4)?;
            bytes += b.size();
            Ok(b)
        };
        let x = alloc("refine roi features [D*49,C]", cap * BINS * c)?;
        let kv = alloc("refine keys|values [D*49,2K]", cap * BINS * 2 * kk)?;
        let q = alloc("refine query [D,K]", cap * kk)?;
        let ctx = alloc("refine context [D,K]", cap * kk)?;
        let gi = alloc("refine input gates [D,GH]", cap * g)?;
        let gh = alloc("refine hidden gates [D,GH]", cap * g)?;
        let heads = alloc("refine delta|stop [D,5]", cap * 5)?;
        let step_boxes = alloc("refine step boxes [T,D,4]", t * cap * 4)?;
        let stop_prob = alloc("refine stop probabilities [T,D]", t * cap)?;
        let attn = alloc("refine attention [T,D,49]", t * cap * BINS)?;
        let logits = alloc("refine class logits [D,N]", cap * n)?;
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
        bytes += nms.scratch_bytes();

        let roi = MultiScaleRoiAlign::box_head(cap, c);
        let lin = |i: usize, o: usize, act| Linear::new(i, o, act);
        let mut d: Vec<(Dispatch, f64)> = Vec::new();
        d.push((
            k.encode_start(gpu, "refine.start", inputs.features, &state)?,
            0.0,
        ));
        let init = lin(head.representation, h, Activation::Tanh);
        d.push((
            init.encode(
                gpu,
                "refine.init",
                &LinearIo {
                    x: &state.feat,
                    w: &head.init.0,
                    b: &head.init.1,
                    count: &state.count,
                    y: &state.h,
                    m_cap: cap,
                    rows_per_count: 1,
                },
            )?,
            init.flops(cap),
        ));
        let kv_op = lin(c, 2 * kk, Activation::None);
        let q_op = lin(h, kk, Activation::None);
        let ih_op = lin(kk, g, Activation::None);
        let hh_op = lin(h, g, Activation::None);
        let heads_op = lin(h, 5, Activation::None);
        for step in 1..=t {
            let l = |what: &str| format!("refine.{what} (step {step})");
            d.push((
                roi.encode(
                    gpu,
                    &l("roi_align"),
                    inputs.levels,
                    inputs.resized,
                    0,
                    &state.boxes,
                    &state.count,
                    &x,
                )?,
                0.0,
            ));
            d.push(linear(
                gpu,
                &l("key_value"),
                &kv_op,
                &x,
                &head.kv,
                &kv,
                &state.count,
                cap,
                BINS,
            )?);
            d.push(linear(
                gpu,
                &l("query"),
                &q_op,
                &state.h,
                &head.query,
                &q,
                &state.count,
                cap,
                1,
            )?);
            d.push((
                k.encode_attention(
                    gpu,
                    &l("attention"),
                    &sp,
                    step,
                    &kv,
                    &q,
                    &head.beta,
                    &state,
                    &ctx,
                    &attn,
                )?,
                (cap * BINS * kk * 4) as f64,
            ));
            d.push(linear(
                gpu,
                &l("cell.ih"),
                &ih_op,
                &ctx,
                &head.ih,
                &gi,
                &state.count,
                cap,
                1,
            )?);
            d.push(linear(
                gpu,
                &l("cell.hh"),
                &hh_op,
                &state.h,
                &head.hh,
                &gh,
                &state.count,
                cap,
                1,
            )?);
            d.push((k.encode_cell(gpu, &l("cell"), &gi, &gh, &state)?, 0.0));
            d.push(linear(
                gpu,
                &l("delta_stop"),
                &heads_op,
                &state.h,
                &head.heads,
                &heads,
                &state.count,
                cap,
                1,
            )?);
            d.push((
                k.encode_step(
                    gpu,
                    &l("step"),
                    &sp,
                    step,
                    &heads,
                    &state,
                    &step_boxes,
                    &stop_prob,
                )?,
                0.0,
            ));
        }
        let cls_op = lin(h, n, Activation::None);
        d.push((
            cls_op.encode(
                gpu,
                "refine.cls",
                &LinearIo {
                    x: &state.h,
                    w: &head.cls.0,
                    b: &head.cls.1,
                    count: &state.count,
                    y: &logits,
                    m_cap: cap,
                    rows_per_count: 1,
                },
            )?,
            cls_op.flops(cap),
        ));
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
                &logits,
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
            _scratch: vec![
                x,
                kv,
                q,
                ctx,
                gi,
                gh,
                heads,
                cand_boxes,
                cand_scores,
                cand_labels,
                cand_count,
                keep,
                keep_count,
            ],
            _nms_scratch: nms_scratch,
            bytes,
            dispatches: d,
        })
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
                .write_buffer(&self.state.input, 0, bytemuck::cast_slice(&data));
        }
        gpu.queue.write_buffer(
            &self.state.count,
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
            (&self.state.count, 4),
            (&self.state.input, (cap * 32) as u64),
            (&self.state.state, (cap * 8) as u64),
            (&self.state.h, (cap * k.hidden * 4) as u64),
            (&self.step_boxes, (t * cap * 16) as u64),
            (&self.stop_prob, (t * cap * 4) as u64),
            (&self.attn, (t * cap * BINS * 4) as u64),
            (&self.logits, (cap * k.classes * 4) as u64),
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

/// One [`Linear`] dispatch over `cap × rows` rows (count[0] × rows live), with its FLOPs.
#[allow(clippy::too_many_arguments)]
fn linear(
    gpu: &Gpu,
    label: &str,
    op: &Linear,
    x: &Buffer,
    wb: &(Buffer, Buffer),
    y: &Buffer,
    count: &Buffer,
    cap: usize,
    rows: usize,
) -> Result<(Dispatch, f64)> {
    let io = LinearIo {
        x,
        w: &wb.0,
        b: &wb.1,
        count,
        y,
        m_cap: cap * rows,
        rows_per_count: rows,
    };
    Ok((op.encode(gpu, label, &io)?, op.flops(cap * rows)))
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
