//! Evaluation against ground truth: the library's one evaluator. `marrow eval`, the training logs
//! and the UI all call it.
//!
//! - [`coco`]: COCO bbox AP/AR, a line-by-line port of pycocotools' `COCOeval` (iouType `bbox`),
//!   checked against pycocotools itself (`tests/eval_coco.rs`, `docs/evaluation.md`).
//! - [`counting`]: what a cell count cares about: per-class count errors and a class confusion
//!   matrix.
//! - [`labels`]: ground-truth readers for YOLO label directories and COCO JSON files.
//!
//! Boxes are `[x1, y1, x2, y2]` in original-image pixels; classes are the model's label indices
//! (1-based, 0 is background), so `class_names[0]` is the background name everywhere here.

use serde::{Deserialize, Serialize};

pub mod coco;
pub mod counting;
pub mod labels;

/// One ground-truth box. `bbox` = `[x1, y1, x2, y2]` in original-image pixels. `class` = model
/// label index (1-based; 0 is background). `area`: what COCO uses for its area ranges (COCO JSON's
/// `"area"` when given, else w*h).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GtBox {
    pub bbox: [f64; 4],
    pub class: usize,
    pub area: f64,
    #[serde(default)]
    pub iscrowd: bool,
}

impl GtBox {
    /// A non-crowd box whose area is its width times height.
    pub fn new(bbox: [f64; 4], class: usize) -> Self {
        let area = (bbox[2] - bbox[0]) * (bbox[3] - bbox[1]);
        Self {
            bbox,
            class,
            area,
            iscrowd: false,
        }
    }
}

/// One detection: `bbox` = `[x1, y1, x2, y2]`, model label (1-based), score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetBox {
    pub bbox: [f64; 4],
    pub class: usize,
    pub score: f64,
}

/// One image's ground truth and detections. `width`/`height` are the original image's size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalImage {
    pub file: String,
    pub width: u32,
    pub height: u32,
    #[serde(default)]
    pub gt: Vec<GtBox>,
    #[serde(default)]
    pub dets: Vec<DetBox>,
}

/// A JSON object whose keys keep the order given (class order), unlike a `BTreeMap`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NamedMap<T>(pub Vec<(String, T)>);

impl<T> NamedMap<T> {
    /// The value stored under `name` (the first, if names repeat).
    pub fn get(&self, name: &str) -> Option<&T> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

impl<T: Serialize> Serialize for NamedMap<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// Plain intersection-over-union of two `[x1, y1, x2, y2]` boxes (no +1 on widths, as COCO and
/// torchvision); 0 when they do not overlap or the union is empty.
pub fn iou_xyxy(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let w = a[2].min(b[2]) - a[0].max(b[0]);
    let h = a[3].min(b[3]) - a[1].max(b[1]);
    if !(w > 0.0 && h > 0.0) {
        return 0.0;
    }
    let inter = w * h;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}
