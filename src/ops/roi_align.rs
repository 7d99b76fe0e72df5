//! MultiScaleRoIAlign on the GPU (docs/torchvision-semantics.md §8). Kernel:
//! shaders/roi_align.wgsl.
//!
//! Inputs: the FPN levels P2..P5 (NHWC tensors of the **padded** image), a capacity-sized boxes
//! buffer `[capacity, 4]` f32 (x1, y1, x2, y2 in resized-image coordinates) and a `u32` count
//! buffer: only the first `count` rows are live, so the dispatch can be recorded before the count
//! is known. Output: `[capacity, out, out, C]` f32, **channels-last** (row r, bin (py, px), channel
//! c at `((r*out + py)*out + px)*C + c`); rows at or beyond the count are not written.
//! torchvision's TwoMLPHead flattens `[K, C, 7, 7]` (`c*49 + py*7 + px`), so fc6's weight columns
//! must be permuted at load time with [`fc6_weight_to_nhwc`] (or the pooled rows with
//! `cpu::roi_align::pooled_to_torchvision`).
//!
//! Level assignment happens per box on the GPU by comparing the f32 box area (computed exactly as
//! torchvision's `box_area`: a subtraction and a product, correctly rounded in WGSL too) with the
//! thresholds from [`level_thresholds`]: the smallest f32 areas that torch's LevelMapper sends up a
//! level, measured on torch itself. The decision therefore equals torch's for every area, with no
//! WGSL sqrt/log2 (a few ulp) in it; even an IEEE-exact host evaluation of the formula differs from
//! torch at one area value, because torch's MKL sqrt is not correctly rounded (see
//! `cpu::roi_align::mapper_level`).

use crate::cpu::roi_align::{mapper_level, TORCHVISION_LEVEL_THRESHOLDS};
use crate::error::{Error, Result};
use crate::gpu::{ConstVal, Dispatch, Gpu, Kernel, Tensor};
use crate::ops::contract::{params_struct, Binding, HostStruct, KernelIo, KernelVariant, Uniform};
use crate::ops::pool::grid_1d;

pub const KERNEL: KernelIo = KernelIo {
    kernel: Kernel {
        name: "multiscale_roi_align",
        source: include_str!("../../shaders/roi_align.wgsl"),
        entry: "main",
    },
    params: Some(Params::LAYOUT),
    storage: &[
        Binding::read("f0"),
        Binding::read("f1"),
        Binding::read("f2"),
        Binding::read("f3"),
        Binding::read("boxes"),
        Binding::read("count"),
        Binding::read_write("y"),
    ],
};

/// The variants RoIAlign compiles: the box head's (7×7, sampling ratio 2, not aligned) and the
/// other settings the op accepts and the tests run (adaptive and fixed sampling, aligned, other
/// output sizes up to the largest, 64).
pub fn variants() -> Vec<KernelVariant> {
    let mut out = Vec::new();
    for (output, sampling_ratio) in [(7, 2), (7, 0), (7, -1), (7, 1), (5, 3), (1, 2), (64, 2)] {
        for aligned in [false, true] {
            let op = MultiScaleRoiAlign {
                output,
                sampling_ratio,
                aligned,
                capacity: 1,
                channels: 1,
            };
            out.push(KernelVariant::new(KERNEL, op.consts()));
        }
    }
    out
}

/// torchvision's MultiScaleRoIAlign(['0','1','2','3'], output, sampling_ratio) over P2..P5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultiScaleRoiAlign {
    /// Pooled size (7 in the box head).
    pub output: usize,
    /// Samples per bin and axis; `<= 0` is torchvision's adaptive `ceil(roi / output)`.
    pub sampling_ratio: i32,
    /// torchvision's `aligned` (MultiScaleRoIAlign always uses false; an option for other users).
    pub aligned: bool,
    /// Rows of the boxes and output buffers.
    pub capacity: usize,
    /// Feature channels (the FPN width).
    pub channels: usize,
}

params_struct! {
    struct Params {
        h: [u32; 4],
        w: [u32; 4],
        scale: [f32; 4],
        thr: [f32; 4],
        c: u32,
        capacity: u32,
        batch: u32,
        ones: u32,
    }
}

/// torchvision's `_infer_scale` on the height: `2 ** round(log2(f32(feat_h / image_h)))`.
pub fn infer_scale(feat_h: usize, image_h: usize) -> f32 {
    crate::cpu::roi_align::infer_scale(feat_h, image_h)
}

/// The smallest f32 box areas that LevelMapper(k_min, k_min + 3) sends to level index 1, 2 and 3:
/// `index(area) = (area >= t[0]) + (area >= t[1]) + (area >= t[2])` for every non-negative area
/// (NaN and negative areas have no level). For the model's k_min = 2 these are torch's own
/// measured values ([`TORCHVISION_LEVEL_THRESHOLDS`]: 12543.98046875, 50175.9296875,
/// 200703.65625); for any other k_min, [`formula_thresholds`].
pub fn level_thresholds(k_min: i32) -> [f32; 3] {
    if k_min == 2 {
        TORCHVISION_LEVEL_THRESHOLDS
    } else {
        formula_thresholds(k_min)
    }
}

/// The thresholds of torchvision's formula evaluated with IEEE f32 arithmetic
/// (`cpu::roi_align::mapper_level`), found by bisection over the bit patterns of positive f32
/// (ordered like the values). For k_min = 2 they equal torch's except the last, one ulp higher
/// (torch's MKL sqrt is not correctly rounded there; see `mapper_level`).
pub fn formula_thresholds(k_min: i32) -> [f32; 3] {
    let k_max = k_min + 3;
    let mut t = [0f32; 3];
    for (i, slot) in t.iter_mut().enumerate() {
        let reaches =
            |bits: u32| mapper_level(f32::from_bits(bits), k_min, k_max).is_some_and(|l| l > i);
        // Invariant: !reaches(lo), reaches(hi). Area 0 is the lowest level (log2(0) = -inf) and
        // +inf the highest.
        let (mut lo, mut hi) = (0u32, f32::INFINITY.to_bits());
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if reaches(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        *slot = f32::from_bits(hi);
    }
    t
}

/// fc6's weight `[out_features, C*P*P]` with torchvision's columns (`c*P*P + bin`) → columns in the
/// kernel's channels-last order (`bin*C + c`), so fc6 can consume `[K, P, P, C]` rows directly.
pub fn fc6_weight_to_nhwc(w: &[f32], out_features: usize, c: usize, p: usize) -> Result<Vec<f32>> {
    let k = c * p * p;
    if w.len() != out_features * k {
        return Err(Error::shape(
            "fc6_weight_to_nhwc",
            format!("{} values for [{out_features}, {c}*{p}*{p}]", w.len()),
        ));
    }
    let mut y = vec![0f32; w.len()];
    for o in 0..out_features {
        for ch in 0..c {
            for bin in 0..p * p {
                y[o * k + bin * c + ch] = w[o * k + ch * p * p + bin];
            }
        }
    }
    Ok(y)
}

impl MultiScaleRoiAlign {
    /// The box head's pooler: 7×7, sampling ratio 2, aligned false.
    pub fn box_head(capacity: usize, channels: usize) -> Self {
        MultiScaleRoiAlign {
            output: 7,
            sampling_ratio: 2,
            aligned: false,
            capacity,
            channels,
        }
    }

    /// The kernel variant's consts.
    fn consts(&self) -> Vec<(&'static str, ConstVal)> {
        vec![
            ("OUT", ConstVal::U32(self.output as u32)),
            ("SAMPLING", ConstVal::I32(self.sampling_ratio)),
            ("ALIGNED", ConstVal::Bool(self.aligned)),
        ]
    }

    /// Elements of the output buffer: `capacity * output² * channels`.
    pub fn out_len(&self) -> usize {
        self.capacity * self.output * self.output * self.channels
    }

    /// The per-level scales torchvision infers from the feature heights and the resized
    /// (unpadded) image height, checked to be consecutive halvings (as FPN's always are; the
    /// thresholds assume k_max = k_min + 3).
    pub fn scales(&self, levels: [&Tensor; 4], image_size: (usize, usize)) -> Result<[f32; 4]> {
        if image_size.0 == 0 || image_size.1 == 0 {
            return Err(Error::shape(
                "multiscale_roi_align",
                format!("image size {image_size:?}"),
            ));
        }
        let s = levels.map(|t| infer_scale(t.shape.h, image_size.0));
        for i in 1..4 {
            if s[i] * 2.0 != s[i - 1] {
                return Err(Error::shape(
                    "multiscale_roi_align",
                    format!(
                        "inferred scales {s:?} (feature heights {:?} vs image height {}) are not \
                         consecutive halvings",
                        levels.map(|t| t.shape.h),
                        image_size.0
                    ),
                ));
            }
        }
        if !(s[0] > 0.0 && s[0] <= 1.0) {
            return Err(Error::shape(
                "multiscale_roi_align",
                format!("inferred scales {s:?}"),
            ));
        }
        Ok(s)
    }

    /// Records the pooling of the first `count[0]` boxes of `boxes` (image `batch` of the
    /// levels) into `out`. `image_size` is the resized, **unpadded** (h, w): torchvision's
    /// `image_sizes` (max over the batch), which `_infer_scale` divides the feature sizes by.
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        gpu: &Gpu,
        label: &str,
        levels: [&Tensor; 4],
        image_size: (usize, usize),
        batch: usize,
        boxes: &wgpu::Buffer,
        count: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Result<Dispatch> {
        let err = |m: String| Error::shape(label, m);
        if self.output == 0 || self.output > 64 {
            return Err(err(format!("output size {} (1..=64)", self.output)));
        }
        if self.channels == 0 {
            return Err(err("zero channels".into()));
        }
        let n = levels[0].shape.n;
        for (i, t) in levels.iter().enumerate() {
            let s = t.shape;
            if s.c != self.channels || s.n != n || s.h == 0 || s.w == 0 {
                return Err(err(format!(
                    "level {i} is {s}; expected {} channels, batch {n}, non-empty",
                    self.channels
                )));
            }
            if t.buf.size() < s.bytes() {
                return Err(err(format!(
                    "level {i} buffer holds {} bytes < {s}",
                    t.buf.size()
                )));
            }
        }
        if batch >= n {
            return Err(err(format!("batch index {batch} for a batch of {n}")));
        }
        let total = self.out_len();
        if total > u32::MAX as usize / 2 || self.capacity > u32::MAX as usize / 4 {
            return Err(Error::TooLarge(format!("{label}: {total} output values")));
        }
        if boxes.size() < (self.capacity * 16) as u64 {
            return Err(err(format!(
                "boxes buffer holds {} bytes, capacity {} needs {}",
                boxes.size(),
                self.capacity,
                self.capacity * 16
            )));
        }
        if count.size() < 4 {
            return Err(err("count buffer is empty".into()));
        }
        if out.size() < total as u64 * 4 {
            return Err(err(format!(
                "output buffer holds {} bytes, [{}, {o}, {o}, {}] needs {}",
                out.size(),
                self.capacity,
                self.channels,
                total * 4,
                o = self.output
            )));
        }
        let scales = self.scales(levels, image_size)?;
        let k_min = -scales[0].log2() as i32;
        let thr = level_thresholds(k_min);
        let consts = self.consts();
        let pipeline = KERNEL.pipeline(gpu, &consts)?;
        let params = Params {
            h: levels.map(|t| t.shape.h as u32),
            w: levels.map(|t| t.shape.w as u32),
            scale: scales,
            thr: [thr[0], thr[1], thr[2], f32::INFINITY],
            c: self.channels as u32,
            capacity: self.capacity as u32,
            batch: batch as u32,
            ones: u32::MAX,
        };
        let ubuf = Uniform::new(gpu, &format!("{label} params"), &params);
        let grid = if total == 0 {
            [0, 1, 1]
        } else {
            grid_1d(total)
        };
        KERNEL.dispatch(
            gpu,
            label,
            &pipeline,
            &consts,
            &ubuf,
            &[
                ("f0", &levels[0].buf),
                ("f1", &levels[1].buf),
                ("f2", &levels[2].buf),
                ("f3", &levels[3].buf),
                ("boxes", boxes),
                ("count", count),
                ("y", out),
            ],
            grid,
        )
    }
}
