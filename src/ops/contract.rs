//! The Rust side of the Rust↔WGSL contract, in a form a test can read.
//!
//! Every kernel entry point is described by a [`KernelIo`]: its [`Kernel`] (file, entry point), the
//! layout of the uniform `Params` struct it reads at `@binding(0)` (if any), and the storage
//! buffers it binds at `@binding(1)`, `@binding(2)`, … in order, each with its WGSL name and
//! access. Ops record their dispatches through [`KernelIo::dispatch`], which checks the buffers
//! they pass (by name, in order) and the params' Rust type against that description, so the
//! description cannot drift from the bind-group-building code. Each op module lists the variants
//! it compiles (`variants()`); [`all_variants`] gathers them, and `tests/shader_contract.rs`
//! preprocesses every one exactly as the runtime does, parses and validates it with naga, checks
//! the bindings and the params layout against these descriptions, and translates it to SPIR-V,
//! MSL and HLSL.
//!
//! Params structs are declared with [`params_struct!`], which adds `#[repr(C)]`, `Pod` and a
//! [`StructLayout`] (size, and each field's name, offset, size and type from `offset_of!` /
//! `size_of`) that the test compares with naga's layout of the WGSL struct.

use std::marker::PhantomData;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::{Buffer, ConstVal, Dispatch, Gpu, Kernel};

/// How an entry point binds one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `var<uniform>`: the params struct at binding 0.
    Uniform,
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    ReadWrite,
}

/// One storage buffer of an entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// The WGSL variable name (and the name the op passes the buffer under).
    pub name: &'static str,
    pub access: Access,
    /// Present only in variants where this `Bool` const is true (declared under `#if FLAG`).
    pub when: Option<&'static str>,
}

impl Binding {
    pub const fn read(name: &'static str) -> Binding {
        Binding {
            name,
            access: Access::Read,
            when: None,
        }
    }

    pub const fn read_write(name: &'static str) -> Binding {
        Binding {
            name,
            access: Access::ReadWrite,
            when: None,
        }
    }

    /// Only in variants whose `flag` const is true.
    pub const fn when(self, flag: &'static str) -> Binding {
        Binding {
            when: Some(flag),
            ..self
        }
    }
}

/// A scalar type a params field is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scalar {
    U32,
    I32,
    F32,
}

/// A params field's type as WGSL sees it: a scalar, or nested fixed-size arrays of it (`dims`,
/// outermost first). `[[u32; 4]; 8]` is (U32, [8, 4]), which matches `array<vec4<u32>, 8>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTy {
    pub scalar: Scalar,
    pub dims: Vec<usize>,
}

impl std::fmt::Display for HostTy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self.scalar {
            Scalar::U32 => "u32",
            Scalar::I32 => "i32",
            Scalar::F32 => "f32",
        };
        let mut t = s.to_string();
        for d in self.dims.iter().rev() {
            t = format!("[{t}; {d}]");
        }
        f.write_str(&t)
    }
}

/// Rust types allowed in a params struct.
pub trait HostType {
    fn host_ty() -> HostTy;
}

macro_rules! scalar_host_type {
    ($t:ty, $s:ident) => {
        impl HostType for $t {
            fn host_ty() -> HostTy {
                HostTy {
                    scalar: Scalar::$s,
                    dims: Vec::new(),
                }
            }
        }
    };
}
scalar_host_type!(u32, U32);
scalar_host_type!(i32, I32);
scalar_host_type!(f32, F32);

impl<T: HostType, const N: usize> HostType for [T; N] {
    fn host_ty() -> HostTy {
        let mut t = T::host_ty();
        t.dims.insert(0, N);
        t
    }
}

/// One field of a params struct.
#[derive(Debug, Clone, Copy)]
pub struct FieldLayout {
    pub name: &'static str,
    pub offset: usize,
    pub size: usize,
    pub ty: fn() -> HostTy,
}

/// The memory layout of a `#[repr(C)]` params struct.
#[derive(Debug, Clone, Copy)]
pub struct StructLayout {
    pub name: &'static str,
    pub size: usize,
    pub fields: &'static [FieldLayout],
}

/// A params struct declared with [`params_struct!`].
pub trait HostStruct: bytemuck::Pod {
    const LAYOUT: StructLayout;
}

/// Declares a kernel's params struct: `#[repr(C)]`, `Pod`, and its [`StructLayout`] for the
/// contract test. The WGSL struct must have the same name, fields (names and order), types and
/// offsets.
macro_rules! params_struct {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name {
            $($(#[$fmeta])* $field: $ty),*
        }

        impl $crate::ops::contract::HostStruct for $name {
            const LAYOUT: $crate::ops::contract::StructLayout =
                $crate::ops::contract::StructLayout {
                    name: stringify!($name),
                    size: ::core::mem::size_of::<$name>(),
                    fields: &[$($crate::ops::contract::FieldLayout {
                        name: stringify!($field),
                        offset: ::core::mem::offset_of!($name, $field),
                        size: ::core::mem::size_of::<$ty>(),
                        ty: <$ty as $crate::ops::contract::HostType>::host_ty,
                    }),*],
                };
        }
    };
}
pub(crate) use params_struct;

/// A uniform buffer holding one params struct; its type says which struct it holds, so an op
/// cannot hand an entry point the params of another.
pub struct Uniform<T> {
    pub buf: Buffer,
    _t: PhantomData<T>,
}

impl<T: HostStruct> Uniform<T> {
    pub fn new(gpu: &Gpu, label: &str, value: &T) -> Uniform<T> {
        Uniform {
            buf: gpu.uniform(label, value),
            _t: PhantomData,
        }
    }
}

/// The Rust-side description of one kernel entry point's inputs and outputs.
#[derive(Debug, Clone, Copy)]
pub struct KernelIo {
    pub kernel: Kernel,
    /// The uniform at `@binding(0)`, when the entry point reads one.
    pub params: Option<StructLayout>,
    /// The storage buffers at `@binding(1)`, `@binding(2)`, … in this order. In a variant where a
    /// buffer's `when` flag is false it is absent and the later ones move up one binding.
    pub storage: &'static [Binding],
}

impl KernelIo {
    /// The storage buffers of one variant, in binding order (binding `i + 1` for entry `i`).
    pub fn storage_for(&self, consts: &[(&str, ConstVal)]) -> Result<Vec<Binding>> {
        let mut out = Vec::with_capacity(self.storage.len());
        for b in self.storage {
            let present = match b.when {
                None => true,
                Some(flag) => match consts.iter().find(|(k, _)| *k == flag) {
                    Some((_, ConstVal::Bool(v))) => *v,
                    _ => {
                        return Err(Error::Shader {
                            kernel: self.kernel.name.into(),
                            message: format!(
                                "binding {} depends on const {flag}, which this variant does not \
                                 give as a bool",
                                b.name
                            ),
                        })
                    }
                },
            };
            if present {
                out.push(*b);
            }
        }
        Ok(out)
    }

    /// The compiled pipeline of one variant (cached by the [`Gpu`]).
    pub fn pipeline(
        &self,
        gpu: &Gpu,
        consts: &[(&str, ConstVal)],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        gpu.pipeline(&self.kernel, consts)
    }

    /// Records a dispatch of this entry point with its params uniform and its storage buffers,
    /// given as (WGSL name, buffer) in binding order; both are checked against this description.
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch<T: HostStruct>(
        &self,
        gpu: &Gpu,
        label: impl Into<String>,
        pipeline: &Arc<wgpu::ComputePipeline>,
        consts: &[(&str, ConstVal)],
        params: &Uniform<T>,
        buffers: &[(&str, &Buffer)],
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        self.record(
            gpu,
            label.into(),
            pipeline,
            consts,
            Some((&T::LAYOUT, &params.buf)),
            buffers,
            workgroups,
        )
    }

    /// [`KernelIo::dispatch`] for an entry point that reads no params uniform.
    pub fn dispatch_without_params(
        &self,
        gpu: &Gpu,
        label: impl Into<String>,
        pipeline: &Arc<wgpu::ComputePipeline>,
        consts: &[(&str, ConstVal)],
        buffers: &[(&str, &Buffer)],
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        self.record(
            gpu,
            label.into(),
            pipeline,
            consts,
            None,
            buffers,
            workgroups,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        gpu: &Gpu,
        label: String,
        pipeline: &Arc<wgpu::ComputePipeline>,
        consts: &[(&str, ConstVal)],
        params: Option<(&StructLayout, &Buffer)>,
        buffers: &[(&str, &Buffer)],
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        let err = |message: String| Error::Shader {
            kernel: format!("{} ({label})", self.kernel.name),
            message,
        };
        match (self.params, params) {
            (Some(want), Some((got, _))) if want.name != got.name || want.size != got.size => {
                return Err(err(format!(
                    "params uniform is a {} ({} bytes), the entry point reads a {} ({} bytes)",
                    got.name, got.size, want.name, want.size
                )))
            }
            (Some(want), None) => {
                return Err(err(format!(
                    "no params uniform given; the entry point reads a {}",
                    want.name
                )))
            }
            (None, Some((got, _))) => {
                return Err(err(format!(
                    "a {} params uniform given; the entry point reads none",
                    got.name
                )))
            }
            _ => {}
        }
        let want: Vec<&str> = self.storage_for(consts)?.iter().map(|b| b.name).collect();
        let got: Vec<&str> = buffers.iter().map(|(n, _)| *n).collect();
        if want != got {
            return Err(err(format!(
                "storage buffers given as {got:?}; the entry point binds {want:?} at bindings 1.."
            )));
        }
        let bufs: Vec<&Buffer> = buffers.iter().map(|(_, b)| *b).collect();
        gpu.dispatch(label, pipeline, params.map(|(_, b)| b), &bufs, workgroups)
    }
}

/// One kernel variant an op compiles: an entry point and the consts prepended to its source.
#[derive(Debug, Clone)]
pub struct KernelVariant {
    pub io: KernelIo,
    pub consts: Vec<(&'static str, ConstVal)>,
}

impl KernelVariant {
    pub fn new(io: KernelIo, consts: Vec<(&'static str, ConstVal)>) -> KernelVariant {
        KernelVariant { io, consts }
    }
}

/// Every kernel variant the ops compile, gathered from each op module's `variants()`: what the
/// contract test checks. A new op module adds its `variants()` here.
pub fn all_variants() -> Vec<KernelVariant> {
    use crate::ops::*;
    [
        transform::variants(),
        conv::variants(),
        pool::variants(),
        rpn::variants(),
        topk::variants(),
        nms::variants(),
        roi_align::variants(),
        box_head::variants(),
        linalg::variants(),
        refine::variants(),
    ]
    .into_iter()
    .flatten()
    .collect()
}
