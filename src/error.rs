//! One error type for the engine. Every variant carries the context a user needs to act: the file,
//! the tensor, the kernel or the adapter, and what was wrong with it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no usable GPU adapter: {0}")]
    NoAdapter(String),
    #[error("GPU error: {0}")]
    Gpu(String),
    #[error("the GPU device was lost ({0}); restart marrow. If it repeats, the input may be too large for this GPU")]
    DeviceLost(String),
    #[error("the GPU ran out of memory: {0}")]
    OutOfMemory(String),
    #[error("WGSL kernel {kernel} failed to compile: {message}")]
    Shader { kernel: String, message: String },
    #[error("too large for this adapter: {0}")]
    TooLarge(String),
    #[error("{op}: shape mismatch: {message}")]
    Shape { op: String, message: String },
    #[error("weights file {path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("image {path}: {message}")]
    Image { path: PathBuf, message: String },
    #[error("reference dump {path}: {message}")]
    Reference { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn shape(op: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Shape {
            op: op.into(),
            message: message.into(),
        }
    }
}
