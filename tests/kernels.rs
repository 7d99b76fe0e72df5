//! Every kernel against its plain CPU implementation (src/cpu.rs) on freshly drawn random shapes
//! and inputs: odd sizes, stride 2, channels not a multiple of 4, batch > 1, 1-pixel edges.
//! Each case prints its shape and the kernel's GFLOP/s (lavapipe numbers are not benchmarks).

mod common;

use common::{conv_case, gpu, Rng};
use marrow::cpu;
use marrow::gpu::{Nhwc, Tensor};
use marrow::ops::conv::{Conv2d, Residual};
use marrow::ops::pool::MaxPool2d;
use marrow::ops::transform::{self, TransformSizes};

fn run_conv_case(rng: &mut Rng, op: Conv2d, xs: Nhwc, res_hw: Option<(usize, usize)>) {
    let g = gpu();
    let c = conv_case(rng, &op, xs, res_hw);
    let os = c.os;
    let yt = Tensor::new(g, "y", os).unwrap();
    let d = op
        .encode(g, "conv under test", &c.x, &c.w, c.res.as_ref(), &yt)
        .unwrap();
    let t = std::time::Instant::now();
    g.run("conv test", [&d]).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let got = yt.read(g).unwrap();
    let d = cpu::diff(&got, &c.want);
    eprintln!(
        "conv {:?} x{} res{:?} -> {}: max_abs {:.2e} rel {:.2e} ({:.2} GFLOP/s)",
        (op.kh, op.stride, op.pad, op.cin, op.cout, op.relu),
        xs,
        res_hw,
        os,
        d.max_abs,
        d.rel_max,
        op.flops(os) / secs * 1e-9
    );
    assert_eq!(d.nonfinite, 0);
    // Inputs in [-1, 1], K ≤ ~3500 terms: f32 accumulation error is ~1e-7·sqrt(K) relative to the
    // largest output; 1e-5 is §14.3's single-layer tolerance.
    assert!(d.rel_max <= 1e-5, "conv mismatch: {d:?}");
}

#[test]
fn conv_random_shapes_against_cpu() {
    let mut rng = Rng::for_test("conv_random_shapes_against_cpu");
    for case in 0..14 {
        let k = rng.pick(&[1usize, 1, 3, 3, 3, 7]);
        let stride = rng.pick(&[1usize, 2]);
        let pad = if case % 4 == 3 {
            rng.range(0, k / 2)
        } else {
            (k - 1) / 2
        };
        let cin = if case == 0 { 3 } else { rng.range(1, 70) };
        let cout = rng.range(1, 90);
        let n = rng.range(1, 3);
        let h = rng.range(k.saturating_sub(2 * pad).max(1), 19);
        let w = rng.range(k.saturating_sub(2 * pad).max(1), 23);
        let relu = rng.range(0, 1) == 1;
        let residual = rng.pick(&[Residual::None, Residual::Same, Residual::Nearest]);
        let op = Conv2d {
            cin,
            cout,
            kh: k,
            kw: k,
            stride,
            pad,
            relu,
            residual,
        };
        let os = op.out_shape(Nhwc::new(n, h, w, cin)).unwrap();
        let res_hw = common::residual_hw(&mut rng, residual, os);
        run_conv_case(&mut rng, op, Nhwc::new(n, h, w, cin), res_hw);
    }
}

#[test]
fn conv_resnet_like_layers_against_cpu() {
    // The shapes the model uses, shrunk spatially: stem 7×7/2 with 3 channels, 1×1 stride-2
    // downsample, 3×3 stride 2 on 64 channels, tall K (3×3×128), FPN lateral with 2× top-down add.
    let mut rng = Rng::for_test("conv_resnet_like_layers_against_cpu");
    let cases = [
        (
            Conv2d {
                cin: 3,
                cout: 64,
                kh: 7,
                kw: 7,
                stride: 2,
                pad: 3,
                relu: true,
                residual: Residual::None,
            },
            Nhwc::new(1, 33, 41, 3),
            None,
        ),
        (
            Conv2d {
                cin: 64,
                cout: 256,
                kh: 1,
                kw: 1,
                stride: 2,
                pad: 0,
                relu: false,
                residual: Residual::None,
            },
            Nhwc::new(2, 9, 11, 64),
            None,
        ),
        (
            Conv2d {
                cin: 64,
                cout: 64,
                kh: 3,
                kw: 3,
                stride: 2,
                pad: 1,
                relu: true,
                residual: Residual::None,
            },
            Nhwc::new(1, 13, 17, 64),
            None,
        ),
        (
            Conv2d {
                cin: 128,
                cout: 72,
                kh: 3,
                kw: 3,
                stride: 1,
                pad: 1,
                relu: true,
                residual: Residual::Same,
            },
            Nhwc::new(1, 7, 9, 128),
            Some((7, 9)),
        ),
        (
            Conv2d {
                cin: 96,
                cout: 64,
                kh: 1,
                kw: 1,
                stride: 1,
                pad: 0,
                relu: false,
                residual: Residual::Nearest,
            },
            Nhwc::new(1, 10, 14, 96),
            Some((5, 7)),
        ),
    ];
    for (op, xs, r) in cases {
        run_conv_case(&mut rng, op, xs, r);
    }
}

#[test]
fn maxpool_random_shapes_against_cpu() {
    let g = gpu();
    let mut rng = Rng::for_test("maxpool_random_shapes_against_cpu");
    for case in 0..10 {
        let op = match case {
            0 => MaxPool2d::STEM,
            1 => MaxPool2d::LAST_LEVEL,
            _ => {
                let k = rng.pick(&[1usize, 2, 3]);
                MaxPool2d {
                    ksize: k,
                    stride: rng.pick(&[1usize, 2]),
                    pad: rng.range(0, k / 2),
                }
            }
        };
        let xs = Nhwc::new(
            rng.range(1, 3),
            rng.range(op.ksize, 17),
            rng.range(op.ksize, 18),
            rng.range(1, 70),
        );
        let x = rng.vec(xs.len(), -3.0, 3.0);
        let (want, os) = cpu::maxpool(&op, &x, xs);
        let xt = Tensor::from_host(g, "x", xs, &x).unwrap();
        let yt = Tensor::new(g, "y", os).unwrap();
        let d = op.encode(g, "pool under test", &xt, &yt).unwrap();
        g.run("pool test", [&d]).unwrap();
        let got = yt.read(g).unwrap();
        // A max selects one input: bit-exact.
        assert_eq!(got, want, "maxpool {op:?} on {xs}");
    }
}

#[test]
fn transform_random_sizes_against_cpu() {
    let g = gpu();
    let mut rng = Rng::for_test("transform_random_sizes_against_cpu");
    for case in 0..6 {
        let cfg = marrow::model::config::TransformConfig {
            min_size: rng.range(24, 96) as u32,
            max_size: rng.range(100, 200) as u32,
            ..Default::default()
        };
        // include an identity-size axis and tiny images
        let (h, w) = match case {
            0 => (cfg.min_size as usize, rng.range(cfg.min_size as usize, 150)),
            1 => (1, 5),
            _ => (rng.range(2, 120), rng.range(2, 120)),
        };
        let sizes = match TransformSizes::new(h, w, &cfg) {
            Ok(s) => s,
            Err(_) => continue,
        };
        let img = rng.vec(3 * h * w, 0.0, 1.0);
        let want = cpu::transform(
            &img,
            h,
            w,
            sizes.resized,
            sizes.padded,
            cfg.image_mean,
            cfg.image_std,
        );
        let ib = g.upload("img", &img).unwrap();
        let out = Tensor::new(g, "out", Nhwc::new(1, sizes.padded.0, sizes.padded.1, 3)).unwrap();
        let d = transform::encode(g, &cfg, &sizes, &ib, &out).unwrap();
        g.run("transform test", [&d]).unwrap();
        let got = out.read(g).unwrap();
        let diff = cpu::diff(&got, &want);
        eprintln!(
            "transform {h}x{w} -> {:?} pad {:?}: max_abs {:.2e}",
            sizes.resized, sizes.padded, diff.max_abs
        );
        // §14.3: ≤ 2e-6 absolute; the GPU's division is within 2.5 ulp of the CPU's.
        assert!(diff.max_abs <= 2e-6, "{diff:?}");
    }
}

#[test]
fn pipelines_are_cached_per_variant() {
    let g = gpu();
    let op = Conv2d {
        cin: 5,
        cout: 7,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
        relu: false,
        residual: Residual::None,
    };
    let a = op.pipeline(g).unwrap();
    let before = g.pipeline_count();
    let b = op.pipeline(g).unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert_eq!(g.pipeline_count(), before);
    let c = Conv2d { relu: true, ..op }.pipeline(g).unwrap();
    assert!(!std::sync::Arc::ptr_eq(&a, &c));
}

#[test]
fn shape_mismatches_are_errors() {
    let g = gpu();
    let op = Conv2d {
        cin: 4,
        cout: 8,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
        relu: false,
        residual: Residual::Same,
    };
    let x = Tensor::new(g, "x", Nhwc::new(1, 5, 5, 4)).unwrap();
    let w = op.upload(g, "w", &vec![0.5; 8 * 36], &[0.0; 8]).unwrap();
    let y = Tensor::new(g, "y", Nhwc::new(1, 5, 5, 8)).unwrap();
    // residual missing
    assert!(op.encode(g, "t", &x, &w, None, &y).is_err());
    // wrong input channels
    let x3 = Tensor::new(g, "x3", Nhwc::new(1, 5, 5, 3)).unwrap();
    assert!(op.encode(g, "t", &x3, &w, Some(&y), &y).is_err());
    // wrong output shape
    let y2 = Tensor::new(g, "y2", Nhwc::new(1, 4, 5, 8)).unwrap();
    assert!(op.encode(g, "t", &x, &w, Some(&y), &y2).is_err());
    // wrong weight size
    assert!(op.upload(g, "w", &[0.0; 10], &[0.0; 8]).is_err());
}
