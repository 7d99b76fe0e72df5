//! The counting API: load a model once, count images, get typed results. The CLI (`marrow count`,
//! `marrow eval`), the tests and the review workstation all go through [`Counter`]; nothing else
//! in the application talks to the detector directly.
//!
//! ```text
//! let model = Model::open(path)?;                     // or Model::builtin()
//! let gpu = Gpu::new(&GpuOptions::default())?;
//! let mut counter = Counter::new(&gpu, model, CountOptions::default())?;
//! let result: ImageCount = counter.count("field.png", &image_io::load_rgb8(path)?)?;
//! let summary = Summary::of(&counter.model, &[result]);
//! ```

pub mod annotate;
pub mod batch;
pub mod document;
pub mod report;
pub mod stats;
pub mod tiling;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::image_io::Rgb8;
use crate::model::detector::Detector;
use crate::model::weights::WeightStore;
use crate::model::ImageF32;
pub use stats::Share;
use tiling::Field;

/// The paper's operating point: detections with a confidence of at least 0.7 are counted.
pub const DEFAULT_THRESHOLD: f32 = 0.7;

/// A loaded model file and what reports say about it.
pub struct Model {
    pub weights: WeightStore,
    pub info: ModelInfo,
}

/// Where a model came from and the settings that shape its counts (for provenance).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    /// File name (or `builtin:NAME` for the model compiled into the binary).
    pub file: String,
    /// SHA-256 of the model file's bytes, lower-case hex.
    pub sha256: String,
    /// Class names without the background class, in label order (label = index + 1).
    pub classes: Vec<String>,
    pub lineage: Option<BTreeMap<String, String>>,
    /// Training field size (the weights' `field`), used by `--tile auto`.
    pub field: Option<u32>,
    /// The detector's own thresholds (box score threshold, class-aware NMS IoU, detections kept).
    pub box_score_thresh: f32,
    pub box_nms_thresh: f32,
    pub detections_per_img: u32,
}

impl Model {
    /// Reads a marrow safetensors file. Errors name the file.
    pub fn open(path: &Path) -> Result<Model> {
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Self::from_bytes(&bytes, path, name)
    }

    /// Parses a model from bytes; `path` names the source in errors, `name` in reports.
    ///
    /// A file with no tensors and a `marrow.seedgen` spec (the test fixtures under
    /// `tests/fixtures/`) is rebuilt from its seed, so tests and demos can count without a
    /// trained model; such a model is random and its counts mean nothing.
    pub fn from_bytes(bytes: &[u8], path: &Path, name: String) -> Result<Model> {
        let mut weights = WeightStore::from_bytes(bytes, path)?;
        if weights.names().next().is_none() {
            if let Some(spec) = weights.seed_spec() {
                let spec =
                    crate::seedgen::SeedSpec::from_json(spec).map_err(|e| Error::Weights {
                        path: path.to_path_buf(),
                        message: format!("seedgen spec: {e}"),
                    })?;
                let label = format!("seedgen(seed {}) from {}", spec.seed, path.display());
                weights = WeightStore::from_seed_spec(&spec, weights.config.clone(), &label)?;
            }
        }
        let num_classes = weights
            .shape("roi_heads.box_predictor.cls_score.weight")
            .map(|s| s[0])
            .ok_or_else(|| Error::Weights {
                path: path.to_path_buf(),
                message: "no roi_heads.box_predictor.cls_score.weight: not a Faster R-CNN detector"
                    .into(),
            })?;
        let cfg = &weights.config;
        if let Some(names) = &cfg.class_names {
            if names.len() != num_classes {
                return Err(Error::Weights {
                    path: path.to_path_buf(),
                    message: format!(
                        "the config names {} classes (background included) but \
                         roi_heads.box_predictor.cls_score.weight has {num_classes}",
                        names.len()
                    ),
                });
            }
        }
        let classes: Vec<String> = (1..num_classes)
            .map(|c| {
                cfg.class_names
                    .as_ref()
                    .and_then(|n| n.get(c).cloned())
                    .unwrap_or_else(|| format!("class_{c}"))
            })
            .collect();
        let info = ModelInfo {
            file: name,
            sha256: sha256_hex(bytes),
            classes,
            lineage: cfg.lineage.clone(),
            field: cfg.field,
            box_score_thresh: cfg.box_head.score_thresh,
            box_nms_thresh: cfg.box_head.nms_thresh,
            detections_per_img: cfg.box_head.detections_per_img,
        };
        Ok(Model { weights, info })
    }

    /// The default model compiled into this binary, if the build has one (cargo feature
    /// `builtin-model`).
    pub fn builtin() -> Option<Result<Model>> {
        builtin::bytes().map(|(name, bytes)| {
            Self::from_bytes(bytes, Path::new(name), format!("builtin:{name}"))
        })
    }

    /// `--weights` if given, else `MARROW_WEIGHTS`, else the built-in model.
    pub fn resolve(weights: Option<&Path>) -> Result<Model> {
        if let Some(p) = weights {
            return Model::open(p);
        }
        if let Some(p) = std::env::var_os("MARROW_WEIGHTS") {
            return Model::open(&PathBuf::from(p));
        }
        Model::builtin().unwrap_or_else(|| {
            Err(Error::Invalid(
                "no model: this build has no built-in model; pass --weights FILE.safetensors \
                 (or set MARROW_WEIGHTS)"
                    .into(),
            ))
        })
    }
}

mod builtin {
    /// (file name, bytes) of the compiled-in default model.
    #[cfg(feature = "builtin-model")]
    pub fn bytes() -> Option<(&'static str, &'static [u8])> {
        Some((
            "marrow-txlpbc-compact.safetensors",
            include_bytes!("../../weights/marrow-txlpbc-compact.safetensors"),
        ))
    }
    #[cfg(not(feature = "builtin-model"))]
    pub fn bytes() -> Option<(&'static str, &'static [u8])> {
        None
    }
}

/// What a model file is, read from its tensors and config without a GPU (`marrow model`): the
/// provenance of [`ModelInfo`], the architecture the tensors describe, and the config that shapes
/// its detections.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDescription {
    #[serde(flatten)]
    pub info: ModelInfo,
    /// "resnet18" … "resnet101" (or a description of a non-standard depth).
    pub backbone: String,
    pub fpn_width: usize,
    /// Box-head MLP width (`roi_heads.box_head.fc6` rows).
    pub representation_size: usize,
    /// RPN head outputs per location (= the config's aspect ratios).
    pub anchors_per_location: usize,
    pub tensors: usize,
    pub parameters: usize,
    /// The whole configuration: transform sizes, anchors, RPN and box-head thresholds, refine.
    pub config: crate::model::config::ModelConfig,
}

impl Model {
    /// The model's architecture and configuration. Errors name the file when a tensor the
    /// description needs is missing.
    pub fn describe(&self) -> Result<ModelDescription> {
        let ws = &self.weights;
        let arch = crate::model::backbone::BackboneArch::infer(ws)?;
        let rows = |name: &str| {
            ws.shape(name).map(|s| s[0]).ok_or_else(|| Error::Weights {
                path: ws.source.clone(),
                message: format!("tensor {name} is missing"),
            })
        };
        let (tensors, parameters) = ws
            .names()
            .filter_map(|n| ws.shape(n))
            .fold((0, 0), |(t, p), s| (t + 1, p + s.iter().product::<usize>()));
        Ok(ModelDescription {
            info: self.info.clone(),
            backbone: arch.name(),
            fpn_width: arch.fpn_channels,
            representation_size: rows("roi_heads.box_head.fc6.weight")?,
            anchors_per_location: rows("rpn.head.cls_logits.weight")?,
            tensors,
            parameters,
            config: ws.config.clone(),
        })
    }
}

/// SHA-256 of bytes as lower-case hex (model identity in provenance).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// How large images are cut into fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tiling {
    /// Cut images larger than 1.5× the model's training field into fields of that size.
    Auto,
    /// Never cut.
    Off,
    /// Cut into fields of this many pixels whenever the image is larger.
    Size(u32),
}

impl std::str::FromStr for Tiling {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Tiling::Auto),
            "off" | "none" => Ok(Tiling::Off),
            n => n
                .parse::<u32>()
                .ok()
                .filter(|n| *n >= 32)
                .map(Tiling::Size)
                .ok_or_else(|| {
                    format!("--tile {n:?}: expected auto, off or a size in pixels ≥ 32")
                }),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CountOptions {
    /// Confidence a detection needs to be counted (score ≥ threshold).
    pub threshold: f32,
    pub tiling: Tiling,
    /// Overlap between fields in pixels; `None` = [`tiling::default_overlap`].
    pub overlap: Option<u32>,
    /// Run the model's refinement head when it has one (`false` = the plain detector's output,
    /// `--no-refine`).
    #[serde(default = "yes")]
    pub refine: bool,
}

fn yes() -> bool {
    true
}

impl Default for CountOptions {
    fn default() -> Self {
        Self {
            threshold: DEFAULT_THRESHOLD,
            tiling: Tiling::Auto,
            overlap: None,
            refine: true,
        }
    }
}

impl CountOptions {
    pub fn check(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(Error::Invalid(format!(
                "threshold {} must be in [0, 1]",
                self.threshold
            )));
        }
        Ok(())
    }
}

/// One detected cell, in original-image pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// [x1, y1, x2, y2] in original-image pixels.
    pub bbox: [f32; 4],
    /// Class name.
    pub class: String,
    /// Model label (1-based; 0 is background).
    pub label: usize,
    pub score: f32,
    /// Whether the cell is counted (score ≥ the counting threshold).
    pub counted: bool,
}

/// Fields an image was cut into (absent when it was processed whole).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TileInfo {
    pub field: u32,
    pub overlap: u32,
    pub fields: usize,
}

/// The count of one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageCount {
    pub file: String,
    pub width: u32,
    pub height: u32,
    /// Counted cells per class (every class present, zeros included).
    pub counts: BTreeMap<String, usize>,
    pub total: usize,
    pub differential: BTreeMap<String, Share>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub me_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tiles: Option<TileInfo>,
    /// Every detection the model returned, counted or not, by descending score.
    pub detections: Vec<Cell>,
}

/// Totals over a batch: counts, differential, M:E ratio, and which images failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub images: usize,
    pub counted_images: usize,
    pub failed_images: usize,
    pub counts: BTreeMap<String, usize>,
    pub total: usize,
    pub differential: BTreeMap<String, Share>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub me_ratio: Option<f64>,
    /// The requested number of cells (`--target`), and whether the batch reached it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target_reached: Option<bool>,
}

impl Summary {
    /// Totals of the counted images (`Ok`) with the failures (`Err`) tallied.
    pub fn of<'a>(
        model: &ModelInfo,
        results: impl IntoIterator<Item = std::result::Result<&'a ImageCount, ()>>,
        target: Option<usize>,
    ) -> Summary {
        let mut counts = model.zero_counts();
        let (mut images, mut ok) = (0, 0);
        for r in results {
            images += 1;
            if let Ok(ic) = r {
                ok += 1;
                for (c, n) in &ic.counts {
                    *counts.entry(c.clone()).or_insert(0) += n;
                }
            }
        }
        let (total, differential, me_ratio) = model.derive(&counts);
        Summary {
            images,
            counted_images: ok,
            failed_images: images - ok,
            differential,
            me_ratio,
            counts,
            total,
            target,
            target_reached: target.map(|t| total >= t),
        }
    }
}

impl ModelInfo {
    /// The class name of a model label (1-based); `class_N` for a label the model does not name.
    pub fn class_name(&self, label: usize) -> String {
        self.classes
            .get(label.wrapping_sub(1))
            .cloned()
            .unwrap_or_else(|| format!("class_{label}"))
    }

    /// Every class of the model with a zero count (reports always carry every class).
    fn zero_counts(&self) -> BTreeMap<String, usize> {
        self.classes.iter().map(|c| (c.clone(), 0)).collect()
    }

    /// What a report derives from per-class counts: the total, the differential and the M:E
    /// ratio (one place for images and batch summaries alike).
    fn derive(
        &self,
        counts: &BTreeMap<String, usize>,
    ) -> (usize, BTreeMap<String, Share>, Option<f64>) {
        (
            counts.values().sum(),
            stats::differential(&self.classes, counts),
            stats::me_ratio(self.lineage.as_ref(), counts),
        )
    }
}

/// Builds an [`ImageCount`] from detections in original-image pixels.
pub fn image_count(
    model: &ModelInfo,
    threshold: f32,
    file: &str,
    width: u32,
    height: u32,
    detections: Vec<(usize, [f32; 4], f32)>,
    tiles: Option<TileInfo>,
) -> ImageCount {
    let cells: Vec<Cell> = detections
        .into_iter()
        .map(|(label, bbox, score)| Cell {
            bbox,
            class: model.class_name(label),
            label,
            score,
            counted: score >= threshold && label >= 1,
        })
        .collect();
    tally(model, file, width, height, cells, tiles)
}

/// Builds an [`ImageCount`] from cells whose `counted` flags are already decided: the model's
/// rule in [`image_count`], or a reviewer's corrections in `marrow serve`. Counts, total,
/// differential and M:E ratio are derived here and only here.
pub fn tally(
    model: &ModelInfo,
    file: &str,
    width: u32,
    height: u32,
    cells: Vec<Cell>,
    tiles: Option<TileInfo>,
) -> ImageCount {
    let mut counts = model.zero_counts();
    for c in cells.iter().filter(|c| c.counted) {
        *counts.entry(c.class.clone()).or_insert(0) += 1;
    }
    let (total, differential, me_ratio) = model.derive(&counts);
    ImageCount {
        file: file.to_string(),
        width,
        height,
        differential,
        me_ratio,
        counts,
        total,
        tiles,
        detections: cells,
    }
}

/// Loads a model once and counts images with it.
pub struct Counter<'g> {
    detector: Detector<'g>,
    pub model: ModelInfo,
    pub opts: CountOptions,
}

impl<'g> Counter<'g> {
    pub fn new(gpu: &'g Gpu, model: Model, opts: CountOptions) -> Result<Self> {
        opts.check()?;
        let mut detector = Detector::new(gpu, model.weights)?;
        detector.set_refine(opts.refine);
        Ok(Counter {
            detector,
            model: model.info,
            opts,
        })
    }

    pub fn gpu(&self) -> &'g Gpu {
        self.detector.gpu
    }

    /// Whether counts come from the model's refinement head (it has one, and it is not
    /// switched off).
    pub fn refines(&self) -> bool {
        self.detector.refines()
    }

    /// The fields an image of this size is cut into under the current options (`None` = whole).
    pub fn fields_for(&self, width: u32, height: u32) -> Result<Option<(TileInfo, Vec<Field>)>> {
        let field = match self.opts.tiling {
            Tiling::Off => return Ok(None),
            Tiling::Size(n) => n,
            Tiling::Auto => match self.model.field {
                // Whole images up to 1.5× the training field are not cut.
                Some(f) if width.max(height) as f64 > 1.5 * f as f64 => f,
                _ => return Ok(None),
            },
        };
        if width <= field && height <= field {
            return Ok(None);
        }
        let overlap = self
            .opts
            .overlap
            .unwrap_or_else(|| tiling::default_overlap(field));
        let fields = tiling::fields(width, height, field, overlap)?;
        Ok(Some((
            TileInfo {
                field,
                overlap,
                fields: fields.len(),
            },
            fields,
        )))
    }

    /// Counts one decoded image. `file` names it in the result and in errors.
    pub fn count(&mut self, file: &str, image: &Rgb8) -> Result<ImageCount> {
        let dets = match self.fields_for(image.width, image.height)? {
            None => {
                let d = self.detector.detect(&image.to_f32())?;
                let dets = d
                    .detections
                    .into_iter()
                    .map(|d| (d.label, d.bbox, d.score))
                    .collect();
                (dets, None)
            }
            Some((info, fields)) => (self.detect_tiled(image, &fields, info.overlap)?, Some(info)),
        };
        Ok(image_count(
            &self.model,
            self.opts.threshold,
            file,
            image.width,
            image.height,
            dets.0,
            dets.1,
        ))
    }

    /// Runs every field and merges the fields' detections ([`merge_fields`]).
    fn detect_tiled(
        &mut self,
        image: &Rgb8,
        fields: &[Field],
        overlap: u32,
    ) -> Result<Vec<(usize, [f32; 4], f32)>> {
        let mut per_field = Vec::with_capacity(fields.len());
        for f in fields {
            let crop = crop_f32(image, f.x0, f.y0, f.width, f.height);
            let d = self.detector.detect(&crop)?;
            per_field.push(
                d.detections
                    .into_iter()
                    .map(|d| (d.label, d.bbox, d.score))
                    .collect::<Vec<_>>(),
            );
        }
        let margin = overlap as f32 / 4.0;
        Ok(merge_fields(
            fields,
            &per_field,
            margin,
            self.model.box_nms_thresh,
        ))
    }
}

/// Merges per-field detections (`(label, bbox in field pixels, score)`) into image pixels, each
/// field keeping what [`Field::keeps`] allows with `margin`, then a class-aware NMS at the
/// detector's own IoU threshold (see [`tiling`] for why both). Result by descending score.
pub fn merge_fields(
    fields: &[Field],
    per_field: &[Vec<(usize, [f32; 4], f32)>],
    margin: f32,
    nms_thresh: f32,
) -> Vec<(usize, [f32; 4], f32)> {
    let mut boxes: Vec<[f32; 4]> = Vec::new();
    let mut scores: Vec<f32> = Vec::new();
    let mut labels: Vec<u32> = Vec::new();
    for (f, dets) in fields.iter().zip(per_field) {
        for &(label, bbox, score) in dets {
            let b = [
                bbox[0] + f.x0 as f32,
                bbox[1] + f.y0 as f32,
                bbox[2] + f.x0 as f32,
                bbox[3] + f.y0 as f32,
            ];
            if f.keeps(&b, margin) {
                boxes.push(b);
                scores.push(score);
                labels.push(label as u32);
            }
        }
    }
    // The per-class loop rather than the coordinate trick: offsets of class × 10⁴ px would cost
    // f32 precision.
    let keep = crate::cpu::nms::batched_nms_vanilla(&boxes, &scores, &labels, nms_thresh);
    keep.into_iter()
        .map(|i| (labels[i] as usize, boxes[i], scores[i]))
        .collect()
}

/// A `w`×`h` window of an 8-bit image at (x0, y0) as the model's planar f32 input, without
/// converting the whole (possibly 10000×10000) image to f32.
pub fn crop_f32(image: &Rgb8, x0: u32, y0: u32, w: u32, h: u32) -> ImageF32 {
    let (w, h) = (w as usize, h as usize);
    let stride = image.width as usize * 3;
    let mut data = vec![0f32; 3 * h * w];
    for y in 0..h {
        let row = (y0 as usize + y) * stride + x0 as usize * 3;
        for x in 0..w {
            for c in 0..3 {
                data[c * h * w + y * w + x] = image.data[row + x * 3 + c] as f32 / 255.0;
            }
        }
    }
    ImageF32 { h, w, data }
}
