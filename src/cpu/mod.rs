//! Plain CPU reference implementations, written for clarity, not speed. Every GPU kernel is
//! tested against these on random shapes; they accumulate in f64 so that they are a better
//! reference than the f32 kernels under test.

pub mod box_head;
pub mod nms;
pub mod refine;
pub mod roi_align;
pub mod rpn;

use crate::gpu::Nhwc;
use crate::ops::conv::{Conv2d, Residual};
use crate::ops::pool::MaxPool2d;

/// ATen's legacy nearest source index (`nearest_idx`), scale = f32(in) / f32(out).
pub fn nearest_idx(dst: usize, in_len: usize, out_len: usize) -> usize {
    if out_len == in_len {
        dst
    } else if out_len == 2 * in_len {
        dst >> 1
    } else {
        let scale = in_len as f32 / out_len as f32;
        ((dst as f32 * scale).floor() as usize).min(in_len - 1)
    }
}

/// `act(conv(x, w) + bias [+ residual])` over NHWC, weights in torchvision's OIHW layout.
pub fn conv2d(
    conv: &Conv2d,
    x: &[f32],
    xs: Nhwc,
    w_oihw: &[f32],
    bias: &[f32],
    residual: Option<(&[f32], Nhwc)>,
) -> (Vec<f32>, Nhwc) {
    let os = conv.out_shape(xs).expect("cpu conv2d: shape");
    let mut y = vec![0f32; os.len()];
    for n in 0..os.n {
        for oy in 0..os.h {
            for ox in 0..os.w {
                for co in 0..conv.cout {
                    let mut acc = bias[co] as f64;
                    for ky in 0..conv.kh {
                        let iy = (oy * conv.stride + ky) as isize - conv.pad as isize;
                        if iy < 0 || iy >= xs.h as isize {
                            continue;
                        }
                        for kx in 0..conv.kw {
                            let ix = (ox * conv.stride + kx) as isize - conv.pad as isize;
                            if ix < 0 || ix >= xs.w as isize {
                                continue;
                            }
                            let xb = ((n * xs.h + iy as usize) * xs.w + ix as usize) * xs.c;
                            for ci in 0..conv.cin {
                                let wv =
                                    w_oihw[((co * conv.cin + ci) * conv.kh + ky) * conv.kw + kx];
                                acc += x[xb + ci] as f64 * wv as f64;
                            }
                        }
                    }
                    let o = ((n * os.h + oy) * os.w + ox) * os.c + co;
                    if let Some((r, rs)) = residual {
                        let ri = match conv.residual {
                            Residual::Same => o,
                            Residual::Nearest => {
                                let sy = nearest_idx(oy, rs.h, os.h);
                                let sx = nearest_idx(ox, rs.w, os.w);
                                ((n * rs.h + sy) * rs.w + sx) * rs.c + co
                            }
                            Residual::None => unreachable!(),
                        };
                        acc += r[ri] as f64;
                    }
                    let mut v = acc as f32;
                    if conv.relu {
                        v = v.max(0.0);
                    }
                    y[o] = v;
                }
            }
        }
    }
    (y, os)
}

pub fn maxpool(pool: &MaxPool2d, x: &[f32], xs: Nhwc) -> (Vec<f32>, Nhwc) {
    let os = pool.out_shape(xs).expect("cpu maxpool: shape");
    let mut y = vec![0f32; os.len()];
    for n in 0..os.n {
        for oy in 0..os.h {
            for ox in 0..os.w {
                for c in 0..os.c {
                    let mut best = f32::NEG_INFINITY;
                    for ky in 0..pool.ksize {
                        for kx in 0..pool.ksize {
                            let iy = (oy * pool.stride + ky) as isize - pool.pad as isize;
                            let ix = (ox * pool.stride + kx) as isize - pool.pad as isize;
                            if iy < 0 || ix < 0 || iy >= xs.h as isize || ix >= xs.w as isize {
                                continue;
                            }
                            let v = x[((n * xs.h + iy as usize) * xs.w + ix as usize) * xs.c + c];
                            if v > best || v.is_nan() {
                                best = v;
                            }
                        }
                    }
                    y[((n * os.h + oy) * os.w + ox) * os.c + c] = best;
                }
            }
        }
    }
    (y, os)
}

/// normalize → bilinear resize → zero pad, from planar [3, H, W] to [1, Hp, Wp, 3].
pub fn transform(
    img: &[f32],
    h: usize,
    w: usize,
    resized: (usize, usize),
    padded: (usize, usize),
    mean: [f32; 3],
    std: [f32; 3],
) -> Vec<f32> {
    let yt = crate::ops::transform::axis_table(h, resized.0);
    let xt = crate::ops::transform::axis_table(w, resized.1);
    let mut out = vec![0f32; padded.0 * padded.1 * 3];
    let tap = |c: usize, y: usize, x: usize| (img[(c * h + y) * w + x] - mean[c]) / std[c];
    for oy in 0..resized.0 {
        for ox in 0..resized.1 {
            let [y0, y1, ly0, ly1] = yt[oy];
            let [x0, x1, lx0, lx1] = xt[ox];
            let (y0, y1, x0, x1) = (y0 as usize, y1 as usize, x0 as usize, x1 as usize);
            for c in 0..3 {
                let top = lx0 * tap(c, y0, x0) + lx1 * tap(c, y0, x1);
                let bot = lx0 * tap(c, y1, x0) + lx1 * tap(c, y1, x1);
                out[(oy * padded.1 + ox) * 3 + c] = ly0 * top + ly1 * bot;
            }
        }
    }
    out
}

/// [N, C, H, W] → [N, H, W, C].
pub fn nchw_to_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for i in 0..h {
                for j in 0..w {
                    y[((b * h + i) * w + j) * c + ch] = x[((b * c + ch) * h + i) * w + j];
                }
            }
        }
    }
    y
}

/// [N, H, W, C] → [N, C, H, W].
pub fn nhwc_to_nchw(x: &[f32], s: Nhwc) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for b in 0..s.n {
        for i in 0..s.h {
            for j in 0..s.w {
                for ch in 0..s.c {
                    y[((b * s.c + ch) * s.h + i) * s.w + j] =
                        x[((b * s.h + i) * s.w + j) * s.c + ch];
                }
            }
        }
    }
    y
}

/// Comparison metrics used by tests and `marrow validate`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Diff {
    pub max_abs: f64,
    pub max_ref: f64,
    /// max |a - b| / max |b|
    pub rel_max: f64,
    /// ||a - b||₂ / ||b||₂
    pub rel_l2: f64,
    pub nonfinite: usize,
}

pub fn diff(got: &[f32], want: &[f32]) -> Diff {
    assert_eq!(got.len(), want.len(), "diff: lengths differ");
    let mut d = Diff::default();
    let (mut num, mut den) = (0f64, 0f64);
    for (&a, &b) in got.iter().zip(want) {
        if !a.is_finite() || !b.is_finite() {
            d.nonfinite += 1;
            continue;
        }
        let e = (a as f64 - b as f64).abs();
        d.max_abs = d.max_abs.max(e);
        d.max_ref = d.max_ref.max((b as f64).abs());
        num += e * e;
        den += (b as f64) * (b as f64);
    }
    d.rel_max = if d.max_ref > 0.0 {
        d.max_abs / d.max_ref
    } else {
        d.max_abs
    };
    d.rel_l2 = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    d
}
