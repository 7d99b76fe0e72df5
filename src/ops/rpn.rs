//! The RPN's post-head stages on the GPU, torchvision-exact where decisions are discrete
//! (docs/torchvision-semantics.md §5–§6): per-level top-k of the raw objectness logits
//! ([`crate::ops::topk`]), decode of the selected anchors, sigmoid, clip to the resized image,
//! `remove_small_boxes`, `score_thresh`, and an order-preserving compaction into fixed-capacity
//! outputs (boxes [Kmax,4], scores [Kmax], level ids [Kmax] u32, live count u32) — the
//! candidates that batched NMS consumes, in torchvision's order (level-major, logit-descending
//! within a level, ties by lower anchor index). Kernels: shaders/rpn.wgsl, shaders/topk.wgsl.
//!
//! Anchors are not materialised: the decode kernel computes each selected anchor from its index,
//! the level's integer strides and its rounded cell anchors (15 numbers from the host, exact f32),
//! which is bit-exact (all integers < 2^24), costs no buffer and no per-image-size upload.
//! [`RpnPlan::encode_anchors`] writes all anchors for validation and tests.

use crate::cpu::rpn as host;
use crate::error::{Error, Result};
use crate::gpu::{Buffer, ConstVal, Dispatch, Gpu, Kernel, Tensor};
use crate::ops::contract::{params_struct, Binding, HostStruct, KernelIo, KernelVariant, Uniform};
use crate::ops::pool::grid_1d;
use crate::ops::topk::{SegmentedTopK, TopKBuffers, MAX_SEGMENTS};

const SOURCE: &str = include_str!("../../shaders/rpn.wgsl");
/// Most anchors per location (cell anchors travel in the uniform).
pub const MAX_ANCHORS_PER_LOCATION: usize = 8;

const fn entry(
    entry: &'static str,
    params: crate::ops::contract::StructLayout,
    storage: &'static [Binding],
) -> KernelIo {
    KernelIo {
        kernel: Kernel {
            name: "rpn",
            source: SOURCE,
            entry,
        },
        params: Some(params),
        storage,
    }
}

/// Writes every anchor of one level (validation and tests).
pub const ANCHORS: KernelIo = entry(
    "rpn_anchors",
    LevelParams::LAYOUT,
    &[Binding::read_write("anchors")],
);
/// Decodes one level's top-k slots.
pub const DECODE: KernelIo = entry(
    "rpn_decode",
    LevelParams::LAYOUT,
    &[
        Binding::read("order"),
        Binding::read("objectness"),
        Binding::read("deltas"),
        Binding::read_write("raw_boxes"),
        Binding::read_write("raw_scores"),
    ],
);
/// Clip, filters and ordered compaction of all levels' candidates.
pub const FILTER: KernelIo = entry(
    "rpn_filter",
    FilterParams::LAYOUT,
    &[
        Binding::read("raw_boxes"),
        Binding::read("raw_scores"),
        Binding::read_write("boxes"),
        Binding::read_write("scores"),
        Binding::read_write("levels"),
        Binding::read_write("count"),
    ],
);

/// An entry point's consts: K_LEVEL (the level-params part), K_ANCHORS, K_DECODE, K_FILTER.
fn consts(io: &KernelIo) -> Vec<(&'static str, ConstVal)> {
    let flags = match io.kernel.entry {
        "rpn_anchors" => [true, true, false, false],
        "rpn_decode" => [true, false, true, false],
        _ => [false, false, false, true],
    };
    ["K_LEVEL", "K_ANCHORS", "K_DECODE", "K_FILTER"]
        .into_iter()
        .zip(flags)
        .map(|(n, f)| (n, ConstVal::Bool(f)))
        .collect()
}

/// Every variant the RPN compiles: one per entry point.
pub fn variants() -> Vec<KernelVariant> {
    [ANCHORS, DECODE, FILTER]
        .into_iter()
        .map(|io| KernelVariant::new(io, consts(&io)))
        .collect()
}

params_struct! {
    struct LevelParams {
        level: u32,
        anchor_offset: u32,
        n: u32,
        k: u32,
        out_offset: u32,
        gw: u32,
        stride_h: u32,
        stride_w: u32,
        a: u32,
        clip: f32,
        pad0: u32,
        pad1: u32,
        cell: [[f32; 4]; MAX_ANCHORS_PER_LOCATION],
    }
}

params_struct! {
    struct FilterParams {
        kmax: u32,
        n_levels: u32,
        img_h: f32,
        img_w: f32,
        min_size: f32,
        score_thresh: f32,
        pad0: u32,
        pad1: u32,
        lv: [[u32; 4]; MAX_SEGMENTS],
    }
}

/// The RPN's pre-NMS proposal stage (eval constants by default).
#[derive(Debug, Clone, PartialEq)]
pub struct RpnProposals {
    /// Per-level top-k (torchvision's `pre_nms_top_n` for testing: 1000).
    pub pre_nms_top_n: usize,
    /// `remove_small_boxes` threshold (1e-3), compared with `>=` in f32.
    pub min_size: f32,
    /// Score threshold (0.0), compared with `>=` on the sigmoid.
    pub score_thresh: f32,
    /// One anchor size per level (32, 64, 128, 256, 512).
    pub anchor_sizes: Vec<f32>,
    /// Aspect ratios h / w (0.5, 1, 2).
    pub aspect_ratios: Vec<f32>,
}

impl Default for RpnProposals {
    fn default() -> Self {
        RpnProposals {
            pre_nms_top_n: 1000,
            min_size: 1e-3,
            score_thresh: 0.0,
            anchor_sizes: host::DEFAULT_SIZES.to_vec(),
            aspect_ratios: host::DEFAULT_RATIOS.to_vec(),
        }
    }
}

/// One level of a plan: everything the kernels need, computed exactly on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct RpnLevel {
    /// Feature map (h, w).
    pub feat: (usize, usize),
    /// `padded // feat` per axis.
    pub stride: (usize, usize),
    /// h·w·A anchors, starting at `anchor_offset` in the concatenated order.
    pub n: usize,
    pub anchor_offset: usize,
    /// min(pre_nms_top_n, n) candidates, in slots `out_offset..out_offset + k`.
    pub k: usize,
    pub out_offset: usize,
    /// Rounded zero-centred base anchors, ratio order.
    pub cell: Vec<[f32; 4]>,
}

/// [`RpnProposals`] bound to one image geometry (padded and resized sizes, feature-map sizes).
#[derive(Debug, Clone, PartialEq)]
pub struct RpnPlan {
    pub op: RpnProposals,
    pub padded: (usize, usize),
    pub resized: (usize, usize),
    /// Anchors per location.
    pub a: usize,
    pub levels: Vec<RpnLevel>,
    pub topk: SegmentedTopK,
}

/// Scratch and outputs of one [`RpnPlan`]. Outputs: `boxes` [kmax,4] f32 (x1,y1,x2,y2, resized
/// image coordinates), `scores` [kmax] f32, `levels` [kmax] u32, `count` [1] u32 (live rows).
pub struct RpnBuffers {
    pub topk: TopKBuffers,
    /// Decoded (unclipped) boxes and sigmoid scores of every top-k slot, [kmax,4] / [kmax].
    pub raw_boxes: Buffer,
    pub raw_scores: Buffer,
    pub boxes: Buffer,
    pub scores: Buffer,
    pub levels: Buffer,
    pub count: Buffer,
}

impl RpnProposals {
    /// Plans for feature maps `feat` (h, w) per level, the padded batch size and the resized
    /// (unpadded) image size.
    pub fn plan(
        &self,
        feat: &[(usize, usize)],
        padded: (usize, usize),
        resized: (usize, usize),
    ) -> Result<RpnPlan> {
        let op = "rpn proposals";
        if feat.is_empty() || feat.len() > MAX_SEGMENTS || feat.len() != self.anchor_sizes.len() {
            return Err(Error::shape(
                op,
                format!(
                    "{} levels for {} anchor sizes (1..={MAX_SEGMENTS})",
                    feat.len(),
                    self.anchor_sizes.len()
                ),
            ));
        }
        let a = self.aspect_ratios.len();
        if a == 0 || a > MAX_ANCHORS_PER_LOCATION {
            return Err(Error::shape(
                op,
                format!("{a} aspect ratios (1..={MAX_ANCHORS_PER_LOCATION})"),
            ));
        }
        if let Some(&(h, w)) = feat
            .iter()
            .find(|&&(h, w)| h == 0 || w == 0 || h > padded.0 || w > padded.1)
        {
            return Err(Error::shape(
                op,
                format!("feature map {h}x{w} for padded image {padded:?}"),
            ));
        }
        if resized.0 == 0 || resized.1 == 0 || resized.0 > padded.0 || resized.1 > padded.1 {
            return Err(Error::shape(
                op,
                format!("resized size {resized:?} for padded size {padded:?}"),
            ));
        }
        // Anchor coordinates (shift + cell) must stay exact integers in f32 and in u32 shifts.
        if padded.0.max(padded.1) > 1 << 22 {
            return Err(Error::shape(
                op,
                format!("padded size {padded:?} too large"),
            ));
        }
        if !(self.min_size.is_finite() && self.score_thresh.is_finite()) {
            return Err(Error::shape(op, "min_size and score_thresh must be finite"));
        }
        let lens: Vec<usize> = feat.iter().map(|&(h, w)| h * w * a).collect();
        let topk = SegmentedTopK::new(&lens, self.pre_nms_top_n)?;
        let (offs, outs) = (topk.offsets(), topk.out_offsets());
        let strides = host::strides(padded, feat);
        let levels = (0..feat.len())
            .map(|l| RpnLevel {
                feat: feat[l],
                stride: strides[l],
                n: lens[l],
                anchor_offset: offs[l],
                k: topk.ks[l],
                out_offset: outs[l],
                cell: host::cell_anchors(self.anchor_sizes[l], &self.aspect_ratios),
            })
            .collect();
        Ok(RpnPlan {
            op: self.clone(),
            padded,
            resized,
            a,
            levels,
            topk,
        })
    }
}

impl RpnPlan {
    /// Σ_l min(pre_nms_top_n, n_l): the capacity of the outputs (≤ 5000 for the default model).
    pub fn kmax(&self) -> usize {
        self.topk.kmax()
    }

    /// Total anchors over all levels.
    pub fn anchors(&self) -> usize {
        self.topk.total()
    }

    pub fn buffers(&self, gpu: &Gpu, label: &str) -> Result<RpnBuffers> {
        let k = self.kmax() as u64;
        Ok(RpnBuffers {
            topk: self.topk.buffers(gpu, &format!("{label} top-k"))?,
            raw_boxes: gpu.storage(&format!("{label} decoded boxes"), k * 16)?,
            raw_scores: gpu.storage(&format!("{label} decoded scores"), k * 4)?,
            boxes: gpu.storage(&format!("{label} boxes"), k * 16)?,
            scores: gpu.storage(&format!("{label} scores"), k * 4)?,
            levels: gpu.storage(&format!("{label} level ids"), k * 4)?,
            count: gpu.storage(&format!("{label} count"), 4)?,
        })
    }

    fn level_params(&self, l: usize) -> LevelParams {
        let lv = &self.levels[l];
        let mut cell = [[0f32; 4]; MAX_ANCHORS_PER_LOCATION];
        cell[..lv.cell.len()].copy_from_slice(&lv.cell);
        LevelParams {
            level: l as u32,
            anchor_offset: lv.anchor_offset as u32,
            n: lv.n as u32,
            k: lv.k as u32,
            out_offset: lv.out_offset as u32,
            gw: lv.feat.1 as u32,
            stride_h: lv.stride.0 as u32,
            stride_w: lv.stride.1 as u32,
            a: self.a as u32,
            clip: host::BBOX_XFORM_CLIP,
            pad0: 0,
            pad1: 0,
            cell,
        }
    }

    /// Records the whole stage: `objectness[l]` is level l's head output [1,h,w,A] and
    /// `deltas[l]` its [1,h,w,4A] (NHWC, so their flat order is torchvision's (y, x, a) order).
    /// Writes `b.boxes`, `b.scores`, `b.levels` and `b.count`.
    pub fn encode(
        &self,
        gpu: &Gpu,
        label: &str,
        objectness: &[&Tensor],
        deltas: &[&Tensor],
        b: &RpnBuffers,
    ) -> Result<Vec<Dispatch>> {
        let nl = self.levels.len();
        if objectness.len() != nl || deltas.len() != nl {
            return Err(Error::shape(
                label,
                format!(
                    "{} objectness and {} delta tensors for {nl} levels",
                    objectness.len(),
                    deltas.len()
                ),
            ));
        }
        for (l, lv) in self.levels.iter().enumerate() {
            let (o, d) = (objectness[l].shape, deltas[l].shape);
            let (h, w) = lv.feat;
            if o.n != 1 || o.h != h || o.w != w || o.c != self.a {
                return Err(Error::shape(
                    label,
                    format!(
                        "level {l}: objectness {o}, expected [1, {h}, {w}, {}]",
                        self.a
                    ),
                ));
            }
            if d.n != 1 || d.h != h || d.w != w || d.c != 4 * self.a {
                return Err(Error::shape(
                    label,
                    format!(
                        "level {l}: deltas {d}, expected [1, {h}, {w}, {}]",
                        4 * self.a
                    ),
                ));
            }
        }
        let k = self.kmax() as u64;
        if b.raw_boxes.size() < k * 16
            || b.boxes.size() < k * 16
            || b.raw_scores.size() < k * 4
            || b.scores.size() < k * 4
            || b.levels.size() < k * 4
        {
            return Err(Error::shape(
                label,
                "output buffers are smaller than this plan's capacity",
            ));
        }
        let inputs: Vec<&Buffer> = objectness.iter().map(|t| t.buf.as_ref()).collect();
        let mut out = self
            .topk
            .encode(gpu, &format!("{label} top-k"), &inputs, &b.topk)?;
        let decode_consts = consts(&DECODE);
        let decode = DECODE.pipeline(gpu, &decode_consts)?;
        for l in 0..nl {
            let u = Uniform::new(
                gpu,
                &format!("{label} decode {l} params"),
                &self.level_params(l),
            );
            out.push(DECODE.dispatch(
                gpu,
                format!("{label} decode {l}"),
                &decode,
                &decode_consts,
                &u,
                &[
                    ("order", &b.topk.order),
                    ("objectness", &objectness[l].buf),
                    ("deltas", &deltas[l].buf),
                    ("raw_boxes", &b.raw_boxes),
                    ("raw_scores", &b.raw_scores),
                ],
                grid_1d(self.levels[l].k),
            )?);
        }
        let mut fp = FilterParams {
            kmax: self.kmax() as u32,
            n_levels: nl as u32,
            img_h: self.resized.0 as f32,
            img_w: self.resized.1 as f32,
            min_size: self.op.min_size,
            score_thresh: self.op.score_thresh,
            pad0: 0,
            pad1: 0,
            lv: [[0; 4]; MAX_SEGMENTS],
        };
        for (l, lv) in self.levels.iter().enumerate() {
            fp.lv[l] = [lv.out_offset as u32, lv.k as u32, 0, 0];
        }
        let u = Uniform::new(gpu, &format!("{label} filter params"), &fp);
        let filter_consts = consts(&FILTER);
        out.push(FILTER.dispatch(
            gpu,
            format!("{label} filter"),
            &FILTER.pipeline(gpu, &filter_consts)?,
            &filter_consts,
            &u,
            &[
                ("raw_boxes", &b.raw_boxes),
                ("raw_scores", &b.raw_scores),
                ("boxes", &b.boxes),
                ("scores", &b.scores),
                ("levels", &b.levels),
                ("count", &b.count),
            ],
            [1, 1, 1],
        )?);
        Ok(out)
    }

    /// Records writing every anchor ([anchors(), 4] f32, torchvision's order) into `out`.
    pub fn encode_anchors(&self, gpu: &Gpu, label: &str, out: &Buffer) -> Result<Vec<Dispatch>> {
        if out.size() < self.anchors() as u64 * 16 {
            return Err(Error::shape(
                label,
                format!("{} bytes for {} anchors", out.size(), self.anchors()),
            ));
        }
        let c = consts(&ANCHORS);
        let p = ANCHORS.pipeline(gpu, &c)?;
        (0..self.levels.len())
            .map(|l| {
                let u = Uniform::new(
                    gpu,
                    &format!("{label} level {l} params"),
                    &self.level_params(l),
                );
                ANCHORS.dispatch(
                    gpu,
                    format!("{label} level {l}"),
                    &p,
                    &c,
                    &u,
                    &[("anchors", out)],
                    grid_1d(self.levels[l].n),
                )
            })
            .collect()
    }
}
