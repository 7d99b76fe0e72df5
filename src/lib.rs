//! marrow: a from-scratch WGSL/wgpu inference engine for torchvision's Faster R-CNN + FPN,
//! built to count cells in microscope images.
//!
//! Layout: [`gpu`] owns every wgpu call; [`ops`] has one op struct per kernel family (WGSL in
//! `shaders/`); [`cpu`] holds the plain reference implementations the kernels are tested
//! against; [`model`] loads weights and runs the network; [`validate`] compares stages with a
//! torchvision reference dump.

pub mod count;
pub mod cpu;
pub mod error;
pub mod eval;
pub mod gpu;
pub mod image_io;
pub mod model;
pub mod ops;
pub mod seedgen;
pub mod serve;
pub mod validate;

pub use error::{Error, Result};
