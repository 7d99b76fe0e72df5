//! The whole detector against torchvision fixtures: proposals and detections by set matching
//! (§14.4), end-to-end from the image and teacher-forced from the reference FPN / proposals.

mod common;

use std::path::PathBuf;

use common::gpu;
use marrow::cpu;
use marrow::gpu::Nhwc;
use marrow::model::detector::Detector;
use marrow::model::ImageF32;
use marrow::validate::matching::{self, Det};
use marrow::validate::RefDump;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn boxes(v: &[f32]) -> Vec<[f32; 4]> {
    v.chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect()
}

fn ref_dets(d: &RefDump) -> Vec<Det> {
    let b = boxes(d.tensors["det.boxes"].f32().unwrap());
    let s = d.tensors["det.scores"].f32().unwrap();
    let l = d.tensors["det.labels"].i64().unwrap();
    (0..b.len())
        .map(|i| Det {
            bbox: b[i],
            score: s[i],
            label: l[i],
        })
        .collect()
}

fn run_case(file: &str) {
    let dump = RefDump::open(&fixture(file)).unwrap();
    let ws = dump.seeded_weights().unwrap().unwrap();
    let cfg = ws.config.clone();
    let mut det = Detector::new(gpu(), ws).unwrap();
    let (is, id) = dump.f32("input.image", 3).unwrap();
    let image = ImageF32 {
        h: is[1],
        w: is[2],
        data: id.to_vec(),
    };

    // End to end from the image.
    let (out, st) = det.detect_debug(&image).unwrap();
    let rp = boxes(dump.tensors["rpn.proposals"].f32().unwrap());
    let rs = dump.tensors["rpn.scores"].f32().unwrap();
    let pm = matching::proposals(&st.proposals, &st.proposal_scores, &rp, rs);
    eprintln!("{file}: e2e proposals {pm:?}");
    let got: Vec<Det> = out
        .detections
        .iter()
        .map(|d| Det {
            bbox: d.bbox,
            score: d.score,
            label: d.label as i64,
        })
        .collect();
    let dm = matching::detections(
        &got,
        &ref_dets(&dump),
        0.98,
        1e-3,
        cfg.box_head.score_thresh,
        cfg.box_head.nms_thresh,
        cfg.box_head.detections_per_img as usize,
    );
    eprintln!("{file}: e2e detections {dm:?}");

    // Teacher-forced from the reference FPN (RPN) and reference proposals (box head).
    let fpn: Vec<(Nhwc, Vec<f32>)> = marrow::model::backbone::FPN_NAMES
        .iter()
        .map(|n| {
            let (s, v) = dump.f32(n, 4).unwrap();
            (
                Nhwc::new(s[0], s[2], s[3], s[1]),
                cpu::nchw_to_nhwc(v, s[0], s[1], s[2], s[3]),
            )
        })
        .collect();
    let (tout, tst) = det
        .detect_teacher_forced((is[1], is[2]), &fpn, Some(&rp))
        .unwrap();
    let tpm = matching::proposals(&tst.proposals, &tst.proposal_scores, &rp, rs);
    eprintln!("{file}: TF proposals {tpm:?}");
    let bl = dump.tensors["box.logits"].f32().unwrap();
    let bd = dump.tensors["box.deltas"].f32().unwrap();
    let dl = cpu::diff(&tst.box_logits, bl);
    let dd = cpu::diff(&tst.box_deltas, bd);
    eprintln!("{file}: TF box.logits {dl:?}\n  box.deltas {dd:?}");
    let tgot: Vec<Det> = tout
        .detections
        .iter()
        .map(|d| Det {
            bbox: d.bbox,
            score: d.score,
            label: d.label as i64,
        })
        .collect();
    let tdm = matching::detections(
        &tgot,
        &ref_dets(&dump),
        0.99,
        1e-5,
        cfg.box_head.score_thresh,
        cfg.box_head.nms_thresh,
        cfg.box_head.detections_per_img as usize,
    );
    eprintln!("{file}: TF detections {tdm:?}");

    assert!(tpm.fraction() >= 0.995, "teacher-forced proposals {tpm:?}");
    assert!(tpm.max_dscore <= 1e-4);
    assert!(pm.fraction() >= 0.97, "end-to-end proposals {pm:?}");
    assert!(pm.max_dscore <= 1e-4);
    // §14.3: fc layers from reference inputs ≤ 1e-5 relative.
    assert!(dl.rel_max <= 1e-5 && dd.rel_max <= 1e-5, "{dl:?} {dd:?}");
    assert_eq!(tdm.unexplained, 0, "teacher-forced detections {tdm:?}");
    assert_eq!(dm.unexplained, 0, "end-to-end detections {dm:?}");
}

#[test]
fn landscape_fixture_matches_torchvision() {
    run_case("image_land_120x160.safetensors");
}

#[test]
fn truncation_fixture_matches_torchvision() {
    run_case("image_portrait_trunc159_100x77.safetensors");
}

#[test]
fn pool61_fixture_matches_torchvision() {
    run_case("image_pool61_50x210.safetensors");
}

fn fixture_detector(file: &str) -> (RefDump, Detector<'static>, ImageF32) {
    let dump = RefDump::open(&fixture(file)).unwrap();
    let ws = dump.seeded_weights().unwrap().unwrap();
    let det = Detector::new(gpu(), ws).unwrap();
    let (is, id) = dump.f32("input.image", 3).unwrap();
    let image = ImageF32 {
        h: is[1],
        w: is[2],
        data: id.to_vec(),
    };
    (dump, det, image)
}

#[test]
fn batch_results_equal_single_runs() {
    let (_, mut det, a) = fixture_detector("image_land_120x160.safetensors");
    let b = {
        let d = RefDump::open(&fixture("image_portrait_trunc159_100x77.safetensors")).unwrap();
        let (s, v) = d.f32("input.image", 3).unwrap();
        ImageF32 {
            h: s[1],
            w: s[2],
            data: v.to_vec(),
        }
    };
    let singles = [det.detect(&a).unwrap(), det.detect(&b).unwrap()];
    // Interleaved sizes re-use each size's cached plan; results must not depend on order.
    let batch = det.detect_batch(&[b.clone(), a.clone(), b]).unwrap();
    assert_eq!(batch[0].detections, singles[1].detections);
    assert_eq!(batch[1].detections, singles[0].detections);
    assert_eq!(batch[2].detections, singles[1].detections);
    assert!(!singles[0].detections.is_empty());
}

#[test]
fn zero_proposals_and_zero_detections_flow_through() {
    let (dump, mut det, image) = fixture_detector("image_land_120x160.safetensors");
    let fpn: Vec<(Nhwc, Vec<f32>)> = marrow::model::backbone::FPN_NAMES
        .iter()
        .map(|n| {
            let (s, v) = dump.f32(n, 4).unwrap();
            (
                Nhwc::new(s[0], s[2], s[3], s[1]),
                cpu::nchw_to_nhwc(v, s[0], s[1], s[2], s[3]),
            )
        })
        .collect();
    // No proposals reach the box head: no candidates, no detections, no error.
    let (out, st) = det
        .detect_teacher_forced((image.h, image.w), &fpn, Some(&[]))
        .unwrap();
    assert!(out.detections.is_empty());
    assert_eq!(st.box_candidates, 0);
    assert!(st.box_logits.is_empty());

    // A score threshold nothing passes: the class-aware NMS sees zero candidates.
    let mut ws = dump.seeded_weights().unwrap().unwrap();
    ws.config.box_head.score_thresh = 0.9999;
    let mut strict = Detector::new(gpu(), ws).unwrap();
    let (out, st) = strict.detect_debug(&image).unwrap();
    assert!(out.detections.is_empty());
    assert_eq!(st.box_candidates, 0);
    assert!(!st.proposals.is_empty(), "the RPN still proposes");
    // And the same detector recovers on the next image with candidates again (no stale counts).
    let (_, mut normal, _) = fixture_detector("image_land_120x160.safetensors");
    assert_eq!(normal.detect(&image).unwrap().detections.len(), 100);
}
