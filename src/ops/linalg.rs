//! Dense linear layers on row-major matrices (shaders/linalg.wgsl): `Y = act(X Wᵀ + b)` with W in
//! PyTorch's `nn.Linear` layout [out, in]. The refinement head's projections and recurrent gates
//! run on it. The live row count is read on the GPU (`count[0] × rows_per_count`, capped at the
//! buffer's rows), so one recorded dispatch serves any number of detections.

use crate::error::{Error, Result};
use crate::gpu::{Buffer, ConstVal, Dispatch, Gpu, Kernel};
use crate::ops::contract::{params_struct, Binding, HostStruct, KernelIo, KernelVariant, Uniform};

pub const KERNEL: Kernel = Kernel {
    name: "linear",
    source: include_str!("../../shaders/linalg.wgsl"),
    entry: "linear",
};

pub const IO: KernelIo = KernelIo {
    kernel: KERNEL,
    params: Some(Params::LAYOUT),
    storage: &[
        Binding::read("x"),
        Binding::read("w"),
        Binding::read("b"),
        Binding::read("count"),
        Binding::read_write("y"),
    ],
};

params_struct! {
    struct Params {
        m_cap: u32,
        n: u32,
        k: u32,
        rows_per_count: u32,
    }
}

/// The activation applied after the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    None,
    Tanh,
}

/// Both activations (the kernel's only variant axis).
pub fn variants() -> Vec<KernelVariant> {
    [Activation::None, Activation::Tanh]
        .into_iter()
        .map(|act| {
            KernelVariant::new(
                IO,
                Linear {
                    inputs: 1,
                    outputs: 1,
                    act,
                }
                .consts(),
            )
        })
        .collect()
}

/// A fully connected layer `y = act(x Wᵀ + b)`, x [rows, inputs], W [outputs, inputs].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Linear {
    pub inputs: usize,
    pub outputs: usize,
    pub act: Activation,
}

/// A linear layer's parameters on the GPU: W [outputs, inputs] and b [outputs], f32.
pub struct LinearWeights {
    pub w: Buffer,
    pub b: Buffer,
}

impl LinearWeights {
    /// Uploads `w` ([outputs, inputs], row-major) and `b` ([outputs]) under `name`.
    pub fn upload(gpu: &Gpu, name: &str, w: &[f32], b: &[f32]) -> Result<LinearWeights> {
        if b.is_empty() || w.len() % b.len() != 0 {
            return Err(Error::shape(
                name,
                format!("{} weights for {} outputs", w.len(), b.len()),
            ));
        }
        Ok(LinearWeights {
            w: gpu.upload(&format!("{name}.weight"), w)?,
            b: gpu.upload(&format!("{name}.bias"), b)?,
        })
    }
}

/// The buffers a [`Linear`] dispatch reads and writes.
pub struct LinearIo<'a> {
    /// [m_cap, inputs] f32.
    pub x: &'a Buffer,
    /// [outputs, inputs] f32.
    pub w: &'a Buffer,
    /// [outputs] f32.
    pub b: &'a Buffer,
    /// `count[0]` live units; rows = min(m_cap, count[0] × rows_per_count).
    pub count: &'a Buffer,
    /// [m_cap, outputs] f32.
    pub y: &'a Buffer,
    pub m_cap: usize,
    pub rows_per_count: usize,
}

impl Linear {
    pub fn new(inputs: usize, outputs: usize, act: Activation) -> Linear {
        Linear {
            inputs,
            outputs,
            act,
        }
    }

    pub fn consts(&self) -> Vec<(&'static str, ConstVal)> {
        let act = match self.act {
            Activation::None => 0,
            Activation::Tanh => 1,
        };
        vec![("ACT", ConstVal::U32(act))]
    }

    /// The pipeline variant (for compiling ahead of use).
    pub fn variant(&self) -> crate::gpu::Variant {
        (KERNEL, self.consts())
    }

    /// FLOPs for `rows` rows (a multiply and an add per weight).
    pub fn flops(&self, rows: usize) -> f64 {
        2.0 * rows as f64 * self.inputs as f64 * self.outputs as f64
    }

    pub fn encode(&self, gpu: &Gpu, label: &str, io: &LinearIo) -> Result<Dispatch> {
        let err = |m: String| Error::shape(label, m);
        if self.inputs == 0 || self.outputs == 0 {
            return Err(err(format!(
                "linear {} -> {} has an empty side",
                self.inputs, self.outputs
            )));
        }
        let need = |b: &Buffer, what: &str, elems: usize| -> Result<()> {
            if b.size() < elems as u64 * 4 {
                return Err(err(format!(
                    "{what} buffer holds {} bytes, needs {} ({elems} f32)",
                    b.size(),
                    elems * 4
                )));
            }
            Ok(())
        };
        need(io.x, "x", io.m_cap * self.inputs)?;
        need(io.w, "w", self.outputs * self.inputs)?;
        need(io.b, "b", self.outputs)?;
        need(io.count, "count", 1)?;
        need(io.y, "y", io.m_cap * self.outputs)?;
        if io.m_cap * self.inputs.max(self.outputs) > u32::MAX as usize / 2 {
            return Err(Error::TooLarge(format!("{label}: {} rows", io.m_cap)));
        }
        let consts = self.consts();
        let pipeline = IO.pipeline(gpu, &consts)?;
        let params = Params {
            m_cap: io.m_cap as u32,
            n: self.outputs as u32,
            k: self.inputs as u32,
            rows_per_count: io.rows_per_count as u32,
        };
        let ubuf = Uniform::new(gpu, &format!("{label} params"), &params);
        IO.dispatch(
            gpu,
            label,
            &pipeline,
            &consts,
            &ubuf,
            &[
                ("x", io.x),
                ("w", io.w),
                ("b", io.b),
                ("count", io.count),
                ("y", io.y),
            ],
            // 64×64 output tiles (shaders/linalg.wgsl).
            [
                self.outputs.div_ceil(64) as u32,
                io.m_cap.div_ceil(64).max(1) as u32,
                1,
            ],
        )
    }
}
