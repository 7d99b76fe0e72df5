//! Image decoding: the pixels the model sees must be the pixels the reference tools (PIL +
//! torchvision) see, and a hostile or absurd file must be an error naming the file, never an
//! out-of-memory abort or a panic.
//!
//! * **JPEG** (recognised by its magic bytes `FF D8 FF`, whatever the extension: most TXL-PBC
//!   ".png" files are JPEG inside) is decoded by libjpeg-turbo's C code as vendored by the
//!   `mozjpeg` crate, with the settings PIL uses: the accurate integer ("islow") IDCT and fancy
//!   (triangle-filter) chroma upsampling. The result is PIL's `Image.open(p).convert("RGB")` bit for
//!   bit (the `image` crate's pure-Rust decoder differs on 6–12 % of pixels by up to 4 levels,
//!   which moved detections across the 0.7 score threshold; `tests/image_input.rs` keeps that
//!   difference visible). Greyscale is replicated to RGB; CMYK/YCCK is converted exactly as PIL
//!   does (Adobe-inverted CMYK, `R = (255 − K) − C·(255 − K)/255`, no ICC profile), so marrow and the
//!   reference tools agree on such files too. libjpeg's fatal errors and its data-loss warnings
//!   (a truncated file, which libjpeg would otherwise fill with grey; a bad Huffman code; a
//!   premature end of a data segment) are errors naming the file.
//! * **PNG, TIFF, BMP** go through the `image` crate: 8/16-bit, grey, grey + alpha, RGBA and palette
//!   all become RGB (alpha dropped, as PIL's `convert("RGB")`). 16-bit samples become 8-bit by
//!   rounding, `(x + 128) / 257`. Note that PIL is not consistent here: it keeps the high byte of
//!   16-bit RGB (`x >> 8`, at most one level below ours) and clips 16-bit grey to 255 (`I;16` →
//!   `L`), so 16-bit inputs are not bit-exact with PIL; microscope fields are 8-bit JPEG or PNG.
//!   Animated PNG (APNG) and multi-page TIFF: the first frame / page is used, as `Image.open` does.
//!   GIF, WebP and other formats are refused with a clear error.
//! * **EXIF orientation** (JPEG APP1, TIFF tag 274, PNG `eXIf`) is applied, so what the user sees
//!   in a viewer is what is counted. PIL's `Image.open` does NOT apply it: reference tools that
//!   compare against marrow must call `PIL.ImageOps.exif_transpose` on such files.
//! * **Limits**, all checked from the header before the pixel buffer is allocated: each side at
//!   least [`MIN_SIDE`] and at most [`MAX_SIDE`] px; at most [`MAX_ALLOC`] bytes decoded; and a
//!   JPEG or PNG must be large enough to hold the pixels it declares (a JPEG needs at least one bit
//!   per 8×8 block, deflate compresses at most 1032:1), which refuses decompression bombs — a tiny
//!   file declaring a huge image — before any allocation.

use std::fs::File;
use std::io::{BufReader, Cursor, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat};

use crate::error::{Error, Result};
use crate::model::ImageF32;

/// Largest accepted side. Microscope tiles are ~2560×1920; whole-slide images must be tiled first.
pub const MAX_SIDE: u32 = 16384;
/// Smallest accepted side: anything smaller is an icon or a thumbnail, not a microscope field (the
/// transform would blow it up more than 25-fold to torchvision's default 800 px minimum side).
pub const MIN_SIDE: u32 = 32;
/// Largest accepted decoded allocation (bytes).
pub const MAX_ALLOC: u64 = 1 << 30;

/// An 8-bit RGB image, interleaved (`data[3 * (y * width + x) + c]`), rows top to bottom, after
/// EXIF orientation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl Rgb8 {
    /// Planar [3, H, W] f32 in [0, 1]: x / 255, as torchvision's `convert_image_dtype`.
    pub fn to_f32(&self) -> ImageF32 {
        ImageF32::from_rgb8(self.width as usize, self.height as usize, &self.data)
    }
}

/// Decodes PNG / JPEG / TIFF / BMP into planar RGB f32 in [0, 1] (8-bit / 255, as torchvision's
/// `convert_image_dtype`). See the module documentation for what "decodes" means exactly.
pub fn load_rgb(path: &Path) -> Result<ImageF32> {
    Ok(load_rgb8(path)?.to_f32())
}

/// Reads and decodes one image file into 8-bit RGB (see the module documentation).
pub fn load_rgb8(path: &Path) -> Result<Rgb8> {
    let io = |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len > MAX_ALLOC {
        return Err(image_error(
            path,
            format!("the file is {len} bytes; the largest accepted is {MAX_ALLOC}: tile large scans first"),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    BufReader::new(file).read_to_end(&mut bytes).map_err(io)?;
    decode_rgb8(&bytes, path)
}

/// Decodes an image held in memory (an upload, say) into 8-bit RGB. `name` is only used in error
/// messages; the content alone decides the format.
pub fn decode_rgb8(bytes: &[u8], name: &Path) -> Result<Rgb8> {
    let kind = sniff(bytes).map_err(|m| image_error(name, m))?;
    // libjpeg reports fatal errors by unwinding (see `jpeg`); a decoder bug in a dependency that
    // panics must not take the process down either.
    let decoded = catch_unwind(AssertUnwindSafe(|| match kind {
        Kind::Jpeg => jpeg::decode(bytes),
        Kind::Other(format) => decode_other(bytes, format),
    }));
    match decoded {
        Ok(r) => r.map_err(|m| image_error(name, m)),
        Err(payload) => Err(image_error(name, panic_message(&*payload))),
    }
}

/// Width and height after EXIF orientation, read from the header only (no pixel data is decoded,
/// so this is cheap). Sizes outside [`MIN_SIDE`, `MAX_SIDE`] are reported, not refused.
pub fn image_size(path: &Path) -> Result<(u32, u32)> {
    let io = |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut head = Vec::with_capacity(16);
    File::open(path)
        .map_err(io)?
        .take(16)
        .read_to_end(&mut head)
        .map_err(io)?;
    let kind = sniff(&head).map_err(|m| image_error(path, m))?;
    let file = BufReader::new(File::open(path).map_err(io)?);
    let header = catch_unwind(AssertUnwindSafe(|| match kind {
        Kind::Jpeg => jpeg::header(file),
        Kind::Other(format) => {
            let mut reader = image::ImageReader::with_format(file, format);
            reader.limits(limits());
            let mut dec = reader.into_decoder().map_err(|e| describe(format, e))?;
            let (w, h) = dec.dimensions();
            Ok((w, h, orientation(&mut dec)))
        }
    }));
    let (w, h, o) = match header {
        Ok(r) => r.map_err(|m| image_error(path, m))?,
        Err(payload) => return Err(image_error(path, panic_message(&*payload))),
    };
    Ok(if swaps_sides(o) { (h, w) } else { (w, h) })
}

fn image_error(path: &Path, message: String) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        message,
    }
}

enum Kind {
    Jpeg,
    Other(ImageFormat),
}

/// The format from the content's magic bytes; the extension is never consulted.
fn sniff(bytes: &[u8]) -> std::result::Result<Kind, String> {
    if bytes.is_empty() {
        return Err("the file is empty (0 bytes)".into());
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(Kind::Jpeg);
    }
    match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Tiff | ImageFormat::Bmp)) => Ok(Kind::Other(f)),
        Ok(f) => Err(format!(
            "{} images are not supported (PNG, JPEG, TIFF or BMP expected): convert it to PNG first",
            f.extensions_str().first().unwrap_or(&"this").to_uppercase()
        )),
        Err(_) => Err(format!(
            "not an image: the content (starting {}) is not PNG, JPEG, TIFF or BMP \
             (the content decides, not the file name)",
            preview(bytes)
        )),
    }
}

/// The first bytes of a file, as text if they are printable, else as hex.
fn preview(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(12)];
    if head.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{:?}", String::from_utf8_lossy(head))
    } else {
        head.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(j) = payload.downcast_ref::<jpeg::Abort>() {
        j.0.clone()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("the decoder failed on this file: {s}")
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        format!("the decoder failed on this file: {s}")
    } else {
        "the decoder failed on this file".into()
    }
}

/// Refuses sizes outside the limits; called with the header's size, before any pixel allocation.
fn check_size(w: u32, h: u32) -> std::result::Result<(), String> {
    if w == 0 || h == 0 {
        return Err(format!("image is {w}×{h} px: it has no pixels"));
    }
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(format!(
            "image is {w}×{h} px; the largest accepted side is {MAX_SIDE} px: \
             tile large scans first (e.g. into 2048×2048 px fields)"
        ));
    }
    if w < MIN_SIDE || h < MIN_SIDE {
        return Err(format!(
            "image is {w}×{h} px; marrow needs at least {MIN_SIDE} px per side"
        ));
    }
    // 4 bytes a pixel covers the widest intermediate (RGBA / CMYK) before conversion to RGB.
    let bytes = w as u64 * h as u64 * 4;
    if bytes > MAX_ALLOC {
        return Err(format!(
            "image is {w}×{h} px, {bytes} bytes decoded; the largest accepted is {MAX_ALLOC}: \
             tile large scans first"
        ));
    }
    Ok(())
}

/// The `image` crate's allocation cap. Sides are left to [`check_size`], whose message is clearer
/// than the crate's "Image size exceeds limit".
fn limits() -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_ALLOC);
    limits
}

fn swaps_sides(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// The EXIF orientation a decoder reports; an unreadable or invalid tag means none, as in PIL's
/// `exif_transpose`.
fn orientation(dec: &mut impl ImageDecoder) -> Orientation {
    dec.orientation().unwrap_or(Orientation::NoTransforms)
}

fn describe(format: ImageFormat, e: image::ImageError) -> String {
    let name = format
        .extensions_str()
        .first()
        .unwrap_or(&"image")
        .to_uppercase();
    match e {
        image::ImageError::Limits(l) => format!(
            "the {name} exceeds the limits ({l}); the largest accepted side is {MAX_SIDE} px and \
             the largest decoded size {MAX_ALLOC} bytes: tile large scans first"
        ),
        image::ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("truncated or corrupt {name}: the data ends early ({e})")
        }
        other => format!("corrupt or unsupported {name}: {other}"),
    }
}

/// PNG, TIFF, BMP through the `image` crate.
fn decode_other(bytes: &[u8], format: ImageFormat) -> std::result::Result<Rgb8, String> {
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits());
    let mut dec = reader.into_decoder().map_err(|e| describe(format, e))?;
    let (w, h) = dec.dimensions();
    check_size(w, h)?;
    if format == ImageFormat::Png {
        check_png_ratio(bytes, w, h)?;
    }
    let o = orientation(&mut dec);
    let mut img = DynamicImage::from_decoder(dec).map_err(|e| describe(format, e))?;
    img.apply_orientation(o);
    let rgb = img.into_rgb8();
    Ok(Rgb8 {
        width: rgb.width(),
        height: rgb.height(),
        data: rgb.into_raw(),
    })
}

/// Deflate cannot compress better than 1032:1, so a PNG whose file is smaller than its filtered
/// scanlines / 1032 cannot hold the image it declares: refuse it before the decoder allocates.
fn check_png_ratio(bytes: &[u8], w: u32, h: u32) -> std::result::Result<(), String> {
    // IHDR is the first chunk: bit depth at byte 24, colour type at byte 25.
    let (depth, colour) = match bytes.get(24..26) {
        Some(&[d, c]) => (d as u64, c),
        _ => return Ok(()),
    };
    let channels = match colour {
        0 | 3 => 1,
        4 => 2,
        2 => 3,
        _ => 4,
    };
    let raw = h as u64 * (1 + (w as u64 * channels * depth).div_ceil(8));
    let least = raw / 1032;
    if (bytes.len() as u64) < least {
        return Err(format!(
            "the PNG declares {w}×{h} px, which needs at least {least} compressed bytes, but the \
             file has {}: truncated, or a decompression bomb",
            bytes.len()
        ));
    }
    Ok(())
}

/// JPEG through libjpeg-turbo (vendored by `mozjpeg`), with PIL's settings.
mod jpeg {
    use std::io::BufRead;
    use std::os::raw::c_int;

    use image::metadata::Orientation;
    use mozjpeg::{ColorSpace, DctMethod, Decompress, Marker};
    use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr};

    use super::{check_size, Rgb8};

    /// The unwinding payload for libjpeg's fatal errors and data-loss warnings: a finished message.
    pub(super) struct Abort(pub String);

    /// Decodes to RGB exactly as PIL's `Image.open(p).convert("RGB")`, then applies EXIF
    /// orientation.
    pub(super) fn decode(bytes: &[u8]) -> Result<Rgb8, String> {
        let mut d = open(bytes)?;
        let (w, h) = (d.width() as u32, d.height() as u32);
        check_size(w, h)?;
        check_blocks(&d, bytes.len())?;
        let o = exif_orientation(&d);
        // libjpeg's defaults, set explicitly: these are what PIL decodes with.
        d.dct_method(DctMethod::IntegerSlow);
        d.do_fancy_upsampling(true);
        let n = w as usize * h as usize;
        let data = match d.color_space() {
            ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => {
                let mut s = d.to_colorspace(ColorSpace::JCS_CMYK).map_err(io)?;
                let cmyk: Vec<u8> = s.read_scanlines().map_err(io)?;
                s.finish().map_err(io)?;
                if cmyk.len() != 4 * n {
                    return Err(short());
                }
                cmyk_to_rgb_like_pil(&cmyk)
            }
            // Grey is replicated, YCbCr converted, RGB passed through, all by libjpeg.
            _ => {
                let mut s = d.rgb().map_err(io)?;
                let rgb: Vec<u8> = s.read_scanlines().map_err(io)?;
                s.finish().map_err(io)?;
                if rgb.len() != 3 * n {
                    return Err(short());
                }
                rgb
            }
        };
        let img = Rgb8 {
            width: w,
            height: h,
            data,
        };
        Ok(orient(img, o))
    }

    /// Size and EXIF orientation from the header (the markers before the first scan).
    pub(super) fn header<R: BufRead>(reader: R) -> Result<(u32, u32, Orientation), String> {
        let d = builder().from_reader(reader).map_err(io)?;
        Ok((d.width() as u32, d.height() as u32, exif_orientation(&d)))
    }

    fn builder() -> mozjpeg::decompress::DecompressBuilder<'static> {
        Decompress::builder()
            .with_err(error_mgr())
            .with_markers(&[Marker::APP(1)])
    }

    fn open(bytes: &[u8]) -> Result<Decompress<&[u8]>, String> {
        builder().from_mem(bytes).map_err(io)
    }

    fn io(e: std::io::Error) -> String {
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof => truncated(),
            _ => format!("corrupt JPEG: {e}"),
        }
    }

    fn truncated() -> String {
        "truncated JPEG: the file ends before the image data does (libjpeg would fill the rest \
         with grey)"
            .into()
    }

    fn short() -> String {
        "corrupt JPEG: libjpeg returned fewer pixels than the header declares".into()
    }

    /// A JPEG codes every 8×8 block of every component with at least one bit (a Huffman code is
    /// at least one bit long), so a file smaller than blocks / 8 bytes cannot hold the image it
    /// declares: a truncated file or a decompression bomb, refused before allocating.
    fn check_blocks<R>(d: &Decompress<R>, len: usize) -> Result<(), String> {
        let comps = d.components();
        let hmax = comps
            .iter()
            .map(|c| c.h_samp_factor)
            .max()
            .unwrap_or(1)
            .max(1) as u64;
        let vmax = comps
            .iter()
            .map(|c| c.v_samp_factor)
            .max()
            .unwrap_or(1)
            .max(1) as u64;
        let (w, h) = (d.width() as u64, d.height() as u64);
        let blocks: u64 = comps
            .iter()
            .map(|c| {
                let cw = (w * c.h_samp_factor.max(1) as u64).div_ceil(hmax);
                let ch = (h * c.v_samp_factor.max(1) as u64).div_ceil(vmax);
                cw.div_ceil(8) * ch.div_ceil(8)
            })
            .sum();
        let least = blocks / 8;
        if (len as u64) < least {
            return Err(format!(
                "the JPEG declares {w}×{h} px, which needs at least {least} bytes of image data, \
                 but the file has {len}: truncated, or a decompression bomb"
            ));
        }
        Ok(())
    }

    /// The orientation in the first "Exif" APP1 segment (the one PIL reads); none if absent or
    /// invalid.
    fn exif_orientation<R>(d: &Decompress<R>) -> Orientation {
        d.markers()
            .find(|m| m.marker == Marker::APP(1) && m.data.starts_with(b"Exif\0\0"))
            .and_then(|m| Orientation::from_exif_chunk(&m.data[6..]))
            .unwrap_or(Orientation::NoTransforms)
    }

    pub(super) fn orient(img: Rgb8, o: Orientation) -> Rgb8 {
        if o == Orientation::NoTransforms {
            return img;
        }
        let buf = image::RgbImage::from_raw(img.width, img.height, img.data)
            .expect("buffer length matches its size");
        let mut dynamic = image::DynamicImage::ImageRgb8(buf);
        dynamic.apply_orientation(o);
        let rgb = dynamic.into_rgb8();
        Rgb8 {
            width: rgb.width(),
            height: rgb.height(),
            data: rgb.into_raw(),
        }
    }

    /// PIL's CMYK JPEG path: the samples are read as Adobe-inverted ("CMYK;I", which PIL assumes
    /// for every CMYK JPEG), then `convert("RGB")` computes, per channel,
    /// `nk = 255 - k; out = clip(nk - MULDIV255(c, nk))` with `MULDIV255(a, b) = (t + (t >> 8)) >> 8`,
    /// `t = a * b + 128` (Pillow's Convert.c `cmyk2rgb`).
    fn cmyk_to_rgb_like_pil(cmyk: &[u8]) -> Vec<u8> {
        let muldiv255 = |a: i32, b: i32| {
            let t = a * b + 128;
            (t + (t >> 8)) >> 8
        };
        let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
        for p in cmyk.chunks_exact(4) {
            let nk = p[3] as i32; // 255 - (255 - k): the inversion and "255 - k" cancel
            for &c in &p[..3] {
                let c = 255 - c as i32;
                out.push((nk - muldiv255(c, nk)).clamp(0, 255) as u8);
            }
        }
        out
    }

    fn error_mgr() -> jpeg_error_mgr {
        // SAFETY: jpeg_error_mgr is a plain C struct (function pointers are `Option`s, so zero is
        // `None`); jpeg_std_error then fills in every field.
        let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
        unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
        err.error_exit = Some(error_exit);
        err.emit_message = Some(emit_message);
        err
    }

    /// libjpeg's message for the current error or warning code.
    fn message(cinfo: &mut jpeg_common_struct) -> String {
        // SAFETY: cinfo.err is the error manager installed by `error_mgr`; format_message writes
        // a NUL-terminated string of at most JMSG_LENGTH_MAX (200) bytes. The binding declares the
        // buffer as 80 bytes, so it is called through a pointer-taking signature with 200.
        unsafe {
            let Some(format) = cinfo.err.as_ref().and_then(|e| e.format_message) else {
                return "unknown libjpeg error".into();
            };
            let format: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8) =
                std::mem::transmute(format);
            let mut buf = [0u8; 200];
            format(cinfo, buf.as_mut_ptr());
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        }
    }

    extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
        let m = message(cinfo);
        // resume_unwind, not panic!: no panic hook message on stderr; `decode_rgb8` catches it.
        std::panic::resume_unwind(Box::new(Abort(format!("corrupt or unsupported JPEG: {m}"))));
    }

    /// Trace messages (level ≥ 0 … informational) are dropped. Warnings (level −1) that mean lost
    /// pixel data abort the decode; only those about metadata, or about stray bytes between
    /// segments, are let through.
    extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
        if level >= 0 {
            return;
        }
        // SAFETY: as in `message`.
        let code = unsafe { cinfo.err.as_ref().map_or(-1, |e| e.msg_code) };
        if matches!(
            code,
            mozjpeg_sys::JWRN_JFIF_MAJOR
                | mozjpeg_sys::JWRN_BOGUS_ICC
                | mozjpeg_sys::JWRN_EXTRANEOUS_DATA
        ) {
            return;
        }
        let text = if code == mozjpeg_sys::JWRN_JPEG_EOF {
            truncated()
        } else {
            format!(
                "corrupt JPEG: {} (libjpeg would fill the damaged part with grey)",
                message(cinfo)
            )
        };
        std::panic::resume_unwind(Box::new(Abort(text)));
    }
}
