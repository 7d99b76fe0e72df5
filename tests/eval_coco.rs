//! The evaluator against pycocotools itself, the counting metrics on hand-checkable cases, and
//! the label readers' errors (including arbitrary bytes, which must never panic).
//!
//! Fixtures: `tests/fixtures/coco_eval/*.json`, written by `weights/make_coco_fixture.py` from
//! pycocotools' COCOeval (see `docs/evaluation.md`).

use std::path::{Path, PathBuf};

use marrow::eval::coco::{self, evaluate};
use marrow::eval::counting::{count_metrics, MISSED, SPURIOUS};
use marrow::eval::labels::{
    label_stem, parse_classes_txt, parse_coco_json, parse_yolo_label, read_coco_json,
    read_yolo_dir, YoloClassMap,
};
use marrow::eval::{DetBox, EvalImage, GtBox};
use proptest::prelude::*;
use serde::Deserialize;

/// How close to pycocotools. The brief allowed 1e-3, expecting pycocotools' float32/float64
/// mixing to get in the way, but bbox evaluation is float64 throughout (the IoUs in maskApi.c,
/// numpy's precision/recall arrays), and marrow mirrors the operation order including numpy's
/// pairwise summation in `np.mean`, so the measured difference is 0 (bit-identical) on every
/// fixture number. 1e-12 leaves room for a libm or numpy build that rounds differently.
const TOL: f64 = 1e-12;

#[derive(Deserialize)]
struct ClassAp {
    #[serde(rename = "AP")]
    ap: f64,
    #[serde(rename = "AP50")]
    ap50: f64,
}

#[derive(Deserialize)]
struct Expected {
    max_dets: [usize; 3],
    stats: [f64; 12],
    ap_at_last_max_dets: f64,
    per_class: std::collections::BTreeMap<String, ClassAp>,
}

#[derive(Deserialize)]
struct Case {
    class_names: Vec<String>,
    images: Vec<EvalImage>,
    results: Vec<Expected>,
    iou_thrs: Vec<f64>,
    rec_thrs: Vec<f64>,
    #[serde(default)]
    yolo_labels: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    classes_txt: Option<String>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/coco_eval")
}

fn load(name: &str) -> Case {
    let path = fixture_dir().join(format!("{name}.json"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs every maxDets setting of a case; returns the largest |difference| seen.
fn check_case(name: &str) -> f64 {
    let case = load(name);
    assert_eq!(coco::iou_thresholds(), case.iou_thrs, "{name}: iouThrs");
    assert_eq!(coco::recall_thresholds(), case.rec_thrs, "{name}: recThrs");
    let mut worst = 0.0f64;
    for exp in &case.results {
        let got = evaluate(&case.images, &case.class_names, exp.max_dets);
        assert_eq!(got.max_dets, exp.max_dets);
        let names = got.stat_names();
        for (i, (&g, &e)) in got.stats.iter().zip(&exp.stats).enumerate() {
            // pycocotools reads stats[0] at maxDets=100 whatever maxDets is (−1 for [1,10,300]);
            // marrow reads it at the last maxDets, which the fixture computes from the precision
            // array the same way.
            let e = if i == 0 { exp.ap_at_last_max_dets } else { e };
            let d = (g - e).abs();
            worst = worst.max(d);
            assert!(
                d <= TOL,
                "{name} {:?} {}: marrow {g} pycocotools {e}",
                exp.max_dets,
                names[i]
            );
        }
        if exp.max_dets[2] == 100 {
            assert_eq!(exp.stats[0], exp.ap_at_last_max_dets);
        }
        assert_eq!(got.per_class.0.len(), case.class_names.len() - 1);
        for (cname, cap) in &got.per_class.0 {
            let e = &exp.per_class[cname];
            for (g, e, what) in [(cap.ap, e.ap, "AP"), (cap.ap50, e.ap50, "AP50")] {
                let d = (g - e).abs();
                worst = worst.max(d);
                assert!(
                    d <= TOL,
                    "{name} {:?} {cname} {what}: marrow {g} pycocotools {e}",
                    exp.max_dets
                );
            }
        }
    }
    eprintln!("{name}: max |marrow − pycocotools| = {worst:e}");
    worst
}

#[test]
fn agrees_with_pycocotools_synthetic() {
    check_case("synthetic");
}

#[test]
fn agrees_with_pycocotools_boundaries() {
    check_case("boundaries");
}

#[test]
fn agrees_with_pycocotools_txl_pbc() {
    check_case("txl_pbc");
}

#[test]
fn fixtures_cover_what_they_claim() {
    let s = load("synthetic");
    assert!(s
        .images
        .iter()
        .any(|i| i.gt.is_empty() && !i.dets.is_empty()));
    assert!(s
        .images
        .iter()
        .any(|i| !i.gt.is_empty() && i.dets.is_empty()));
    assert!(s
        .images
        .iter()
        .any(|i| i.gt.is_empty() && i.dets.is_empty()));
    assert!(s.images.iter().any(|i| i.gt.iter().any(|g| g.iscrowd)));
    assert!(s
        .images
        .iter()
        .any(|i| i.dets.iter().filter(|d| d.class == 1).count() > 100));
    for range in &coco::AREA_RANGES[1..] {
        assert!(s
            .images
            .iter()
            .flat_map(|i| &i.gt)
            .any(|g| g.area >= range[0] && g.area <= range[1]));
    }
    // With maxDets 300 the crowded image's extra detections change the numbers.
    assert_ne!(s.results[0].stats[8], s.results[1].stats[8]);
}

#[test]
fn metrics_serialize_with_the_max_dets_in_the_names() {
    let case = load("synthetic");
    let m = evaluate(&case.images, &case.class_names, [1, 10, 300]);
    let v: serde_json::Value = serde_json::to_value(&m).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    for k in [
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "AR1",
        "AR10",
        "AR300",
        "ARs",
        "ARm",
        "ARl",
        "per_class",
    ] {
        assert!(keys.contains(&k), "missing {k} in {keys:?}");
    }
    assert_eq!(v["per_class"]["gamma"]["AP"], -1.0);
    assert_eq!(v["AR300"], m.stats[8]);
    assert!(m.summary().contains("maxDets=300"));
}

#[test]
fn max_dets_are_sorted_like_pycocotools() {
    let case = load("boundaries");
    let a = evaluate(&case.images, &case.class_names, [100, 1, 10]);
    let b = evaluate(&case.images, &case.class_names, coco::DEFAULT_MAX_DETS);
    assert_eq!(a, b);
}

#[test]
fn boxes_of_unknown_classes_are_dropped() {
    let case = load("boundaries");
    let mut images = case.images.clone();
    images[0].gt.push(GtBox::new([0.0, 0.0, 5.0, 5.0], 7));
    images[0].dets.push(det([0.0, 0.0, 5.0, 5.0], 0, 0.99));
    let a = evaluate(&images, &case.class_names, coco::DEFAULT_MAX_DETS);
    let b = evaluate(&case.images, &case.class_names, coco::DEFAULT_MAX_DETS);
    assert_eq!(a, b);
}

// ---- counting -------------------------------------------------------------------------------

fn names(n: &[&str]) -> Vec<String> {
    n.iter().map(|s| s.to_string()).collect()
}

fn det(bbox: [f64; 4], class: usize, score: f64) -> DetBox {
    DetBox { bbox, class, score }
}

fn image(gt: Vec<GtBox>, dets: Vec<DetBox>) -> EvalImage {
    EvalImage {
        file: "x.png".into(),
        width: 100,
        height: 100,
        gt,
        dets,
    }
}

#[test]
fn counting_by_hand() {
    let cls = names(&["bg", "wbc", "rbc"]);
    let b = |x: f64| [x, 0.0, x + 10.0, 10.0];
    let images = vec![
        // wbc: gt 2, det 2 (one below threshold does not count) → exact; rbc: gt 1, det 0.
        image(
            vec![
                GtBox::new(b(0.0), 1),
                GtBox::new(b(20.0), 1),
                GtBox::new(b(40.0), 2),
            ],
            vec![
                det(b(0.0), 1, 0.9),
                det(b(20.0), 1, 0.8),
                det(b(60.0), 1, 0.1),
            ],
        ),
        // wbc: gt 0, det 1 (spurious); rbc: gt 2, det 3 (one is taken for the wbc GT's place:
        // det rbc on GT wbc).
        image(
            vec![
                GtBox::new(b(0.0), 2),
                GtBox::new(b(20.0), 2),
                // crowd regions are not counted
                GtBox {
                    bbox: b(80.0),
                    class: 1,
                    area: 100.0,
                    iscrowd: true,
                },
            ],
            vec![
                det(b(0.0), 2, 0.9),
                det(b(20.0), 2, 0.9),
                det(b(40.0), 2, 0.7),
                det(b(60.0), 1, 0.6),
            ],
        ),
        // nothing at all
        image(vec![], vec![]),
    ];
    let m = count_metrics(&images, &cls, 0.5, 0.5);
    assert_eq!(m.images, 3);
    let wbc = m.per_class.get("wbc").unwrap();
    assert_eq!((wbc.gt, wbc.det), (2, 3));
    // |2-2|, |1-0|, |0-0| → MAE 1/3; relative only over image 0 → 0; exact 2 of 3.
    assert_eq!(wbc.mae, Some(1.0 / 3.0));
    assert_eq!((wbc.mre, wbc.mre_images), (Some(0.0), 1));
    assert_eq!(wbc.exact, Some(2.0 / 3.0));
    let rbc = m.per_class.get("rbc").unwrap();
    assert_eq!((rbc.gt, rbc.det), (3, 3));
    // |0-1|, |3-2|, 0 → MAE 2/3; relative (1/1 + 1/2) / 2 = 0.75; exact 1 of 3.
    assert_eq!(rbc.mae, Some(2.0 / 3.0));
    assert_eq!((rbc.mre, rbc.mre_images), (Some(0.75), 2));
    assert_eq!(rbc.exact, Some(1.0 / 3.0));
    // Totals per image: (2 det, 3 gt), (4, 2), (0, 0).
    assert_eq!(m.total.mae, Some(1.0));
    assert_eq!(m.total.mre, Some((1.0 / 3.0 + 1.0) / 2.0));

    assert_eq!(m.confusion.rows, names(&["wbc", "rbc", SPURIOUS]));
    assert_eq!(m.confusion.cols, names(&["wbc", "rbc", MISSED]));
    assert_eq!(
        m.confusion.matrix,
        vec![
            vec![2, 0, 0], // wbc GT: both found as wbc
            vec![0, 2, 1], // rbc GT: two found, the one in image 0 missed
            vec![1, 1, 0], // spurious: the wbc at 60 and the rbc at 40 in image 1
        ]
    );
    let v = serde_json::to_value(&m).unwrap();
    assert_eq!(v["per_class"]["rbc"]["mre"], 0.75);
    assert_eq!(v["confusion"]["matrix"][2][0], 1);
}

#[test]
fn counting_confusion_is_greedy_by_score_and_one_to_one() {
    let cls = names(&["bg", "a", "b"]);
    // One GT of class a; a class-b detection with a higher score and lower IoU takes it first,
    // so the better-placed class-a detection is spurious.
    let images = vec![image(
        vec![GtBox::new([0.0, 0.0, 10.0, 10.0], 1)],
        vec![
            det([0.0, 0.0, 10.0, 10.0], 1, 0.6),
            det([0.0, 0.0, 10.0, 7.0], 2, 0.9),
        ],
    )];
    let m = count_metrics(&images, &cls, 0.0, 0.5);
    assert_eq!(
        m.confusion.matrix,
        vec![vec![0, 1, 0], vec![0, 0, 0], vec![1, 0, 0]]
    );
    // A det below the IoU threshold matches nothing: IoU 0.4 < 0.5.
    let images = vec![image(
        vec![GtBox::new([0.0, 0.0, 10.0, 10.0], 1)],
        vec![det([0.0, 0.0, 4.0, 10.0], 1, 0.9)],
    )];
    let m = count_metrics(&images, &cls, 0.0, 0.5);
    assert_eq!(
        m.confusion.matrix,
        vec![vec![0, 0, 1], vec![0, 0, 0], vec![1, 0, 0]]
    );
    // IoU exactly 0.5 matches.
    let images = vec![image(
        vec![GtBox::new([0.0, 0.0, 10.0, 10.0], 1)],
        vec![det([0.0, 0.0, 5.0, 10.0], 1, 0.9)],
    )];
    let m = count_metrics(&images, &cls, 0.0, 0.5);
    assert_eq!(m.confusion.matrix[0][0], 1);
}

#[test]
fn counting_with_no_images_is_undefined_not_nan() {
    let m = count_metrics(&[], &names(&["bg", "a"]), 0.5, 0.5);
    let a = m.per_class.get("a").unwrap();
    assert_eq!((a.mae, a.mre, a.exact), (None, None, None));
    let v = serde_json::to_string(&m).unwrap();
    assert!(v.contains("\"mae\":null"), "{v}");
}

// ---- label readers --------------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("marrow-eval-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn yolo_reader_reproduces_the_fixture_ground_truth() {
    let case = load("txl_pbc");
    let labels = case.yolo_labels.as_ref().unwrap();
    // The dataset layout: root/classes.txt, root/labels/val/*.txt.
    let tmp = TempDir::new("txl");
    let dir = tmp.0.join("labels").join("val");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        tmp.0.join("classes.txt"),
        case.classes_txt.as_ref().unwrap(),
    )
    .unwrap();
    for (stem, text) in labels {
        std::fs::write(dir.join(format!("{stem}.txt")), text).unwrap();
    }
    std::fs::write(dir.join("orphan.txt"), "0 0.5 0.5 0.1 0.1\n").unwrap();
    let mut files: Vec<(String, u32, u32)> = case
        .images
        .iter()
        .map(|i| (i.file.clone(), i.width, i.height))
        .collect();
    files.push(("no_labels.png".into(), 100, 100));
    let got = read_yolo_dir(&dir, &files, &case.class_names).unwrap();
    assert_eq!(got.dataset_names.as_ref().unwrap().len(), 3);
    assert!(got.classes_file.is_some());
    for (img, gt) in case.images.iter().zip(&got.gt) {
        // Bit-identical boxes, classes and areas (the model's class order differs from
        // classes.txt's, so this also checks the mapping by name).
        assert_eq!(&img.gt, gt, "{}", img.file);
    }
    assert!(got.gt.last().unwrap().is_empty());
    assert_eq!(got.warnings.len(), 2, "{:?}", got.warnings);
    assert!(got.warnings[0].contains("no_labels.png"));
    assert!(got.warnings[1].contains("orphan.txt"));
}

#[test]
fn yolo_reader_without_classes_txt_offsets_by_one() {
    let tmp = TempDir::new("plain");
    std::fs::write(
        tmp.0.join("a.txt"),
        "\n1 0.5 0.5 0.5 0.25\r\n\n  0 0 0 1 1  \n",
    )
    .unwrap();
    let cls = names(&["bg", "x", "y"]);
    let got = read_yolo_dir(&tmp.0, &[("a.jpg".into(), 200, 100)], &cls).unwrap();
    assert_eq!(got.dataset_names, None);
    assert!(got.warnings.is_empty());
    assert_eq!(
        got.gt[0],
        vec![
            GtBox::new([50.0, 37.5, 150.0, 62.5], 2),
            // Edges clamped to the image: cx - w/2 = -0.5 → 0.
            GtBox::new([0.0, 0.0, 100.0, 50.0], 1),
        ]
    );
    // Class 2 is out of range for a 2-class model.
    std::fs::write(
        tmp.0.join("b.txt"),
        "0 0.5 0.5 0.1 0.1\n2 0.5 0.5 0.1 0.1\n",
    )
    .unwrap();
    let e = read_yolo_dir(&tmp.0, &[("b".into(), 10, 10)], &cls)
        .unwrap_err()
        .to_string();
    assert!(e.contains("b.txt: line 2:") && e.contains("class 2"), "{e}");
}

#[test]
fn yolo_unknown_class_name_is_named() {
    let tmp = TempDir::new("names");
    std::fs::write(tmp.0.join("classes.txt"), "wbc\nplatelet\n").unwrap();
    std::fs::write(
        tmp.0.join("a.txt"),
        "0 0.5 0.5 0.1 0.1\n1 0.5 0.5 0.1 0.1\n",
    )
    .unwrap();
    let cls = names(&["bg", "RBC", "WBC"]);
    let e = read_yolo_dir(&tmp.0, &[("a.png".into(), 10, 10)], &cls)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a.txt: line 2:") && e.contains("'platelet'"),
        "{e}"
    );
    // Names match trimmed and case-insensitively: line 1 alone is fine and maps wbc → 2.
    std::fs::write(tmp.0.join("a.txt"), "0 0.5 0.5 0.1 0.1\n").unwrap();
    let got = read_yolo_dir(&tmp.0, &[("a.png".into(), 10, 10)], &cls).unwrap();
    assert_eq!(got.gt[0][0].class, 2);
}

#[test]
fn yolo_long_names_map_by_their_abbreviation() {
    // TXL-PBC's own classes.txt spells the names out; the model says WBC, RBC, platelet.
    let cls = names(&["__background__", "WBC", "RBC", "platelet"]);
    let file: Vec<String> = ["White Blood Cell (WBC)", "Red Blood Cell (RBC)", "Platelet"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let map = YoloClassMap::new(&cls, Some(file));
    assert_eq!(
        (map.label(0), map.label(1), map.label(2)),
        (Ok(1), Ok(2), Ok(3))
    );
    // A parenthesised word that is no model class is still an error naming it.
    let map = YoloClassMap::new(&cls, Some(vec!["Blast cell (BLA)".to_string()]));
    let e = map.label(0).unwrap_err();
    assert!(e.contains("'Blast cell (BLA)'"), "{e}");
}

#[test]
fn yolo_line_errors_name_file_and_line() {
    let map = YoloClassMap::new(&names(&["bg", "a"]), None);
    let cases: &[(&[u8], &str)] = &[
        (b"0 0.5 0.5 0.1\n", "line 1: expected 5 fields"),
        (b"\n\n0 0.5 0.5 0.1 0.1 0.9\n", "line 3: expected 5 fields"),
        (b"x 0.5 0.5 0.1 0.1\n", "line 1: class `x`"),
        (b"-1 0.5 0.5 0.1 0.1\n", "line 1: class `-1`"),
        (b"0 nan 0.5 0.1 0.1\n", "line 1: cx = nan is outside"),
        (b"0 0.5 0.5 -0.1 0.1\n", "line 1: w = -0.1 is outside"),
        (b"0 0.5 1.5 0.1 0.1\n", "line 1: cy = 1.5 is outside"),
        (b"0 0.5 0.5 0.1 0\n", "line 1: h = 0 is outside"),
        (b"0 0.5 0.5 0.1 inf\n", "line 1: h = inf is outside"),
        (b"0 0.5 0.5 0.1 abc\n", "line 1: h `abc` is not a number"),
        (b"0 0.5 0.5 0.1 0.1\n\xff\n", "not UTF-8"),
    ];
    for (bytes, want) in cases {
        let e = parse_yolo_label(bytes, "lbl/a.txt", 10, 10, &map)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("lbl/a.txt: ") && e.contains(want),
            "{e} (want {want})"
        );
    }
    // A UTF-8 byte-order mark is fine.
    assert_eq!(
        parse_yolo_label(b"\xef\xbb\xbf0 0.5 0.5 0.2 0.2", "a", 10, 10, &map)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn classes_txt_plain_and_indexed() {
    assert_eq!(
        parse_classes_txt(
            b"0 White Blood Cell (WBC)\n1 Red Blood Cell (RBC)\n2 Platelet",
            "c"
        )
        .unwrap(),
        names(&["White Blood Cell (WBC)", "Red Blood Cell (RBC)", "Platelet"])
    );
    assert_eq!(
        parse_classes_txt(b"wbc\n\nrbc\n", "c").unwrap(),
        names(&["wbc", "rbc"])
    );
    // Numbers that are not 0, 1, 2… in order are part of the names.
    assert_eq!(
        parse_classes_txt(b"1 a\n2 b\n", "c").unwrap(),
        names(&["1 a", "2 b"])
    );
    assert!(parse_classes_txt(b"\n \n", "c").is_err());
    assert_eq!(label_stem("dir/sub/a.b.PNG"), "a.b");
    assert_eq!(label_stem("a.b"), "a.b");
    assert_eq!(label_stem(r"c:\x\img.jpeg"), "img");
}

#[test]
fn yolo_missing_dir_is_an_error() {
    let e = read_yolo_dir(Path::new("/nonexistent/labels"), &[], &names(&["bg", "a"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/labels"), "{e}");
}

const COCO_OK: &str = r#"{
  "images": [{"id": 7, "file_name": "b.png", "width": 50, "height": 40},
             {"id": 3, "file_name": "a.png", "width": 20, "height": 10}],
  "annotations": [
    {"id": 1, "image_id": 7, "category_id": 5, "bbox": [1, 2, 3, 4], "area": 10.5, "iscrowd": 0},
    {"id": 2, "image_id": 3, "category_id": 9, "bbox": [0, 0, 2, 2], "iscrowd": true},
    {"id": 3, "image_id": 7, "category_id": 9, "bbox": [5, 5, 1, 1]}
  ],
  "categories": [{"id": 5, "name": "WBC"}, {"id": 9, "name": "rbc"}, {"id": 11, "name": "unused"}]
}"#;

#[test]
fn coco_json_reader() {
    let cls = names(&["bg", "rbc", "wbc"]);
    let gt = parse_coco_json(COCO_OK.as_bytes(), "gt.json", &cls).unwrap();
    // Images in ascending id, as pycocotools evaluates them.
    assert_eq!(gt.images[0].file_name, "a.png");
    assert_eq!(
        gt.gt[0],
        vec![GtBox {
            bbox: [0.0, 0.0, 2.0, 2.0],
            class: 1,
            area: 4.0,
            iscrowd: true
        }]
    );
    assert_eq!(
        gt.gt[1],
        vec![
            GtBox {
                bbox: [1.0, 2.0, 4.0, 6.0],
                class: 2,
                area: 10.5,
                iscrowd: false
            },
            GtBox::new([5.0, 5.0, 6.0, 6.0], 1),
        ]
    );
    assert_eq!(gt.categories.len(), 3);
    let ev = gt.eval_images();
    assert_eq!(
        (ev[1].file.as_str(), ev[1].width, ev[1].gt.len()),
        ("b.png", 50, 2)
    );

    let tmp = TempDir::new("coco");
    let p = tmp.0.join("gt.json");
    std::fs::write(&p, COCO_OK).unwrap();
    assert_eq!(read_coco_json(&p, &cls).unwrap(), gt);
    let e = read_coco_json(&tmp.0.join("missing.json"), &cls)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.json"), "{e}");
}

#[test]
fn coco_json_errors() {
    let cls = names(&["bg", "rbc", "wbc"]);
    let err = |s: String| {
        parse_coco_json(s.as_bytes(), "gt.json", &cls)
            .unwrap_err()
            .to_string()
    };
    let e = err(COCO_OK.replace(r#""name": "WBC""#, r#""name": "platelet""#));
    assert!(
        e.contains("annotations[0]") && e.contains("'platelet'"),
        "{e}"
    );
    let e = err(COCO_OK.replace(r#""image_id": 3,"#, r#""image_id": 4,"#));
    assert!(e.contains("annotations[1]: image_id 4"), "{e}");
    let e = err(COCO_OK.replace(r#""category_id": 5,"#, r#""category_id": 6,"#));
    assert!(e.contains("category_id 6"), "{e}");
    let e = err(COCO_OK.replace("[1, 2, 3, 4]", "[1, 2, 3]"));
    assert!(e.contains("bbox has 3 numbers"), "{e}");
    let e = err(COCO_OK.replace("[1, 2, 3, 4]", "[1, 2, -3, 4]"));
    assert!(e.contains("not a box"), "{e}");
    let e = err(COCO_OK.replace(r#""id": 3, "file"#, r#""id": 7, "file"#));
    assert!(e.contains("image id 7 appears twice"), "{e}");
    let e = err(COCO_OK.replace("10.5", "-1"));
    assert!(e.contains("area -1"), "{e}");
    let e = err("{\"images\": [{\"id\": 1}]}".into());
    assert!(
        e.starts_with("gt.json: not COCO JSON") && e.contains("file_name"),
        "{e}"
    );
    let e = err("[".repeat(100_000));
    assert!(e.starts_with("gt.json: not COCO JSON"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn yolo_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400),
                                w in any::<u32>(), h in any::<u32>()) {
        let map = YoloClassMap::new(&names(&["bg", "a", "b"]), None);
        let _ = parse_yolo_label(&bytes, "f.txt", w, h, &map);
        let map = YoloClassMap::new(&names(&["bg", "a"]), Some(names(&["A", "c"])));
        let _ = parse_yolo_label(&bytes, "f.txt", w, h, &map);
        let _ = parse_classes_txt(&bytes, "classes.txt");
    }

    #[test]
    fn yolo_parser_on_near_valid_lines(lines in proptest::collection::vec(
        (0usize..4, -0.5f64..1.5, -0.5f64..1.5, -0.5f64..1.5, -0.5f64..1.5, 0usize..8), 0..20)) {
        let specials = ["nan", "inf", "-0", "1e309", "0x1", "", "1.0", "99999999999999999999"];
        let text: String = lines.iter().map(|(k, a, b, c, d, s)| {
            format!("{k} {a} {b} {c} {d} {}\n", if *s < 6 { "" } else { specials[*s] })
        }).collect();
        let map = YoloClassMap::new(&names(&["bg", "a", "b"]), None);
        if let Ok(boxes) = parse_yolo_label(text.as_bytes(), "f.txt", 640, 480, &map) {
            for b in boxes {
                prop_assert!(b.bbox[0] >= 0.0 && b.bbox[2] <= 640.0 && b.bbox[0] <= b.bbox[2]);
                prop_assert!(b.bbox[1] >= 0.0 && b.bbox[3] <= 480.0 && b.bbox[1] <= b.bbox[3]);
                prop_assert!(b.class == 1 || b.class == 2);
            }
        }
    }

    #[test]
    fn coco_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_coco_json(&bytes, "gt.json", &names(&["bg", "rbc", "wbc"]));
    }

    #[test]
    fn coco_parser_on_mutated_json(pos in 0usize..COCO_OK.len(), byte in any::<u8>(),
                                   cut in 0usize..COCO_OK.len()) {
        let mut b = COCO_OK.as_bytes().to_vec();
        b[pos] = byte;
        let _ = parse_coco_json(&b, "gt.json", &names(&["bg", "rbc", "wbc"]));
        let _ = parse_coco_json(&COCO_OK.as_bytes()[..cut], "gt.json", &names(&["bg", "rbc", "wbc"]));
    }

    #[test]
    fn evaluator_never_panics(boxes in proptest::collection::vec(
        (0usize..4, -5.0f64..50.0, -5.0f64..50.0, 0.0f64..30.0, 0.0f64..30.0, any::<bool>(), 0.0f64..1.0), 0..40)) {
        let mut img = image(vec![], vec![]);
        for (i, (c, x, y, w, h, crowd, s)) in boxes.iter().enumerate() {
            let bbox = [*x, *y, x + w, y + h];
            if i % 2 == 0 {
                img.gt.push(GtBox { bbox, class: *c, area: w * h, iscrowd: *crowd });
            } else {
                img.dets.push(det(bbox, *c, if i % 7 == 0 { f64::NAN } else { *s }));
            }
        }
        let cls = names(&["bg", "a", "b"]);
        let m = evaluate(&[img.clone(), img.clone()], &cls, [1, 3, 5]);
        for s in m.stats {
            prop_assert!(s == -1.0 || (0.0..=1.0).contains(&s), "{s}");
        }
        let _ = count_metrics(&[img], &cls, 0.5, 0.5);
    }
}
