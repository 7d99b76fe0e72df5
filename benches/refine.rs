//! The refinement head's cost per image (docs/design.md §6) against the rest of the detector:
//! the built-in compact model (ResNet-18, FPN 128, representation 256, 4 classes) with a seeded
//! random head of each cell type attached (H = 64, K = 32, T = 3: the training script's default
//! head), on a 480×640 field (resized to 384×512).
//!
//! 1. The GEMM and copy ceilings of this adapter (benches/common::ceilings), same process.
//! 2. One `detect()` (warm-up: pipelines, the plan), then the detector's own dispatches with GPU
//!    timestamps (`Detector::timed_stages`), MARROW_BENCH_REPS (default 3) runs, medians.
//! 3. The head teacher-forced with 100 detections (`Detector::refine_teacher_forced`), then its
//!    dispatches (the gather excluded: the 100 inputs stay in place) timed the same way, per
//!    kernel, with GFLOP/s of the linear layers and their share of the GEMM ceiling.
//!
//!     cargo bench --bench refine
//!
//! Results: tables on stdout (pasteable into docs/perf.md) and target/marrow-bench/refine.json.

mod common;

use std::collections::BTreeMap;

use common::*;
use marrow::count::Model;
use marrow::gpu::{Dispatch, Gpu, GpuOptions, Nhwc};
use marrow::model::detector::Detector;
use marrow::model::refine::RefineInput;
use marrow::model::weights::{HostTensor, WeightStore};
use marrow::model::ImageF32;
use serde_json::{json, Value};

const IMAGE: (usize, usize) = (480, 640);
const DETECTIONS: usize = 100;
const HIDDEN: usize = 64;
const KEY: usize = 32;
const STEPS: usize = 3;

fn main() {
    if let Err(e) = run() {
        eprintln!("refine benchmark failed: {e}");
        std::process::exit(1);
    }
}

/// The built-in model's tensors plus a random head (`refine.*` with PyTorch-like scales).
fn with_head(base: &WeightStore, cell: &str) -> BenchResult<WeightStore> {
    let c = 128;
    let r = 256;
    let n = 4;
    let g = if cell == "gru" { 3 } else { 4 } * HIDDEN;
    let mut t: Vec<(String, HostTensor)> = base
        .names()
        .map(|name| {
            let shape = base.shape(name).expect("listed").to_vec();
            let data = base.get(name, &shape).expect("listed").to_vec();
            (name.to_string(), HostTensor { shape, data })
        })
        .collect();
    let mut add = |name: &str, shape: Vec<usize>, fan_in: usize| {
        let s = 1.0 / (fan_in as f32).sqrt();
        let len = shape.iter().product();
        let data = random_values(name, len, -s, s);
        t.push((name.to_string(), HostTensor { shape, data }));
    };
    for (name, o, i) in [
        ("refine.init", HIDDEN, r),
        ("refine.key", KEY, c),
        ("refine.value", KEY, c),
        ("refine.query", KEY, HIDDEN),
        ("refine.delta", 4, HIDDEN),
        ("refine.stop", 1, HIDDEN),
        ("refine.critic", 1, HIDDEN),
        ("refine.cls", n, HIDDEN),
    ] {
        add(&format!("{name}.weight"), vec![o, i], i);
        add(&format!("{name}.bias"), vec![o], i);
    }
    add("refine.cell.weight_ih", vec![g, KEY], HIDDEN);
    add("refine.cell.weight_hh", vec![g, HIDDEN], HIDDEN);
    add("refine.cell.bias_ih", vec![g], HIDDEN);
    add("refine.cell.bias_hh", vec![g], HIDDEN);
    t.push((
        "refine.beta".into(),
        HostTensor {
            shape: vec![1],
            data: vec![1.0],
        },
    ));
    let mut config = base.config.clone();
    config.refine = Some(
        json!({"cell": cell, "hidden": HIDDEN, "key": KEY, "steps": STEPS,
                                "stop_threshold": 0.5, "nms_thresh": 0.5}),
    );
    // A stop bias of -40 keeps every detection active for all T steps: the worst case.
    if let Some((_, st)) = t.iter_mut().find(|(n, _)| n == "refine.stop.bias") {
        st.data[0] = -40.0;
    }
    Ok(WeightStore::from_tensors(
        &format!("builtin + random {cell} head"),
        config,
        t,
    )?)
}

fn median_times(gpu: &Gpu, ds: &[&Dispatch], reps: usize) -> BenchResult<Vec<f64>> {
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); ds.len()];
    for _ in 0..reps.max(1) {
        for (i, s) in gpu.time_dispatches(ds)?.into_iter().enumerate() {
            per[i].push(s);
        }
    }
    Ok(per.iter().map(|v| Stats::of(v).median).collect())
}

/// Kernel family of a refine dispatch label ("refine.cell.ih (step 2)" → "cell.ih").
fn family(label: &str) -> String {
    let l = label.strip_prefix("refine.").unwrap_or(label);
    let l = l.split(" (step").next().unwrap_or(l);
    // NMS labels carry sub-kernel names ("nms sort", …): one family.
    if l.starts_with("nms") {
        return "nms".into();
    }
    l.to_string()
}

fn run() -> BenchResult<()> {
    let gpu = Gpu::new(&GpuOptions::default())?;
    print_adapter(&gpu);
    let reps = env_usize("MARROW_BENCH_REPS", 3);
    let ceil = ceilings(&gpu, 1, 3)?;
    let base = Model::builtin()
        .ok_or("built without the builtin-model feature")??
        .weights;
    let img = ImageF32 {
        h: IMAGE.0,
        w: IMAGE.1,
        data: random_values("refine bench image", 3 * IMAGE.0 * IMAGE.1, 0.0, 1.0),
    };
    let mut out = json!({"machine": machine(&gpu), "ceilings": ceil.json, "image": IMAGE,
                         "detections": DETECTIONS, "hidden": HIDDEN, "key": KEY, "steps": STEPS});
    for cell in ["gru", "lstm"] {
        let ws = with_head(&base, cell)?;
        let mut det = Detector::new(&gpu, ws)?;
        det.set_refine(false);
        det.detect(&img)?;
        let list = det.timed_stages(IMAGE.0, IMAGE.1)?;
        let ds: Vec<&Dispatch> = list.iter().map(|(_, d, _)| *d).collect();
        let t = median_times(&gpu, &ds, reps)?;
        let mut detector: BTreeMap<&str, f64> = BTreeMap::new();
        for ((stage, _, _), s) in list.iter().zip(&t) {
            *detector.entry(stage).or_default() += s;
        }
        let detector_s: f64 = t.iter().sum();

        // The head on 100 detections, teacher-forced on the plan's own sizes.
        det.set_refine(true);
        let sizes = marrow::ops::transform::TransformSizes::new(
            IMAGE.0,
            IMAGE.1,
            &det.weights.config.transform,
        )?;
        let (ph, pw) = sizes.padded;
        let f = det.arch.fpn_channels;
        let fpn: Vec<(Nhwc, Vec<f32>)> = [4usize, 8, 16, 32, 64]
            .iter()
            .map(|s| {
                let sh = Nhwc::new(1, ph.div_ceil(*s), pw.div_ceil(*s), f);
                (sh, random_values("fpn", sh.len(), -1.0, 1.0))
            })
            .collect();
        let (rh, rw) = (sizes.resized.0 as f32, sizes.resized.1 as f32);
        let boxes: Vec<f32> = random_values("boxes", DETECTIONS * 4, 0.0, 1.0);
        let inputs: Vec<RefineInput> = boxes
            .chunks_exact(4)
            .map(|b| {
                let (w, h) = (8.0 + b[2] * 120.0, 8.0 + b[3] * 120.0);
                let (x, y) = (b[0] * (rw - w), b[1] * (rh - h));
                RefineInput {
                    bbox: [x, y, x + w, y + h],
                    score: 0.9,
                    label: 1,
                }
            })
            .collect();
        let r = det.box_mlp().representation;
        let feats = random_values("features", DETECTIONS * r, 0.0, 2.0);
        let (_, dbg) = det.refine_teacher_forced((IMAGE.0, IMAGE.1), &fpn, &inputs, &feats)?;
        assert_eq!(dbg.detections, DETECTIONS);
        let list = det.timed_stages(IMAGE.0, IMAGE.1)?;
        let head: Vec<(&Dispatch, f64)> = list
            .iter()
            .filter(|(st, _, _)| *st == "refine")
            .skip(1)
            .map(|(_, d, f)| (*d, *f))
            .collect();
        let ds: Vec<&Dispatch> = head.iter().map(|(d, _)| *d).collect();
        let t = median_times(&gpu, &ds, reps)?;
        let mut fam: BTreeMap<String, (f64, f64, usize)> = BTreeMap::new();
        for ((d, fl), s) in head.iter().zip(&t) {
            let e = fam.entry(family(&d.label)).or_default();
            e.0 += s;
            e.1 += fl;
            e.2 += 1;
        }
        let head_s: f64 = t.iter().sum();
        println!(
            "\n{cell} head, {DETECTIONS} detections, T = {STEPS}, H = {HIDDEN}, K = {KEY}: {:.2} ms \
             ({:.1} % of the detector's {:.2} ms on this field)",
            head_s * 1e3,
            100.0 * head_s / detector_s,
            detector_s * 1e3
        );
        let mut rows: Vec<Vec<String>> = fam
            .iter()
            .map(|(k, (s, fl, n))| {
                let gf = if *fl > 0.0 { fl / s / 1e9 } else { f64::NAN };
                vec![
                    k.clone(),
                    n.to_string(),
                    format!("{:.3}", s * 1e3),
                    format!("{:.1}", 100.0 * s / head_s),
                    if gf.is_nan() {
                        "—".into()
                    } else {
                        format!("{gf:.2}")
                    },
                    if gf.is_nan() {
                        "—".into()
                    } else {
                        format!("{:.1} %", 100.0 * gf / ceil.gemm_gflops)
                    },
                ]
            })
            .collect();
        rows.sort_by(|a, b| {
            b[2].parse::<f64>()
                .unwrap_or(0.0)
                .total_cmp(&a[2].parse().unwrap_or(0.0))
        });
        print_table(
            &[
                "kernel",
                "dispatches",
                "ms",
                "% of head",
                "GFLOP/s",
                "of GEMM ceiling",
            ],
            &rows,
        );
        println!("\ndetector stages on the same field (ms):");
        let drows: Vec<Vec<String>> = detector
            .iter()
            .map(|(k, s)| vec![k.to_string(), format!("{:.2}", s * 1e3)])
            .collect();
        print_table(&["stage", "ms"], &drows);
        out[cell] = json!({
            "head_s": head_s, "detector_s": detector_s,
            "kernels": fam.iter().map(|(k, (s, fl, n))| (k.clone(), json!({"s": s, "flops": fl, "dispatches": n}))).collect::<BTreeMap<_, Value>>(),
            "detector_stages_s": detector,
        });
    }
    let p = write_json("refine", &out)?;
    eprintln!("wrote {}", p.display());
    Ok(())
}
