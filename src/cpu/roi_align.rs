//! CPU reference for RoIAlign and MultiScaleRoIAlign (docs/torchvision-semantics.md §8), written to
//! mirror torchvision's CPU kernel (`roi_align_kernel.cpp` + `pre_calc_for_bilinear_interpolate`)
//! operation by operation in f32 wherever a value feeds a discrete decision (level choice, sample
//! coordinates, the out-of-range cut, `trunc`, the edge clamp, bilinear weights). Only the channel
//! sums are accumulated in f64, which makes this a slightly better reference than the f32 kernels
//! under test. Validated against torchvision itself by tests/roi_align.rs with
//! tests/fixtures/roi_align_cases.safetensors.
//!
//! Layouts: features NHWC; pooled output `[K, out, out, C]` (channels-last, what the GPU kernel
//! writes). [`pooled_to_torchvision`] gives torchvision's `[K, C, out, out]`, whose flattening is
//! what TwoMLPHead's fc6 consumes.

use crate::gpu::Nhwc;

/// LevelMapper's constants (`poolers.py::initLevelMapper` defaults).
pub const CANONICAL_SCALE: f32 = 224.0;
pub const CANONICAL_LEVEL: f32 = 4.0;
/// `torch.tensor(1e-6, dtype=float32)` = 9.99999997e-7.
pub const LEVEL_EPS: f32 = 1e-6;

/// torchvision's `box_area` in f32: `(x2 - x1) * (y2 - y1)`.
pub fn box_area(b: [f32; 4]) -> f32 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// The FPN level index (0-based, `lvl - k_min`) of a box of this area by torchvision's
/// `LevelMapper(k_min, k_max)` formula evaluated in f32 with IEEE arithmetic:
/// `clamp(floor(4 + log2(sqrt(area) / 224) + f32(1e-6)), k_min, k_max) - k_min`
/// (correctly rounded sqrt and division, libm's `log2f`).
///
/// `None` where torch's result is not a level at all: a NaN area, or a negative one (an inverted
/// box, sqrt → NaN). torch casts that NaN to a garbage int64 that matches no level, so
/// MultiScaleRoIAlign leaves the row zero.
///
/// Caveat, measured: torch evaluates `sqrt` and `log2` of float tensors with MKL's vector math on
/// x86 (not correctly rounded), and `torch.sqrt(200703.65625f)` returns 447.99963 (0x43dffff4)
/// where IEEE gives 447.99960 (0x43dffff3). So at exactly one f32 area, 200703.65625, torch says
/// level 5 and this formula says level 4. [`level_of`] uses torch's own measured thresholds
/// ([`TORCHVISION_LEVEL_THRESHOLDS`]) and is exact; this function serves other `k_min` only.
pub fn mapper_level(area: f32, k_min: i32, k_max: i32) -> Option<usize> {
    let s = area.sqrt();
    let v = (CANONICAL_LEVEL + (s / CANONICAL_SCALE).log2()) + LEVEL_EPS;
    let lvl = v.floor();
    if lvl.is_nan() {
        return None;
    }
    Some((lvl.clamp(k_min as f32, k_max as f32) as i32 - k_min) as usize)
}

/// torchvision's LevelMapper(2, 5) as a function of the f32 box area, measured on torch itself:
/// the smallest f32 areas that it sends to level index 1, 2 and 3 (torch 2.x CPU f32, MKL on
/// AVX-512; weights/make_roi_align_fixture.py sweeps every f32 area near 112², 224², 448² through
/// torch and stores them, and tests/roi_align.rs checks these constants against that). They sit
/// just below 112², 224², 448² because of the +1e-6 in the formula. The mapper is monotone in the
/// area there (checked by the sweep), so `index = #{t : area >= t}` reproduces it for every area.
pub const TORCHVISION_LEVEL_THRESHOLDS: [f32; 3] = [
    f32::from_bits(0x4643_FFEC), // 12543.98046875
    f32::from_bits(0x4743_FFEE), // 50175.9296875
    f32::from_bits(0x4843_FFEA), // 200703.65625
];

/// Level index from an area and ascending thresholds (what the GPU kernel does); `None` for a
/// NaN or negative area.
pub fn level_from_thresholds(area: f32, thr: &[f32; 3]) -> Option<usize> {
    if area.is_nan() || area < 0.0 {
        return None;
    }
    Some(thr.iter().filter(|&&t| area >= t).count())
}

/// Level index (P2..P5 → 0..3) that torchvision's MultiScaleRoIAlign gives a box in
/// resized-image coordinates, exactly as torch decides it (see [`TORCHVISION_LEVEL_THRESHOLDS`]);
/// `None` for a NaN or negative area (torch leaves that row zero).
pub fn level_of(b: [f32; 4]) -> Option<usize> {
    level_from_thresholds(box_area(b), &TORCHVISION_LEVEL_THRESHOLDS)
}

/// torchvision's `_infer_scale` on the height (the only element it uses): `approx = feat_h /
/// image_h` in f64, rounded to an f32 tensor, `2 ** round(log2(approx))` (round half to even).
pub fn infer_scale(feat_h: usize, image_h: usize) -> f32 {
    let approx = (feat_h as f64 / image_h as f64) as f32;
    let k = approx.log2().round_ties_even();
    2f64.powf(k as f64) as f32
}

/// The four bilinear taps of a sample, as (y, x) feature coordinates, and their weights.
pub type Taps = ([(usize, usize); 4], [f32; 4]);

/// The sample grid of one RoI, shared by all channels: per (bin, sample) either `None` (the
/// sample is outside the map: it adds 0 but still counts) or the four taps and weights.
pub struct RoiGrid {
    pub grid_h: i32,
    pub grid_w: i32,
    /// `max(grid_h * grid_w, 1)`, the divisor.
    pub count: f32,
    /// `[ph][pw][iy][ix]` flattened; taps as (y, x) feature coordinates.
    pub samples: Vec<Option<Taps>>,
}

/// torchvision's per-RoI geometry (`roi_align_forward_kernel_impl` + `pre_calc_for_bilinear_
/// interpolate`), f32 in C++ evaluation order.
pub fn roi_grid(
    b: [f32; 4],
    h: usize,
    w: usize,
    spatial_scale: f32,
    out: usize,
    sampling_ratio: i32,
    aligned: bool,
) -> RoiGrid {
    let offset = if aligned { 0.5f32 } else { 0.0 };
    let start_w = b[0] * spatial_scale - offset;
    let start_h = b[1] * spatial_scale - offset;
    let end_w = b[2] * spatial_scale - offset;
    let end_h = b[3] * spatial_scale - offset;
    let mut roi_w = end_w - start_w;
    let mut roi_h = end_h - start_h;
    if !aligned {
        // std::max(roi, 1.f): a NaN first argument stays NaN.
        roi_w = if roi_w < 1.0 { 1.0 } else { roi_w };
        roi_h = if roi_h < 1.0 { 1.0 } else { roi_h };
    }
    let pooled = out as f32;
    let bin_h = roi_h / pooled;
    let bin_w = roi_w / pooled;
    // C++ `int g = ceil(roi / pooled)`: float ceil, then a truncating conversion.
    let grid_h = if sampling_ratio > 0 {
        sampling_ratio
    } else {
        (roi_h / pooled).ceil() as i32
    };
    let grid_w = if sampling_ratio > 0 {
        sampling_ratio
    } else {
        (roi_w / pooled).ceil() as i32
    };
    let count = (grid_h.saturating_mul(grid_w)).max(1) as f32;
    let (gh, gw) = (grid_h.max(0) as usize, grid_w.max(0) as usize);
    let mut samples = Vec::with_capacity(out * out * gh * gw);
    for ph in 0..out {
        for pw in 0..out {
            for iy in 0..gh {
                let yy =
                    (start_h + ph as f32 * bin_h) + ((iy as f32 + 0.5) * bin_h) / grid_h as f32;
                for ix in 0..gw {
                    let xx =
                        (start_w + pw as f32 * bin_w) + ((ix as f32 + 0.5) * bin_w) / grid_w as f32;
                    samples.push(bilinear_taps(yy, xx, h, w));
                }
            }
        }
    }
    RoiGrid {
        grid_h,
        grid_w,
        count,
        samples,
    }
}

/// The bilinear taps of one sample point, torchvision's rules: outside `[-1, H] × [-1, W]`
/// (or NaN) → nothing; `≤ 0` → 0; `trunc`; `y_lo ≥ H - 1` → both rows `H - 1` and `y = H - 1`.
pub fn bilinear_taps(y: f32, x: f32, h: usize, w: usize) -> Option<Taps> {
    let (hf, wf) = (h as f32, w as f32);
    if !(y >= -1.0 && y <= hf && x >= -1.0 && x <= wf) {
        return None;
    }
    let mut y = if y <= 0.0 { 0.0 } else { y };
    let mut x = if x <= 0.0 { 0.0 } else { x };
    let mut y_lo = y as usize;
    let mut x_lo = x as usize;
    let y_hi;
    let x_hi;
    if y_lo + 1 >= h {
        y_lo = h - 1;
        y_hi = h - 1;
        y = y_lo as f32;
    } else {
        y_hi = y_lo + 1;
    }
    if x_lo + 1 >= w {
        x_lo = w - 1;
        x_hi = w - 1;
        x = x_lo as f32;
    } else {
        x_hi = x_lo + 1;
    }
    let ly = y - y_lo as f32;
    let lx = x - x_lo as f32;
    let hy = 1.0 - ly;
    let hx = 1.0 - lx;
    Some((
        [(y_lo, x_lo), (y_lo, x_hi), (y_hi, x_lo), (y_hi, x_hi)],
        [hy * hx, hy * lx, ly * hx, ly * lx],
    ))
}

/// torchvision's `roi_align` over one NHWC feature map for the boxes of image `batch_idx`.
/// Output `[K, out, out, C]`.
#[allow(clippy::too_many_arguments)]
pub fn roi_align_nhwc(
    feat: &[f32],
    shape: Nhwc,
    boxes: &[[f32; 4]],
    batch_idx: usize,
    spatial_scale: f32,
    out: usize,
    sampling_ratio: i32,
    aligned: bool,
) -> Vec<f32> {
    let mut y = vec![0f32; boxes.len() * out * out * shape.c];
    for (k, b) in boxes.iter().enumerate() {
        pool_one(
            feat,
            shape,
            *b,
            batch_idx,
            spatial_scale,
            out,
            sampling_ratio,
            aligned,
            &mut y[k * out * out * shape.c..][..out * out * shape.c],
        );
    }
    y
}

#[allow(clippy::too_many_arguments)]
fn pool_one(
    feat: &[f32],
    s: Nhwc,
    b: [f32; 4],
    n: usize,
    spatial_scale: f32,
    out: usize,
    sampling_ratio: i32,
    aligned: bool,
    dst: &mut [f32],
) {
    let g = roi_grid(b, s.h, s.w, spatial_scale, out, sampling_ratio, aligned);
    let per_bin = g.grid_h.max(0) as usize * g.grid_w.max(0) as usize;
    let base = n * s.h * s.w * s.c;
    for bin in 0..out * out {
        for c in 0..s.c {
            let mut acc = 0f64;
            // Out-of-range samples add nothing (but count in the divisor).
            for (taps, wts) in g.samples[bin * per_bin..(bin + 1) * per_bin]
                .iter()
                .flatten()
            {
                for (&(ty, tx), &wt) in taps.iter().zip(wts) {
                    acc += wt as f64 * feat[base + (ty * s.w + tx) * s.c + c] as f64;
                }
            }
            dst[bin * s.c + c] = (acc / g.count as f64) as f32;
        }
    }
}

/// torchvision's MultiScaleRoIAlign over P2..P5 (NHWC, image `batch_idx`), `image_size` = the
/// resized **unpadded** (h, w) (torchvision's `image_sizes`; max over the batch), from which the
/// scales are inferred. Rows whose box has no level (NaN or negative area) stay zero.
/// Output `[K, out, out, C]`.
#[allow(clippy::too_many_arguments)]
pub fn multiscale_roi_align_nhwc(
    levels: [(&[f32], Nhwc); 4],
    image_size: (usize, usize),
    boxes: &[[f32; 4]],
    batch_idx: usize,
    out: usize,
    sampling_ratio: i32,
    aligned: bool,
) -> Vec<f32> {
    let scales: Vec<f32> = levels
        .iter()
        .map(|(_, s)| infer_scale(s.h, image_size.0))
        .collect();
    let k_min = -scales[0].log2() as i32;
    let k_max = -scales[3].log2() as i32;
    let c = levels[0].1.c;
    let mut y = vec![0f32; boxes.len() * out * out * c];
    for (k, b) in boxes.iter().enumerate() {
        let level = if k_min == 2 && k_max == 5 {
            level_of(*b)
        } else {
            mapper_level(box_area(*b), k_min, k_max)
        };
        let Some(l) = level.filter(|&l| l < 4) else {
            continue;
        };
        let (f, s) = levels[l];
        pool_one(
            f,
            s,
            *b,
            batch_idx,
            scales[l],
            out,
            sampling_ratio,
            aligned,
            &mut y[k * out * out * c..][..out * out * c],
        );
    }
    y
}

/// `[K, P, P, C]` (what the kernel writes) → torchvision's `[K, C, P, P]`, i.e. the flattened
/// `[K, C*P*P]` rows (index `c*P*P + y*P + x`) that TwoMLPHead's fc6 multiplies.
pub fn pooled_to_torchvision(x: &[f32], k: usize, p: usize, c: usize) -> Vec<f32> {
    let mut y = vec![0f32; k * c * p * p];
    for r in 0..k {
        for bin in 0..p * p {
            for ch in 0..c {
                y[(r * c + ch) * p * p + bin] = x[(r * p * p + bin) * c + ch];
            }
        }
    }
    y
}

/// torchvision's `[K, C, P, P]` → `[K, P, P, C]`.
pub fn pooled_from_torchvision(x: &[f32], k: usize, p: usize, c: usize) -> Vec<f32> {
    let mut y = vec![0f32; k * c * p * p];
    for r in 0..k {
        for bin in 0..p * p {
            for ch in 0..c {
                y[(r * p * p + bin) * c + ch] = x[(r * c + ch) * p * p + bin];
            }
        }
    }
    y
}
