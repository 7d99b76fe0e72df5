//! 2-D convolution (implicit GEMM, NHWC) with BN folded into the weights and bias, and ReLU,
//! residual add or FPN nearest-upsample add fused into the epilogue. Kernel: shaders/conv2d.wgsl.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::{ConstVal, Dispatch, Gpu, Kernel, Nhwc, Tensor, Variant};
use crate::ops::contract::{params_struct, Binding, HostStruct, KernelIo, KernelVariant, Uniform};

pub const KERNEL: Kernel = Kernel {
    name: "conv2d",
    source: include_str!("../../shaders/conv2d.wgsl"),
    entry: "main",
};

/// The kernel's inputs and outputs (the residual only in variants with `RESIDUAL`).
pub const IO: KernelIo = KernelIo {
    kernel: KERNEL,
    params: Some(Params::LAYOUT),
    storage: &[
        Binding::read("x"),
        Binding::read("wt"),
        Binding::read("bias"),
        Binding::read_write("y"),
        Binding::read("res").when("RESIDUAL"),
    ],
};

/// The conv variants the known models compile, every tile of every distinct layer:
/// [`faster_rcnn_layers`] of torchvision's COCO model (ResNet-50, FPN 256, 1024, 91 classes), the
/// paper's (8 classes), marrow's compact model (ResNet-18, FPN 128, 256, 4 classes) and the test
/// fixture model (ResNet-50, FPN 64, 1024, 4 classes).
pub fn variants() -> Vec<KernelVariant> {
    let mut layers: Vec<Conv2d> = Vec::new();
    for (bottleneck, fpn, rep, classes) in [
        (true, 256, 1024, 91),
        (true, 256, 1024, 8),
        (false, 128, 256, 4),
        (true, 64, 1024, 4),
    ] {
        for l in faster_rcnn_layers(bottleneck, fpn, rep, classes) {
            if !layers.contains(&l) {
                layers.push(l);
            }
        }
    }
    layers
        .iter()
        .flat_map(|l| ConvTile::ALL.map(|t| KernelVariant::new(IO, l.consts(t))))
        .collect()
}

/// The distinct convolution layers of a torchvision ResNet-FPN Faster R-CNN, as src/model builds
/// them: the body (`bottleneck`: ResNet-50/101 Bottleneck blocks, else ResNet-18/34 BasicBlocks;
/// the block count does not add shapes), the FPN of width `fpn` (lateral 1×1 convs with the
/// top-down add fused, 3×3 outputs), the RPN head (3 anchors per location) and the box head MLP
/// (`representation`, `classes` including background) as 1×1 convolutions over rows.
pub fn faster_rcnn_layers(
    bottleneck: bool,
    fpn: usize,
    representation: usize,
    classes: usize,
) -> Vec<Conv2d> {
    let conv = |cin, cout, k: usize, stride, relu, residual| Conv2d {
        cin,
        cout,
        kh: k,
        kw: k,
        stride,
        pad: (k - 1) / 2,
        relu,
        residual,
    };
    let e = if bottleneck { 4 } else { 1 };
    let mut out = vec![conv(3, 64, 7, 2, true, Residual::None)];
    for layer in 1..=4 {
        let planes = 64 << (layer - 1);
        // Block 0 (stride, channel change, downsample) and block 1 (as all later blocks).
        for idx in 0..2 {
            let stride = if idx == 0 && layer > 1 { 2 } else { 1 };
            let cin = match (idx, layer) {
                (0, 1) => 64,
                (0, _) => planes / 2 * e,
                _ => planes * e,
            };
            if stride != 1 || cin != planes * e {
                out.push(conv(cin, planes * e, 1, stride, false, Residual::None));
            }
            if bottleneck {
                out.push(conv(cin, planes, 1, 1, true, Residual::None));
                out.push(conv(planes, planes, 3, stride, true, Residual::None));
                out.push(conv(planes, planes * 4, 1, 1, true, Residual::Same));
            } else {
                out.push(conv(cin, planes, 3, stride, true, Residual::None));
                out.push(conv(planes, planes, 3, 1, true, Residual::Same));
            }
        }
    }
    for i in 0..4 {
        let residual = if i == 3 {
            Residual::None
        } else {
            Residual::Nearest
        };
        out.push(conv((64 << i) * e, fpn, 1, 1, false, residual));
        out.push(conv(fpn, fpn, 3, 1, false, Residual::None));
    }
    out.push(conv(fpn, fpn, 3, 1, true, Residual::None));
    out.push(conv(fpn, 3, 1, 1, false, Residual::None));
    out.push(conv(fpn, 12, 1, 1, false, Residual::None));
    let linear = crate::ops::box_head::linear;
    out.push(linear(fpn * 49, representation, true));
    out.push(linear(representation, representation, true));
    out.push(linear(representation, classes, false));
    out.push(linear(representation, 4 * classes, false));
    let mut distinct: Vec<Conv2d> = Vec::new();
    for l in out {
        if !distinct.contains(&l) {
            distinct.push(l);
        }
    }
    distinct
}

/// What the epilogue adds before the (optional) ReLU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Residual {
    None,
    /// A tensor of the output's shape (ResNet shortcut).
    Same,
    /// A tensor with the output's batch and channels, upsampled with ATen's legacy nearest rule
    /// to the output's height and width (FPN top-down merge).
    Nearest,
}

/// The register block of one thread of shaders/conv2d.wgsl (rows x columns of the GEMM); a
/// workgroup of 16x16 threads computes a (16*rows)x(16*columns) output tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvTile {
    /// 4x4 per thread, 64x64 per workgroup (the original kernel).
    R4x4,
    /// 8x4 per thread, 128x64 per workgroup: layers with at most 64 output channels.
    R8x4,
    /// 8x8 per thread, 128x128 per workgroup: half the workgroup-memory loads per FMA of 4x4.
    R8x8,
}

impl ConvTile {
    pub const ALL: [ConvTile; 3] = [ConvTile::R4x4, ConvTile::R8x4, ConvTile::R8x8];

    /// (rows, columns) per thread.
    pub fn block(self) -> (usize, usize) {
        match self {
            ConvTile::R4x4 => (4, 4),
            ConvTile::R8x4 => (8, 4),
            ConvTile::R8x8 => (8, 8),
        }
    }
}

/// The static description of one convolution layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conv2d {
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub relu: bool,
    pub residual: Residual,
}

/// Device-resident weights in the kernel's layout: `w` is [KH*KW*CIN, COUT], `b` is [COUT].
pub struct ConvWeights {
    pub w: Arc<wgpu::Buffer>,
    pub b: Arc<wgpu::Buffer>,
}

params_struct! {
    struct Params {
        n: u32,
        h: u32,
        w: u32,
        oh: u32,
        ow: u32,
        m: u32,
        rh: u32,
        rw: u32,
        scale_h: f32,
        scale_w: f32,
        pad0: u32,
        pad1: u32,
    }
}

impl Conv2d {
    pub fn k(&self) -> usize {
        self.kh * self.kw * self.cin
    }

    /// torchvision's output size: floor((h + 2p - k) / s) + 1.
    pub fn out_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        if h + 2 * self.pad < self.kh || w + 2 * self.pad < self.kw || self.stride == 0 {
            return Err(Error::shape(
                "conv2d",
                format!(
                    "input {h}x{w} is smaller than the {}x{} kernel",
                    self.kh, self.kw
                ),
            ));
        }
        Ok((
            (h + 2 * self.pad - self.kh) / self.stride + 1,
            (w + 2 * self.pad - self.kw) / self.stride + 1,
        ))
    }

    pub fn out_shape(&self, x: Nhwc) -> Result<Nhwc> {
        if x.c != self.cin {
            return Err(Error::shape(
                "conv2d",
                format!(
                    "input {x} has {} channels, the layer expects {}",
                    x.c, self.cin
                ),
            ));
        }
        let (oh, ow) = self.out_hw(x.h, x.w)?;
        Ok(Nhwc::new(x.n, oh, ow, self.cout))
    }

    /// Repacks torchvision's OIHW weight into the kernel's [K, COUT] layout, k = (ky, kx, ci).
    pub fn repack_oihw(&self, oihw: &[f32]) -> Vec<f32> {
        let (cin, cout, kh, kw) = (self.cin, self.cout, self.kh, self.kw);
        let mut out = vec![0.0f32; kh * kw * cin * cout];
        for co in 0..cout {
            for ci in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        out[((ky * kw + kx) * cin + ci) * cout + co] =
                            oihw[((co * cin + ci) * kh + ky) * kw + kx];
                    }
                }
            }
        }
        out
    }

    /// Uploads OIHW weights and a bias (already BN-folded).
    pub fn upload(
        &self,
        gpu: &Gpu,
        label: &str,
        oihw: &[f32],
        bias: &[f32],
    ) -> Result<ConvWeights> {
        if oihw.len() != self.cout * self.k() || bias.len() != self.cout {
            return Err(Error::shape(
                label,
                format!(
                    "weight has {} values and bias {}, expected {}x{}x{}x{} and {}",
                    oihw.len(),
                    bias.len(),
                    self.cout,
                    self.cin,
                    self.kh,
                    self.kw,
                    self.cout
                ),
            ));
        }
        Ok(ConvWeights {
            w: Arc::new(gpu.upload(&format!("{label}.weight[K,COUT]"), &self.repack_oihw(oihw))?),
            b: Arc::new(gpu.upload(&format!("{label}.bias"), bias)?),
        })
    }

    /// The register block for this layer: 8x8 unless the output has at most 64 channels (then a
    /// 128-wide tile would be half idle); `MARROW_CONV_TILE=4x4|8x4|8x8` overrides (benchmarks).
    pub fn tile(&self) -> ConvTile {
        match std::env::var("MARROW_CONV_TILE").as_deref() {
            Ok("4x4") => ConvTile::R4x4,
            Ok("8x4") => ConvTile::R8x4,
            Ok("8x8") => ConvTile::R8x8,
            _ if self.cout <= 64 => ConvTile::R8x4,
            _ => ConvTile::R8x8,
        }
    }

    /// The pipeline of this layer's tile ([`Conv2d::tile`]).
    pub fn pipeline(&self, gpu: &Gpu) -> Result<Arc<wgpu::ComputePipeline>> {
        self.pipeline_for(gpu, self.tile())
    }

    /// The pipeline of a given tile (one cached variant per layer shape, epilogue and tile).
    pub fn pipeline_for(&self, gpu: &Gpu, tile: ConvTile) -> Result<Arc<wgpu::ComputePipeline>> {
        IO.pipeline(gpu, &self.consts(tile))
    }

    /// The kernel variant of this layer with a given tile, for [`Gpu::prepare_pipelines`].
    pub fn variant(&self, tile: ConvTile) -> Variant {
        (KERNEL, self.consts(tile))
    }

    /// The consts of this layer's kernel variant with a given tile.
    pub fn consts(&self, tile: ConvTile) -> Vec<(&'static str, ConstVal)> {
        let u = |v: usize| ConstVal::U32(v as u32);
        let (rm, rn) = tile.block();
        vec![
            ("KH", u(self.kh)),
            ("KW", u(self.kw)),
            ("STRIDE", u(self.stride)),
            ("PAD", u(self.pad)),
            ("CIN", u(self.cin)),
            ("COUT", u(self.cout)),
            ("RELU", ConstVal::Bool(self.relu)),
            ("RM", u(rm)),
            ("RN", u(rn)),
            ("RESIDUAL", ConstVal::Bool(self.residual != Residual::None)),
            (
                "RES_MODE",
                ConstVal::U32(match self.residual {
                    Residual::None => 0,
                    Residual::Same => 1,
                    Residual::Nearest => 2,
                }),
            ),
        ]
    }

    /// Checks shapes and records the dispatch `y = act(conv(x) + bias [+ residual])` with the
    /// layer's tile ([`Conv2d::tile`]).
    pub fn encode(
        &self,
        gpu: &Gpu,
        label: &str,
        x: &Tensor,
        weights: &ConvWeights,
        residual: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<Dispatch> {
        self.encode_with(gpu, self.tile(), label, x, weights, residual, y)
    }

    /// [`Conv2d::encode`] with a given tile (tests run every tile).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_with(
        &self,
        gpu: &Gpu,
        tile: ConvTile,
        label: &str,
        x: &Tensor,
        weights: &ConvWeights,
        residual: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<Dispatch> {
        let out = self.out_shape(x.shape)?;
        if y.shape != out {
            return Err(Error::shape(
                label,
                format!("output is {}, expected {out}", y.shape),
            ));
        }
        let (rh, rw) = match (self.residual, residual) {
            (Residual::None, None) => (0, 0),
            (Residual::Same, Some(r)) if r.shape == out => (out.h, out.w),
            (Residual::Nearest, Some(r))
                if r.shape.n == out.n && r.shape.c == out.c && r.shape.h > 0 && r.shape.w > 0 =>
            {
                (r.shape.h, r.shape.w)
            }
            (mode, r) => {
                return Err(Error::shape(
                    label,
                    format!(
                        "residual mode {mode:?} with residual {:?} for output {out}",
                        r.map(|t| t.shape)
                    ),
                ))
            }
        };
        let m = out.n * out.h * out.w;
        if m > u32::MAX as usize
            || x.shape.len() > u32::MAX as usize
            || y.shape.len() > u32::MAX as usize
        {
            return Err(Error::TooLarge(format!(
                "{label}: tensor exceeds 2^32 elements"
            )));
        }
        let params = Params {
            n: out.n as u32,
            h: x.shape.h as u32,
            w: x.shape.w as u32,
            oh: out.h as u32,
            ow: out.w as u32,
            m: m as u32,
            rh: rh as u32,
            rw: rw as u32,
            // ATen: scale = (float)in / out, in f32, used only off the identity / exact-2x paths.
            scale_h: if out.h > 0 {
                rh as f32 / out.h as f32
            } else {
                0.0
            },
            scale_w: if out.w > 0 {
                rw as f32 / out.w as f32
            } else {
                0.0
            },
            pad0: 0,
            pad1: 0,
        };
        let consts = self.consts(tile);
        let pipeline = IO.pipeline(gpu, &consts)?;
        let ubuf = Uniform::new(gpu, &format!("{label} params"), &params);
        let mut bufs: Vec<(&str, &wgpu::Buffer)> = vec![
            ("x", &x.buf),
            ("wt", &weights.w),
            ("bias", &weights.b),
            ("y", &y.buf),
        ];
        if let Some(r) = residual {
            bufs.push(("res", &r.buf));
        }
        let (rm, rn) = tile.block();
        IO.dispatch(
            gpu,
            label,
            &pipeline,
            &consts,
            &ubuf,
            &bufs,
            [
                super::groups(m, 16 * rm),
                super::groups(self.cout, 16 * rn),
                1,
            ],
        )
    }

    /// Floating-point operations of one application (2 per multiply-add).
    pub fn flops(&self, out: Nhwc) -> f64 {
        2.0 * (out.n * out.h * out.w) as f64 * self.k() as f64 * self.cout as f64
    }
}
