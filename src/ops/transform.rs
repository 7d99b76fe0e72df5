//! GeneralizedRCNNTransform: the exact resize-size rule (host, f64), ATen's bilinear source
//! indices (host, f32 tables) and the normalize + resize + pad kernel (shaders/transform.wgsl).

use crate::error::{Error, Result};
use crate::gpu::{Dispatch, Gpu, Kernel, Nhwc, Tensor};
use crate::model::config::TransformConfig;
use crate::ops::contract::{params_struct, Binding, HostStruct, KernelIo, KernelVariant, Uniform};

pub const KERNEL: KernelIo = KernelIo {
    kernel: Kernel {
        name: "transform",
        source: include_str!("../../shaders/transform.wgsl"),
        entry: "main",
    },
    params: Some(Params::LAYOUT),
    storage: &[
        Binding::read("img"),
        Binding::read("ytab"),
        Binding::read("xtab"),
        Binding::read_write("out"),
    ],
};

/// The one variant (no consts).
pub fn variants() -> Vec<KernelVariant> {
    vec![KernelVariant::new(KERNEL, Vec::new())]
}

/// torchvision's eval resize size for an H×W image: `scale = min(min_size / min(H, W),
/// max_size / max(H, W))` in f64, then `int(H * scale)`, `int(W * scale)` — truncation, so some
/// shapes land one pixel short (97×97 → 799×799 at min_size 800).
pub fn resized_size(h: usize, w: usize, min_size: u32, max_size: u32) -> Result<(usize, usize)> {
    if h == 0 || w == 0 {
        return Err(Error::Invalid(format!(
            "image of size {h}x{w} has no pixels"
        )));
    }
    let (lo, hi) = (h.min(w) as f64, h.max(w) as f64);
    let scale = f64::min(min_size as f64 / lo, max_size as f64 / hi);
    let oh = (h as f64 * scale).floor() as usize;
    let ow = (w as f64 * scale).floor() as usize;
    if oh == 0 || ow == 0 {
        return Err(Error::Invalid(format!(
            "image of size {h}x{w} resizes to {oh}x{ow}: aspect ratio too extreme"
        )));
    }
    Ok((oh, ow))
}

/// Pads up to a multiple of `div` (batch_images).
pub fn padded(n: usize, div: u32) -> usize {
    n.div_ceil(div as usize) * div as usize
}

/// ATen's `compute_source_index_and_lambda` for one axis (align_corners=False), in f32:
/// (i0, i1, lambda0, lambda1) per output index.
pub fn axis_table(in_len: usize, out_len: usize) -> Vec<[f32; 4]> {
    (0..out_len)
        .map(|d| {
            if in_len == out_len {
                return [d as f32, d as f32, 1.0, 0.0];
            }
            let ratio = in_len as f32 / out_len as f32;
            // torch's single-threaded CPU kernel (the reference: §14.1 dumps run with 1 thread)
            // evaluates `ratio * (d + 0.5) - 0.5` as one fused multiply-add. Measured with torch
            // 2.15 at 480×640 → 800×1066: the unfused form rounds src differently in 1 of 533
            // columns, which moves that column's lambda by ~3e-5 and the pixel by up to 5.8e-6.
            let mut src = ratio.mul_add(d as f32 + 0.5, -0.5);
            if src < 0.0 {
                src = 0.0;
            }
            let i0 = (src.floor() as usize).min(in_len - 1);
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < in_len - 1 { i0 + 1 } else { i0 };
            [i0 as f32, i1 as f32, 1.0 - l1, l1]
        })
        .collect()
}

/// Sizes of one image through the transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransformSizes {
    pub orig: (usize, usize),
    pub resized: (usize, usize),
    pub padded: (usize, usize),
}

impl TransformSizes {
    pub fn new(h: usize, w: usize, cfg: &TransformConfig) -> Result<Self> {
        let resized = resized_size(h, w, cfg.min_size, cfg.max_size)?;
        Ok(TransformSizes {
            orig: (h, w),
            resized,
            padded: (
                padded(resized.0, cfg.size_divisible),
                padded(resized.1, cfg.size_divisible),
            ),
        })
    }
}

params_struct! {
    struct Params {
        h: u32,
        w: u32,
        oh: u32,
        ow: u32,
        hp: u32,
        wp: u32,
        pad0: u32,
        pad1: u32,
        mean: [f32; 4],
        stdev: [f32; 4],
    }
}

/// Bytes of the row and column index tables [`encode`] uploads for `sizes` (one `[f32; 4]` per
/// output row and column; its dispatch holds them), for memory accounting.
pub fn table_bytes(sizes: &TransformSizes) -> u64 {
    ((sizes.resized.0 + sizes.resized.1) * 16) as u64
}

/// Normalize + resize + pad for one image: `image` is planar [3, H, W] f32 in [0, 1]; the output
/// is [1, Hp, Wp, 3]. (The bind group keeps the tables and params alive.)
pub fn encode(
    gpu: &Gpu,
    cfg: &TransformConfig,
    sizes: &TransformSizes,
    image: &wgpu::Buffer,
    out: &Tensor,
) -> Result<Dispatch> {
    let (h, w) = sizes.orig;
    let (oh, ow) = sizes.resized;
    let (hp, wp) = sizes.padded;
    if out.shape != Nhwc::new(1, hp, wp, 3) {
        return Err(Error::shape(
            "transform",
            format!("output is {}, expected [1, {hp}, {wp}, 3]", out.shape),
        ));
    }
    if image.size() < (3 * h * w * 4) as u64 {
        return Err(Error::shape(
            "transform",
            format!("image buffer too small for 3x{h}x{w}"),
        ));
    }
    let ytab = gpu.upload("transform rows", &axis_table(h, oh))?;
    let xtab = gpu.upload("transform cols", &axis_table(w, ow))?;
    let m = cfg.image_mean;
    let s = cfg.image_std;
    let params = Params {
        h: h as u32,
        w: w as u32,
        oh: oh as u32,
        ow: ow as u32,
        hp: hp as u32,
        wp: wp as u32,
        pad0: 0,
        pad1: 0,
        mean: [m[0], m[1], m[2], 0.0],
        stdev: [s[0], s[1], s[2], 1.0],
    };
    let ubuf = Uniform::new(gpu, "transform params", &params);
    let pipeline = KERNEL.pipeline(gpu, &[])?;
    KERNEL.dispatch(
        gpu,
        "transform",
        &pipeline,
        &[],
        &ubuf,
        &[
            ("img", image),
            ("ytab", &ytab),
            ("xtab", &xtab),
            ("out", &out.buf),
        ],
        super::pool::grid_1d(hp * wp),
    )
}
