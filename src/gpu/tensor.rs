//! A GPU activation tensor: a storage buffer plus its NHWC shape. Channels-last because the
//! implicit-GEMM convolution reads contiguous input channels for each (pixel, tap) pair.

use std::sync::Arc;

use super::Gpu;
use crate::error::Result;

/// Shape of a channels-last activation: (batch, height, width, channels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nhwc {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Nhwc {
    pub fn new(n: usize, h: usize, w: usize, c: usize) -> Self {
        Nhwc { n, h, w, c }
    }
    pub fn len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn bytes(&self) -> u64 {
        self.len() as u64 * 4
    }
}

impl std::fmt::Display for Nhwc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {}, {}, {}] (NHWC)", self.n, self.h, self.w, self.c)
    }
}

#[derive(Clone)]
pub struct Tensor {
    pub buf: Arc<wgpu::Buffer>,
    pub shape: Nhwc,
}

impl Tensor {
    pub fn new(gpu: &Gpu, label: &str, shape: Nhwc) -> Result<Tensor> {
        Ok(Tensor {
            buf: Arc::new(gpu.storage(label, shape.bytes())?),
            shape,
        })
    }
    pub fn from_host(gpu: &Gpu, label: &str, shape: Nhwc, data: &[f32]) -> Result<Tensor> {
        if shape.len() != data.len() {
            return Err(crate::error::Error::shape(
                label,
                format!("{} host values for shape {shape}", data.len()),
            ));
        }
        Ok(Tensor {
            buf: Arc::new(gpu.upload(label, data)?),
            shape,
        })
    }
    pub fn read(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        gpu.read_back(&self.buf, self.shape.len())
    }
    /// Views the same buffer with another shape of no more elements (used by the buffer planner,
    /// which hands out buffers at least as large as the tensor).
    pub fn with_shape(&self, shape: Nhwc) -> Tensor {
        debug_assert!(shape.bytes() <= self.buf.size());
        Tensor {
            buf: self.buf.clone(),
            shape,
        }
    }
}
