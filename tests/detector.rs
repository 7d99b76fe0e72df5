//! The whole detector against torchvision fixtures: proposals and detections by set matching
//! (§14.4), end-to-end from the image and teacher-forced from the reference FPN / proposals.

mod common;

use std::path::PathBuf;

use common::gpu;
use marrow::cpu;
use marrow::gpu::Nhwc;
use marrow::model::detector::Detector;
use marrow::model::ImageF32;
use marrow::validate;
use marrow::validate::RefDump;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Runs `marrow validate`'s head comparison (the same code path as the CLI) and checks that every
/// set-valued and teacher-forced row is present and within §14.4 / §14.3.
fn run_case(file: &str) {
    let dump = RefDump::open(&fixture(file)).unwrap();
    let ws = dump.seeded_weights().unwrap().unwrap();
    let report = validate::validate_heads(gpu(), ws, &dump).unwrap();
    eprintln!("{file}\n{}", report.table());
    for (stage, mode) in [
        ("anchors", "exact"),
        ("rpn.proposals", "from image"),
        ("rpn.proposals", "TF from FPN"),
        ("box.logits", "TF proposals"),
        ("box.deltas", "TF proposals"),
        ("det.*", "from image"),
        ("det.*", "TF proposals"),
    ] {
        let row = report
            .row(stage, mode)
            .unwrap_or_else(|| panic!("{file}: {stage} ({mode}) not compared"));
        assert!(row.pass, "{file}: {stage} ({mode}) failed: {}", row.note);
    }
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

#[test]
fn plan_memory_accounting_matches_the_allocator() {
    // Uses its own device so other tests' buffers are not in the allocator's total.
    let g: &'static marrow::gpu::Gpu = Box::leak(Box::new(
        marrow::gpu::Gpu::new(&marrow::gpu::GpuOptions::default()).unwrap(),
    ));
    let dump = RefDump::open(&fixture("image_land_120x160.safetensors")).unwrap();
    let ws = dump.seeded_weights().unwrap().unwrap();
    // Bytes of every tensor in the file; the GPU holds fewer (FrozenBN's 4 vectors fold into one
    // bias per channel).
    let file_bytes: u64 = ws
        .names()
        .map(|n| ws.shape(n).unwrap().iter().product::<usize>() as u64 * 4)
        .sum();
    let mut det = Detector::new(g, ws).unwrap();
    let image = {
        let (s, v) = dump.f32("input.image", 3).unwrap();
        ImageF32 {
            h: s[1],
            w: s[2],
            data: v.to_vec(),
        }
    };
    det.detect(&image).unwrap();
    let plan = det.plan_bytes(image.h, image.w).unwrap();
    let Some(report) = g.device.generate_allocator_report() else {
        eprintln!("this backend has no allocator report; skipping the comparison");
        return;
    };
    let allocated = report.total_allocated_bytes;
    eprintln!("plan {plan} B, weights in the file {file_bytes} B, allocator {allocated} B");
    // Besides the plan, the allocator holds the uploaded weights (at most the file's tensors)
    // and ~200 small uniform buffers (measured: 218 KiB beyond the file size at this fixture); a
    // plan that forgot a buffer of its own would leave a gap larger than the 1 MiB margin.
    let rest = allocated.saturating_sub(plan);
    assert!(plan <= allocated, "plan {plan} > allocated {allocated}");
    assert!(
        rest <= file_bytes + (1 << 20),
        "unaccounted: {rest} B beyond the plan, weights {file_bytes} B"
    );
}
