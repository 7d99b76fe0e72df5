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

/// A model with non-default anchors (sizes 20/44.5/90/170/333, five aspect ratios, so a 5-output
/// RPN head), carried in its config: proposals and detections must still match torchvision.
#[test]
fn custom_anchor_fixture_matches_torchvision() {
    run_case("image_anchors5_90x120.safetensors");
}

/// The same weights with the config's anchors removed (default: 3 ratios) are refused by name,
/// not run with logits paired to the wrong anchors.
#[test]
fn anchor_count_mismatch_is_refused() {
    let dump = RefDump::open(&fixture("image_anchors5_90x120.safetensors")).unwrap();
    let mut ws = dump.seeded_weights().unwrap().unwrap();
    assert_eq!(ws.config.rpn.aspect_ratios.len(), 5);
    ws.config.rpn.aspect_ratios = cpu::rpn::DEFAULT_RATIOS.to_vec();
    let e = Detector::new(gpu(), ws)
        .err()
        .expect("mismatch accepted")
        .to_string();
    assert!(
        e.contains("rpn.head.cls_logits.weight has 5 outputs") && e.contains("rpn.aspect_ratios"),
        "{e}"
    );
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

/// The fixture model's weights plus a small deterministic GRU refinement head (H 8, K 4, 2
/// steps), so that a plan holds every stage.
fn with_refine_head(
    ws: &marrow::model::weights::WeightStore,
) -> marrow::model::weights::WeightStore {
    use marrow::model::weights::{HostTensor, WeightStore};
    let mut t: Vec<(String, HostTensor)> = ws
        .names()
        .map(|n| {
            let shape = ws.shape(n).unwrap().to_vec();
            let data = ws.get(n, &shape).unwrap().to_vec();
            (n.to_string(), HostTensor { shape, data })
        })
        .collect();
    let rows = |n: &str| ws.shape(n).unwrap()[0];
    let c = rows("rpn.head.conv.0.0.weight");
    let r = rows("roi_heads.box_head.fc7.weight");
    let n = rows("roi_heads.box_predictor.cls_score.weight");
    let (h, k) = (8, 4);
    let mut add = |name: &str, shape: Vec<usize>| {
        let len = shape.iter().product::<usize>();
        let data = (0..len).map(|i| ((i % 7) as f32 - 3.0) * 0.05).collect();
        t.push((name.to_string(), HostTensor { shape, data }));
    };
    for (name, o, i) in [
        ("refine.init", h, r),
        ("refine.key", k, c),
        ("refine.value", k, c),
        ("refine.query", k, h),
        ("refine.delta", 4, h),
        ("refine.stop", 1, h),
        ("refine.critic", 1, h),
        ("refine.cls", n, h),
    ] {
        add(&format!("{name}.weight"), vec![o, i]);
        add(&format!("{name}.bias"), vec![o]);
    }
    add("refine.cell.weight_ih", vec![3 * h, k]);
    add("refine.cell.weight_hh", vec![3 * h, h]);
    add("refine.cell.bias_ih", vec![3 * h]);
    add("refine.cell.bias_hh", vec![3 * h]);
    add("refine.beta", vec![1]);
    let mut cfg = ws.config.clone();
    cfg.refine = Some(serde_json::json!({"cell": "gru", "hidden": h, "key": k, "steps": 2}));
    WeightStore::from_tensors("fixture+refine.safetensors", cfg, t).unwrap()
}

#[test]
fn plan_bytes_count_every_buffer_once() {
    // Each stage records the buffers it allocates (label, bytes); plan_bytes is their sum. The
    // independent count is every storage and staging buffer this thread created while the plan
    // was built, whichever code created it: a buffer a stage forgot to record, or recorded twice,
    // makes the two differ.
    let dump = RefDump::open(&fixture("image_land_120x160.safetensors")).unwrap();
    let ws = with_refine_head(&dump.seeded_weights().unwrap().unwrap());
    let mut det = Detector::new(gpu(), ws).unwrap();
    assert!(det.refine_head().is_some());
    let (h, w) = (120, 160);
    let before = marrow::gpu::bytes_created_on_this_thread();
    let bytes = det.plan_bytes(h, w).unwrap();
    let created = marrow::gpu::bytes_created_on_this_thread() - before;
    let buffers = det.plan_buffers(h, w).unwrap();
    let mut labels: Vec<(&str, &str)> = buffers.iter().map(|(s, l, _)| (*s, l.as_str())).collect();
    labels.sort_unstable();
    let n = labels.len();
    labels.dedup();
    assert_eq!(labels.len(), n, "a buffer label appears twice: {buffers:?}");
    for stage in ["backbone", "rpn", "box head", "refine"] {
        assert!(
            buffers.iter().any(|(s, _, b)| *s == stage && *b > 0),
            "no buffers for {stage}"
        );
    }
    let listed: u64 = buffers.iter().map(|(_, _, b)| b).sum();
    eprintln!("plan {bytes} B in {n} entries; created while planning {created} B");
    assert_eq!(
        listed, bytes,
        "plan_bytes is the sum of the stages' buffers"
    );
    assert_eq!(
        created, bytes,
        "plan_bytes vs every buffer created: {buffers:#?}"
    );
    // A second call builds nothing.
    let before = marrow::gpu::bytes_created_on_this_thread();
    assert_eq!(det.plan_bytes(h, w).unwrap(), bytes);
    assert_eq!(marrow::gpu::bytes_created_on_this_thread(), before);
}
