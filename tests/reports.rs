//! The outputs of `marrow count` made from a report (issue 7): CSV, COCO results, GeoJSON for
//! QuPath and annotated images. The report is built by hand, so no GPU is needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use marrow::count::annotate::{annotate, write_annotated, write_annotated_as};
use marrow::count::document::{ImageEntry, Provenance, Report, NOTICE};
use marrow::count::report::{
    class_colour, coco_results, geojson, output_stems, write_coco, write_csv, write_geojson_dir,
};
use marrow::count::stats::{wilson, Z95};
use marrow::count::{image_count, ImageCount, ModelInfo, TileInfo};
use marrow::image_io::Rgb8;
use marrow::Error;
use serde_json::Value;

const THRESHOLD: f32 = 0.7;
const FILE_A: &str = "slides/smear, \"A\".png";
const FILE_B: &str = "other/smear, \"A\".jpg";
const FILE_FAILED: &str = "bad.png";
const FAILED_ERROR: &str = "image bad.png: corrupt or unsupported image: \"truncated\", sorry";

fn model() -> ModelInfo {
    ModelInfo {
        file: "test.safetensors".into(),
        sha256: "ab".repeat(32),
        classes: vec![
            "White Blood Cell (WBC)".into(),
            "RBC".into(),
            "Platelet".into(),
        ],
        lineage: Some(BTreeMap::from([
            ("White Blood Cell (WBC)".to_string(), "myeloid".to_string()),
            ("RBC".to_string(), "erythroid".to_string()),
        ])),
        field: Some(640),
        box_score_thresh: 0.05,
        box_nms_thresh: 0.5,
        detections_per_img: 100,
    }
}

type Det = (usize, [f32; 4], f32);

fn dets_a() -> Vec<Det> {
    vec![
        (1, [100.0, 100.0, 180.0, 170.0], 0.97),
        (2, [300.5, 200.25, 350.75, 260.0], 0.91),
        (2, [10.0, 400.0, 60.0, 460.0], 0.85),
        (3, [500.0, 50.0, 512.0, 62.0], 0.40), // below the threshold
    ]
}

fn dets_b() -> Vec<Det> {
    vec![
        (3, [20.0, 20.0, 30.0, 31.0], 0.88),
        (2, [100.0, 100.0, 140.0, 150.0], 0.75),
        (1, [200.0, 50.0, 260.0, 120.0], 0.2), // below the threshold
    ]
}

fn report() -> Report {
    let m = model();
    let a = image_count(&m, THRESHOLD, FILE_A, 640, 480, dets_a(), None);
    let b = image_count(&m, THRESHOLD, FILE_B, 320, 240, dets_b(), None);
    let provenance = Provenance {
        marrow_version: "0.1.0".into(),
        notice: NOTICE.into(),
        model: m,
        threshold: THRESHOLD,
        adapter: "test".into(),
        time: "2026-01-01T00:00:00Z".into(),
        tiling: "auto".into(),
        tile_overlap: None,
        refinement_head: false,
        shard: None,
        inputs_total: 3,
        input_indices: vec![0, 1, 2],
    };
    Report::new(
        provenance,
        vec![
            ImageEntry::Counted(a),
            ImageEntry::Counted(b),
            ImageEntry::Failed {
                file: FILE_FAILED.into(),
                error: FAILED_ERROR.into(),
            },
        ],
        None,
    )
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("marrow-reports-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A strict RFC 4180 reader: fields separated by commas, records by CRLF, quoted fields may hold
/// commas, doubled quotes and line breaks.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => {
                    quoted = false;
                    assert!(
                        matches!(chars.peek(), Some(',') | Some('\r') | None),
                        "text after a closing quote"
                    );
                }
                c => field.push(c),
            }
            continue;
        }
        match c {
            '"' => {
                assert!(at_start, "quote inside an unquoted field: {field:?}");
                quoted = true;
            }
            ',' => {
                row.push(std::mem::take(&mut field));
                at_start = true;
                continue;
            }
            '\r' => {
                assert_eq!(chars.next(), Some('\n'), "CR without LF");
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
                at_start = true;
                continue;
            }
            '\n' => panic!("bare LF ends a record"),
            c => field.push(c),
        }
        at_start = false;
    }
    assert!(!quoted, "unterminated quoted field");
    assert!(row.is_empty() && field.is_empty(), "last record lacks CRLF");
    rows
}

fn f3(x: f64) -> String {
    format!("{x:.3}")
}

/// The percent and 95 % interval cells of `k` of `n`, computed independently of the report.
fn share_cells(k: usize, n: usize) -> (String, [String; 2]) {
    let [lo, hi] = wilson(k, n, Z95);
    let p = if n == 0 {
        0.0
    } else {
        100.0 * k as f64 / n as f64
    };
    (f3(p), [f3(100.0 * lo), f3(100.0 * hi)])
}

fn expected_count_row(
    file: &str,
    size: Option<(u32, u32)>,
    status: &str,
    counts: [usize; 3],
    me: &str,
    error: &str,
) -> Vec<String> {
    let n: usize = counts.iter().sum();
    let (w, h) = size.map_or((String::new(), String::new()), |(w, h)| {
        (w.to_string(), h.to_string())
    });
    let mut row = vec![file.to_string(), w, h, status.to_string(), n.to_string()];
    row.extend(counts.iter().map(|k| k.to_string()));
    row.extend(counts.iter().map(|&k| share_cells(k, n).0));
    for &k in &counts {
        row.extend(share_cells(k, n).1);
    }
    row.push(me.to_string());
    row.push(error.to_string());
    row
}

#[test]
fn csv_has_every_cell() {
    let dir = tmp_dir("csv");
    let path = dir.join("counts.csv");
    write_csv(&path, &report()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.starts_with('#'), "no comment line");
    let rows = parse_csv(&text);
    let header: Vec<&str> = rows[0].iter().map(|s| s.as_str()).collect();
    assert_eq!(
        header,
        [
            "file",
            "width",
            "height",
            "status",
            "total",
            "White Blood Cell (WBC)",
            "RBC",
            "Platelet",
            "White Blood Cell (WBC)_percent",
            "RBC_percent",
            "Platelet_percent",
            "White Blood Cell (WBC)_ci95_lo",
            "White Blood Cell (WBC)_ci95_hi",
            "RBC_ci95_lo",
            "RBC_ci95_hi",
            "Platelet_ci95_lo",
            "Platelet_ci95_hi",
            "me_ratio",
            "error",
        ]
    );
    assert_eq!(rows.len(), 5, "header, 3 images, TOTAL");
    for r in &rows {
        assert_eq!(r.len(), header.len(), "{r:?}");
    }
    assert_eq!(
        rows[1],
        expected_count_row(FILE_A, Some((640, 480)), "counted", [1, 2, 0], "0.500", "")
    );
    // Spot-check the independent expectations against literal values too.
    assert_eq!(rows[1][8..11], ["33.333", "66.667", "0.000"]);
    assert_eq!(
        rows[2],
        expected_count_row(FILE_B, Some((320, 240)), "counted", [0, 1, 1], "0.000", "")
    );
    let mut failed = vec![String::new(); header.len()];
    failed[0] = FILE_FAILED.into();
    failed[3] = "failed".into();
    failed[header.len() - 1] = FAILED_ERROR.into();
    assert_eq!(rows[3], failed);
    assert_eq!(
        rows[4],
        expected_count_row(
            "TOTAL",
            None,
            "total",
            [1, 3, 1],
            "0.333",
            "1 of 3 images failed and are not in the totals"
        )
    );
    // The raw text quotes the names with commas and quotes as RFC 4180 says.
    assert!(text.contains("\"slides/smear, \"\"A\"\".png\",640,480,counted,"));
    assert!(text.ends_with("\r\n"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn coco_results_have_every_detection() {
    let r = report();
    let v = coco_results(&r);
    let items = v.as_array().unwrap();
    assert_eq!(
        items.len(),
        dets_a().len() + dets_b().len(),
        "counted or not"
    );
    let expected: Vec<(usize, &str, Det)> = dets_a()
        .into_iter()
        .map(|d| (1, FILE_A, d))
        .chain(dets_b().into_iter().map(|d| (2, FILE_B, d)))
        .collect();
    // Detections are stored by descending score within an image; match each by box.
    for (image_id, file, (label, b, score)) in &expected {
        let item = items
            .iter()
            .find(|i| {
                i["image_id"] == *image_id
                    && i["bbox"][0].as_f64() == Some(b[0] as f64)
                    && i["bbox"][1].as_f64() == Some(b[1] as f64)
            })
            .unwrap_or_else(|| panic!("no COCO entry for {file} {b:?}"));
        assert_eq!(item["file_name"], *file);
        assert_eq!(item["category_id"], *label);
        assert_eq!(item["category_name"], r.provenance.model.classes[label - 1]);
        let bbox: Vec<f64> = item["bbox"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let want = [b[0], b[1], b[2] - b[0], b[3] - b[1]];
        for k in 0..4 {
            assert!(
                (bbox[k] - want[k] as f64).abs() < 1e-4,
                "{bbox:?} vs {want:?}"
            );
        }
        assert!((item["score"].as_f64().unwrap() - *score as f64).abs() < 1e-6);
    }
    // The RBC with fractional coordinates prints exactly.
    let rbc = items.iter().find(|i| i["bbox"][0] == 300.5).unwrap();
    assert_eq!(rbc["bbox"].to_string(), "[300.5,200.25,50.25,59.75]");
    assert_eq!(rbc["score"].to_string(), "0.91");
    // image_id = position in report.images; the failed third image has none.
    assert!(items
        .iter()
        .all(|i| i["image_id"] == 1 || i["image_id"] == 2));

    let dir = tmp_dir("coco");
    let path = dir.join("dets.json");
    write_coco(&path, &r).unwrap();
    let back: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(back, v);
    // An empty report is an empty array.
    let mut empty = r.clone();
    empty.images.clear();
    write_coco(&path, &empty).unwrap();
    let back: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(back, Value::Array(vec![]));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn check_feature_collection(v: &Value, ic: &ImageCount) {
    assert_eq!(v["type"], "FeatureCollection");
    let features = v["features"].as_array().unwrap();
    let counted: Vec<_> = ic.detections.iter().filter(|d| d.counted).collect();
    assert_eq!(features.len(), counted.len(), "counted cells only");
    let mut ids = std::collections::HashSet::new();
    for (f, d) in features.iter().zip(&counted) {
        assert_eq!(f["type"], "Feature");
        let id = f["id"].as_str().unwrap();
        let groups: Vec<usize> = id.split('-').map(|g| g.len()).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "UUID form: {id}");
        assert!(id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        assert!(ids.insert(id.to_string()), "duplicate id {id}");
        assert_eq!(f["geometry"]["type"], "Polygon");
        let rings = f["geometry"]["coordinates"].as_array().unwrap();
        assert_eq!(rings.len(), 1);
        let ring: Vec<[f64; 2]> = rings[0]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| [p[0].as_f64().unwrap(), p[1].as_f64().unwrap()])
            .collect();
        assert_eq!(ring.len(), 5);
        assert_eq!(ring[0], ring[4], "closed ring");
        let [x1, y1, x2, y2] = d.bbox.map(|v| v as f64);
        assert_eq!(ring[..4], [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]);
        let p = &f["properties"];
        assert_eq!(p["objectType"], "detection");
        assert_eq!(p["classification"]["name"], d.class);
        let colour: Vec<u8> = p["classification"]["color"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(colour, class_colour(d.label));
        assert!((p["measurements"]["score"].as_f64().unwrap() - d.score as f64).abs() < 1e-6);
        assert_eq!(p["isLocked"], false);
    }
}

#[test]
fn geojson_per_counted_image_with_distinct_names() {
    let r = report();
    let m = &r.provenance.model;
    for e in &r.images {
        if let Some(ic) = e.counted() {
            let v = geojson(ic, m);
            check_feature_collection(&v, ic);
            assert_eq!(v, geojson(ic, m), "deterministic (ids included)");
        }
    }
    let dir = tmp_dir("geojson");
    let out = dir.join("qupath"); // created by the writer
    let written = write_geojson_dir(&out, &r).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["smear, \"A\".geojson", "smear, \"A\"-2.geojson"]);
    let mut on_disk: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    assert_eq!(
        on_disk.len(),
        2,
        "one file per counted image, none for the failed one"
    );
    for (p, e) in written
        .iter()
        .zip(r.images.iter().filter_map(|e| e.counted()))
    {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        check_feature_collection(&v, e);
    }
    assert_eq!(
        output_stems(r.images.iter().map(|e| e.file())),
        ["smear, \"A\"", "smear, \"A\"-2", "bad"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A textured test image: a smooth gradient, so that "unchanged" means something.
fn test_image(w: u32, h: u32) -> Rgb8 {
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            data.extend([
                (180 + x * 60 / w) as u8,
                (170 + y * 60 / h) as u8,
                (200 + (x + y) * 40 / (w + h)) as u8,
            ]);
        }
    }
    Rgb8 {
        width: w,
        height: h,
        data,
    }
}

fn px(img: &Rgb8, x: u32, y: u32) -> [u8; 3] {
    let i = ((y * img.width + x) * 3) as usize;
    [img.data[i], img.data[i + 1], img.data[i + 2]]
}

#[test]
fn annotated_image_shows_boxes_and_legend() {
    let m = model();
    let img = test_image(640, 480);
    let r = report();
    let ic = r.images[0].counted().unwrap();
    let out = annotate(&img, ic, &m, THRESHOLD);
    assert_eq!(
        (out.width, out.height, out.data.len()),
        (640, 480, img.data.len())
    );
    // Edges of the counted RBC [300.5, 200.25, 350.75, 260]: columns 300 and 350, rows 200 and
    // 259; sample the middle of each side, below any label.
    let rbc = class_colour(2);
    for (x, y) in [(300, 240), (350, 240), (325, 200), (325, 259)] {
        assert_eq!(px(&out, x, y), rbc, "RBC box edge at ({x}, {y})");
    }
    let wbc = class_colour(1);
    for (x, y) in [(100, 150), (179, 150), (140, 169)] {
        assert_eq!(px(&out, x, y), wbc, "WBC box edge at ({x}, {y})");
    }
    // The counted box's inside and places far from boxes and the legend are unchanged.
    for (x, y) in [(325, 230), (600, 300), (450, 400), (630, 470), (200, 300)] {
        assert_eq!(px(&out, x, y), px(&img, x, y), "({x}, {y}) changed");
    }
    // The below-threshold platelet [500, 50, 512, 62] is drawn (dashed, semi-opaque), starting
    // at its corner, but not in the solid class colour.
    let corner = px(&out, 500, 50);
    assert_ne!(corner, px(&img, 500, 50));
    assert_ne!(corner, class_colour(3));
    // The legend (top-left) darkens its panel.
    let (mut changed, mut darker) = (0, 0);
    for y in 6..60 {
        for x in 6..120 {
            let (a, b) = (px(&out, x, y), px(&img, x, y));
            changed += (a != b) as u32;
            darker += (a.iter().map(|&v| v as u32).sum::<u32>()
                < b.iter().map(|&v| v as u32).sum::<u32>()) as u32;
        }
    }
    assert!(
        changed > 54 * 114 * 9 / 10,
        "legend panel: {changed} pixels changed"
    );
    assert!(darker > 54 * 114 / 2);
    // Everything outside boxes, labels and legend is untouched: count changed pixels in the
    // bottom-right quadrant, which holds nothing.
    let quadrant_changed = (240..480)
        .flat_map(|y| (400..640).map(move |x| (x, y)))
        .filter(|&(x, y)| px(&out, x, y) != px(&img, x, y))
        .count();
    assert_eq!(quadrant_changed, 0);
}

#[test]
fn annotate_clips_and_draws_the_field_grid() {
    let m = model();
    let img = test_image(400, 300);
    let dets = vec![
        (1, [-50.0, -20.0, 30.0, 40.0], 0.9), // past the top-left corner
        (2, [380.0, 280.0, 500.0, 400.0], 0.95), // past the bottom-right corner
        (3, [399.5, 0.0, 400.0, 0.5], 0.8),   // a sliver on the edge
        (2, [-1e30, -1e30, 1e30, 1e30], 0.99), // absurdly large
        (2, [f32::NAN, 0.0, 10.0, 10.0], 0.99), // not a box
        (1, [500.0, 500.0, 600.0, 600.0], 0.3), // wholly outside, below threshold
        (7, [50.0, 50.0, 60.0, 60.0], 0.9),   // label the model does not have
    ];
    let tiles = TileInfo {
        field: 200,
        overlap: 64,
        fields: 6,
    };
    let ic = image_count(&m, THRESHOLD, "edge.png", 400, 300, dets, Some(tiles));
    let out = annotate(&img, &ic, &m, THRESHOLD);
    assert_eq!((out.width, out.height), (400, 300));
    // Fields of 200 px with 64 px overlap over 400×300 start at x = 0, 100, 200 and y = 0, 100:
    // core boundaries at x = 150, 250 and y = 150. The grid darkens them faintly.
    for (x, y) in [(150, 290), (250, 200), (330, 150)] {
        let (a, b) = (px(&out, x, y), px(&img, x, y));
        assert!(
            a.iter().zip(b).all(|(a, b)| *a < b && *a > b / 2),
            "grid at ({x}, {y}): {a:?} vs {b:?}"
        );
    }
    assert_eq!(px(&out, 200, 290), px(&img, 200, 290), "between grid lines");
}

#[test]
fn write_annotated_names_files_and_reports_errors() {
    let m = model();
    let r = report();
    let ic = r.images[1].counted().unwrap();
    let img = test_image(320, 240);
    let dir = tmp_dir("annotated");
    let out_dir = dir.join("png");
    let p = write_annotated(&out_dir, &img, ic, &m, THRESHOLD).unwrap();
    assert_eq!(p, out_dir.join("smear, \"A\".annotated.png"));
    let back = image::open(&p).unwrap().to_rgb8();
    assert_eq!(back.dimensions(), (320, 240));
    assert_eq!(back.as_raw(), &annotate(&img, ic, &m, THRESHOLD).data);
    let p2 = write_annotated_as(&out_dir, "smear, \"A\"-2", &img, ic, &m, THRESHOLD).unwrap();
    assert_eq!(p2, out_dir.join("smear, \"A\"-2.annotated.png"));

    // A folder that cannot be created (its parent is a file): an IO error naming the path.
    let blocker = dir.join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let bad = blocker.join("out");
    let check = |e: Error, path: &Path| {
        let msg = e.to_string();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    };
    check(
        write_annotated(&bad, &img, ic, &m, THRESHOLD).unwrap_err(),
        &bad,
    );
    check(write_geojson_dir(&bad, &r).unwrap_err(), &bad);
    let csv = dir.join("missing").join("counts.csv");
    check(write_csv(&csv, &r).unwrap_err(), &csv);
    let coco = bad.join("dets.json");
    check(write_coco(&coco, &r).unwrap_err(), &coco);

    // An image that is not the one counted is refused rather than annotated wrongly.
    let wrong = test_image(100, 100);
    let e = write_annotated(&out_dir, &wrong, ic, &m, THRESHOLD).unwrap_err();
    assert!(
        matches!(e, Error::Invalid(_)) && e.to_string().contains("320×240"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
