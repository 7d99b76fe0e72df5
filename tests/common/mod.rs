//! Shared test helpers: one GPU per test process, and a seeded RNG whose seed is fresh each run
//! (printed, and fixed with MARROW_TEST_SEED=… to reproduce a failure).
#![allow(dead_code)]

use std::sync::OnceLock;

use marrow::gpu::{Gpu, GpuOptions, Nhwc, Tensor};
use marrow::ops::conv::{Conv2d, ConvWeights};

pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        let g = Gpu::new(&GpuOptions::default()).expect(
            "no GPU adapter: install Mesa's lavapipe (.ci/install-vulkan) to run the tests",
        );
        eprintln!(
            "adapter: {} ({}, {})",
            g.report.name, g.report.backend, g.report.driver_info
        );
        g
    })
}

pub struct Rng(u64);

impl Rng {
    /// A generator for one test; the seed mixes the run seed with the test's name.
    pub fn for_test(name: &str) -> Rng {
        let run = std::env::var("MARROW_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{name}: MARROW_TEST_SEED={run}");
        Rng(run ^ marrow::seedgen::fnv1a64(name.as_bytes()))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        marrow::seedgen::splitmix64(self.0)
    }
    /// Uniform in [lo, hi].
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.uniform()).collect()
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.range(0, xs.len() - 1)]
    }
}

/// The source size of a random residual for a conv with output `os`: none, the output's own
/// size, or for the nearest-upsample add one of exact 2×, identity, or an arbitrary size (ATen's
/// general nearest rule).
pub fn residual_hw(
    rng: &mut Rng,
    residual: marrow::ops::conv::Residual,
    os: marrow::gpu::Nhwc,
) -> Option<(usize, usize)> {
    use marrow::ops::conv::Residual;
    match residual {
        Residual::None => None,
        Residual::Same => Some((os.h, os.w)),
        Residual::Nearest => Some(match rng.range(0, 2) {
            0 => (os.h.div_ceil(2).max(1), os.w.div_ceil(2).max(1)),
            1 => (os.h, os.w),
            _ => (rng.range(1, os.h + 3), rng.range(1, os.w + 3)),
        }),
    }
}

/// One random convolution case on the GPU: inputs, weights and an optional residual of source
/// size `res_hw` drawn in [-1, 1], uploaded, with the CPU reference output `want` of shape `os`.
pub struct ConvCase {
    pub os: Nhwc,
    pub want: Vec<f32>,
    pub x: Tensor,
    pub w: ConvWeights,
    pub res: Option<Tensor>,
}

pub fn conv_case(rng: &mut Rng, op: &Conv2d, xs: Nhwc, res_hw: Option<(usize, usize)>) -> ConvCase {
    let g = gpu();
    let x = rng.vec(xs.len(), -1.0, 1.0);
    let w = rng.vec(op.cout * op.k(), -1.0, 1.0);
    let b = rng.vec(op.cout, -1.0, 1.0);
    let os = op.out_shape(xs).unwrap();
    let rs = res_hw.map(|(h, w)| Nhwc::new(os.n, h, w, os.c));
    let r = rs.map(|s| rng.vec(s.len(), -1.0, 1.0));
    let (want, _) = marrow::cpu::conv2d(op, &x, xs, &w, &b, r.as_deref().zip(rs));
    ConvCase {
        os,
        want,
        x: Tensor::from_host(g, "x", xs, &x).unwrap(),
        w: op.upload(g, "conv", &w, &b).unwrap(),
        res: r
            .as_ref()
            .map(|r| Tensor::from_host(g, "res", rs.unwrap(), r).unwrap()),
    }
}
