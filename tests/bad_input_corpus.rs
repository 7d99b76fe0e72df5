//! The bad-input corpus under `tests/bad_inputs/` (weights and label files; the images are
//! `tests/image_input.rs`'s): every file gives an error that names the file and the problem
//! (a substring from `tests/bad_inputs/expected.json`), and nothing panics. Regenerate the
//! files with `python3 weights/make_bad_weights_labels.py`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use marrow::count::{CountOptions, Counter, Model};
use marrow::eval::labels::{parse_coco_json, parse_yolo_label, YoloClassMap};

fn manifest() -> BTreeMap<String, BTreeMap<String, String>> {
    serde_json::from_str(&std::fs::read_to_string("tests/bad_inputs/expected.json").unwrap())
        .unwrap()
}

/// Every file in `dir` is in the manifest and vice versa (a new file must say what it expects).
fn files(dir: &str, expected: &BTreeMap<String, String>) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        expected.keys().cloned().collect::<Vec<_>>(),
        "{dir} vs expected.json"
    );
    names
}

#[test]
fn every_bad_weights_file_is_a_clear_load_error() {
    let m = manifest();
    let expected = &m["weights"];
    for name in files("tests/bad_inputs/weights", expected) {
        let path = Path::new("tests/bad_inputs/weights").join(&name);
        // Loading parses and checks the file; building the detector checks the architecture.
        let err = match Model::open(&path) {
            Err(e) => e.to_string(),
            Ok(model) => match Counter::new(common::gpu(), model, CountOptions::default()) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{name}: loaded without an error"),
            },
        };
        assert!(
            err.contains(&name),
            "{name}: the error does not name the file: {err}"
        );
        assert!(
            err.contains(&expected[&name]),
            "{name}: expected {:?} in: {err}",
            expected[&name]
        );
    }
}

#[test]
fn every_bad_label_file_is_a_clear_parse_error() {
    let m = manifest();
    let expected = &m["labels"];
    let classes: Vec<String> = ["__background__", "WBC", "RBC", "platelet"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let map = YoloClassMap::new(&classes, None);
    for name in files("tests/bad_inputs/labels", expected) {
        let bytes = std::fs::read(Path::new("tests/bad_inputs/labels").join(&name)).unwrap();
        let r = if name.ends_with(".json") {
            parse_coco_json(&bytes, &name, &classes).map(|_| ())
        } else {
            parse_yolo_label(&bytes, &name, 640, 480, &map).map(|_| ())
        };
        let err = r.expect_err(&name).to_string();
        assert!(
            err.contains(&name),
            "{name}: the error does not name the file: {err}"
        );
        assert!(
            err.contains(&expected[&name]),
            "{name}: expected {:?} in: {err}",
            expected[&name]
        );
    }
}
