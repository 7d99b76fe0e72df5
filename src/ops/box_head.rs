//! Box-head post-processing on the GPU (shaders/box_head.wgsl): per-class softmax + decode +
//! clip, ordered compaction of the candidates that pass the score and size filters, and the final
//! gather + rescale of the NMS survivors. The classifier MLP itself is GEMM work done by the conv
//! kernel as 1×1 convolutions ([`linear`]).

use crate::error::{Error, Result};
use crate::gpu::{ConstVal, Dispatch, Gpu, Kernel};
use crate::ops::conv::{Conv2d, Residual};

pub const KERNEL_DECODE: Kernel = Kernel {
    name: "box_head.decode_classes",
    source: include_str!("../../shaders/box_head.wgsl"),
    entry: "decode_classes",
};
pub const KERNEL_COMPACT: Kernel = Kernel {
    name: "box_head.compact",
    source: include_str!("../../shaders/box_head.wgsl"),
    entry: "compact",
};
pub const KERNEL_GATHER: Kernel = Kernel {
    name: "box_head.gather_rows",
    source: include_str!("../../shaders/box_head.wgsl"),
    entry: "gather_rows",
};
pub const KERNEL_FINALIZE: Kernel = Kernel {
    name: "box_head.finalize",
    source: include_str!("../../shaders/box_head.wgsl"),
    entry: "finalize",
};

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
    pub cand_count: wgpu::Buffer,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    capacity: u32,
    img_h: f32,
    img_w: f32,
    ratio_h: f32,
    ratio_w: f32,
    pad: [u32; 3],
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
            cand_count: gpu.storage("box_head candidate count", 4)?,
        })
    }

    fn params(&self, gpu: &Gpu, resized: (usize, usize), orig: (usize, usize)) -> wgpu::Buffer {
        gpu.uniform(
            "box_head params",
            &Params {
                capacity: self.capacity as u32,
                img_h: resized.0 as f32,
                img_w: resized.1 as f32,
                // transform.resize_boxes: f32 ratio original / resized.
                ratio_h: orig.0 as f32 / resized.0 as f32,
                ratio_w: orig.1 as f32 / resized.1 as f32,
                pad: [0; 3],
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
        let decode = gpu.pipeline(&KERNEL_DECODE, &self.consts("decode"))?;
        let compact = gpu.pipeline(&KERNEL_COMPACT, &self.consts("compact"))?;
        Ok(vec![
            gpu.dispatch(
                "box_head.decode_classes",
                &decode,
                Some(&params),
                &[
                    logits,
                    deltas,
                    proposals,
                    proposal_count,
                    &bufs.cls_scores,
                    &bufs.cls_boxes,
                ],
                [
                    self.num_classes.div_ceil(64) as u32,
                    self.capacity.max(1) as u32,
                    1,
                ],
            )?,
            gpu.dispatch(
                "box_head.compact",
                &compact,
                None,
                &[
                    &bufs.cls_scores,
                    &bufs.cls_boxes,
                    proposal_count,
                    &bufs.cand_boxes,
                    &bufs.cand_scores,
                    &bufs.cand_labels,
                    &bufs.cand_count,
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
        bufs: &BoxBuffers,
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
        let fin = gpu.pipeline(&KERNEL_FINALIZE, &self.consts("finalize"))?;
        gpu.dispatch(
            "box_head.finalize",
            &fin,
            Some(&params),
            &[
                &bufs.cand_boxes,
                &bufs.cand_scores,
                &bufs.cand_labels,
                keep,
                keep_count,
                dets,
                det_count,
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
        let consts = [
            ("NUM_CLASSES", ConstVal::U32(2)),
            ("SCORE_THRESH", ConstVal::F32(0.0)),
            ("MIN_SIZE", ConstVal::F32(0.0)),
            ("MAX_DET", ConstVal::U32(self.max_rows as u32)),
            ("DECODE", ConstVal::Bool(false)),
            ("COMPACT", ConstVal::Bool(false)),
            ("FINALIZE", ConstVal::Bool(false)),
            ("GATHER", ConstVal::Bool(true)),
        ];
        let pipeline = gpu.pipeline(&KERNEL_GATHER, &consts)?;
        gpu.dispatch(
            label,
            &pipeline,
            None,
            &[
                src_boxes, src_scores, keep, keep_count, out_boxes, out_scores, out_count,
            ],
            [self.max_rows.div_ceil(64).max(1) as u32, 1, 1],
        )
    }
}
