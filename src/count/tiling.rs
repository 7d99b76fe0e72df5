//! Cutting a large image into native-resolution fields and merging their detections so that
//! every cell is counted once.
//!
//! Along each axis the fields have the same side `field` and start at evenly spaced positions
//! chosen so that neighbours overlap by at least `overlap` pixels. Each field *owns* a core
//! interval: the boundary between two neighbours is the middle of their overlap, so the cores
//! partition the image exactly (half-open intervals, the first starts at 0, the last ends at the
//! image side). A detection is kept only by the field that owns its box centre. A cell whose
//! centre lies in a core is at least `overlap / 2` from that field's inner edges, so every cell
//! no larger than `overlap` lies wholly inside the field that owns it and is seen whole there.
//!
//! Two fields estimate a cell near their boundary independently, a few pixels apart, so strict
//! ownership could drop the cell (each estimate on the other's side) or keep it twice. So a field
//! keeps a detection when its centre lies in the core grown by a margin of `overlap / 4`, and
//! drops any detection touching one of its inner edges (that is a cell it sees cut off, which
//! the neighbour sees whole); a final class-aware NMS over the kept detections (torchvision
//! `batched_nms`, per class) then removes the pairs near a boundary. A cell of up to
//! `overlap / 2` px is thus counted once unless two estimates of it disagree by more than the
//! margin.

use crate::error::{Error, Result};

/// One field: the pixel rectangle cut from the image and the core it owns, all in image pixels.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Field {
    pub x0: u32,
    pub y0: u32,
    pub width: u32,
    pub height: u32,
    /// Owned core `[x1, y1, x2, y2)`: a detection is this field's when its box centre is inside.
    pub core: [f32; 4],
}

impl Field {
    /// Whether this field owns a box (by its centre; half-open core).
    pub fn owns(&self, bbox: &[f32; 4]) -> bool {
        let cx = 0.5 * (bbox[0] + bbox[2]);
        let cy = 0.5 * (bbox[1] + bbox[3]);
        cx >= self.core[0] && cx < self.core[2] && cy >= self.core[1] && cy < self.core[3]
    }

    /// Whether this field keeps a detection (image pixels) for the merge: its centre lies in the
    /// core grown by `margin`, and it does not touch an inner edge of the field (within 1 px).
    pub fn keeps(&self, bbox: &[f32; 4], margin: f32) -> bool {
        let cx = 0.5 * (bbox[0] + bbox[2]);
        let cy = 0.5 * (bbox[1] + bbox[3]);
        let inside = cx >= self.core[0] - margin
            && cx < self.core[2] + margin
            && cy >= self.core[1] - margin
            && cy < self.core[3] + margin;
        // A side is inner when the core does not run to infinity there (image border).
        let (x0, y0) = (self.x0 as f32, self.y0 as f32);
        let (x1, y1) = (x0 + self.width as f32, y0 + self.height as f32);
        let cut = (self.core[0].is_finite() && bbox[0] <= x0 + 1.0)
            || (self.core[1].is_finite() && bbox[1] <= y0 + 1.0)
            || (self.core[2].is_finite() && bbox[2] >= x1 - 1.0)
            || (self.core[3].is_finite() && bbox[3] >= y1 - 1.0);
        inside && !cut
    }
}

/// Field starts and core boundaries along one axis of length `len`.
fn axis(len: u32, field: u32, overlap: u32) -> Vec<(u32, u32, f32, f32)> {
    if len <= field {
        return vec![(0, len, f32::NEG_INFINITY, f32::INFINITY)];
    }
    let stride = field - overlap;
    // Fewest fields whose evenly spaced starts keep every overlap ≥ `overlap`.
    let n = (len - overlap).div_ceil(stride) as u64;
    let span = (len - field) as u64;
    let starts: Vec<u32> = (0..n)
        .map(|i| ((i * span + (n - 1) / 2) / (n - 1)) as u32)
        .collect();
    (0..n as usize)
        .map(|i| {
            let lo = if i == 0 {
                f32::NEG_INFINITY
            } else {
                // Middle of the overlap with the previous field.
                0.5 * (starts[i] as f32 + (starts[i - 1] + field) as f32)
            };
            let hi = if i + 1 == n as usize {
                f32::INFINITY
            } else {
                0.5 * (starts[i + 1] as f32 + (starts[i] + field) as f32)
            };
            (starts[i], field, lo, hi)
        })
        .collect()
}

/// The fields covering a `width`×`height` image. `overlap` must be smaller than `field`.
/// Cores at the image border extend to ±∞ so that a box centre rounded just outside the image
/// (a clipped box of a cell on the edge) still has an owner.
pub fn fields(width: u32, height: u32, field: u32, overlap: u32) -> Result<Vec<Field>> {
    if field < 32 {
        return Err(Error::Invalid(format!(
            "tile size {field} px is too small (at least 32 px)"
        )));
    }
    if overlap >= field {
        return Err(Error::Invalid(format!(
            "tile overlap {overlap} px must be smaller than the tile size {field} px"
        )));
    }
    let xs = axis(width, field, overlap);
    let ys = axis(height, field, overlap);
    let mut out = Vec::with_capacity(xs.len() * ys.len());
    for &(y0, h, ylo, yhi) in &ys {
        for &(x0, w, xlo, xhi) in &xs {
            out.push(Field {
                x0,
                y0,
                width: w,
                height: h,
                core: [xlo, ylo, xhi, yhi],
            });
        }
    }
    Ok(out)
}

/// Default overlap for a field size: half the field. The overlap must exceed the largest cell,
/// and the model's own fields say how large cells get relative to a field: in TXL-PBC's 640×480
/// BCCD fields a white cell spans up to 276 px (43 % of the field), in its 575 px PBC fields up
/// to 445 px. Half a field keeps every cell up to that size whole in the field that owns it, at
/// about 4× the work of abutting fields; `--tile-overlap` trades that back when cells are small.
pub fn default_overlap(field: u32) -> u32 {
    (field / 2).min(field.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cores partition the image: every pixel centre belongs to exactly one field, and each field
    /// contains its core's interior plus at least overlap/2 of margin on inner sides.
    #[test]
    fn cores_partition_and_margins_hold() {
        for &(w, h, f, o) in &[
            (2560u32, 1920u32, 640u32, 160u32),
            (10000, 10000, 640, 160),
            (641, 480, 640, 160),
            (1000, 300, 400, 100),
            (500, 500, 640, 160),
            (1281, 1283, 427, 131),
        ] {
            let fs = fields(w, h, f, o).unwrap();
            for y in (0..h).step_by(7) {
                for x in (0..w).step_by(5) {
                    let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                    let owners = fs.iter().filter(|fl| fl.owns(&[px, py, px, py])).count();
                    assert_eq!(
                        owners, 1,
                        "{w}x{h} field {f}: ({px}, {py}) has {owners} owners"
                    );
                }
            }
            for fl in &fs {
                assert!(fl.x0 + fl.width <= w && fl.y0 + fl.height <= h);
                assert_eq!(fl.width, f.min(w));
                assert_eq!(fl.height, f.min(h));
                // Inner margins: core edge to field edge ≥ overlap / 2.
                if fl.core[0].is_finite() {
                    assert!(fl.core[0] - fl.x0 as f32 >= o as f32 / 2.0);
                }
                if fl.core[2].is_finite() {
                    assert!((fl.x0 + fl.width) as f32 - fl.core[2] >= o as f32 / 2.0);
                }
                if fl.core[1].is_finite() {
                    assert!(fl.core[1] - fl.y0 as f32 >= o as f32 / 2.0);
                }
                if fl.core[3].is_finite() {
                    assert!((fl.y0 + fl.height) as f32 - fl.core[3] >= o as f32 / 2.0);
                }
            }
        }
    }

    #[test]
    fn small_images_are_one_field_and_bad_sizes_are_errors() {
        let fs = fields(500, 400, 640, 160).unwrap();
        assert_eq!(fs.len(), 1);
        assert_eq!((fs[0].width, fs[0].height), (500, 400));
        assert!(fields(1000, 1000, 640, 640).is_err());
        assert!(fields(1000, 1000, 16, 4).is_err());
        assert_eq!(fields(2560, 1920, 640, 160).unwrap().len(), 5 * 4);
    }
}
