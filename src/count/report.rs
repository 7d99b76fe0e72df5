//! The table and interchange outputs of `marrow count`, made from a [`Report`]:
//!
//! * [`write_csv`]: one row per image plus a `TOTAL` row, for spreadsheets;
//! * [`write_coco`]: every detection as COCO *results* JSON, for AP with pycocotools;
//! * [`write_geojson_dir`]: one GeoJSON file per counted image that QuPath imports as detection
//!   objects.
//!
//! Provenance (model, threshold, time) lives in the JSON report only. Every writer writes only the
//! file or folder it is given (a folder is created if missing); errors name the path.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::document::{ImageEntry, Report};
use super::{ImageCount, ModelInfo};
use crate::error::{Error, Result};

/// Okabe–Ito, the colour-blind-safe palette of Okabe & Ito (2008), without its black (invisible on
/// dark stains) and ordered so that the first classes stand out on pink/purple stained blood
/// smears on a light background.
const PALETTE: [[u8; 3]; 7] = [
    [230, 159, 0],   // orange
    [0, 114, 178],   // blue
    [0, 158, 115],   // bluish green
    [213, 94, 0],    // vermillion
    [86, 180, 233],  // sky blue
    [204, 121, 167], // reddish purple
    [240, 228, 66],  // yellow
];

/// The colour of a model label (1-based, as [`super::Cell::label`]) in every marrow output:
/// annotated images, GeoJSON classifications. Labels past the palette reuse it in order; label 0
/// (background, never reported) is grey.
pub fn class_colour(label: usize) -> [u8; 3] {
    match label {
        0 => [128, 128, 128],
        l => PALETTE[(l - 1) % PALETTE.len()],
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path`, naming the path in errors.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(io_err(path))
}

/// Creates the output folder the user named (and its missing parents), naming it in errors.
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Output names

/// The file stem of an input name (`a/b/field 1.png` → `field 1`); `image` when it has none.
pub fn file_stem(file: &str) -> String {
    Path::new(file)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "image".to_string())
}

/// One distinct output stem per input name, in input order, for per-image output files
/// (`<stem>.geojson`, `<stem>.annotated.png`).
///
/// The rule is deterministic and depends only on the list: an input keeps its own file stem when
/// it is the first with that stem; a later input with the same stem (`a/x.png` and `b/x.png`, or
/// `x.png` and `x.tif`) gets `-2`, `-3`, … appended, skipping any name another input has as its
/// own stem. Stems are compared case-insensitively so that the files stay distinct on macOS and
/// Windows file systems too. Call it with the whole input list, failed images included, so that
/// the GeoJSON and the annotated image of one input share a stem.
pub fn output_stems<'a>(files: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let stems: Vec<String> = files.into_iter().map(file_stem).collect();
    let key = |s: &str| s.to_lowercase();
    // Pass 1: the first input with each stem keeps it.
    let mut taken: HashSet<String> = HashSet::new();
    let keeps: Vec<bool> = stems.iter().map(|s| taken.insert(key(s))).collect();
    // Pass 2: the others get the lowest free suffix.
    stems
        .iter()
        .zip(keeps)
        .map(|(s, keep)| {
            if keep {
                return s.clone();
            }
            let mut n = 2;
            loop {
                let candidate = format!("{s}-{n}");
                if taken.insert(key(&candidate)) {
                    return candidate;
                }
                n += 1;
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// CSV

/// One CSV field, quoted as RFC 4180 requires when it holds a comma, a quote or a line break
/// (quotes doubled).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_row(out: &mut String, fields: &[String]) {
    let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    out.push_str(&row.join(","));
    out.push_str("\r\n");
}

/// Percentages and intervals in the CSV: three decimals (the JSON report has full precision).
fn pct(x: f64) -> String {
    format!("{x:.3}")
}

/// The CSV header for a model's classes (see [`csv_text`]).
pub fn csv_header(classes: &[String]) -> Vec<String> {
    let mut h: Vec<String> = ["file", "width", "height", "status", "total"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    h.extend(classes.iter().cloned());
    h.extend(classes.iter().map(|c| format!("{c}_percent")));
    for c in classes {
        h.push(format!("{c}_ci95_lo"));
        h.push(format!("{c}_ci95_hi"));
    }
    h.push("me_ratio".into());
    h.push("error".into());
    h
}

/// The count columns of an image or of the summary: total, per-class counts, percentages, 95 %
/// intervals (lo, hi per class), M:E ratio.
fn count_fields(
    classes: &[String],
    total: usize,
    counts: &std::collections::BTreeMap<String, usize>,
    differential: &std::collections::BTreeMap<String, super::Share>,
    me_ratio: Option<f64>,
) -> Vec<String> {
    let mut f = vec![total.to_string()];
    f.extend(
        classes
            .iter()
            .map(|c| counts.get(c).copied().unwrap_or(0).to_string()),
    );
    f.extend(classes.iter().map(|c| {
        differential
            .get(c)
            .map(|s| pct(s.percent))
            .unwrap_or_default()
    }));
    for c in classes {
        match differential.get(c) {
            Some(s) => {
                f.push(pct(s.ci95[0]));
                f.push(pct(s.ci95[1]));
            }
            None => f.extend([String::new(), String::new()]),
        }
    }
    f.push(me_ratio.map(|r| format!("{r:.3}")).unwrap_or_default());
    f
}

/// The CSV table of a report (what [`write_csv`] writes).
///
/// Columns: `file,width,height,status,total`, then per class (in the model's class order) the
/// counted cells, then each class's `_percent` of the counted cells, then each class's 95 % Wilson
/// interval `_ci95_lo,_ci95_hi` (percent), then `me_ratio` (myeloid:erythroid, empty when
/// undefined) and `error`. Percentages, intervals and the ratio have three decimals.
///
/// `status` is `counted` or `failed`; a failed image has only its file, status and error. The
/// last row has `file` = `TOTAL`, `status` = `total` and the batch totals of `report.summary`
/// (its `error` says how many images failed and are therefore not in the totals).
///
/// RFC 4180: fields with commas, quotes or line breaks are quoted, rows end in CRLF. There is no
/// comment line (CSV readers take it for the header); provenance is in the JSON report.
pub fn csv_text(report: &Report) -> String {
    let classes = &report.provenance.model.classes;
    let header = csv_header(classes);
    let mut out = String::new();
    csv_row(&mut out, &header);
    for entry in &report.images {
        let mut row: Vec<String> = Vec::with_capacity(header.len());
        match entry {
            ImageEntry::Counted(ic) => {
                row.extend([
                    ic.file.clone(),
                    ic.width.to_string(),
                    ic.height.to_string(),
                    "counted".to_string(),
                ]);
                row.extend(count_fields(
                    classes,
                    ic.total,
                    &ic.counts,
                    &ic.differential,
                    ic.me_ratio,
                ));
                row.push(String::new());
            }
            ImageEntry::Failed { file, error } => {
                row.extend([file.clone(), String::new(), String::new(), "failed".into()]);
                // Empty count columns: total … me_ratio.
                row.extend(std::iter::repeat_n(String::new(), header.len() - 5));
                row.push(error.clone());
            }
        }
        csv_row(&mut out, &row);
    }
    let s = &report.summary;
    let mut row = vec![
        "TOTAL".to_string(),
        String::new(),
        String::new(),
        "total".to_string(),
    ];
    row.extend(count_fields(
        classes,
        s.total,
        &s.counts,
        &s.differential,
        s.me_ratio,
    ));
    row.push(if s.failed_images > 0 {
        format!(
            "{} of {} images failed and are not in the totals",
            s.failed_images, s.images
        )
    } else {
        String::new()
    });
    csv_row(&mut out, &row);
    out
}

/// Writes the CSV table of [`csv_text`] to `path`.
pub fn write_csv(path: &Path, report: &Report) -> Result<()> {
    write_file(path, csv_text(report).as_bytes())
}

// ---------------------------------------------------------------------------------------------
// COCO results

/// An f32 as a JSON number with its shortest decimal form (`12.3`, not `12.300000190734863`).
fn num(x: f32) -> Value {
    format!("{x}")
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// Every detection of every counted image as COCO *results* (the detection-results format of
/// pycocotools' `COCO.loadRes`), counted or not, so that AP can be computed over the whole
/// score range:
///
/// ```text
/// [{"image_id": 1, "file_name": "a.png", "category_id": 2, "category_name": "RBC",
///   "bbox": [x, y, width, height], "score": 0.93}, ...]
/// ```
///
/// `image_id` is the image's 1-based position in `report.images` (failed images keep their
/// position and have no detections); `category_id` is the model label (1-based, in the model's
/// class order); `bbox` is in original-image pixels, top-left corner plus size. pycocotools'
/// `loadRes` requires every `image_id` to exist in the ground-truth file and compares category
/// ids directly: map `file_name` (and `category_name`) to the ids of your ground truth before
/// calling it.
pub fn coco_results(report: &Report) -> Value {
    let mut out = Vec::new();
    for (i, entry) in report.images.iter().enumerate() {
        let Some(ic) = entry.counted() else { continue };
        for d in &ic.detections {
            let [x1, y1, x2, y2] = d.bbox;
            out.push(json!({
                "image_id": i + 1,
                "file_name": ic.file,
                "category_id": d.label,
                "category_name": d.class,
                "bbox": [num(x1), num(y1), num(x2 - x1), num(y2 - y1)],
                "score": num(d.score),
            }));
        }
    }
    Value::Array(out)
}

/// The counted cells of every counted image as COCO *ground truth* (`images`, `annotations`,
/// `categories`), the form `weights/train.py --coco-train/--coco-val` and pycocotools read: a
/// reviewed case exported this way is training data.
///
/// `image_id` is the image's 1-based position in `report.images`; `file_name` is the report's
/// file name (relative to the case folder for `marrow serve` exports: pass that folder as
/// `--coco-images`); `category_id` is the model label, `categories` every model class;
/// `bbox` is `[x, y, width, height]` in original-image pixels; `iscrowd` is 0.
pub fn coco_ground_truth(report: &Report) -> Value {
    let mut images = Vec::new();
    let mut annotations = Vec::new();
    for (i, entry) in report.images.iter().enumerate() {
        let Some(ic) = entry.counted() else { continue };
        images.push(json!({
            "id": i + 1, "file_name": ic.file, "width": ic.width, "height": ic.height,
        }));
        for d in ic.detections.iter().filter(|d| d.counted) {
            let [x1, y1, x2, y2] = d.bbox;
            annotations.push(json!({
                "id": annotations.len() + 1,
                "image_id": i + 1,
                "category_id": d.label,
                "bbox": [num(x1), num(y1), num(x2 - x1), num(y2 - y1)],
                "area": num((x2 - x1) * (y2 - y1)),
                "iscrowd": 0,
            }));
        }
    }
    let categories: Vec<Value> = report
        .provenance
        .model
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"id": i + 1, "name": c}))
        .collect();
    json!({"images": images, "annotations": annotations, "categories": categories})
}

/// The counted cells of one image as a YOLO label file: one `class cx cy w h` line per cell,
/// class = model label − 1 (class 0 first, the order of `classes.txt`), centre and size
/// normalised to [0, 1] by the image's width and height, six decimals.
pub fn yolo_label_text(image: &ImageCount) -> String {
    let (w, h) = (image.width.max(1) as f32, image.height.max(1) as f32);
    let mut out = String::new();
    for d in image
        .detections
        .iter()
        .filter(|d| d.counted && d.label >= 1)
    {
        let [x1, y1, x2, y2] = d.bbox;
        let (cx, cy) = ((x1 + x2) / 2.0 / w, (y1 + y2) / 2.0 / h);
        let (bw, bh) = ((x2 - x1) / w, (y2 - y1) / h);
        out.push_str(&format!(
            "{} {cx:.6} {cy:.6} {bw:.6} {bh:.6}\n",
            d.label - 1
        ));
    }
    out
}

/// Writes [`coco_results`] to `path`, one detection per line.
pub fn write_coco(path: &Path, report: &Report) -> Result<()> {
    write_file(path, json_lines(&coco_results(report)).as_bytes())
}

/// JSON text with one array element per line: a COCO results array, or a GeoJSON
/// `FeatureCollection` with one feature per line (compact, yet readable and diffable).
fn json_lines(v: &Value) -> String {
    let (prefix, items, suffix) = match v {
        Value::Array(items) => ("[".to_string(), items, "]"),
        Value::Object(o) => match o.get("features") {
            Some(Value::Array(items)) => {
                let mut head = o.clone();
                head.remove("features");
                let head = Value::Object(head).to_string();
                // `{"type":"FeatureCollection"}` → `{"type":"FeatureCollection","features":[`
                let sep = if head.len() > 2 { "," } else { "" };
                let open = format!("{}{sep}\"features\":[", &head[..head.len() - 1]);
                (open, items, "]}")
            }
            _ => return format!("{v}\n"),
        },
        _ => return format!("{v}\n"),
    };
    let mut text = prefix;
    for (i, item) in items.iter().enumerate() {
        text.push_str(if i == 0 { "\n" } else { ",\n" });
        text.push_str(&item.to_string());
    }
    text.push('\n');
    text.push_str(suffix);
    text.push('\n');
    text
}

// ---------------------------------------------------------------------------------------------
// GeoJSON for QuPath

/// A deterministic RFC 4122-formatted id (version 8, "custom") from bytes: the same detection of
/// the same image always gets the same id, so re-imports are recognisable. QuPath (≥ 0.4) reads
/// a feature's `id` with `UUID.fromString`.
fn uuid_from(bytes: &[u8]) -> String {
    // Two independent 64-bit FNV-1a hashes, each finished with the SplitMix64 mixer.
    let hash = |seed: u64| {
        let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    };
    let hi = (hash(0x6d61_7272_6f77) & !0xf000) | 0x8000; // version 8
    let lo = (hash(0x9e37_79b9_7f4a_7c15) & !(0b11 << 62)) | (0b10 << 62); // variant 10
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

/// The counted cells of one image as a GeoJSON `FeatureCollection` in the form QuPath's
/// *File → Import objects from file* (and `importObjectsFromFile`) reads as detection objects:
///
/// ```text
/// {"type": "Feature", "id": "<uuid>",
///  "geometry": {"type": "Polygon", "coordinates": [[[x1,y1],[x2,y1],[x2,y2],[x1,y2],[x1,y1]]]},
///  "properties": {"objectType": "detection",
///                 "classification": {"name": "RBC", "color": [0, 114, 178]},
///                 "measurements": {"score": 0.93}, "isLocked": false}}
/// ```
///
/// Coordinates are original-image pixels with the origin at the top-left corner, x to the right
/// and y down (QuPath's convention; no flip). The ring is closed (first point repeated).
///
/// Only *counted* cells (score ≥ the counting threshold) are included: QuPath users count
/// objects per classification (e.g. the Detections table, or `getDetectionObjects()` by class),
/// and there the GeoJSON must agree with marrow's counts. Detections below the threshold are in
/// the COCO results ([`coco_results`]) and dashed in the annotated image. The classification
/// colour is [`class_colour`], as in the annotated images.
pub fn geojson(image: &ImageCount, model: &ModelInfo) -> Value {
    let features: Vec<Value> = image
        .detections
        .iter()
        .enumerate()
        .filter(|(_, d)| d.counted)
        .map(|(i, d)| {
            let [x1, y1, x2, y2] = d.bbox.map(num);
            let mut key =
                format!("{}\n{}\n{i}\n{}", model.sha256, image.file, d.label).into_bytes();
            for v in d.bbox.iter().chain([&d.score]) {
                key.extend(v.to_le_bytes());
            }
            json!({
                "type": "Feature",
                "id": uuid_from(&key),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[
                        [x1.clone(), y1.clone()],
                        [x2.clone(), y1.clone()],
                        [x2.clone(), y2.clone()],
                        [x1.clone(), y2],
                        [x1, y1],
                    ]],
                },
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": d.class, "color": class_colour(d.label)},
                    "measurements": {"score": num(d.score)},
                    "isLocked": false,
                },
            })
        })
        .collect();
    json!({"type": "FeatureCollection", "features": features})
}

/// Writes [`geojson`] of every counted image of `report` into `dir` (created if missing) as
/// `<stem>.geojson`, stems from [`output_stems`] over all of `report.images`. Returns the files
/// written, in report order.
pub fn write_geojson_dir(dir: &Path, report: &Report) -> Result<Vec<PathBuf>> {
    create_dir(dir)?;
    let stems = output_stems(report.images.iter().map(|e| e.file()));
    let mut written = Vec::new();
    for (entry, stem) in report.images.iter().zip(stems) {
        let Some(ic) = entry.counted() else { continue };
        let path = dir.join(format!("{stem}.geojson"));
        let text = json_lines(&geojson(ic, &report.provenance.model));
        write_file(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_are_unique_and_deterministic() {
        let files = [
            "a/x.png", "b/x.png", "x.tif", "x-2.png", "y.png", "Y.PNG", "noext", "",
        ];
        let s = output_stems(files);
        assert_eq!(s, ["x", "x-3", "x-4", "x-2", "y", "Y-2", "noext", "image"]);
        assert_eq!(output_stems(files), s);
    }

    #[test]
    fn json_lines_is_the_same_json() {
        let v = json!({"type": "FeatureCollection", "features": [{"a": 1}, {"b": [2, 3]}]});
        let text = json_lines(&v);
        assert_eq!(text.lines().count(), 4, "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v);
        for v in [
            json!([]),
            json!([1, {"x": "y"}]),
            json!({"features": []}),
            json!(3),
        ] {
            assert_eq!(serde_json::from_str::<Value>(&json_lines(&v)).unwrap(), v);
        }
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }

    #[test]
    fn uuids_are_well_formed_and_distinct() {
        let a = uuid_from(b"one");
        let b = uuid_from(b"two");
        assert_ne!(a, b);
        assert_eq!(a, uuid_from(b"one"));
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('8'), "version 8: {a}");
        assert!("89ab".contains(&parts[3][..1]), "variant 10: {a}");
    }

    #[test]
    fn yolo_lines_are_normalised_and_zero_based() {
        let cell = |label, bbox, counted| super::super::Cell {
            bbox,
            class: String::new(),
            label,
            score: 0.9,
            counted,
        };
        let ic = ImageCount {
            file: "f.png".into(),
            width: 200,
            height: 100,
            counts: Default::default(),
            total: 0,
            differential: Default::default(),
            me_ratio: None,
            tiles: None,
            detections: vec![
                cell(1, [0.0, 0.0, 20.0, 10.0], true),
                cell(3, [100.0, 50.0, 200.0, 100.0], true),
                cell(2, [10.0, 10.0, 30.0, 30.0], false),
            ],
        };
        assert_eq!(
            yolo_label_text(&ic),
            "0 0.050000 0.050000 0.100000 0.100000\n2 0.750000 0.750000 0.500000 0.500000\n"
        );
    }

    #[test]
    fn numbers_keep_their_short_form() {
        assert_eq!(num(12.3).to_string(), "12.3");
        assert_eq!(num(0.93).to_string(), "0.93");
        assert_eq!(num(f32::NAN), Value::Null);
    }
}
