//! Ground-truth readers: a YOLO label directory ([`read_yolo_dir`]) and a COCO JSON file
//! ([`read_coco_json`]). Both give [`GtBox`]es in original-image pixels with the model's class
//! labels (1-based), and both refuse bad input with an error that names the file (and, for YOLO,
//! the line); no input bytes make them panic.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::GtBox;
use crate::error::{Error, Result};

/// The file that names a YOLO dataset's classes, one per line, class 0 first.
pub const CLASSES_TXT: &str = "classes.txt";

/// Image extensions stripped from a name to find its label file (`a.png` → `a.txt`).
const IMAGE_EXTENSIONS: [&str; 8] = ["png", "jpg", "jpeg", "tif", "tiff", "bmp", "gif", "webp"];

fn same_name(a: &str, b: &str) -> bool {
    a.trim().to_lowercase() == b.trim().to_lowercase()
}

/// Whether a dataset's class name means the model's class `model`: the same name (trimmed,
/// case-insensitive), or a long name whose parenthesised abbreviation is that name — TXL-PBC's
/// own classes.txt says "White Blood Cell (WBC)" where the model says "WBC".
fn names_class(dataset: &str, model: &str) -> bool {
    if same_name(dataset, model) {
        return true;
    }
    let d = dataset.trim();
    match (d.rfind('('), d.ends_with(')')) {
        (Some(open), true) => same_name(&d[open + 1..d.len() - 1], model),
        _ => false,
    }
}

/// How a YOLO class index becomes a model label.
#[derive(Debug, Clone, PartialEq)]
pub struct YoloClassMap {
    /// The model's class names, index 0 = background.
    model: Vec<String>,
    /// The dataset's names (`classes.txt`), when there is one.
    file: Option<Vec<String>>,
}

impl YoloClassMap {
    /// Without dataset names YOLO class k is model label k + 1. With them, class k is the model
    /// class of the same name (trimmed, case-insensitive), or whose name is the dataset name's
    /// parenthesised abbreviation ("White Blood Cell (WBC)" → "WBC").
    pub fn new(class_names: &[String], dataset_names: Option<Vec<String>>) -> Self {
        Self {
            model: class_names.to_vec(),
            file: dataset_names,
        }
    }

    /// The model label of YOLO class `k`, or why there is none (for the error message).
    pub fn label(&self, k: usize) -> std::result::Result<usize, String> {
        let known = || {
            self.model
                .iter()
                .skip(1)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        };
        match &self.file {
            None => {
                if k < self.model.len().saturating_sub(1) {
                    Ok(k + 1)
                } else {
                    Err(format!(
                        "class {k} is out of range: the model has {} classes ({}) and there is \
                         no {CLASSES_TXT} to map names",
                        self.model.len().saturating_sub(1),
                        known()
                    ))
                }
            }
            Some(names) => {
                let Some(name) = names.get(k) else {
                    return Err(format!(
                        "class {k} is out of range: {CLASSES_TXT} names {} classes",
                        names.len()
                    ));
                };
                let exact = self.model.iter().skip(1).position(|m| same_name(m, name));
                let found =
                    exact.or_else(|| self.model.iter().skip(1).position(|m| names_class(name, m)));
                match found {
                    Some(p) => Ok(p + 1),
                    None => Err(format!(
                        "class {k} ('{name}' in {CLASSES_TXT}) is not one of the model's classes \
                         ({})",
                        known()
                    )),
                }
            }
        }
    }
}

/// What [`read_yolo_dir`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct YoloLabels {
    /// One list per image, in the order the images were given.
    pub gt: Vec<Vec<GtBox>>,
    /// The dataset's class names from `classes.txt`, when one was found.
    pub dataset_names: Option<Vec<String>>,
    /// Where that `classes.txt` was.
    pub classes_file: Option<PathBuf>,
    /// Things the user should know that are not errors (an image without a label file counts as
    /// an image with no cells; label files that match no image).
    pub warnings: Vec<String>,
}

fn text<'a>(bytes: &'a [u8], source: &str) -> Result<&'a str> {
    let s = std::str::from_utf8(bytes).map_err(|e| {
        Error::Invalid(format!(
            "{source}: not UTF-8 text (bad byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    Ok(s.strip_prefix('\u{feff}').unwrap_or(s))
}

/// Parses a `classes.txt`: one name per line, or `index name` per line when every line starts
/// with its own 0-based index (as TXL-PBC writes it). Blank lines are skipped.
pub fn parse_classes_txt(bytes: &[u8], source: &str) -> Result<Vec<String>> {
    let lines: Vec<&str> = text(bytes, source)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return Err(Error::Invalid(format!("{source}: names no classes")));
    }
    let indexed: Option<Vec<String>> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let (idx, rest) = l.split_once(char::is_whitespace)?;
            (idx.parse::<usize>().ok()? == i).then(|| rest.trim().to_string())
        })
        .collect();
    Ok(indexed.unwrap_or_else(|| lines.iter().map(|l| l.to_string()).collect()))
}

/// Reads a `classes.txt` (see [`parse_classes_txt`]).
pub fn read_classes_txt(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_classes_txt(&bytes, &path.display().to_string())
}

/// The `classes.txt` that goes with a label directory: in the directory itself, in its parent,
/// or, when the parent is called `labels` (`root/labels/val`), in the dataset root.
pub fn find_classes_txt(label_dir: &Path) -> Option<PathBuf> {
    let dir = std::fs::canonicalize(label_dir).unwrap_or_else(|_| label_dir.to_path_buf());
    let mut candidates = vec![dir.join(CLASSES_TXT)];
    if let Some(parent) = dir.parent() {
        candidates.push(parent.join(CLASSES_TXT));
        if parent.file_name().is_some_and(|n| n == "labels") {
            if let Some(root) = parent.parent() {
                candidates.push(root.join(CLASSES_TXT));
            }
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// The label-file stem of an image name: the last path component without an image extension
/// (`val/a.png` → `a`; a name without such an extension is taken as the stem already).
pub fn label_stem(image_name: &str) -> &str {
    let base = image_name.rsplit(['/', '\\']).next().unwrap_or(image_name);
    match base.rsplit_once('.') {
        Some((stem, ext))
            if !stem.is_empty() && IMAGE_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext)) =>
        {
            stem
        }
        _ => base,
    }
}

/// Parses one YOLO label file: `class cx cy w h` per line, normalised to the image size, blank
/// lines allowed. Each value must be finite, `cx`, `cy` in [0, 1] and `w`, `h` in (0, 1]; the box
/// edges are clamped to the image. `source` names the file in errors.
pub fn parse_yolo_label(
    bytes: &[u8],
    source: &str,
    width: u32,
    height: u32,
    classes: &YoloClassMap,
) -> Result<Vec<GtBox>> {
    let (w_img, h_img) = (f64::from(width), f64::from(height));
    let mut out = Vec::new();
    for (i, line) in text(bytes, source)?.lines().enumerate() {
        let n = i + 1;
        let err = |msg: String| Error::Invalid(format!("{source}: line {n}: {msg}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        if fields.len() != 5 {
            return Err(err(format!(
                "expected 5 fields `class cx cy w h`, found {}",
                fields.len()
            )));
        }
        let k: usize = fields[0].parse().map_err(|_| {
            err(format!(
                "class `{}` is not a non-negative integer",
                fields[0].escape_debug()
            ))
        })?;
        let mut v = [0.0f64; 4];
        for (j, name) in ["cx", "cy", "w", "h"].iter().enumerate() {
            let tok = fields[j + 1];
            let x: f64 = tok
                .parse()
                .map_err(|_| err(format!("{name} `{}` is not a number", tok.escape_debug())))?;
            let ok = if j < 2 {
                (0.0..=1.0).contains(&x)
            } else {
                x > 0.0 && x <= 1.0
            };
            if !ok {
                let range = if j < 2 { "[0, 1]" } else { "(0, 1]" };
                return Err(err(format!(
                    "{name} = {tok} is outside {range} (YOLO values are normalised to the image)"
                )));
            }
            v[j] = x;
        }
        let class = classes.label(k).map_err(err)?;
        let [cx, cy, w, h] = v;
        let bbox = [
            (cx - w / 2.0).clamp(0.0, 1.0) * w_img,
            (cy - h / 2.0).clamp(0.0, 1.0) * h_img,
            (cx + w / 2.0).clamp(0.0, 1.0) * w_img,
            (cy + h / 2.0).clamp(0.0, 1.0) * h_img,
        ];
        out.push(GtBox::new(bbox, class));
    }
    Ok(out)
}

/// Reads the YOLO labels of `images` (name or stem, width, height) from `label_dir`: image
/// `a.png` reads `label_dir/a.txt`. A missing label file is an image with no cells, reported in
/// `warnings`. Class mapping: see [`YoloClassMap`]; the dataset's names come from
/// [`find_classes_txt`]. `class_names` are the model's, index 0 = background.
pub fn read_yolo_dir(
    label_dir: &Path,
    images: &[(String, u32, u32)],
    class_names: &[String],
) -> Result<YoloLabels> {
    if !label_dir.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: not a directory of YOLO label files",
            label_dir.display()
        )));
    }
    let classes_file = find_classes_txt(label_dir);
    let dataset_names = classes_file.as_deref().map(read_classes_txt).transpose()?;
    let map = YoloClassMap::new(class_names, dataset_names.clone());
    let mut warnings = Vec::new();
    let mut gt = Vec::with_capacity(images.len());
    let mut missing = Vec::new();
    let mut stems = std::collections::HashSet::new();
    for (name, w, h) in images {
        let stem = label_stem(name);
        stems.insert(format!("{stem}.txt"));
        let path = label_dir.join(format!("{stem}.txt"));
        match std::fs::read(&path) {
            Ok(bytes) => gt.push(parse_yolo_label(
                &bytes,
                &path.display().to_string(),
                *w,
                *h,
                &map,
            )?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(name.clone());
                gt.push(Vec::new());
            }
            Err(source) => return Err(Error::Io { path, source }),
        }
    }
    if !missing.is_empty() {
        warnings.push(format!(
            "{} image(s) have no label file in {} and count as images with no cells: {}",
            missing.len(),
            label_dir.display(),
            list_some(&missing)
        ));
    }
    let entries = std::fs::read_dir(label_dir).map_err(|source| Error::Io {
        path: label_dir.to_path_buf(),
        source,
    })?;
    let mut orphans: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".txt") && n != CLASSES_TXT && !stems.contains(n))
        .collect();
    if !orphans.is_empty() {
        orphans.sort();
        warnings.push(format!(
            "{} label file(s) in {} match no image and are not evaluated: {}",
            orphans.len(),
            label_dir.display(),
            list_some(&orphans)
        ));
    }
    Ok(YoloLabels {
        gt,
        dataset_names,
        classes_file,
        warnings,
    })
}

fn list_some(names: &[String]) -> String {
    const SHOW: usize = 5;
    let mut s = names
        .iter()
        .take(SHOW)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOW {
        s.push_str(&format!(", … ({} more)", names.len() - SHOW));
    }
    s
}

/// One image of a COCO file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CocoImageInfo {
    pub id: i64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
}

/// A COCO ground-truth file mapped to the model's classes.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoGt {
    /// Images in ascending id (the order pycocotools evaluates them in).
    pub images: Vec<CocoImageInfo>,
    /// Ground truth per image, in `images` order; within an image in file order.
    pub gt: Vec<Vec<GtBox>>,
    /// The file's categories `(id, name)`, in file order.
    pub categories: Vec<(i64, String)>,
}

impl CocoGt {
    /// The images as [`super::EvalImage`]s with no detections yet.
    pub fn eval_images(&self) -> Vec<super::EvalImage> {
        self.images
            .iter()
            .zip(&self.gt)
            .map(|(im, gt)| super::EvalImage {
                file: im.file_name.clone(),
                width: im.width,
                height: im.height,
                gt: gt.clone(),
                dets: Vec::new(),
            })
            .collect()
    }
}

#[derive(Deserialize)]
struct RawCoco {
    images: Vec<CocoImageInfo>,
    #[serde(default)]
    annotations: Vec<RawAnn>,
    #[serde(default)]
    categories: Vec<RawCat>,
}

#[derive(Deserialize)]
struct RawAnn {
    image_id: i64,
    category_id: i64,
    bbox: Vec<f64>,
    #[serde(default)]
    area: Option<f64>,
    #[serde(default)]
    iscrowd: Option<Crowd>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Crowd {
    Int(i64),
    Bool(bool),
}

#[derive(Deserialize)]
struct RawCat {
    id: i64,
    name: String,
}

/// Parses COCO ground truth (`images` with `id`, `file_name`, `width`, `height`; `annotations`
/// with `image_id`, `category_id`, `bbox` `[x, y, w, h]`, optional `area` and `iscrowd`;
/// `categories` with `id`, `name`). Categories map to model classes by name (trimmed,
/// case-insensitive); an annotation of a category the model lacks is an error naming it.
/// `source` names the file in errors.
pub fn parse_coco_json(bytes: &[u8], source: &str, class_names: &[String]) -> Result<CocoGt> {
    let raw: RawCoco = serde_json::from_slice(bytes)
        .map_err(|e| Error::Invalid(format!("{source}: not COCO JSON: {e}")))?;
    let err = |msg: String| Error::Invalid(format!("{source}: {msg}"));

    let mut images = raw.images;
    images.sort_by_key(|im| im.id);
    for pair in images.windows(2) {
        if pair[0].id == pair[1].id {
            return Err(err(format!("image id {} appears twice", pair[0].id)));
        }
    }
    let mut cat_label: Vec<(i64, std::result::Result<usize, String>)> = Vec::new();
    let mut categories = Vec::new();
    for c in raw.categories {
        if cat_label.iter().any(|(id, _)| *id == c.id) {
            return Err(err(format!("category id {} appears twice", c.id)));
        }
        let label = class_names
            .iter()
            .skip(1)
            .position(|m| same_name(m, &c.name))
            .map(|p| p + 1)
            .ok_or_else(|| {
                format!(
                    "category {} ('{}') is not one of the model's classes ({})",
                    c.id,
                    c.name,
                    class_names
                        .iter()
                        .skip(1)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
        cat_label.push((c.id, label));
        categories.push((c.id, c.name));
    }

    let mut gt = vec![Vec::new(); images.len()];
    for (i, a) in raw.annotations.into_iter().enumerate() {
        let at = |msg: String| err(format!("annotations[{i}]: {msg}"));
        let slot = images
            .binary_search_by_key(&a.image_id, |im| im.id)
            .map_err(|_| at(format!("image_id {} is not in images", a.image_id)))?;
        let class = match cat_label.iter().find(|(id, _)| *id == a.category_id) {
            None => {
                return Err(at(format!(
                    "category_id {} is not in categories",
                    a.category_id
                )))
            }
            Some((_, Err(msg))) => return Err(at(msg.clone())),
            Some((_, Ok(label))) => *label,
        };
        let [x, y, w, h] = <[f64; 4]>::try_from(a.bbox.as_slice()).map_err(|_| {
            at(format!(
                "bbox has {} numbers, expected 4 ([x, y, w, h])",
                a.bbox.len()
            ))
        })?;
        if ![x, y, w, h].iter().all(|v| v.is_finite()) || w < 0.0 || h < 0.0 {
            return Err(at(format!(
                "bbox [{x}, {y}, {w}, {h}] is not a box (finite, w and h ≥ 0)"
            )));
        }
        let area = match a.area {
            Some(v) if !(v.is_finite() && v >= 0.0) => {
                return Err(at(format!("area {v} is not a finite non-negative number")))
            }
            Some(v) => v,
            None => w * h,
        };
        let iscrowd = match a.iscrowd {
            None => false,
            Some(Crowd::Int(v)) => v != 0,
            Some(Crowd::Bool(b)) => b,
        };
        gt[slot].push(GtBox {
            bbox: [x, y, x + w, y + h],
            class,
            area,
            iscrowd,
        });
    }
    Ok(CocoGt {
        images,
        gt,
        categories,
    })
}

/// Reads a COCO ground-truth JSON file (see [`parse_coco_json`]).
pub fn read_coco_json(path: &Path, class_names: &[String]) -> Result<CocoGt> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_coco_json(&bytes, &path.display().to_string(), class_names)
}
