//! The detector's stages for one input size, each a struct that owns its GPU buffers, records
//! its dispatches once (tagged with their stage as they are recorded) and reports its bytes:
//!
//! - [`BackboneStage`]: transform → ResNet body → FPN ("transform", "body", "fpn");
//! - [`RpnStage`]: RPN head → top-k, decode, filters → per-level NMS → gather of the proposals
//!   ("rpn head", "rpn proposals", "rpn nms");
//! - [`BoxHeadStage`]: MultiScaleRoIAlign → box MLP → per-class decode and filters →
//!   class-aware NMS → top detections and rescale ("roi align", "box mlp", "box postprocess",
//!   "box nms", "finalize");
//! - [`RefineSegment`]: the refinement head's [`RefineStage`] (src/model/refine.rs) after the
//!   gather from the box head's NMS survivors ("refine").
//!
//! Each stage's `new` takes the previous stages it reads from, so the detector's `build_plan`
//! (src/model/detector.rs) is their composition. [`PlanCache`] keeps the per-size plans of both
//! the detector and the backbone-only [`super::Backbone`] (at most [`MAX_PLANS`] sizes).

use std::collections::HashMap;

use super::backbone::{BackboneArch, BackboneBuilder, FPN_NAMES};
use super::graph::{Graph, Plan};
use super::refine::{RefineHead, RefineInputs, RefineStage};
use super::weights::WeightStore;
use crate::error::Result;
use crate::gpu::{Buffer, Dispatch, Gpu, Nhwc, Tensor};
use crate::model::config::{BoxConfig, RpnConfig, TransformConfig};
use crate::ops::box_head::{BoxBuffers, BoxPostprocess, GatherRows};
use crate::ops::nms::{Nms, NmsIo, NmsScratch};
use crate::ops::roi_align::MultiScaleRoiAlign;
use crate::ops::rpn::{RpnBuffers, RpnProposals};
use crate::ops::transform::{self, TransformSizes};

/// Largest number of box-head candidates (proposal × class pairs above the score threshold) the
/// class-aware NMS takes; its IoU bitmask grows with the square. More candidates is an error,
/// never a silent truncation.
pub const MAX_BOX_CANDIDATES: usize = 16384;

/// Size plans kept at once; older ones are dropped (and rebuilt if that size comes back).
pub const MAX_PLANS: usize = 3;

/// The stages a dispatch can be tagged with ([`Staged::stage`]), in run order.
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

/// One recorded dispatch, tagged with its stage (one of [`STAGES`]) when it was recorded, and
/// its FLOPs (convolutions and linear layers; 0 for everything else).
#[derive(Clone)]
pub struct Staged {
    pub stage: &'static str,
    pub dispatch: Dispatch,
    pub flops: f64,
}

/// A stage's dispatches in run order, each tagged as it is recorded.
#[derive(Clone, Default)]
pub struct Segment(Vec<Staged>);

impl Segment {
    fn push_flops(&mut self, stage: &'static str, dispatch: Dispatch, flops: f64) {
        debug_assert!(STAGES.contains(&stage), "unknown stage {stage}");
        self.0.push(Staged {
            stage,
            dispatch,
            flops,
        });
    }

    fn push(&mut self, stage: &'static str, dispatch: Dispatch) {
        self.push_flops(stage, dispatch, 0.0);
    }

    fn extend(&mut self, stage: &'static str, dispatches: impl IntoIterator<Item = Dispatch>) {
        for d in dispatches {
            self.push(stage, d);
        }
    }

    /// A graph plan's dispatches with their FLOPs; `stage_of_node(i)` tags node i.
    fn extend_plan(&mut self, plan: &Plan, stage_of_node: impl Fn(usize) -> &'static str) {
        for (i, op) in plan.ops.iter().enumerate() {
            self.push_flops(stage_of_node(i), op.dispatch.clone(), op.flops);
        }
    }

    /// The tagged dispatches, in run order.
    pub fn staged(&self) -> &[Staged] {
        &self.0
    }

    pub fn dispatches(&self) -> impl Iterator<Item = &Dispatch> {
        self.0.iter().map(|s| &s.dispatch)
    }
}

/// The buffers a stage allocated, by label: its [`Ledger::total`] is the stage's `bytes()`.
/// Buffers the stage allocates itself go through [`Ledger::storage`] / [`Ledger::tensor`] /
/// [`Ledger::staging`]; those an op or the graph planner allocates for it are entered with
/// [`Ledger::buffer`] (a buffer it holds) or [`Ledger::bytes`] (a size the allocating code
/// reports: graph activations, NMS scratch, the transform's index tables). Weights and the
/// small per-dispatch params uniforms are not counted.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    entries: Vec<(String, u64)>,
}

impl Ledger {
    pub fn storage(&mut self, gpu: &Gpu, label: &str, bytes: u64) -> Result<Buffer> {
        let b = gpu.storage(label, bytes)?;
        self.buffer(label, &b);
        Ok(b)
    }

    pub fn tensor(&mut self, gpu: &Gpu, label: &str, shape: Nhwc) -> Result<Tensor> {
        let t = Tensor::new(gpu, label, shape)?;
        self.buffer(label, &t.buf);
        Ok(t)
    }

    pub fn staging(&mut self, gpu: &Gpu, label: &str, bytes: u64) -> Buffer {
        let b = gpu.staging(label, bytes);
        self.buffer(label, &b);
        b
    }

    pub fn buffer(&mut self, label: &str, b: &Buffer) {
        self.bytes(label, b.size());
    }

    pub fn bytes(&mut self, label: &str, bytes: u64) {
        self.entries.push((label.to_string(), bytes));
    }

    /// (label, bytes) of every entry, in allocation order.
    pub fn entries(&self) -> &[(String, u64)] {
        &self.entries
    }

    pub fn total(&self) -> u64 {
        self.entries.iter().map(|(_, b)| b).sum()
    }
}

/// Per-size plans, least recently used dropped beyond [`MAX_PLANS`]: a folder of fields of many
/// sizes must not accumulate a plan (hundreds of MiB at 800×1088) per size.
pub struct PlanCache<P> {
    plans: HashMap<(usize, usize), P>,
    /// Plan keys, least recently used first.
    use_order: Vec<(usize, usize)>,
}

impl<P> Default for PlanCache<P> {
    fn default() -> Self {
        PlanCache {
            plans: HashMap::new(),
            use_order: Vec::new(),
        }
    }
}

impl<P> PlanCache<P> {
    /// The plan for an `h`×`w` input, built with `build` when it is not held (after dropping the
    /// least recently used plan when [`MAX_PLANS`] are held). A failed build holds nothing.
    pub fn get(&mut self, h: usize, w: usize, build: impl FnOnce() -> Result<P>) -> Result<&mut P> {
        let key = (h, w);
        self.use_order.retain(|k| *k != key);
        self.use_order.push(key);
        if !self.plans.contains_key(&key) {
            while self.plans.len() >= MAX_PLANS {
                let Some(i) = self
                    .use_order
                    .iter()
                    .position(|k| self.plans.contains_key(k))
                else {
                    break;
                };
                let oldest = self.use_order.remove(i);
                self.plans.remove(&oldest);
            }
            match build() {
                Ok(p) => {
                    self.plans.insert(key, p);
                }
                Err(e) => {
                    self.use_order.retain(|k| *k != key);
                    return Err(e);
                }
            }
        }
        Ok(self.plans.get_mut(&key).expect("plan inserted"))
    }

    /// Number of plans held (at most [`MAX_PLANS`]).
    pub fn len(&self) -> usize {
        self.plans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }
}

/// The backbone network, size-independent: transform input → ResNet body → FPN as one graph,
/// with the node index where the body ends (the "body" / "fpn" stage tags).
pub struct BackboneNet {
    pub arch: BackboneArch,
    pub graph: Graph,
    /// Nodes of `graph` that are the ResNet body (the rest are FPN).
    pub body_nodes: usize,
}

impl BackboneNet {
    /// Builds the graph from the `backbone.*` tensors. Its outputs are the FPN levels
    /// ([`FPN_NAMES`]), preceded by `body.c2`..`body.c5` with `body_outputs` (validation reads
    /// them; they then stay allocated to the end of the plan instead of being reused).
    /// Unused `backbone.*` tensors are the caller's check (`WeightStore::check_all_used`).
    pub fn new(gpu: &Gpu, ws: &WeightStore, body_outputs: bool) -> Result<BackboneNet> {
        let b = BackboneBuilder::new(gpu, ws)?;
        let mut g = Graph::default();
        let x = g.input("transform.image");
        let c = b.body(&mut g, x)?;
        let body_nodes = g.nodes.len();
        if body_outputs {
            for (i, v) in c.iter().enumerate() {
                g.output(&format!("body.c{}", i + 2), *v);
            }
        }
        let p = b.fpn(&mut g, c)?;
        for (name, v) in FPN_NAMES.iter().zip(p) {
            g.output(name, v);
        }
        Ok(BackboneNet {
            arch: b.arch,
            graph: g,
            body_nodes,
        })
    }
}

/// Transform + body + FPN for one input size: the input image buffer, the transformed image,
/// the graph plan and their dispatches.
pub struct BackboneStage {
    pub sizes: TransformSizes,
    /// The input image, planar [3, H, W] (stored as NHWC [1, 3, H, W]).
    pub image: Tensor,
    /// `transform.image`, [1, Hp, Wp, 3].
    pub x: Tensor,
    pub plan: Plan,
    ledger: Ledger,
    segment: Segment,
}

impl BackboneStage {
    pub fn new(
        gpu: &Gpu,
        net: &BackboneNet,
        cfg: &TransformConfig,
        h: usize,
        w: usize,
    ) -> Result<BackboneStage> {
        let sizes = TransformSizes::new(h, w, cfg)?;
        let mut ledger = Ledger::default();
        let image = ledger.tensor(gpu, "input image [3,H,W]", Nhwc::new(1, 3, h, w))?;
        let x = ledger.tensor(
            gpu,
            "transform.image",
            Nhwc::new(1, sizes.padded.0, sizes.padded.1, 3),
        )?;
        let plan = net.graph.plan(gpu, "backbone", std::slice::from_ref(&x))?;
        ledger.bytes("backbone activations", plan.activation_bytes);
        let mut segment = Segment::default();
        segment.push(
            "transform",
            transform::encode(gpu, cfg, &sizes, &image.buf, &x)?,
        );
        ledger.bytes("transform index tables", transform::table_bytes(&sizes));
        let body_nodes = net.body_nodes;
        segment.extend_plan(&plan, |i| if i < body_nodes { "body" } else { "fpn" });
        Ok(BackboneStage {
            sizes,
            image,
            x,
            plan,
            ledger,
            segment,
        })
    }

    /// The FPN levels, in [`FPN_NAMES`] order.
    pub fn levels(&self) -> Vec<&Tensor> {
        FPN_NAMES
            .iter()
            .map(|n| self.plan.output(n).expect("fpn output"))
            .collect()
    }

    /// P2..P5, the levels RoIAlign pools from.
    pub fn roi_levels(&self) -> [&Tensor; 4] {
        let l = self.levels();
        [l[0], l[1], l[2], l[3]]
    }
}

/// RPN head + proposals for one input size: the head's graph plan, top-k / decode / filter
/// buffers, the per-level NMS and the gathered proposals.
pub struct RpnStage {
    pub head: Plan,
    pub bufs: RpnBuffers,
    _nms_scratch: NmsScratch,
    /// `rpn.proposals` [post_nms_top_n, 4] and `rpn.scores`, valid up to `proposal_count`.
    pub proposals: Buffer,
    pub proposal_scores: Buffer,
    pub proposal_count: Buffer,
    /// Rows the proposal buffers hold (post_nms_top_n).
    pub capacity: usize,
    ledger: Ledger,
    segment: Segment,
}

impl RpnStage {
    /// `head` is the RPN head graph (inputs: the FPN levels; outputs `rpn.objectness.{l}` and
    /// `rpn.deltas.{l}`).
    pub fn new(
        gpu: &Gpu,
        head: &Graph,
        cfg: &RpnConfig,
        backbone: &BackboneStage,
    ) -> Result<RpnStage> {
        let sizes = &backbone.sizes;
        let levels: Vec<Tensor> = backbone.levels().into_iter().cloned().collect();
        let mut ledger = Ledger::default();
        let plan = head.plan(gpu, "rpn head", &levels)?;
        ledger.bytes("rpn head activations", plan.activation_bytes);

        // Top-k, decode, filters, per-level NMS, gather.
        let rpn = RpnProposals {
            pre_nms_top_n: cfg.pre_nms_top_n as usize,
            min_size: cfg.min_size,
            score_thresh: cfg.score_thresh,
            anchor_sizes: cfg.anchor_sizes.clone(),
            aspect_ratios: cfg.aspect_ratios.clone(),
        }
        .plan(
            &levels
                .iter()
                .map(|t| (t.shape.h, t.shape.w))
                .collect::<Vec<_>>(),
            sizes.padded,
            sizes.resized,
        )?;
        let bufs = rpn.buffers(gpu, "rpn")?;
        for (label, b) in [
            ("rpn top-k keys", &bufs.topk.keys),
            ("rpn top-k histogram", &bufs.topk.hist),
            ("rpn top-k state", &bufs.topk.state),
            ("rpn top-k candidates", &bufs.topk.cand),
            ("rpn top-k order", &bufs.topk.order),
            ("rpn decoded boxes", &bufs.raw_boxes),
            ("rpn decoded scores", &bufs.raw_scores),
            ("rpn boxes", &bufs.boxes),
            ("rpn scores", &bufs.scores),
            ("rpn level ids", &bufs.levels),
            ("rpn count", &bufs.count),
        ] {
            ledger.buffer(label, b);
        }
        let post_n = cfg.post_nms_top_n as usize;
        let nms = Nms::new(rpn.kmax(), cfg.nms_thresh, post_n, true);
        let nms_scratch = nms.scratch(gpu, "rpn nms")?;
        ledger.bytes("rpn nms scratch", nms.scratch_bytes());
        let keep = ledger.storage(gpu, "rpn nms keep", post_n.min(rpn.kmax()) as u64 * 4)?;
        let keep_count = ledger.storage(gpu, "rpn nms keep count", 4)?;
        let proposals = ledger.storage(gpu, "rpn.proposals [K,4]", post_n as u64 * 16)?;
        let proposal_scores = ledger.storage(gpu, "rpn.scores [K]", post_n as u64 * 4)?;
        let proposal_count = ledger.storage(gpu, "rpn.proposals count", 4)?;

        let mut segment = Segment::default();
        segment.extend_plan(&plan, |_| "rpn head");
        let output = |name: String| plan.output(&name).expect("head output");
        let obj: Vec<&Tensor> = (0..5)
            .map(|l| output(format!("rpn.objectness.{l}")))
            .collect();
        let del: Vec<&Tensor> = (0..5).map(|l| output(format!("rpn.deltas.{l}"))).collect();
        segment.extend("rpn proposals", rpn.encode(gpu, "rpn", &obj, &del, &bufs)?);
        segment.extend(
            "rpn nms",
            nms.encode(
                gpu,
                "rpn nms",
                &NmsIo {
                    boxes: &bufs.boxes,
                    scores: &bufs.scores,
                    ids: Some(&bufs.levels),
                    count: &bufs.count,
                    count_index: 0,
                    keep: &keep,
                    keep_count: &keep_count,
                    keep_count_index: 0,
                },
                &nms_scratch,
            )?,
        );
        segment.push(
            "rpn proposals",
            GatherRows { max_rows: post_n }.encode(
                gpu,
                "rpn proposals gather",
                &bufs.boxes,
                &bufs.scores,
                &keep,
                &keep_count,
                &proposals,
                &proposal_scores,
                &proposal_count,
            )?,
        );
        Ok(RpnStage {
            head: plan,
            bufs,
            _nms_scratch: nms_scratch,
            proposals,
            proposal_scores,
            proposal_count,
            capacity: post_n,
            ledger,
            segment,
        })
    }

    /// Anchors over all levels (the RPN head's outputs per image).
    pub fn anchors(&self) -> usize {
        (0..5)
            .filter_map(|l| self.head.output(&format!("rpn.objectness.{l}")))
            .map(|t| t.shape.len())
            .sum()
    }
}

/// The box head for one input size: RoIAlign of the proposals, the box MLP's graph plan,
/// per-class decode and filters, the class-aware NMS, and the final detections (with the
/// staging buffer of the one read-back per image).
pub struct BoxHeadStage {
    /// RoI features [1, 1, K, 7·7·C].
    pub rois: Tensor,
    /// The box MLP (outputs `box.logits`, `box.deltas`, `box.features`).
    pub mlp: Plan,
    pub post: BoxPostprocess,
    pub post_bufs: BoxBuffers,
    _nms_scratch: NmsScratch,
    /// Candidates the class-aware NMS takes (more is an error at read-back).
    pub nms_capacity: usize,
    /// The NMS survivors (indices into the candidates) and their count.
    pub keep: Buffer,
    pub keep_count: Buffer,
    /// Detection rows [max_det, 8] in original-image coordinates, and their count.
    pub dets: Buffer,
    pub det_count: Buffer,
    /// Staging for the one read-back per image: counts, detection rows and (with a refinement
    /// head) its count and per-detection state.
    pub readback: Buffer,
    ledger: Ledger,
    segment: Segment,
}

impl BoxHeadStage {
    /// `mlp` is the box MLP graph (input `rois`); `num_classes` includes background and
    /// `channels` is the FPN width.
    pub fn new(
        gpu: &Gpu,
        mlp: &Graph,
        num_classes: usize,
        channels: usize,
        cfg: &BoxConfig,
        backbone: &BackboneStage,
        rpn: &RpnStage,
    ) -> Result<BoxHeadStage> {
        let sizes = &backbone.sizes;
        let post_n = rpn.capacity;
        let mut ledger = Ledger::default();
        let roi = MultiScaleRoiAlign::box_head(post_n, channels);
        let rois = ledger.tensor(
            gpu,
            "roi features [1,1,K,7*7*C]",
            Nhwc::new(1, 1, post_n, 49 * channels),
        )?;
        let plan = mlp.plan(gpu, "box head", std::slice::from_ref(&rois))?;
        ledger.bytes("box head activations", plan.activation_bytes);
        let post = BoxPostprocess {
            num_classes,
            capacity: post_n,
            score_thresh: cfg.score_thresh,
            min_size: cfg.min_size,
            max_det: cfg.detections_per_img as usize,
        };
        let post_bufs = post.buffers(gpu)?;
        for (label, b) in [
            ("box class scores", &post_bufs.cls_scores),
            ("box class boxes", &post_bufs.cls_boxes),
            ("box candidate boxes", &post_bufs.cand_boxes),
            ("box candidate scores", &post_bufs.cand_scores),
            ("box candidate labels", &post_bufs.cand_labels),
            ("box candidate rows", &post_bufs.cand_rows),
            ("box candidate count", &post_bufs.cand_count),
        ] {
            ledger.buffer(label, b);
        }
        let nms_capacity = post.candidates().min(MAX_BOX_CANDIDATES);
        let nms = Nms::new(nms_capacity, cfg.nms_thresh, post.max_det, true);
        let nms_scratch = nms.scratch(gpu, "box nms")?;
        ledger.bytes("box nms scratch", nms.scratch_bytes());
        let keep = ledger.storage(
            gpu,
            "box nms keep",
            post.max_det.min(nms_capacity) as u64 * 4,
        )?;
        let keep_count = ledger.storage(gpu, "box nms keep count", 4)?;
        let dets = ledger.storage(gpu, "detections [max_det, 8]", post.max_det as u64 * 32)?;
        let det_count = ledger.storage(gpu, "detections count", 4)?;

        let mut segment = Segment::default();
        segment.push(
            "roi align",
            roi.encode(
                gpu,
                "roi align",
                backbone.roi_levels(),
                sizes.resized,
                0,
                &rpn.proposals,
                &rpn.proposal_count,
                &rois.buf,
            )?,
        );
        segment.extend_plan(&plan, |_| "box mlp");
        let logits = plan.output("box.logits").expect("mlp output");
        let deltas = plan.output("box.deltas").expect("mlp output");
        segment.extend(
            "box postprocess",
            post.encode_candidates(
                gpu,
                &logits.buf,
                &deltas.buf,
                &rpn.proposals,
                &rpn.proposal_count,
                sizes.resized,
                &post_bufs,
            )?,
        );
        segment.extend(
            "box nms",
            nms.encode(
                gpu,
                "box nms",
                &NmsIo {
                    boxes: &post_bufs.cand_boxes,
                    scores: &post_bufs.cand_scores,
                    ids: Some(&post_bufs.cand_labels),
                    count: &post_bufs.cand_count,
                    count_index: 0,
                    keep: &keep,
                    keep_count: &keep_count,
                    keep_count_index: 0,
                },
                &nms_scratch,
            )?,
        );
        segment.push(
            "finalize",
            post.encode_finalize(
                gpu,
                post_bufs.candidates(),
                &keep,
                &keep_count,
                sizes.resized,
                sizes.orig,
                &dets,
                &det_count,
            )?,
        );
        let readback = ledger.staging(
            gpu,
            "detections read-back staging",
            24 + post.max_det as u64 * 40,
        );
        Ok(BoxHeadStage {
            rois,
            mlp: plan,
            post,
            post_bufs,
            _nms_scratch: nms_scratch,
            nms_capacity,
            keep,
            keep_count,
            dets,
            det_count,
            readback,
            ledger,
            segment,
        })
    }

    /// The box MLP output `name` (`box.logits`, `box.deltas` or `box.features`).
    pub fn output(&self, name: &str) -> &Tensor {
        self.mlp.output(name).expect("mlp output")
    }
}

/// The refinement head's stage for one input size ([`RefineStage`] owns its buffers and records
/// its steps) with its dispatch list: the gather of the box head's NMS survivors, then the
/// stage's own dispatches, all tagged "refine".
pub struct RefineSegment {
    pub stage: RefineStage,
    segment: Segment,
}

impl RefineSegment {
    pub fn new(
        gpu: &Gpu,
        head: &RefineHead,
        min_size: f32,
        backbone: &BackboneStage,
        boxes: &BoxHeadStage,
    ) -> Result<RefineSegment> {
        let stage = RefineStage::new(
            gpu,
            head,
            &RefineInputs {
                levels: backbone.roi_levels(),
                resized: backbone.sizes.resized,
                orig: backbone.sizes.orig,
                features: &boxes.output("box.features").buf,
            },
            boxes.post.max_det,
            min_size,
        )?;
        let mut segment = Segment::default();
        segment.push(
            "refine",
            stage.gather(
                gpu,
                &boxes.keep,
                &boxes.keep_count,
                boxes.post_bufs.candidates(),
                &boxes.post_bufs.cand_rows,
            )?,
        );
        for (d, f) in &stage.dispatches {
            segment.push_flops("refine", d.clone(), *f);
        }
        Ok(RefineSegment { stage, segment })
    }
}

/// What every stage of a plan reports: the buffers it allocated (by label) and the dispatches it
/// recorded, tagged with the stage. `build_plan` and `plan_bytes` go through this, so a new stage
/// is counted and run as soon as it implements it.
pub trait Stage {
    fn ledger(&self) -> &Ledger;
    fn segment(&self) -> &Segment;
    /// Bytes of every buffer the stage allocated.
    fn bytes(&self) -> u64 {
        self.ledger().total()
    }
}

/// The stages whose ledger and segment are their own fields.
macro_rules! stage_with_own_books {
    ($($t:ty),*) => {$(
        impl Stage for $t {
            fn ledger(&self) -> &Ledger {
                &self.ledger
            }
            fn segment(&self) -> &Segment {
                &self.segment
            }
        }
    )*};
}
stage_with_own_books!(BackboneStage, RpnStage, BoxHeadStage);

/// The refinement stage keeps its own ledger; the segment adds the detector's gather in front.
impl Stage for RefineSegment {
    fn ledger(&self) -> &Ledger {
        &self.stage.ledger
    }
    fn segment(&self) -> &Segment {
        &self.segment
    }
}
