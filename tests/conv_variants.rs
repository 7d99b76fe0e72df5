//! Every register-block variant of shaders/conv2d.wgsl (`ConvTile`: 4x4, 8x4, 8x8) against the
//! plain CPU convolution on the same freshly drawn random shapes, whichever one a layer would
//! pick, so every variant stays tested. Shapes straddle the tiles (rows % 128, channels % 64 and
//! % 128, K tails), include CIN = 3, odd channels, stride 2, non-square kernels, unusual padding,
//! batch > 1 and all residual modes.

mod common;

use common::{conv_case, gpu, Rng};
use marrow::cpu;
use marrow::gpu::{Nhwc, Tensor};
use marrow::ops::conv::{Conv2d, ConvTile, Residual};

fn check(rng: &mut Rng, op: Conv2d, xs: Nhwc, res_hw: Option<(usize, usize)>) {
    let g = gpu();
    let c = conv_case(rng, &op, xs, res_hw);
    let os = c.os;
    for kernel in ConvTile::ALL {
        let yt = Tensor::new(g, "y", os).unwrap();
        let d = op
            .encode_with(
                g,
                kernel,
                "conv under test",
                &c.x,
                &c.w,
                c.res.as_ref(),
                &yt,
            )
            .unwrap();
        g.run("conv variant test", [&d]).unwrap();
        let got = yt.read(g).unwrap();
        let d = cpu::diff(&got, &c.want);
        eprintln!(
            "{kernel:?} conv {:?} x{xs} res{res_hw:?} -> {os}: max_abs {:.2e} rel {:.2e}",
            (
                op.kh,
                op.kw,
                op.stride,
                op.pad,
                op.cin,
                op.cout,
                op.relu,
                op.residual
            ),
            d.max_abs,
            d.rel_max,
        );
        assert_eq!(d.nonfinite, 0, "{kernel:?}");
        // §14.3's single-layer tolerance (inputs in [-1, 1], K up to ~2300 terms).
        assert!(d.rel_max <= 1e-5, "{kernel:?} conv mismatch: {d:?}");
    }
}

#[test]
fn conv_kernels_agree_with_cpu_on_random_shapes() {
    let mut rng = Rng::for_test("conv_kernels_agree_with_cpu_on_random_shapes");
    for case in 0..16 {
        let k = rng.pick(&[1usize, 1, 3, 3, 7]);
        let kw = if case % 5 == 4 {
            rng.pick(&[1usize, 3])
        } else {
            k
        };
        let stride = rng.pick(&[1usize, 2]);
        let pad = if case % 4 == 3 {
            rng.range(0, k.min(kw) / 2)
        } else {
            (k.min(kw) - 1) / 2
        };
        let cin = match case {
            0 => 3,
            1 => 4 * rng.range(1, 40),
            _ => rng.range(1, 140),
        };
        let cout = match case {
            2 => 64 * rng.range(1, 2),
            _ => rng.range(1, 270),
        };
        let n = rng.range(1, 3);
        let h = rng.range(k.saturating_sub(2 * pad).max(1), 29);
        let w = rng.range(kw.saturating_sub(2 * pad).max(1), 31);
        let residual = rng.pick(&[Residual::None, Residual::Same, Residual::Nearest]);
        let op = Conv2d {
            cin,
            cout,
            kh: k,
            kw,
            stride,
            pad,
            relu: rng.range(0, 1) == 1,
            residual,
        };
        let os = op.out_shape(Nhwc::new(n, h, w, cin)).unwrap();
        let res_hw = common::residual_hw(&mut rng, residual, os);
        check(&mut rng, op, Nhwc::new(n, h, w, cin), res_hw);
    }
}

#[test]
fn conv_tile_choice_follows_the_output_channels() {
    if std::env::var("MARROW_CONV_TILE").is_ok() {
        return;
    }
    let op = |cout| Conv2d {
        cin: 8,
        cout,
        kh: 1,
        kw: 1,
        stride: 1,
        pad: 0,
        relu: false,
        residual: Residual::None,
    };
    assert_eq!(op(3).tile(), ConvTile::R8x4);
    assert_eq!(op(64).tile(), ConvTile::R8x4);
    assert_eq!(op(65).tile(), ConvTile::R8x8);
    assert_eq!(op(2048).tile(), ConvTile::R8x8);
}
