//! Image decoding with the `image` crate (real codecs), with limits so that a hostile or absurd
//! file is an error naming the file, never an out-of-memory abort or a panic.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::ImageF32;

/// Largest accepted side. Microscope tiles are ~2560×1920; whole-slide images must be tiled first.
pub const MAX_SIDE: u32 = 16384;
/// Largest accepted decoded allocation (bytes).
pub const MAX_ALLOC: u64 = 1 << 30;

/// Decodes PNG / JPEG / TIFF / BMP into planar RGB f32 in [0, 1] (8-bit / 255, as torchvision's
/// `convert_image_dtype`). Alpha is dropped; grey is replicated to RGB; 16-bit samples are
/// rounded to 8 bits first, as PIL does for the torchvision preset.
pub fn load_rgb(path: &Path) -> Result<ImageF32> {
    let err = |m: String| Error::Image {
        path: path.to_path_buf(),
        message: m,
    };
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?
        .with_guessed_format()
        .map_err(|e| err(format!("cannot read: {e}")))?;
    if reader.format().is_none() {
        return Err(err(
            "not a recognised image format (PNG, JPEG, TIFF or BMP expected)".into(),
        ));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => err(format!(
            "image exceeds the limits ({l}); the largest accepted side is {MAX_SIDE} px: tile large scans first"
        )),
        other => err(format!("corrupt or unsupported image: {other}")),
    })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(err("image has no pixels".into()));
    }
    let rgb = img.to_rgb8();
    Ok(ImageF32::from_rgb8(
        rgb.width() as usize,
        rgb.height() as usize,
        rgb.as_raw(),
    ))
}
