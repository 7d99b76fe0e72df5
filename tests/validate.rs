//! `marrow validate`'s comparison code on a dump with a refinement head
//! (tests/fixtures/validate/refine_gru_48x64.safetensors, seeded detector + seeded GRU head, with
//! the float64 floor), the floor-aware verdict, and the explained-miss rule.

mod common;

use std::path::PathBuf;

use common::gpu;
use marrow::validate::matching::{self, Det, DetRules, Why};
use marrow::validate::{self, RefData, RefDump, Report};

const FIXTURE: &str = "tests/fixtures/validate/refine_gru_48x64.safetensors";

fn dump() -> RefDump {
    RefDump::open(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(FIXTURE)).unwrap()
}

fn f32_mut<'a>(d: &'a mut RefDump, name: &str) -> &'a mut Vec<f32> {
    match &mut d.tensors.get_mut(name).unwrap().data {
        RefData::F32(v) => v,
        _ => panic!("{name} is not f32"),
    }
}

fn heads(d: &RefDump, refine: bool) -> Report {
    let ws = d.seeded_weights().unwrap().unwrap();
    let r = validate::validate_heads_with(gpu(), ws, d, &validate::Options { refine }).unwrap();
    eprintln!("{}", r.table());
    r
}

#[test]
fn every_refine_row_passes() {
    let d = dump();
    let r = heads(&d, true);
    for (stage, mode) in [
        ("det.*", "from image"),
        ("det.count@0.7", "from image"),
        ("refine.*", "from image"),
        ("refine.count@0.7", "from image"),
        ("det.*", "TF proposals"),
        ("refine.*", "TF proposals"),
        ("refine.stop_step", "TF detections"),
        ("refine.step_boxes", "TF detections"),
        ("refine.stop_prob", "TF detections"),
        ("refine.attention", "TF detections"),
        ("refine.hidden", "TF detections"),
        ("refine.logits", "TF detections"),
        ("refine.*", "TF detections"),
        ("refine.count@0.7", "TF detections"),
    ] {
        let row = r
            .row(stage, mode)
            .unwrap_or_else(|| panic!("{stage} ({mode}) not compared"));
        assert!(row.pass, "{stage} ({mode}) failed: {}", row.note);
    }
    assert!(r.passed(), "a row failed");
    assert!(r.unchecked.is_empty(), "{:?}", r.unchecked);
    // The TF refine rows are exact matches of every detection, not explained misses.
    let m = r.row("refine.*", "TF detections").unwrap();
    assert!(
        m.note.starts_with("matched 38/38, explained 0"),
        "{}",
        m.note
    );
    let s = r.row("refine.stop_step", "TF detections").unwrap();
    assert!(s.note.starts_with("40 of 40 equal"), "{}", s.note);
}

#[test]
fn no_refine_compares_det_only() {
    let d = dump();
    let r = heads(&d, false);
    assert!(r.passed());
    assert!(r.row("det.*", "from image").unwrap().pass);
    assert!(r.rows.iter().all(|x| !x.stage.starts_with("refine.")));
    assert!(r
        .unchecked
        .iter()
        .any(|(s, why)| s == "refine.boxes" && why == "--no-refine"));
}

/// A stage over its tolerance but under FLOOR_MULT × its float64 floor passes ("ok (floor)");
/// one far above both still fails.
#[test]
fn floor_aware_verdict() {
    let mut d = dump();
    assert!(
        d.floor("fpn.3").is_some(),
        "the fixture carries the float64 floor"
    );
    // fpn.3: perturb every value by 2e-4 relative (over the 1e-4 tolerance) and claim a floor of
    // 1e-4 (limit 4e-4).
    for v in f32_mut(&mut d, "fpn.3").iter_mut() {
        *v *= 1.0 + 2e-4;
    }
    d.floor.insert("fpn.3".into(), 1e-4);
    // fpn.2: one value off by a lot (a real bug), with the same floor.
    let v = f32_mut(&mut d, "fpn.2");
    let big = v.iter().fold(0f32, |a, &b| a.max(b.abs()));
    v[7] += 3.0 * big;
    d.floor.insert("fpn.2".into(), 1e-4);
    let ws = d.seeded_weights().unwrap().unwrap();
    let r = validate::validate_backbone(gpu(), ws, &d).unwrap();
    eprintln!("{}", r.table());
    let p3 = r.row("fpn.3", "from image").unwrap();
    let v3 = p3.value().unwrap();
    assert!(v3 > validate::tol::BACKBONE_REL && v3 < 4e-4, "{v3}");
    assert!(p3.pass && p3.verdict() == "ok (floor)");
    assert_eq!(p3.limit(), validate::FLOOR_MULT * 1e-4);
    assert!(r.table().contains("4.00e-4"), "the table prints 4×floor");
    let p2 = r.row("fpn.2", "from image").unwrap();
    assert!(!p2.pass && p2.verdict() == "FAIL", "{:?}", p2.diff);
    // Untouched levels pass on the plain tolerance.
    assert_eq!(r.row("fpn.0", "from image").unwrap().verdict(), "ok");
}

/// A reference detection whose source proposal has no engine partner (and the engine's detection
/// from a proposal the reference lacks) is explained; the same miss without an upstream
/// difference fails.
#[test]
fn explained_miss_needs_an_upstream_difference() {
    let base = dump();
    let idx: Vec<i64> = base.tensors["refine.input.proposal_index"]
        .i64()
        .unwrap()
        .to_vec();
    let (i, k) = (0usize, idx[0] as usize);
    let shift = |d: &mut RefDump, name: &str, row: usize| {
        let v = f32_mut(d, name);
        for c in 0..4 {
            v[row * 4 + c] += 9.0;
        }
    };
    // Upstream: the reference's detection 0 and the proposal it came from both moved.
    let mut d = dump();
    shift(&mut d, "det.boxes", i);
    shift(&mut d, "rpn.proposals", k);
    let r = heads(&d, false);
    let row = r.row("det.*", "from image").unwrap();
    assert!(row.pass, "{}", row.note);
    assert!(row.note.contains("Upstream"), "{}", row.note);
    assert!(
        row.note.contains("explained by an upstream difference"),
        "{}",
        row.note
    );
    // The same detection moved, its proposal not: the engine is "wrong" -> FAIL.
    let mut d = dump();
    shift(&mut d, "det.boxes", i);
    let r = heads(&d, false);
    let row = r.row("det.*", "from image").unwrap();
    assert!(!row.pass, "{}", row.note);
    assert!(row.note.contains("unexplained 1"), "{}", row.note);
}

fn det(x: f32, s: f32, l: i64) -> Det {
    Det {
        bbox: [x, 0.0, x + 10.0, 10.0],
        score: s,
        label: l,
    }
}

const RULES: DetRules = DetRules {
    min_iou: 0.98,
    max_dscore: 1e-3,
    score_thresh: 0.05,
    nms_thresh: 0.5,
    max_det: 100,
};

/// The rule itself, on CPU: hints, knock-ons through NMS, and engine extras.
#[test]
fn explained_miss_rule_cpu() {
    // Reference: A (from a proposal the engine lacks) suppressed B by NMS; the engine, without
    // A, kept B. Both differences are explained.
    let a = det(0.0, 0.9, 1);
    let mut b = det(2.0, 0.8, 1); // IoU(A, B) = 8/12 > 0.5
    let c = det(50.0, 0.7, 2);
    let want = [a, c];
    let got = [c, b];
    let m = matching::detections_explained(&got, &want, &RULES, &[], &[Some(Why::Upstream), None]);
    assert_eq!(m.want_why, vec![Why::Upstream, Why::Matched]);
    assert_eq!(m.got_why, vec![Why::Matched, Why::KnockOn]);
    assert!(m.ok());
    assert_eq!((m.explainable, m.extra_explained, m.upstream), (1, 1, 2));
    // Without the hint both are unexplained.
    let m = matching::detections_explained(&got, &want, &RULES, &[], &[]);
    assert_eq!((m.unexplained, m.extra_unexplained), (1, 1));
    assert!(!m.ok());
    // A knock-on needs overlap: B far from A stays unexplained.
    b.bbox = [30.0, 0.0, 40.0, 10.0];
    let m =
        matching::detections_explained(&[c, b], &want, &RULES, &[], &[Some(Why::Upstream), None]);
    assert_eq!(m.got_why[1], Why::Unexplained);
    assert!(!m.ok());
    // The old entry point keeps its meaning.
    let m = matching::detections(&[c], &want, 0.98, 1e-3, 0.05, 0.5, 100);
    assert_eq!((m.matched, m.unexplained), (1, 1));
}
