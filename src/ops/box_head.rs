//! Box-head post-processing on the GPU (shaders/box_head.wgsl): per-class softmax + decode +
//! clip, ordered compaction of the candidates that pass the score and size filters, and the final
//! gather + rescale of the NMS survivors. The classifier MLP itself is GEMM work done by the conv
//! kernel as 1×1 convolutions ([`linear`]).

use crate::error::{Error, Result};
use crate::gpu::{ConstVal, Dispatch, Gpu, Kernel};
use crate::ops::contract::{params_struct, Binding, HostStruct, KernelIo, KernelVariant, Uniform};
use crate::ops::conv::{Conv2d, Residual};

const SOURCE: &str = include_str!("../../shaders/box_head.wgsl");

const fn kernel(name: &'static str, entry: &'static str) -> Kernel {
    Kernel {
        name,
        source: SOURCE,
        entry,
    }
}

pub const KERNEL_DECODE: KernelIo = KernelIo {
    kernel: kernel("box_head.decode_classes", "decode_classes"),
    params: Some(Params::LAYOUT),
    storage: &[
        Binding::read("logits"),
        Binding::read("deltas"),
        Binding::read("proposals"),
        Binding::read("proposal_count"),
        Binding::read_write("cls_scores"),
        Binding::read_write("cls_boxes"),
    ],
};
pub const KERNEL_COMPACT: KernelIo = KernelIo {
    kernel: kernel("box_head.compact", "compact"),
    params: None,
    storage: &[
        Binding::read("cls_scores"),
        Binding::read("cls_boxes"),
        Binding::read("proposal_count"),
        Binding::read_write("cand_boxes"),
        Binding::read_write("cand_scores"),
        Binding::read_write("cand_labels"),
        Binding::read_write("cand_rows"),
        Binding::read_write("cand_count"),
    ],
};
pub const KERNEL_GATHER: KernelIo = KernelIo {
    kernel: kernel("box_head.gather_rows", "gather_rows"),
    params: None,
    storage: &[
        Binding::read("src_boxes"),
        Binding::read("src_scores"),
        Binding::read("keep"),
        Binding::read("keep_count"),
        Binding::read_write("out_boxes"),
        Binding::read_write("out_scores"),
        Binding::read_write("out_count"),
    ],
};
pub const KERNEL_FINALIZE: KernelIo = KernelIo {
    kernel: kernel("box_head.finalize", "finalize"),
    params: Some(Params::LAYOUT),
    storage: &[
        Binding::read("cand_boxes"),
        Binding::read("cand_scores"),
        Binding::read("cand_labels"),
        Binding::read("keep"),
        Binding::read("keep_count"),
        Binding::read_write("dets"),
        Binding::read_write("det_count"),
    ],
};

/// The variants the box head compiles: decode, compact and finalize for the class counts of the
/// known models (COCO's 91, the paper's 8, the 4 of the TXL-PBC and fixture models, and the
/// smallest, 2) with torchvision's default thresholds and 100 detections, and the RPN's row
/// gather (1000 rows, the default `post_nms_top_n`).
pub fn variants() -> Vec<KernelVariant> {
    let mut out = Vec::new();
    for num_classes in [2, 4, 8, 91] {
        let op = BoxPostprocess {
            num_classes,
            capacity: 1000,
            score_thresh: 0.05,
            min_size: 1e-2,
            max_det: 100,
        };
        out.push(KernelVariant::new(KERNEL_DECODE, op.consts("decode")));
        out.push(KernelVariant::new(KERNEL_COMPACT, op.consts("compact")));
        out.push(KernelVariant::new(KERNEL_FINALIZE, op.consts("finalize")));
    }
    out.push(KernelVariant::new(
        KERNEL_GATHER,
        GatherRows { max_rows: 1000 }.consts(),
    ));
    out
}

/// A fully connected layer `y = x Wᵀ + b` as a 1×1 convolution over rows: x is [1, 1, rows, in].
pub fn linear(inputs: usize, outputs: usize, relu: bool) -> Conv2d {
    Conv2d {
        cin: inputs,
        cout: outputs,
        kh: 1,
        kw: 1,
        stride: 1,
        pad: 0,
        relu,
        residual: Residual::None,
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BoxPostprocess {
    /// Classes including background.
    pub num_classes: usize,
    /// Proposal rows the buffers are sized for.
    pub capacity: usize,
    pub score_thresh: f32,
    pub min_size: f32,
    pub max_det: usize,
}

/// Intermediate buffers, sized for `capacity` proposals.
pub struct BoxBuffers {
    pub cls_scores: wgpu::Buffer,
    pub cls_boxes: wgpu::Buffer,
    pub cand_boxes: wgpu::Buffer,
    pub cand_scores: wgpu::Buffer,
    pub cand_labels: wgpu::Buffer,
    /// The proposal row each candidate came from (the refinement head gathers its features).
    pub cand_rows: wgpu::Buffer,
    pub cand_count: wgpu::Buffer,
}

impl BoxBuffers {
    /// The candidate lists as the final gather reads them.
    pub fn candidates(&self) -> Candidates<'_> {
        Candidates {
            boxes: &self.cand_boxes,
            scores: &self.cand_scores,
            labels: &self.cand_labels,
        }
    }
}

/// Scored, labelled boxes in resized-image coordinates that an NMS keep list indexes: the box
/// head's candidates, or the refinement head's refined detections.
#[derive(Clone, Copy)]
pub struct Candidates<'a> {
    pub boxes: &'a wgpu::Buffer,
    pub scores: &'a wgpu::Buffer,
    pub labels: &'a wgpu::Buffer,
}

params_struct! {
    struct Params {
        capacity: u32,
        img_h: f32,
        img_w: f32,
        ratio_h: f32,
        ratio_w: f32,
        pad0: u32,
        pad1: u32,
        pad2: u32,
    }
}

impl BoxPostprocess {
    /// Candidate capacity: every (proposal, non-background class) pair.
    pub fn candidates(&self) -> usize {
        self.capacity * (self.num_classes - 1)
    }

    fn consts(&self, which: &str) -> Vec<(&'static str, ConstVal)> {
        vec![
            ("NUM_CLASSES", ConstVal::U32(self.num_classes as u32)),
            ("SCORE_THRESH", ConstVal::F32(self.score_thresh)),
            ("MIN_SIZE", ConstVal::F32(self.min_size)),
            ("MAX_DET", ConstVal::U32(self.max_det as u32)),
            ("DECODE", ConstVal::Bool(which == "decode")),
            ("COMPACT", ConstVal::Bool(which == "compact")),
            ("FINALIZE", ConstVal::Bool(which == "finalize")),
            ("GATHER", ConstVal::Bool(which == "gather")),
        ]
    }

    pub fn buffers(&self, gpu: &Gpu) -> Result<BoxBuffers> {
        if self.num_classes < 2 {
            return Err(Error::shape(
                "box_head",
                "need at least one class besides background",
            ));
        }
        let kc = (self.capacity * self.num_classes) as u64;
        let n = self.candidates() as u64;
        Ok(BoxBuffers {
            cls_scores: gpu.storage("box_head class scores [K,C]", kc * 4)?,
            cls_boxes: gpu.storage("box_head class boxes [K,C,4]", kc * 16)?,
            cand_boxes: gpu.storage("box_head candidate boxes", n * 16)?,
            cand_scores: gpu.storage("box_head candidate scores", n * 4)?,
            cand_labels: gpu.storage("box_head candidate labels", n * 4)?,
            cand_rows: gpu.storage("box_head candidate source rows", n * 4)?,
            cand_count: gpu.storage("box_head candidate count", 4)?,
        })
    }

    fn params(&self, gpu: &Gpu, resized: (usize, usize), orig: (usize, usize)) -> Uniform<Params> {
        Uniform::new(
            gpu,
            "box_head params",
            &Params {
                capacity: self.capacity as u32,
                img_h: resized.0 as f32,
                img_w: resized.1 as f32,
                // transform.resize_boxes: f32 ratio original / resized.
                ratio_h: orig.0 as f32 / resized.0 as f32,
                ratio_w: orig.1 as f32 / resized.1 as f32,
                pad0: 0,
                pad1: 0,
                pad2: 0,
            },
        )
    }

    /// logits [capacity, C], deltas [capacity, 4C], proposals [capacity, 4] with the live count in
    /// `proposal_count[0]` → ordered candidates in `bufs`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_candidates(
        &self,
        gpu: &Gpu,
        logits: &wgpu::Buffer,
        deltas: &wgpu::Buffer,
        proposals: &wgpu::Buffer,
        proposal_count: &wgpu::Buffer,
        resized: (usize, usize),
        bufs: &BoxBuffers,
    ) -> Result<Vec<Dispatch>> {
        let kc = (self.capacity * self.num_classes) as u64;
        if logits.size() < kc * 4
            || deltas.size() < kc * 16
            || proposals.size() < self.capacity as u64 * 16
        {
            return Err(Error::shape(
                "box_head",
                format!(
                    "logits/deltas/proposals buffers too small for {} proposals x {} classes",
                    self.capacity, self.num_classes
                ),
            ));
        }
        let params = self.params(gpu, resized, resized);
        let decode_consts = self.consts("decode");
        let compact_consts = self.consts("compact");
        let decode = KERNEL_DECODE.pipeline(gpu, &decode_consts)?;
        let compact = KERNEL_COMPACT.pipeline(gpu, &compact_consts)?;
        Ok(vec![
            KERNEL_DECODE.dispatch(
                gpu,
                "box_head.decode_classes",
                &decode,
                &decode_consts,
                &params,
                &[
                    ("logits", logits),
                    ("deltas", deltas),
                    ("proposals", proposals),
                    ("proposal_count", proposal_count),
                    ("cls_scores", &bufs.cls_scores),
                    ("cls_boxes", &bufs.cls_boxes),
                ],
                [
                    self.num_classes.div_ceil(64) as u32,
                    self.capacity.max(1) as u32,
                    1,
                ],
            )?,
            KERNEL_COMPACT.dispatch_without_params(
                gpu,
                "box_head.compact",
                &compact,
                &compact_consts,
                &[
                    ("cls_scores", &bufs.cls_scores),
                    ("cls_boxes", &bufs.cls_boxes),
                    ("proposal_count", proposal_count),
                    ("cand_boxes", &bufs.cand_boxes),
                    ("cand_scores", &bufs.cand_scores),
                    ("cand_labels", &bufs.cand_labels),
                    ("cand_rows", &bufs.cand_rows),
                    ("cand_count", &bufs.cand_count),
                ],
                [1, 1, 1],
            )?,
        ])
    }

    /// NMS survivors `keep` (indices into the candidates, score order, count in `keep_count[0]`)
    /// → `dets` rows of 8 f32 (x1, y1, x2, y2, score, label, 0, 0) in original-image coordinates,
    /// at most `max_det`, and the count in `det_count[0]`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_finalize(
        &self,
        gpu: &Gpu,
        cand: Candidates<'_>,
        keep: &wgpu::Buffer,
        keep_count: &wgpu::Buffer,
        resized: (usize, usize),
        orig: (usize, usize),
        dets: &wgpu::Buffer,
        det_count: &wgpu::Buffer,
    ) -> Result<Dispatch> {
        if dets.size() < self.max_det as u64 * 32 {
            return Err(Error::shape(
                "box_head",
                "detections buffer smaller than max_det rows",
            ));
        }
        let params = self.params(gpu, resized, orig);
        let consts = self.consts("finalize");
        let fin = KERNEL_FINALIZE.pipeline(gpu, &consts)?;
        KERNEL_FINALIZE.dispatch(
            gpu,
            "box_head.finalize",
            &fin,
            &consts,
            &params,
            &[
                ("cand_boxes", cand.boxes),
                ("cand_scores", cand.scores),
                ("cand_labels", cand.labels),
                ("keep", keep),
                ("keep_count", keep_count),
                ("dets", dets),
                ("det_count", det_count),
            ],
            [self.max_det.div_ceil(64).max(1) as u32, 1, 1],
        )
    }
}

/// `out[i] = src[keep[i]]` for boxes ([N,4] f32) and scores, for i < min(keep_count, max_rows);
/// writes that count to `out_count[0]`. Used to turn the RPN's NMS keep list into proposals.
pub struct GatherRows {
    pub max_rows: usize,
}

impl GatherRows {
    fn consts(&self) -> Vec<(&'static str, ConstVal)> {
        vec![
            ("NUM_CLASSES", ConstVal::U32(2)),
            ("SCORE_THRESH", ConstVal::F32(0.0)),
            ("MIN_SIZE", ConstVal::F32(0.0)),
            ("MAX_DET", ConstVal::U32(self.max_rows as u32)),
            ("DECODE", ConstVal::Bool(false)),
            ("COMPACT", ConstVal::Bool(false)),
            ("FINALIZE", ConstVal::Bool(false)),
            ("GATHER", ConstVal::Bool(true)),
        ]
    }

    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        gpu: &Gpu,
        label: &str,
        src_boxes: &wgpu::Buffer,
        src_scores: &wgpu::Buffer,
        keep: &wgpu::Buffer,
        keep_count: &wgpu::Buffer,
        out_boxes: &wgpu::Buffer,
        out_scores: &wgpu::Buffer,
        out_count: &wgpu::Buffer,
    ) -> Result<Dispatch> {
        if out_boxes.size() < self.max_rows as u64 * 16
            || out_scores.size() < self.max_rows as u64 * 4
        {
            return Err(Error::shape(
                label,
                "gather output buffers smaller than max_rows",
            ));
        }
        let consts = self.consts();
        let pipeline = KERNEL_GATHER.pipeline(gpu, &consts)?;
        KERNEL_GATHER.dispatch_without_params(
            gpu,
            label,
            &pipeline,
            &consts,
            &[
                ("src_boxes", src_boxes),
                ("src_scores", src_scores),
                ("keep", keep),
                ("keep_count", keep_count),
                ("out_boxes", out_boxes),
                ("out_scores", out_scores),
                ("out_count", out_count),
            ],
            [self.max_rows.div_ceil(64).max(1) as u32, 1, 1],
        )
    }
}
