//! The whole Faster R-CNN on the GPU: transform → body → FPN → RPN head → anchors, top-k,
//! decode, filters → per-level NMS → proposals → MultiScaleRoIAlign → box MLP → per-class
//! decode and filters → class-aware NMS → top-100 → rescale. Everything between the image upload
//! and one read-back of the final detections stays on the GPU; the sizes that vary per image
//! (proposal and candidate counts) live in GPU count buffers that later kernels read.
//!
//! A plan is built per input size and reused. Its dispatches form three segments so validation
//! can teacher-force a stage: [transform, body, FPN], [RPN head … proposals], [RoIAlign … dets].

use std::collections::HashMap;

use super::backbone::{BackboneArch, BackboneBuilder, FPN_NAMES};
use super::graph::{Graph, Plan};
use super::heads::{BoxMlp, RpnHead};
use super::refine::{RefineDebug, RefineHead, RefineInput, RefineInputs, RefineStage};
use super::weights::WeightStore;
use super::ImageF32;
use crate::error::{Error, Result};
use crate::gpu::{Buffer, Dispatch, Gpu, Nhwc, Tensor};
use crate::ops::box_head::{BoxBuffers, BoxPostprocess, GatherRows};
use crate::ops::nms::{Nms, NmsIo, NmsScratch};
use crate::ops::roi_align::MultiScaleRoiAlign;
use crate::ops::rpn::{RpnBuffers, RpnProposals};
use crate::ops::transform::{self, TransformSizes};

/// Largest number of box-head candidates (proposal × class pairs above the score threshold) the
/// class-aware NMS takes; its IoU bitmask grows with the square. More candidates is an error,
/// never a silent truncation.
pub const MAX_BOX_CANDIDATES: usize = 16384;

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

struct SizePlan {
    sizes: TransformSizes,
    image: Tensor,
    x: Tensor,
    backbone: Plan,
    rpn_head: Plan,
    rpn_bufs: RpnBuffers,
    _rpn_scratch: NmsScratch,
    proposals: Buffer,
    proposal_scores: Buffer,
    proposal_count: Buffer,
    rois: Tensor,
    mlp: Plan,
    post: BoxPostprocess,
    post_bufs: BoxBuffers,
    _det_scratch: NmsScratch,
    det_nms_capacity: usize,
    /// Bytes of every head buffer and NMS scratch this plan allocated (for memory reports).
    head_bytes: u64,
    /// Staging for the one read-back per image (counts + detection rows), reused.
    readback: Buffer,
    dets: Buffer,
    det_count: Buffer,
    front: Segment,
    middle: Segment,
    back: Segment,
    /// The refinement head's stage and its dispatches (gather first), when the weights have one.
    refine: Option<(RefineStage, Segment)>,
}

/// One recorded dispatch, tagged with its stage (one of [`STAGES`]) when it was recorded, and
/// its FLOPs (convolutions and linear layers; 0 for everything else).
#[derive(Clone)]
pub struct Staged {
    pub stage: &'static str,
    pub dispatch: Dispatch,
    pub flops: f64,
}

/// A run of dispatches submitted together.
#[derive(Clone, Default)]
struct Segment(Vec<Staged>);

impl Segment {
    fn push(&mut self, stage: &'static str, dispatch: Dispatch) {
        debug_assert!(STAGES.contains(&stage), "unknown stage {stage}");
        self.0.push(Staged {
            stage,
            dispatch,
            flops: 0.0,
        });
    }

    fn extend(&mut self, stage: &'static str, dispatches: impl IntoIterator<Item = Dispatch>) {
        for d in dispatches {
            self.push(stage, d);
        }
    }

    /// A graph plan's dispatches with their FLOPs; `stage_of_node(i)` tags node i.
    fn extend_plan(&mut self, plan: &Plan, stage_of_node: impl Fn(usize) -> &'static str) {
        for (i, op) in plan.ops.iter().enumerate() {
            self.0.push(Staged {
                stage: stage_of_node(i),
                dispatch: op.dispatch.clone(),
                flops: op.flops,
            });
        }
    }

    fn dispatches(&self) -> impl Iterator<Item = &Dispatch> {
        self.0.iter().map(|s| &s.dispatch)
    }
}

pub struct Detector<'g> {
    pub gpu: &'g Gpu,
    pub arch: BackboneArch,
    pub weights: WeightStore,
    pub num_classes: usize,
    backbone: Graph,
    rpn_head: Graph,
    mlp: Graph,
    /// Nodes of `backbone` that are the ResNet body (the rest are FPN): the stage tag.
    body_nodes: usize,
    box_mlp: BoxMlp,
    refine_head: Option<RefineHead>,
    /// Whether [`Detector::detect`] runs the refinement head (when the weights carry one).
    refine_enabled: bool,
    plans: HashMap<(usize, usize), SizePlan>,
    /// Plan keys, least recently used first.
    plan_use: Vec<(usize, usize)>,
}

/// Size plans kept at once; older ones are dropped (and rebuilt if that size comes back).
pub const MAX_PLANS: usize = 3;

impl<'g> Detector<'g> {
    pub fn new(gpu: &'g Gpu, weights: WeightStore) -> Result<Self> {
        weights.check_known_prefixes()?;
        let (arch, backbone, body_nodes, rpn_head, box_mlp, mlp) = {
            let b = BackboneBuilder::new(gpu, &weights)?;
            let f = b.arch.fpn_channels;
            let mut g = Graph::default();
            let x = g.input("transform.image");
            let c = b.body(&mut g, x)?;
            let body_nodes = g.nodes.len();
            let p = b.fpn(&mut g, c)?;
            for (name, v) in FPN_NAMES.iter().zip(p) {
                g.output(name, v);
            }
            let head = RpnHead::load(gpu, &weights, f)?;
            let mut hg = Graph::default();
            let levels: Vec<usize> = FPN_NAMES.iter().map(|n| hg.input(n)).collect();
            for (l, (o, d)) in head.add(&mut hg, &levels).into_iter().enumerate() {
                hg.output(&format!("rpn.objectness.{l}"), o);
                hg.output(&format!("rpn.deltas.{l}"), d);
            }
            let box_mlp = BoxMlp::load(gpu, &weights, f, 7)?;
            let mut mg = Graph::default();
            let rois = mg.input("rois");
            let (l, d, x7) = box_mlp.add(&mut mg, rois);
            mg.output("box.logits", l);
            mg.output("box.deltas", d);
            mg.output("box.features", x7);
            (b.arch.clone(), g, body_nodes, hg, box_mlp, mg)
        };
        // Every backbone / RPN / box-head tensor must have been consumed by some layer.
        for prefix in ["backbone.", "rpn.", "roi_heads."] {
            weights.check_all_used(prefix)?;
        }
        let num_classes = box_mlp.num_classes;
        let refine_head = RefineHead::load(
            gpu,
            &weights,
            arch.fpn_channels,
            box_mlp.representation,
            num_classes,
        )?;
        prepare_pipelines(gpu, [&backbone, &rpn_head, &mlp])?;
        Ok(Detector {
            gpu,
            arch,
            weights,
            num_classes,
            backbone,
            rpn_head,
            mlp,
            body_nodes,
            box_mlp,
            refine_enabled: refine_head.is_some(),
            refine_head,
            plans: HashMap::new(),
            plan_use: Vec::new(),
        })
    }

    /// The refinement head the weights carry, if any.
    pub fn refine_head(&self) -> Option<&RefineHead> {
        self.refine_head.as_ref()
    }

    /// Runs the refinement head (`true`, the default when the weights have one) or returns the
    /// plain detector's output (`false`: `marrow detect --no-refine`). No effect without a head.
    pub fn set_refine(&mut self, on: bool) {
        self.refine_enabled = on && self.refine_head.is_some();
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
        let key = (h, w);
        self.plan_use.retain(|k| *k != key);
        self.plan_use.push(key);
        if !self.plans.contains_key(&key) {
            // A folder of fields of many sizes must not accumulate a plan (hundreds of MiB at
            // 800×1088) per size: keep the most recently used few.
            while self.plans.len() >= MAX_PLANS {
                let Some(i) = self
                    .plan_use
                    .iter()
                    .position(|k| self.plans.contains_key(k))
                else {
                    break;
                };
                let oldest = self.plan_use.remove(i);
                self.plans.remove(&oldest);
            }
            match self.build_plan(h, w) {
                Ok(p) => {
                    self.plans.insert(key, p);
                }
                Err(e) => {
                    self.plan_use.retain(|k| *k != key);
                    return Err(e);
                }
            }
        }
        Ok(&self.plans[&key])
    }

    /// Number of size plans currently held (at most [`MAX_PLANS`]).
    pub fn plans_held(&self) -> usize {
        self.plans.len()
    }

    fn build_plan(&self, h: usize, w: usize) -> Result<SizePlan> {
        let gpu = self.gpu;
        let cfg = &self.weights.config;
        let sizes = TransformSizes::new(h, w, &cfg.transform)?;
        let f = self.arch.fpn_channels;
        let image = Tensor::new(gpu, "input image [3,H,W]", Nhwc::new(1, 3, h, w))?;
        let x = Tensor::new(
            gpu,
            "transform.image",
            Nhwc::new(1, sizes.padded.0, sizes.padded.1, 3),
        )?;
        let backbone = self
            .backbone
            .plan(gpu, "backbone", std::slice::from_ref(&x))?;
        let levels: Vec<Tensor> = FPN_NAMES
            .iter()
            .map(|n| backbone.output(n).expect("fpn output").clone())
            .collect();
        let rpn_head = self.rpn_head.plan(gpu, "rpn head", &levels)?;

        // RPN proposals: top-k, decode, filters, per-level NMS, gather.
        let rpn = RpnProposals {
            pre_nms_top_n: cfg.rpn.pre_nms_top_n as usize,
            min_size: cfg.rpn.min_size,
            score_thresh: cfg.rpn.score_thresh,
            ..Default::default()
        }
        .plan(
            &levels
                .iter()
                .map(|t| (t.shape.h, t.shape.w))
                .collect::<Vec<_>>(),
            sizes.padded,
            sizes.resized,
        )?;
        let rpn_bufs = rpn.buffers(gpu, "rpn")?;
        let post_n = cfg.rpn.post_nms_top_n as usize;
        let rpn_nms = Nms::new(rpn.kmax(), cfg.rpn.nms_thresh, post_n, true);
        let rpn_scratch = rpn_nms.scratch(gpu, "rpn nms")?;
        let rpn_keep = gpu.storage("rpn nms keep", post_n.min(rpn.kmax()) as u64 * 4)?;
        let rpn_keep_count = gpu.storage("rpn nms keep count", 4)?;
        let proposals = gpu.storage("rpn.proposals [K,4]", post_n as u64 * 16)?;
        let proposal_scores = gpu.storage("rpn.scores [K]", post_n as u64 * 4)?;
        let proposal_count = gpu.storage("rpn.proposals count", 4)?;

        // Box head.
        let roi = MultiScaleRoiAlign::box_head(post_n, f);
        let rois = Tensor::new(
            gpu,
            "roi features [1,1,K,7*7*C]",
            Nhwc::new(1, 1, post_n, 49 * f),
        )?;
        let mlp = self
            .mlp
            .plan(gpu, "box head", std::slice::from_ref(&rois))?;
        let post = BoxPostprocess {
            num_classes: self.num_classes,
            capacity: post_n,
            score_thresh: cfg.box_head.score_thresh,
            min_size: cfg.box_head.min_size,
            max_det: cfg.box_head.detections_per_img as usize,
        };
        let post_bufs = post.buffers(gpu)?;
        let det_nms_capacity = post.candidates().min(MAX_BOX_CANDIDATES);
        let det_nms = Nms::new(
            det_nms_capacity,
            cfg.box_head.nms_thresh,
            post.max_det,
            true,
        );
        let det_scratch = det_nms.scratch(gpu, "box nms")?;
        let det_keep = gpu.storage(
            "box nms keep",
            post.max_det.min(det_nms_capacity) as u64 * 4,
        )?;
        let det_keep_count = gpu.storage("box nms keep count", 4)?;
        let dets = gpu.storage("detections [max_det, 8]", post.max_det as u64 * 32)?;
        let det_count = gpu.storage("detections count", 4)?;
        let t = &rpn_bufs.topk;
        let head_bytes: u64 = [
            &t.keys,
            &t.hist,
            &t.state,
            &t.cand,
            &t.order,
            &rpn_bufs.raw_boxes,
            &rpn_bufs.raw_scores,
            &rpn_bufs.boxes,
            &rpn_bufs.scores,
            &rpn_bufs.levels,
            &rpn_bufs.count,
            &rpn_keep,
            &rpn_keep_count,
            &proposals,
            &proposal_scores,
            &proposal_count,
            &post_bufs.cls_scores,
            &post_bufs.cls_boxes,
            &post_bufs.cand_boxes,
            &post_bufs.cand_scores,
            &post_bufs.cand_labels,
            &post_bufs.cand_count,
            &det_keep,
            &det_keep_count,
            &dets,
            &det_count,
        ]
        .iter()
        .map(|b| b.size())
        .sum::<u64>()
            + rpn_nms.scratch_bytes()
            + det_nms.scratch_bytes()
            + image.shape.bytes()
            + x.shape.bytes();

        // Segment 1: transform + body + FPN (the transform dispatch is re-recorded per run
        // because it reads the image buffer, which is per plan anyway).
        let mut front = Segment::default();
        front.push(
            "transform",
            transform::encode(gpu, &cfg.transform, &sizes, &image.buf, &x)?,
        );
        let body_nodes = self.body_nodes;
        front.extend_plan(&backbone, |i| if i < body_nodes { "body" } else { "fpn" });
        // Segment 2: RPN.
        let mut middle = Segment::default();
        middle.extend_plan(&rpn_head, |_| "rpn head");
        let obj: Vec<&Tensor> = (0..5)
            .map(|l| {
                rpn_head
                    .output(&format!("rpn.objectness.{l}"))
                    .expect("head output")
            })
            .collect();
        let del: Vec<&Tensor> = (0..5)
            .map(|l| {
                rpn_head
                    .output(&format!("rpn.deltas.{l}"))
                    .expect("head output")
            })
            .collect();
        middle.extend(
            "rpn proposals",
            rpn.encode(gpu, "rpn", &obj, &del, &rpn_bufs)?,
        );
        middle.extend(
            "rpn nms",
            rpn_nms.encode(
                gpu,
                "rpn nms",
                &NmsIo {
                    boxes: &rpn_bufs.boxes,
                    scores: &rpn_bufs.scores,
                    ids: Some(&rpn_bufs.levels),
                    count: &rpn_bufs.count,
                    count_index: 0,
                    keep: &rpn_keep,
                    keep_count: &rpn_keep_count,
                    keep_count_index: 0,
                },
                &rpn_scratch,
            )?,
        );
        middle.push(
            "rpn proposals",
            GatherRows { max_rows: post_n }.encode(
                gpu,
                "rpn proposals gather",
                &rpn_bufs.boxes,
                &rpn_bufs.scores,
                &rpn_keep,
                &rpn_keep_count,
                &proposals,
                &proposal_scores,
                &proposal_count,
            )?,
        );
        // Segment 3: box head.
        let lv: [&Tensor; 4] = [&levels[0], &levels[1], &levels[2], &levels[3]];
        let mut back = Segment::default();
        back.push(
            "roi align",
            roi.encode(
                gpu,
                "roi align",
                lv,
                sizes.resized,
                0,
                &proposals,
                &proposal_count,
                &rois.buf,
            )?,
        );
        back.extend_plan(&mlp, |_| "box mlp");
        let logits = mlp.output("box.logits").expect("mlp output");
        let deltas = mlp.output("box.deltas").expect("mlp output");
        back.extend(
            "box postprocess",
            post.encode_candidates(
                gpu,
                &logits.buf,
                &deltas.buf,
                &proposals,
                &proposal_count,
                sizes.resized,
                &post_bufs,
            )?,
        );
        back.extend(
            "box nms",
            det_nms.encode(
                gpu,
                "box nms",
                &NmsIo {
                    boxes: &post_bufs.cand_boxes,
                    scores: &post_bufs.cand_scores,
                    ids: Some(&post_bufs.cand_labels),
                    count: &post_bufs.cand_count,
                    count_index: 0,
                    keep: &det_keep,
                    keep_count: &det_keep_count,
                    keep_count_index: 0,
                },
                &det_scratch,
            )?,
        );
        back.push(
            "finalize",
            post.encode_finalize(
                gpu,
                post_bufs.candidates(),
                &det_keep,
                &det_keep_count,
                sizes.resized,
                sizes.orig,
                &dets,
                &det_count,
            )?,
        );
        let refine = match &self.refine_head {
            None => None,
            Some(head) => {
                let features = mlp.output("box.features").expect("mlp output");
                let stage = RefineStage::new(
                    gpu,
                    head,
                    &RefineInputs {
                        levels: lv,
                        resized: sizes.resized,
                        orig: sizes.orig,
                        features: &features.buf,
                    },
                    post.max_det,
                    cfg.box_head.min_size,
                )?;
                let mut list = Segment::default();
                list.push(
                    "refine",
                    stage.gather(
                        gpu,
                        &det_keep,
                        &det_keep_count,
                        post_bufs.candidates(),
                        &post_bufs.cand_rows,
                    )?,
                );
                list.0.extend(stage.dispatches.iter().map(|(d, f)| Staged {
                    stage: "refine",
                    dispatch: d.clone(),
                    flops: *f,
                }));
                Some((stage, list))
            }
        };
        Ok(SizePlan {
            sizes,
            image,
            x,
            backbone,
            rpn_head,
            rpn_bufs,
            _rpn_scratch: rpn_scratch,
            proposals,
            proposal_scores,
            proposal_count,
            rois,
            mlp,
            post,
            post_bufs,
            _det_scratch: det_scratch,
            det_nms_capacity,
            head_bytes,
            // Counts, rows and (with a refinement head) its count and per-detection state.
            readback: gpu.staging(
                "detections read-back staging",
                24 + post.max_det as u64 * 40,
            ),
            dets,
            det_count,
            front,
            middle,
            back,
            refine,
        })
    }

    /// Detects on one image: one submission, one read-back.
    pub fn detect(&mut self, image: &ImageF32) -> Result<Detections> {
        let gpu = self.gpu;
        let refine = self.refine_enabled;
        let p = self.upload(image)?;
        gpu.run(
            "detect",
            p.front
                .dispatches()
                .chain(p.middle.dispatches())
                .chain(p.back.dispatches())
                .chain(refine_list(p, refine)),
        )?;
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
            .write_buffer(&p.image.buf, 0, bytemuck::cast_slice(&image.data));
        Ok(p)
    }

    /// Like [`Detector::detect`], also reading back every intermediate stage (validation).
    pub fn detect_debug(&mut self, image: &ImageF32) -> Result<(Detections, DebugStages)> {
        let gpu = self.gpu;
        let num_classes = self.num_classes;
        let refine = self.refine_enabled;
        let p = self.upload(image)?;
        gpu.run(
            "detect (debug)",
            p.front
                .dispatches()
                .chain(p.middle.dispatches())
                .chain(p.back.dispatches())
                .chain(refine_list(p, refine)),
        )?;
        let mut st = DebugStages {
            tensors: vec![("transform.image".into(), p.x.shape, p.x.read(gpu)?)],
            ..Default::default()
        };
        for n in FPN_NAMES {
            let t = p.backbone.output(n).expect("fpn output");
            st.tensors.push((n.to_string(), t.shape, t.read(gpu)?));
        }
        read_middle(gpu, p, &mut st)?;
        read_back(gpu, p, &mut st, num_classes)?;
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
        gpu.run("rpn (teacher-forced)", p.middle.dispatches())?;
        let mut st = DebugStages::default();
        read_middle(gpu, p, &mut st)?;
        if let Some(props) = proposals {
            let cap = p.post.capacity;
            if props.len() > cap {
                return Err(Error::shape(
                    "teacher forcing",
                    format!("{} proposals > capacity {cap}", props.len()),
                ));
            }
            if !props.is_empty() {
                gpu.queue
                    .write_buffer(&p.proposals, 0, bytemuck::cast_slice(props));
            }
            gpu.queue.write_buffer(
                &p.proposal_count,
                0,
                bytemuck::bytes_of(&(props.len() as u32)),
            );
        }
        gpu.run(
            "box head (teacher-forced)",
            p.back.dispatches().chain(refine_list(p, refine)),
        )?;
        read_back(gpu, p, &mut st, num_classes)?;
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
        let Some(head) = self.refine_head.as_ref() else {
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
        let (stage, list) = p.refine.as_ref().expect("a head has a stage");
        stage.write_input(gpu, inputs)?;
        let fb = &p.mlp.output("box.features").expect("mlp output").buf;
        if !features.is_empty() {
            gpu.queue
                .write_buffer(fb, 0, bytemuck::cast_slice(features));
        }
        // Skip the gather (the first dispatch): the input rows were written above.
        gpu.run("refine (teacher-forced)", list.dispatches().skip(1))?;
        let dbg = stage.read_debug(gpu)?;
        let dets = stage.read_detections(gpu)?;
        Ok((
            Detections {
                sizes: p.sizes,
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

    /// Bytes of every GPU buffer a plan of this size allocated: activations (after lifetime
    /// reuse), RoI features, the image and transformed image, head buffers and NMS scratch, and
    /// the refinement stage's buffers when the weights have a head.
    /// Weights are not included. Allocated-buffer accounting, not a driver measurement.
    pub fn plan_bytes(&mut self, h: usize, w: usize) -> Result<u64> {
        let p = self.plan(h, w)?;
        Ok(p.backbone.activation_bytes
            + p.rpn_head.activation_bytes
            + p.mlp.activation_bytes
            + p.rois.shape.bytes()
            + p.head_bytes
            + p.refine.as_ref().map_or(0, |(stage, _)| stage.bytes))
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
        let tail = p
            .refine
            .iter()
            .filter(|_| refine)
            .flat_map(|(_, l)| l.0.iter());
        Ok(p.front
            .0
            .iter()
            .chain(&p.middle.0)
            .chain(&p.back.0)
            .chain(tail)
            .map(|s| (s.stage, &s.dispatch, s.flops))
            .collect())
    }

    pub fn box_mlp(&self) -> &BoxMlp {
        &self.box_mlp
    }
}

/// The stages [`Detector::timed_stages`] reports, in run order.
pub const STAGES: [&str; 12] = [
    "transform",
    "body",
    "fpn",
    "rpn head",
    "rpn proposals",
    "rpn nms",
    "roi align",
    "box mlp",
    "box postprocess",
    "box nms",
    "finalize",
    "refine",
];

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
    for (n, (s, d)) in FPN_NAMES.iter().zip(fpn) {
        let t = p.backbone.output(n).expect("fpn output");
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

/// The refinement dispatches to run after the box head (none when off or absent).
fn refine_list(p: &SizePlan, on: bool) -> impl Iterator<Item = &Dispatch> {
    p.refine
        .iter()
        .filter(move |_| on)
        .flat_map(|(_, list)| list.dispatches())
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
    let (Some((stage, _)), true) = (&p.refine, on) else {
        return Ok(());
    };
    st.refine = Some(stage.read_debug(gpu)?);
    st.plain = Some(finish(gpu, p, false)?.detections);
    Ok(())
}

fn u32s(b: &[u8]) -> Vec<u32> {
    bytemuck::pod_collect_to_vec(b)
}

fn f32s(b: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(b)
}

fn read_middle(gpu: &Gpu, p: &SizePlan, st: &mut DebugStages) -> Result<()> {
    st.anchors = (0..5)
        .filter_map(|l| p.rpn_head.output(&format!("rpn.objectness.{l}")))
        .map(|t| t.shape.len())
        .sum();
    let c = gpu.read_back_many(&[(&p.proposal_count, 4), (&p.rpn_bufs.count, 4)])?;
    let n = u32s(&c[0])[0] as usize;
    st.rpn_candidates = u32s(&c[1])[0] as usize;
    let r = gpu.read_back_many(&[
        (&p.proposals, n as u64 * 16),
        (&p.proposal_scores, n as u64 * 4),
    ])?;
    let b = f32s(&r[0]);
    st.proposals = b
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect();
    st.proposal_scores = f32s(&r[1]);
    Ok(())
}

fn read_back(gpu: &Gpu, p: &SizePlan, st: &mut DebugStages, num_classes: usize) -> Result<()> {
    let c = gpu.read_back_many(&[(&p.proposal_count, 4), (&p.post_bufs.cand_count, 4)])?;
    let n = u32s(&c[0])[0] as usize;
    st.box_candidates = u32s(&c[1])[0] as usize;
    let logits = p.mlp.output("box.logits").expect("mlp output");
    let deltas = p.mlp.output("box.deltas").expect("mlp output");
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
    let refine = p.refine.as_ref().filter(|_| refined).map(|(s, _)| s);
    let (count, rows) = match refine {
        Some(st) => (&st.det_count, &st.dets),
        None => (&p.det_count, &p.dets),
    };
    let mut parts = vec![
        (count, 4),
        (&p.post_bufs.cand_count, 4),
        (rows, p.post.max_det as u64 * 32),
    ];
    if let Some(st) = refine {
        parts.push((&st.state.count.buf, 4));
        parts.push((&st.state.state.buf, st.kernels.cap as u64 * 8));
    }
    let r = gpu.read_back_via(&p.readback, &parts)?;
    let n = (u32s(&r[0])[0] as usize).min(p.post.max_det);
    let cands = u32s(&r[1])[0] as usize;
    if cands > p.det_nms_capacity {
        return Err(Error::TooLarge(format!(
            "{cands} box candidates above the score threshold exceed the class-aware NMS capacity of {} \
             (raise box_head.score_thresh in the model config)",
            p.det_nms_capacity
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
        sizes: p.sizes,
        detections,
        refine,
    })
}
