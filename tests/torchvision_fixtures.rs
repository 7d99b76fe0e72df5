//! The backbone against committed torchvision fixtures (tests/fixtures/, made by
//! weights/make_fixtures.py). No weights are committed: each fixture's metadata carries the seedgen
//! spec, and the weights torchvision used are regenerated here bit-for-bit.
//!
//! - single layers teacher-forced (stem, bottlenecks with and without downsample, FPN with exact-2×
//!   and general nearest upsampling): ≤ 1e-5 of max |ref| (§14.3);
//! - whole transform + body + FPN from the image, three shapes (ordinary, a short side that
//!   truncates to min_size − 1, a P6 stride of 61): ≤ 1e-4 relative per level.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::gpu;
use marrow::cpu;
use marrow::gpu::{Nhwc, Tensor};
use marrow::model::backbone::BackboneBuilder;
use marrow::model::graph::Graph;
use marrow::model::weights::WeightStore;
use marrow::validate::{self, RefDump};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn layers() -> &'static (RefDump, WeightStore) {
    static L: OnceLock<(RefDump, WeightStore)> = OnceLock::new();
    L.get_or_init(|| {
        let d = RefDump::open(&fixture("layers.safetensors")).unwrap();
        let w = d
            .seeded_weights()
            .unwrap()
            .expect("layers fixture carries a seedgen spec");
        (d, w)
    })
}

fn nhwc_input(d: &RefDump, name: &str) -> (Nhwc, Vec<f32>) {
    let (s, v) = d.f32(name, 4).unwrap();
    (
        Nhwc::new(s[0], s[2], s[3], s[1]),
        cpu::nchw_to_nhwc(v, s[0], s[1], s[2], s[3]),
    )
}

/// Builds a sub-graph with `build`, feeds the named reference inputs, and checks each named
/// output against the reference within `tol` of max |ref|.
fn check_subgraph(
    inputs: &[&str],
    outputs: &[(&str, &str)],
    tol: f64,
    build: impl Fn(&BackboneBuilder, &mut Graph, Vec<usize>) -> Vec<usize>,
) {
    let g = gpu();
    let (dump, ws) = layers();
    let b = BackboneBuilder::new(g, ws).unwrap();
    let mut graph = Graph::default();
    let ins: Vec<usize> = inputs.iter().map(|n| graph.input(n)).collect();
    let outs = build(&b, &mut graph, ins);
    for ((name, _), v) in outputs.iter().zip(outs) {
        graph.output(name, v);
    }
    let tensors: Vec<Tensor> = inputs
        .iter()
        .map(|n| {
            let (s, v) = nhwc_input(dump, n);
            Tensor::from_host(g, n, s, &v).unwrap()
        })
        .collect();
    let plan = graph.plan(g, "fixture", &tensors).unwrap();
    g.run("fixture", plan.dispatches()).unwrap();
    for (name, refname) in outputs {
        let t = plan.output(name).unwrap();
        let got = cpu::nhwc_to_nchw(&t.read(g).unwrap(), t.shape);
        let (rs, want) = dump.f32(refname, 4).unwrap();
        assert_eq!(
            rs,
            [t.shape.n, t.shape.c, t.shape.h, t.shape.w],
            "{refname} shape"
        );
        let d = cpu::diff(&got, want);
        eprintln!(
            "{refname}: max_abs {:.3e} rel_max {:.3e} rel_l2 {:.3e}",
            d.max_abs, d.rel_max, d.rel_l2
        );
        assert_eq!(d.nonfinite, 0, "{refname}");
        assert!(d.rel_max <= tol, "{refname}: {d:?} exceeds {tol}");
    }
}

#[test]
fn seedgen_matches_the_fixture_spot_checks() {
    let (dump, ws) = layers();
    let checks: serde_json::Value =
        serde_json::from_str(&dump.metadata[marrow::seedgen::SEEDGEN_CHECK_KEY]).unwrap();
    let mut n = 0;
    for (name, c) in checks.as_object().unwrap() {
        let shape = ws.shape(name).unwrap().to_vec();
        let v = ws.get(name, &shape).unwrap();
        let first: Vec<f32> = c["first"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&v[..first.len()], first.as_slice(), "{name}: first values");
        let sum: f64 = v.iter().map(|x| *x as f64).sum();
        assert!(
            (sum - c["sum"].as_f64().unwrap()).abs() <= 1e-9 * sum.abs().max(1.0),
            "{name}: sum"
        );
        n += 1;
    }
    assert!(n >= 3);
}

#[test]
fn stem_teacher_forced() {
    check_subgraph(
        &["stem.in"],
        &[("conv", "stem.conv_bn_relu"), ("pool", "stem.out")],
        1e-5,
        |b, g, i| {
            let (c, p) = b.stem(g, i[0]).unwrap();
            vec![c, p]
        },
    );
}

#[test]
fn bottleneck_without_downsample_teacher_forced() {
    check_subgraph(
        &["layer1.1.in"],
        &[("out", "layer1.1.out")],
        1e-5,
        |b, g, i| vec![b.block(g, 1, 1, i[0]).unwrap()],
    );
}

#[test]
fn bottleneck_stride2_downsample_teacher_forced() {
    check_subgraph(
        &["layer2.0.in"],
        &[("out", "layer2.0.out")],
        1e-5,
        |b, g, i| vec![b.block(g, 2, 0, i[0]).unwrap()],
    );
}

#[test]
fn bottleneck_layer4_teacher_forced() {
    check_subgraph(
        &["layer4.0.in"],
        &[("out", "layer4.0.out")],
        1e-5,
        |b, g, i| vec![b.block(g, 4, 0, i[0]).unwrap()],
    );
}

fn fpn_case(prefix: &str) {
    let ins: Vec<String> = (0..4).map(|i| format!("{prefix}.in.{i}")).collect();
    let ins: Vec<&str> = ins.iter().map(|s| s.as_str()).collect();
    let outs: Vec<(String, String)> = ["0", "1", "2", "3", "pool"]
        .iter()
        .map(|l| (format!("p{l}"), format!("{prefix}.out.{l}")))
        .collect();
    let outs: Vec<(&str, &str)> = outs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    check_subgraph(&ins, &outs, 1e-5, |b, g, i| {
        b.fpn(g, [i[0], i[1], i[2], i[3]]).unwrap().to_vec()
    });
}

#[test]
fn fpn_teacher_forced_exact_2x() {
    fpn_case("fpn");
}

#[test]
fn fpn_teacher_forced_general_nearest() {
    fpn_case("fpn_odd");
}

fn image_case(file: &str) -> (RefDump, validate::Report) {
    let dump = RefDump::open(&fixture(file)).unwrap();
    let ws = dump.seeded_weights().unwrap().unwrap();
    let report = validate::validate_backbone(gpu(), ws, &dump).unwrap();
    eprintln!("{file}\n{}", report.table());
    assert!(report.passed(), "{file}:\n{}", report.table());
    // Every level was compared from the image (none silently skipped).
    for name in marrow::model::backbone::FPN_NAMES {
        let row = report
            .row(name, "from image")
            .unwrap_or_else(|| panic!("{file}: {name} not compared"));
        assert!(row.diff.unwrap().rel_l2 <= validate::tol::BACKBONE_REL);
    }
    assert!(report.row("transform.size", "exact").unwrap().pass);
    assert!(report.row("transform.image", "from image").unwrap().pass);
    (dump, report)
}

#[test]
fn image_landscape_from_image() {
    image_case("image_land_120x160.safetensors");
}

#[test]
fn image_short_side_truncates_to_min_size_minus_one() {
    let (dump, _) = image_case("image_portrait_trunc159_100x77.safetensors");
    let size = dump.tensors["transform.size"].i64().unwrap().to_vec();
    let ws = dump.seeded_weights().unwrap().unwrap();
    let min = ws.config.transform.min_size as i64;
    assert_eq!(
        size.iter().min().copied(),
        Some(min - 1),
        "this fixture must exercise the f64 truncation"
    );
}

#[test]
fn image_pool_level_stride_61() {
    let (dump, _) = image_case("image_pool61_50x210.safetensors");
    let (ts, _) = dump.f32("transform.image", 4).unwrap();
    let (ps, _) = dump.f32("fpn.pool", 4).unwrap();
    // torchvision's anchor stride for the pool level is padded_size // feature_size.
    assert_eq!(
        ts[3] / ps[3],
        61,
        "padded width {} over P6 width {}",
        ts[3],
        ps[3]
    );
}

#[test]
fn resize_rule_truncation_examples_from_the_spec() {
    use marrow::ops::transform::resized_size;
    // docs/torchvision-semantics.md §2.3: the f64 product truncates just below the integer.
    assert_eq!(resized_size(97, 97, 800, 1333).unwrap(), (799, 799));
    assert_eq!(resized_size(600, 1000, 800, 1333).unwrap(), (799, 1333));
    assert_eq!(resized_size(21, 35, 800, 1333).unwrap(), (799, 1333));
    assert_eq!(resized_size(161, 161, 800, 1333).unwrap(), (799, 799));
    assert_eq!(resized_size(480, 640, 800, 1333).unwrap(), (800, 1066));
    assert_eq!(resized_size(800, 800, 800, 1333).unwrap(), (800, 800));
}

#[test]
fn rpn_head_teacher_forced_from_reference_fpn() {
    use marrow::model::heads::RpnHead;
    let g = gpu();
    for file in [
        "image_land_120x160.safetensors",
        "image_pool61_50x210.safetensors",
    ] {
        let dump = RefDump::open(&fixture(file)).unwrap();
        let ws = dump.seeded_weights().unwrap().unwrap();
        let head = RpnHead::load(g, &ws, 64).unwrap();
        let mut graph = Graph::default();
        let names = marrow::model::backbone::FPN_NAMES;
        let ins: Vec<usize> = names.iter().map(|n| graph.input(n)).collect();
        let outs = head.add(&mut graph, &ins);
        for (l, (o, _)) in outs.iter().enumerate() {
            graph.output(&format!("obj{l}"), *o);
        }
        let tensors: Vec<Tensor> = names
            .iter()
            .map(|n| {
                let (s, v) = nhwc_input(&dump, n);
                Tensor::from_host(g, n, s, &v).unwrap()
            })
            .collect();
        let plan = graph.plan(g, "rpn head", &tensors).unwrap();
        g.run("rpn head", plan.dispatches()).unwrap();
        // NHWC [1, H, W, A] flattens to torchvision's (h, w, a) order; levels concatenate.
        let mut got = Vec::new();
        for l in 0..5 {
            got.extend(plan.output(&format!("obj{l}")).unwrap().read(g).unwrap());
        }
        let want = dump.tensors["rpn.logits"].f32().unwrap();
        assert_eq!(got.len(), want.len(), "{file}: anchor count");
        let d = cpu::diff(&got, want);
        eprintln!("{file}: rpn.logits rel_max {:.3e}", d.rel_max);
        assert!(d.rel_max <= 1e-5, "{file}: {d:?}");
    }
}
