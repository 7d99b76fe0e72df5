//! The built-in default model on real images: `marrow count`'s path (decode → Counter) against
//! torchvision running the same file on the same bundled examples (a committed fixture made by
//! `weights/make_count_fixture.py`), and a tiled mosaic of real fields counted once per cell.
//!
//! Without the `builtin-model` feature these tests check nothing and say so.

mod common;

use std::path::Path;

use marrow::count::{CountOptions, Counter, Model, Tiling};
use marrow::validate::matching::{self, Det};
use marrow::validate::set_tol;

#[cfg(feature = "builtin-model")]
const FIXTURE: &str = "tests/fixtures/default_model_torchvision.json";

/// Set-matches marrow's detections with torchvision's for every image of a fixture and requires
/// identical counts at the fixture's threshold. Returns (matched, reference) detection totals.
pub fn parity(model: Model, fixture: &Path) -> (usize, usize) {
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let sha = doc["model"]["sha256"].as_str().unwrap();
    assert_eq!(
        sha, model.info.sha256,
        "the fixture was made from another model file"
    );
    let threshold = doc["threshold"].as_f64().unwrap() as f32;
    let (st, nt, maxd) = (
        model.info.box_score_thresh,
        model.info.box_nms_thresh,
        model.info.detections_per_img as usize,
    );
    let mut counter = Counter::new(
        common::gpu(),
        model,
        CountOptions {
            threshold,
            tiling: Tiling::Off,
            overlap: None,
        },
    )
    .unwrap();
    let (mut matched, mut reference) = (0, 0);
    for im in doc["images"].as_array().unwrap() {
        let file = im["file"].as_str().unwrap();
        let img = marrow::image_io::load_rgb8(Path::new(file)).unwrap();
        let got = counter.count(file, &img).unwrap();
        let want: Vec<Det> = im["detections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let b: Vec<f32> = d["bbox"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect();
                Det {
                    bbox: [b[0], b[1], b[2], b[3]],
                    score: d["score"].as_f64().unwrap() as f32,
                    label: d["label"].as_i64().unwrap(),
                }
            })
            .collect();
        let mine: Vec<Det> = got
            .detections
            .iter()
            .map(|c| Det {
                bbox: c.bbox,
                score: c.score,
                label: c.label as i64,
            })
            .collect();
        // The end-to-end tolerances of `marrow validate` (docs/validation.md): f32 reordering
        // between the GPU's and torch's convolutions moves scores by ~1e-6 and boxes by far less
        // than the 0.98 IoU floor; a miss must be explainable (at the 0.05 score threshold, the
        // top-100 cut or an IoU tie at the NMS threshold).
        let m = matching::detections(
            &mine,
            &want,
            set_tol::DET_IOU_E2E,
            set_tol::DET_DSCORE_E2E,
            st,
            nt,
            maxd,
        );
        assert_eq!(m.unexplained, 0, "{file}: {m:?}");
        assert!(m.matched + m.explainable == want.len(), "{file}: {m:?}");
        let counts: std::collections::BTreeMap<String, usize> =
            serde_json::from_value(im["counts"].clone()).unwrap();
        assert_eq!(got.counts, counts, "{file}: counts at {threshold}");
        matched += m.matched;
        reference += want.len();
    }
    (matched, reference)
}

#[cfg(feature = "builtin-model")]
#[test]
fn builtin_model_matches_torchvision_on_the_bundled_examples() {
    let model = Model::builtin().expect("built with the model").unwrap();
    let (matched, reference) = parity(model, Path::new(FIXTURE));
    assert!(reference > 100, "the fixture has real detections");
    eprintln!("{matched}/{reference} torchvision detections matched");
}

/// Local check of any model against a fixture made for it (not run in CI):
/// `MARROW_PARITY_WEIGHTS=W MARROW_PARITY_FIXTURE=F cargo test --test default_model -- --ignored`.
#[test]
#[ignore]
fn any_model_matches_its_torchvision_fixture() {
    let w = std::env::var("MARROW_PARITY_WEIGHTS").expect("MARROW_PARITY_WEIGHTS");
    let f = std::env::var("MARROW_PARITY_FIXTURE").expect("MARROW_PARITY_FIXTURE");
    let (matched, reference) = parity(Model::open(Path::new(&w)).unwrap(), Path::new(&f));
    eprintln!("{matched}/{reference} torchvision detections matched");
}

#[cfg(not(feature = "builtin-model"))]
#[test]
fn builtin_model_tests_need_the_feature() {
    assert!(Model::builtin().is_none());
    eprintln!("built without the builtin-model feature: default-model parity not run");
}
