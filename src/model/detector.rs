//! The whole Faster R-CNN on the GPU: transform → body → FPN → RPN head → anchors, top-k,
//! decode, filters → per-level NMS → proposals → MultiScaleRoIAlign → box MLP → per-class
//! decode and filters → class-aware NMS → top-100 → rescale. Everything between the image upload
//! and one read-back of the final detections stays on the GPU; the sizes that vary per image
//! (proposal and candidate counts) live in GPU count buffers that later kernels read.
//!
//! A plan is built per input size and reused: the composition of the stages in
//! src/model/stages.rs (backbone, RPN, box head, refinement), each owning its buffers and its
//! tagged dispatches, so validation can run or teacher-force one stage at a time.

use super::backbone::{BackboneArch, FPN_NAMES};
use super::config::ModelConfig;
use super::graph::Graph;
use super::heads::{BoxMlp, RpnHead};
use super::refine::{RefineDebug, RefineHead, RefineInput, RefineStage};
use super::stages::{
    BackboneNet, BackboneStage, BoxHeadStage, PlanCache, RefineSegment, RpnStage, Stage,
};
pub use super::stages::{Staged, MAX_BOX_CANDIDATES, MAX_PLANS, STAGES};
use super::weights::WeightStore;
use super::ImageF32;
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, Gpu, Nhwc};
use crate::ops::transform::TransformSizes;

/// One detection in original-image pixel coordinates.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Detection {
    pub bbox: [f32; 4],
    pub score: f32,
    pub label: usize,
}

#[derive(Debug, Clone)]
pub struct Detections {
    pub sizes: TransformSizes,
    pub detections: Vec<Detection>,
    /// Set when the refinement head produced `detections`.
    pub refine: Option<RefineSummary>,
}

/// What the refinement head did on one image.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RefineSummary {
    /// "gru" or "lstm".
    pub cell: &'static str,
    pub steps: usize,
    /// Detections that went into the head.
    pub inputs: usize,
    /// Detections that stopped at step 1, 2, …, T.
    pub stopped_at_step: Vec<usize>,
    /// Detections that never stopped (ran all T steps).
    pub never_stopped: usize,
}

/// Intermediate stages read back in debug / validate mode (rows up to the live counts).
#[derive(Debug, Clone, Default)]
pub struct DebugStages {
    /// (name, NHWC shape, data) of transform.image and fpn.*.
    pub tensors: Vec<(String, Nhwc, Vec<f32>)>,
    pub proposals: Vec<[f32; 4]>,
    pub proposal_scores: Vec<f32>,
    /// [K, C] and [K, 4C] for the K proposals.
    pub box_logits: Vec<f32>,
    pub box_deltas: Vec<f32>,
    /// Anchors over all levels (= RPN head outputs per image, torchvision's objectness length).
    pub anchors: usize,
    /// Pre-NMS RPN candidates (count) and box-head candidates (count).
    pub rpn_candidates: usize,
    pub box_candidates: usize,
    /// [K, R] box-head representations of the K proposals (the refinement head's f).
    pub box_features: Vec<f32>,
    /// The plain detector's detections when the refinement head ran (its input, rescaled).
    pub plain: Option<Vec<Detection>>,
    /// The refinement head's intermediate outputs, when it ran.
    pub refine: Option<RefineDebug>,
}
/// Everything a plan of one input size holds: the stages in run order.
struct SizePlan {
    backbone: BackboneStage,
    rpn: RpnStage,
    boxes: BoxHeadStage,
    /// The refinement head's stage, when the weights have one.
    refine: Option<RefineSegment>,
}

impl SizePlan {
    fn sizes(&self) -> TransformSizes {
        self.backbone.sizes
    }

    /// Every tagged dispatch in run order (the refinement head's only when `refine`).
    fn staged(&self, refine: bool) -> impl Iterator<Item = &Staged> {
        self.backbone
            .segment()
            .staged()
            .iter()
            .chain(self.rpn.segment().staged())
            .chain(self.boxes.segment().staged())
            .chain(refine_list(self, refine).flat_map(|r| r.segment().staged()))
    }

    fn dispatches(&self, refine: bool) -> impl Iterator<Item = &Dispatch> {
        self.staged(refine).map(|s| &s.dispatch)
    }

    /// Bytes of every buffer the stages allocated.
    fn bytes(&self) -> u64 {
        self.backbone.bytes()
            + self.rpn.bytes()
            + self.boxes.bytes()
            + self.refine.as_ref().map_or(0, |r| r.bytes())
    }
}

/// The size-independent networks a plan is built from.
struct Networks {
    backbone: BackboneNet,
    rpn_head: Graph,
    mlp: Graph,
    box_mlp: BoxMlp,
    refine_head: Option<RefineHead>,
}

impl Networks {
    /// The stages for an `h`×`w` input, each built on the ones before it.
    fn build_plan(&self, gpu: &Gpu, cfg: &ModelConfig, h: usize, w: usize) -> Result<SizePlan> {
        let backbone = BackboneStage::new(gpu, &self.backbone, &cfg.transform, h, w)?;
        let rpn = RpnStage::new(gpu, &self.rpn_head, &cfg.rpn, &backbone)?;
        let boxes = BoxHeadStage::new(
            gpu,
            &self.mlp,
            self.box_mlp.num_classes,
            self.backbone.arch.fpn_channels,
            &cfg.box_head,
            &backbone,
            &rpn,
        )?;
        let refine = self
            .refine_head
            .as_ref()
            .map(|head| RefineSegment::new(gpu, head, cfg.box_head.min_size, &backbone, &boxes))
            .transpose()?;
        Ok(SizePlan {
            backbone,
            rpn,
            boxes,
            refine,
        })
    }
}

pub struct Detector<'g> {
    pub gpu: &'g Gpu,
    pub arch: BackboneArch,
    pub weights: WeightStore,
    pub num_classes: usize,
    nets: Networks,
    /// Whether [`Detector::detect`] runs the refinement head (when the weights carry one).
    refine_enabled: bool,
    plans: PlanCache<SizePlan>,
}

impl<'g> Detector<'g> {
    pub fn new(gpu: &'g Gpu, weights: WeightStore) -> Result<Self> {
        weights.check_known_prefixes()?;
        let backbone = BackboneNet::new(gpu, &weights, false)?;
        let f = backbone.arch.fpn_channels;
        let head = RpnHead::load(gpu, &weights, f)?;
        let mut rpn_head = Graph::default();
        let levels: Vec<usize> = FPN_NAMES.iter().map(|n| rpn_head.input(n)).collect();
        for (l, (o, d)) in head.add(&mut rpn_head, &levels).into_iter().enumerate() {
            rpn_head.output(&format!("rpn.objectness.{l}"), o);
            rpn_head.output(&format!("rpn.deltas.{l}"), d);
        }
        let box_mlp = BoxMlp::load(gpu, &weights, f, 7)?;
        let mut mlp = Graph::default();
        let rois = mlp.input("rois");
        let (l, d, x7) = box_mlp.add(&mut mlp, rois);
        mlp.output("box.logits", l);
        mlp.output("box.deltas", d);
        mlp.output("box.features", x7);
        // Every backbone / RPN / box-head tensor must have been consumed by some layer.
        for prefix in ["backbone.", "rpn.", "roi_heads."] {
            weights.check_all_used(prefix)?;
        }
        let num_classes = box_mlp.num_classes;
        let refine_head = RefineHead::load(
            gpu,
            &weights,
            backbone.arch.fpn_channels,
            box_mlp.representation,
            num_classes,
        )?;
        prepare_pipelines(gpu, [&backbone.graph, &rpn_head, &mlp])?;
        Ok(Detector {
            gpu,
            arch: backbone.arch.clone(),
            weights,
            num_classes,
            refine_enabled: refine_head.is_some(),
            nets: Networks {
                backbone,
                rpn_head,
                mlp,
                box_mlp,
                refine_head,
            },
            plans: PlanCache::default(),
        })
    }

    /// The refinement head the weights carry, if any.
    pub fn refine_head(&self) -> Option<&RefineHead> {
        self.nets.refine_head.as_ref()
    }

    /// Runs the refinement head (`true`, the default when the weights have one) or returns the
    /// plain detector's output (`false`: `marrow detect --no-refine`). No effect without a head.
    pub fn set_refine(&mut self, on: bool) {
        self.refine_enabled = on && self.nets.refine_head.is_some();
    }

    /// Whether detections come from the refinement head.
    pub fn refines(&self) -> bool {
        self.refine_enabled
    }

    /// Class name for a label (index 0 = background), from the weights' config.
    pub fn class_name(&self, label: usize) -> String {
        self.weights
            .config
            .class_names
            .as_ref()
            .and_then(|n| n.get(label).cloned())
            .unwrap_or_else(|| format!("class_{label}"))
    }

    fn plan(&mut self, h: usize, w: usize) -> Result<&SizePlan> {
        let (gpu, nets, cfg) = (self.gpu, &self.nets, &self.weights.config);
        let p = self.plans.get(h, w, || nets.build_plan(gpu, cfg, h, w))?;
        Ok(p)
    }

    /// Number of size plans currently held (at most [`MAX_PLANS`]).
    pub fn plans_held(&self) -> usize {
        self.plans.len()
    }

    /// Detects on one image: one submission, one read-back.
    pub fn detect(&mut self, image: &ImageF32) -> Result<Detections> {
        let gpu = self.gpu;
        let refine = self.refine_enabled;
        let p = self.upload(image)?;
        gpu.run("detect", p.dispatches(refine))?;
        finish(gpu, p, refine)
    }

    /// Each image of a batch runs as its own plan, so results equal single-image runs exactly.
    /// (torchvision pads a batch to its largest image, which changes anchors and border
    /// features: its batched results differ from its own single-image runs.)
    pub fn detect_batch(&mut self, images: &[ImageF32]) -> Result<Vec<Detections>> {
        images.iter().map(|im| self.detect(im)).collect()
    }

    fn upload(&mut self, image: &ImageF32) -> Result<&SizePlan> {
        if image.data.len() != 3 * image.h * image.w || image.h == 0 || image.w == 0 {
            return Err(Error::shape(
                "image",
                format!("{} values for 3x{}x{}", image.data.len(), image.h, image.w),
            ));
        }
        let gpu = self.gpu;
        let p = self.plan(image.h, image.w)?;
        gpu.queue
            .write_buffer(&p.backbone.image.buf, 0, bytemuck::cast_slice(&image.data));
        Ok(p)
    }

    /// Like [`Detector::detect`], also reading back every intermediate stage (validation).
    pub fn detect_debug(&mut self, image: &ImageF32) -> Result<(Detections, DebugStages)> {
        let gpu = self.gpu;
        let num_classes = self.num_classes;
        let refine = self.refine_enabled;
        let p = self.upload(image)?;
        gpu.run("detect (debug)", p.dispatches(refine))?;
        let x = &p.backbone.x;
        let mut st = DebugStages {
            tensors: vec![("transform.image".into(), x.shape, x.read(gpu)?)],
            ..Default::default()
        };
        for (n, t) in FPN_NAMES.iter().zip(p.backbone.levels()) {
            st.tensors.push((n.to_string(), t.shape, t.read(gpu)?));
        }
        read_rpn(gpu, p, &mut st)?;
        read_box_head(gpu, p, &mut st, num_classes)?;
        read_refine(gpu, p, &mut st, refine)?;
        let d = finish(gpu, p, refine)?;
        Ok((d, st))
    }

    /// Teacher-forced: the RPN and box head run on the reference FPN levels (NHWC, in FPN_NAMES
    /// order), and the box head additionally on the reference proposals when given.
    pub fn detect_teacher_forced(
        &mut self,
        image_hw: (usize, usize),
        fpn: &[(Nhwc, Vec<f32>)],
        proposals: Option<&[[f32; 4]]>,
    ) -> Result<(Detections, DebugStages)> {
        let num_classes = self.num_classes;
        let gpu = self.gpu;
        let refine = self.refine_enabled;
        let p = self.plan(image_hw.0, image_hw.1)?;
        write_fpn(gpu, p, fpn)?;
        gpu.run("rpn (teacher-forced)", p.rpn.segment().dispatches())?;
        let mut st = DebugStages::default();
        read_rpn(gpu, p, &mut st)?;
        if let Some(props) = proposals {
            let cap = p.boxes.post.capacity;
            if props.len() > cap {
                return Err(Error::shape(
                    "teacher forcing",
                    format!("{} proposals > capacity {cap}", props.len()),
                ));
            }
            if !props.is_empty() {
                gpu.queue
                    .write_buffer(&p.rpn.proposals, 0, bytemuck::cast_slice(props));
            }
            gpu.queue.write_buffer(
                &p.rpn.proposal_count,
                0,
                bytemuck::bytes_of(&(props.len() as u32)),
            );
        }
        gpu.run(
            "box head (teacher-forced)",
            p.boxes
                .segment()
                .dispatches()
                .chain(refine_list(p, refine).flat_map(|r| r.segment().dispatches())),
        )?;
        read_box_head(gpu, p, &mut st, num_classes)?;
        read_refine(gpu, p, &mut st, refine)?;
        let d = finish(gpu, p, refine)?;
        Ok((d, st))
    }

    /// The refinement head alone, teacher-forced: on the reference FPN levels (NHWC, in
    /// FPN_NAMES order) and the reference's input detections (resized-image coordinates) with
    /// their box-head representations (`features`, [D, R] row-major). Errors without a head.
    pub fn refine_teacher_forced(
        &mut self,
        image_hw: (usize, usize),
        fpn: &[(Nhwc, Vec<f32>)],
        inputs: &[RefineInput],
        features: &[f32],
    ) -> Result<(Detections, RefineDebug)> {
        let gpu = self.gpu;
        let Some(head) = self.nets.refine_head.as_ref() else {
            return Err(Error::Invalid(
                "the weights have no refinement head to teacher-force".into(),
            ));
        };
        let r = head.representation;
        if features.len() != inputs.len() * r {
            return Err(Error::shape(
                "refine teacher forcing",
                format!(
                    "{} feature values for {} detections of {r}",
                    features.len(),
                    inputs.len()
                ),
            ));
        }
        let p = self.plan(image_hw.0, image_hw.1)?;
        write_fpn(gpu, p, fpn)?;
        let refine = p.refine.as_ref().expect("a head has a stage");
        let stage = &refine.stage;
        stage.write_input(gpu, inputs)?;
        let fb = &p.boxes.output("box.features").buf;
        if !features.is_empty() {
            gpu.queue
                .write_buffer(fb, 0, bytemuck::cast_slice(features));
        }
        // Skip the gather (the first dispatch): the input rows were written above.
        gpu.run(
            "refine (teacher-forced)",
            refine.segment().dispatches().skip(1),
        )?;
        let dbg = stage.read_debug(gpu)?;
        let dets = stage.read_detections(gpu)?;
        Ok((
            Detections {
                sizes: p.sizes(),
                detections: dets
                    .into_iter()
                    .map(|d| Detection {
                        bbox: d.bbox,
                        score: d.score,
                        label: d.label,
                    })
                    .collect(),
                refine: Some(summary(stage, &dbg)),
            },
            dbg,
        ))
    }

    /// Bytes of every GPU buffer a plan of this size allocated: the sum of its stages' own
    /// counts (activations after lifetime reuse, the image and transformed image, the
    /// transform's index tables, RoI features, head buffers, NMS scratch, the read-back staging
    /// buffer, and the refinement stage's buffers when the weights have a head; each buffer
    /// once, see [`Detector::plan_buffers`]). Weights and the small params uniforms of each
    /// dispatch are not included. Allocated-buffer accounting, not a driver measurement.
    pub fn plan_bytes(&mut self, h: usize, w: usize) -> Result<u64> {
        Ok(self.plan(h, w)?.bytes())
    }

    /// (stage, buffer label, bytes) of every allocation [`Detector::plan_bytes`] counts, for
    /// the plan of an `h`×`w` input: each stage lists each buffer (graph activations as one
    /// entry per graph).
    pub fn plan_buffers(&mut self, h: usize, w: usize) -> Result<Vec<(&'static str, String, u64)>> {
        let p = self.plan(h, w)?;
        let mut v = Vec::new();
        let refine = p.refine.as_ref().map(|r| ("refine", r.ledger()));
        for (stage, ledger) in [
            ("backbone", p.backbone.ledger()),
            ("rpn", p.rpn.ledger()),
            ("box head", p.boxes.ledger()),
        ]
        .into_iter()
        .chain(refine)
        {
            v.extend(ledger.entries().iter().map(|(l, b)| (stage, l.clone(), *b)));
        }
        Ok(v)
    }

    /// Every dispatch of the plan for an `h`×`w` input, in run order, with the stage it was
    /// tagged with when recorded (one of [`STAGES`]) and its FLOPs (convolutions and linear
    /// layers; 0 for everything else). For benchmarks that time each stage with GPU timestamps:
    /// these are the very dispatches [`Detector::detect`] submits (the refinement head's only
    /// while it is enabled).
    pub fn timed_stages(
        &mut self,
        h: usize,
        w: usize,
    ) -> Result<Vec<(&'static str, &Dispatch, f64)>> {
        let refine = self.refine_enabled;
        let p = self.plan(h, w)?;
        Ok(p.staged(refine)
            .map(|s| (s.stage, &s.dispatch, s.flops))
            .collect())
    }

    pub fn box_mlp(&self) -> &BoxMlp {
        &self.nets.box_mlp
    }
}

/// Compiles every convolution and pool variant of the graphs up front, on all cores: these are
/// nearly all of the model's pipelines (35 of 57 for ResNet-50 + FPN), each created once however
/// many layers share it, and the size-independent ones, so the first plan finds them compiled.
/// `MARROW_PIPELINE_THREADS=n` sets the threads (0: none up front, compiled lazily by the plan).
fn prepare_pipelines(gpu: &Gpu, graphs: [&Graph; 3]) -> Result<()> {
    let threads = std::env::var("MARROW_PIPELINE_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    if threads == 0 {
        return Ok(());
    }
    let variants: Vec<crate::gpu::Variant> = graphs
        .iter()
        .flat_map(|g| g.nodes.iter())
        .filter_map(|n| n.op.variant())
        .collect();
    gpu.prepare_pipelines(&variants, threads)?;
    Ok(())
}

/// Writes reference FPN levels (NHWC, FPN_NAMES order) into a plan's level buffers.
fn write_fpn(gpu: &Gpu, p: &SizePlan, fpn: &[(Nhwc, Vec<f32>)]) -> Result<()> {
    if fpn.len() != 5 {
        return Err(Error::shape("teacher forcing", "need 5 FPN levels"));
    }
    for ((n, t), (s, d)) in FPN_NAMES.iter().zip(p.backbone.levels()).zip(fpn) {
        if t.shape != *s || d.len() != s.len() {
            return Err(Error::shape(
                "teacher forcing",
                format!("{n}: reference {s}, engine {}", t.shape),
            ));
        }
        gpu.queue.write_buffer(&t.buf, 0, bytemuck::cast_slice(d));
    }
    Ok(())
}

/// The refinement stage to run after the box head (none when off or absent).
fn refine_list(p: &SizePlan, on: bool) -> impl Iterator<Item = &RefineSegment> {
    p.refine.iter().filter(move |_| on)
}

fn summary(stage: &RefineStage, dbg: &RefineDebug) -> RefineSummary {
    let (stopped_at_step, never_stopped) = RefineStage::stop_counts(dbg, stage.steps);
    RefineSummary {
        cell: stage.kernels.cell.name(),
        steps: stage.steps,
        inputs: dbg.detections,
        stopped_at_step,
        never_stopped,
    }
}

/// Reads the refinement head's intermediates and the plain detections it started from.
fn read_refine(gpu: &Gpu, p: &SizePlan, st: &mut DebugStages, on: bool) -> Result<()> {
    let (Some(r), true) = (&p.refine, on) else {
        return Ok(());
    };
    st.refine = Some(r.stage.read_debug(gpu)?);
    st.plain = Some(finish(gpu, p, false)?.detections);
    Ok(())
}

fn u32s(b: &[u8]) -> Vec<u32> {
    bytemuck::pod_collect_to_vec(b)
}

fn f32s(b: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(b)
}

/// The RPN stage's debug outputs: anchors, candidates, proposals and their scores.
fn read_rpn(gpu: &Gpu, p: &SizePlan, st: &mut DebugStages) -> Result<()> {
    let rpn = &p.rpn;
    st.anchors = rpn.anchors();
    let c = gpu.read_back_many(&[(&rpn.proposal_count, 4), (&rpn.bufs.count, 4)])?;
    let n = u32s(&c[0])[0] as usize;
    st.rpn_candidates = u32s(&c[1])[0] as usize;
    let r = gpu.read_back_many(&[
        (&rpn.proposals, n as u64 * 16),
        (&rpn.proposal_scores, n as u64 * 4),
    ])?;
    let b = f32s(&r[0]);
    st.proposals = b
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect();
    st.proposal_scores = f32s(&r[1]);
    Ok(())
}

/// The box head's debug outputs: candidate count, logits and deltas of the live proposals.
fn read_box_head(gpu: &Gpu, p: &SizePlan, st: &mut DebugStages, num_classes: usize) -> Result<()> {
    let c = gpu.read_back_many(&[
        (&p.rpn.proposal_count, 4),
        (&p.boxes.post_bufs.cand_count, 4),
    ])?;
    let n = u32s(&c[0])[0] as usize;
    st.box_candidates = u32s(&c[1])[0] as usize;
    let logits = p.boxes.output("box.logits");
    let deltas = p.boxes.output("box.deltas");
    let r = gpu.read_back_many(&[
        (&logits.buf, (n * num_classes) as u64 * 4),
        (&deltas.buf, (n * num_classes * 4) as u64 * 4),
    ])?;
    st.box_logits = f32s(&r[0]);
    st.box_deltas = f32s(&r[1]);
    Ok(())
}

/// The one read-back: detection count, rows, and the candidate count (overflow check); with
/// `refined`, the refinement head's detections and stop steps instead of the box head's.
fn finish(gpu: &Gpu, p: &SizePlan, refined: bool) -> Result<Detections> {
    let b = &p.boxes;
    let refine = p.refine.as_ref().filter(|_| refined).map(|r| &r.stage);
    let (count, rows) = match refine {
        Some(st) => (&st.det_count, &st.dets),
        None => (&b.det_count, &b.dets),
    };
    let mut parts = vec![
        (count, 4),
        (&b.post_bufs.cand_count, 4),
        (rows, b.post.max_det as u64 * 32),
    ];
    if let Some(st) = refine {
        parts.push((&st.state.count.buf, 4));
        parts.push((&st.state.state.buf, st.kernels.cap as u64 * 8));
    }
    let r = gpu.read_back_via(&b.readback, &parts)?;
    let n = (u32s(&r[0])[0] as usize).min(b.post.max_det);
    let cands = u32s(&r[1])[0] as usize;
    if cands > b.nms_capacity {
        return Err(Error::TooLarge(format!(
            "{cands} box candidates above the score threshold exceed the class-aware NMS capacity of {} \
             (raise box_head.score_thresh in the model config)",
            b.nms_capacity
        )));
    }
    let rows = f32s(&r[2]);
    let detections = rows
        .chunks_exact(8)
        .take(n)
        .map(|r| Detection {
            bbox: [r[0], r[1], r[2], r[3]],
            score: r[4],
            label: r[5] as usize,
        })
        .collect();
    let refine = refine.map(|st| {
        let d = (u32s(&r[3])[0] as usize).min(st.kernels.cap);
        let state = u32s(&r[4]);
        let dbg = RefineDebug {
            detections: d,
            stop_step: (0..d).map(|i| state[2 * i + 1]).collect(),
            ..Default::default()
        };
        summary(st, &dbg)
    });
    Ok(Detections {
        sizes: p.sizes(),
        detections,
        refine,
    })
}
