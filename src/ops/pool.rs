//! Max pooling (stem 3x3/2 and FPN LastLevelMaxPool). Kernel: shaders/pool.wgsl.

use crate::error::{Error, Result};
use crate::gpu::{ConstVal, Dispatch, Gpu, Kernel, Nhwc, Tensor, Variant};
use crate::ops::contract::{params_struct, Binding, HostStruct, KernelIo, KernelVariant, Uniform};

pub const KERNEL: Kernel = Kernel {
    name: "maxpool2d",
    source: include_str!("../../shaders/pool.wgsl"),
    entry: "main",
};

pub const IO: KernelIo = KernelIo {
    kernel: KERNEL,
    params: Some(Params::LAYOUT),
    storage: &[Binding::read("x"), Binding::read_write("y")],
};

/// The pools the model compiles: the stem's and FPN's LastLevelMaxPool.
pub fn variants() -> Vec<KernelVariant> {
    [MaxPool2d::STEM, MaxPool2d::LAST_LEVEL]
        .iter()
        .map(|p| KernelVariant::new(IO, p.consts()))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MaxPool2d {
    pub ksize: usize,
    pub stride: usize,
    pub pad: usize,
}

params_struct! {
    struct Params {
        n: u32,
        h: u32,
        w: u32,
        c: u32,
        oh: u32,
        ow: u32,
        total: u32,
        pad0: u32,
    }
}

impl MaxPool2d {
    /// The ResNet stem pool.
    pub const STEM: MaxPool2d = MaxPool2d {
        ksize: 3,
        stride: 2,
        pad: 1,
    };
    /// FPN's LastLevelMaxPool: max_pool2d(P5, 1, 2, 0).
    pub const LAST_LEVEL: MaxPool2d = MaxPool2d {
        ksize: 1,
        stride: 2,
        pad: 0,
    };

    pub fn out_shape(&self, x: Nhwc) -> Result<Nhwc> {
        if self.stride == 0
            || x.h + 2 * self.pad < self.ksize
            || x.w + 2 * self.pad < self.ksize
            || 2 * self.pad > self.ksize
        {
            return Err(Error::shape("maxpool2d", format!("input {x} for {self:?}")));
        }
        // floor mode (ceil_mode=False everywhere in this model).
        Ok(Nhwc::new(
            x.n,
            (x.h + 2 * self.pad - self.ksize) / self.stride + 1,
            (x.w + 2 * self.pad - self.ksize) / self.stride + 1,
            x.c,
        ))
    }

    /// This pool's kernel variant, for [`Gpu::prepare_pipelines`].
    pub fn variant(&self) -> Variant {
        (KERNEL, self.consts())
    }

    /// The consts of this pool's kernel variant.
    pub fn consts(&self) -> Vec<(&'static str, ConstVal)> {
        let u = |v: usize| ConstVal::U32(v as u32);
        vec![
            ("KSIZE", u(self.ksize)),
            ("STRIDE", u(self.stride)),
            ("PAD", u(self.pad)),
        ]
    }

    pub fn encode(&self, gpu: &Gpu, label: &str, x: &Tensor, y: &Tensor) -> Result<Dispatch> {
        let out = self.out_shape(x.shape)?;
        if y.shape != out {
            return Err(Error::shape(
                label,
                format!("output is {}, expected {out}", y.shape),
            ));
        }
        let total = out.len();
        let consts = self.consts();
        let pipeline = IO.pipeline(gpu, &consts)?;
        let params = Params {
            n: out.n as u32,
            h: x.shape.h as u32,
            w: x.shape.w as u32,
            c: out.c as u32,
            oh: out.h as u32,
            ow: out.w as u32,
            total: total as u32,
            pad0: 0,
        };
        let ubuf = Uniform::new(gpu, &format!("{label} params"), &params);
        IO.dispatch(
            gpu,
            label,
            &pipeline,
            &consts,
            &ubuf,
            &[("x", &x.buf), ("y", &y.buf)],
            grid_1d(total),
        )
    }
}

/// A 2-D grid covering `n` invocations of a 256-wide kernel that linearises (x, y).
pub(crate) fn grid_1d(n: usize) -> [u32; 3] {
    let groups = n.div_ceil(256).max(1);
    if groups <= 65535 {
        [groups as u32, 1, 1]
    } else {
        [65535, groups.div_ceil(65535) as u32, 1]
    }
}
