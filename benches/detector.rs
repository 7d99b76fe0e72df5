//! The whole Faster R-CNN — transform, ResNet-50-FPN-256, RPN, RoIAlign, box head (1024),
//! post-processing — on a 480×640 image (resized to 800×1066, padded to 800×1088), random seeded
//! weights (benches/common::seeded_faster_rcnn), for 91 classes (COCO's head) and 4 classes
//! (blood cells: background, WBC, RBC, platelet). The class count changes the box predictor, the
//! per-class decode and the class-aware NMS; everything before the box head is identical.
//!
//! 0. The GEMM and copy ceilings of this adapter (benches/common::ceilings), same process.
//! 1. 91 classes: `detect_debug` once (the warm-up; also the live counts and the FPN levels),
//!    then MARROW_BENCH_STAGE_REPS (default 1) runs with every dispatch in its own pass with GPU
//!    timestamps (`Detector::timed_stages`), all in one submission: the per-stage breakdown.
//! 2. MARROW_BENCH_REPS (default 2) runs of `detect()` (one submission + one read-back), wall
//!    clock, two images rotated: the headline latency.
//! 3. 4 classes: a second detector, warmed up teacher-forced on the 91-class run's FPN levels
//!    (the backbone weights are the same seeded tensors), then its RPN + box-head dispatches
//!    timed the same way; MARROW_BENCH_SMALL_REPS (default 0) whole `detect()` runs. The 4-class
//!    whole-model figure is otherwise the 91-class front segment plus the 4-class heads.
//! 4. Memory: allocated-buffer accounting (weights uploaded + `Detector::plan_bytes`), and
//!    wgpu's allocator report where the backend gives one.
//! 5. torchvision's whole `fasterrcnn_resnet50_fpn` eval forward on the CPU, 2 threads, for both
//!    class counts (weights/bench_torchvision.py --full; 1 warm-up + MARROW_BENCH_TORCH_REPS,
//!    default 3; MARROW_BENCH_TORCH=0 skips it).
//!
//! On lavapipe (2 shared cores) one whole-model run takes ~45–90 s; the defaults keep the bench
//! under ~10 min.
//!
//!     cargo bench --bench detector
//!
//! Results: a summary on stdout and target/marrow-bench/detector.json.

mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use common::*;
use marrow::gpu::{Dispatch, Gpu, GpuOptions};
use marrow::model::detector::{Detector, STAGES};
use marrow::model::ImageF32;
use marrow::ops::transform::TransformSizes;
use serde_json::{json, Value};

const IMAGE: (usize, usize) = (480, 640);
const FRONT: [&str; 3] = ["transform", "body", "fpn"];

fn main() {
    if let Err(e) = run() {
        eprintln!("detector benchmark failed: {e}");
        std::process::exit(1);
    }
}

/// Live sizes that set the work of the data-dependent stages.
#[derive(Debug, Clone, Copy)]
struct Counts {
    /// Proposals after the RPN (RoIAlign and box-head rows).
    proposals: usize,
    /// RPN candidates before NMS.
    rpn_candidates: usize,
    /// Box-head candidates (proposal × class above the score threshold) before NMS.
    box_candidates: usize,
    detections: usize,
}

/// Per stage: (GFLOP, an element count with its unit, fewest bytes), from the plan and the counts.
/// The non-GEMM stages' bytes are lower bounds (each input read once, each output written once).
fn stage_work(
    stage: &str,
    flops: f64,
    sizes: &TransformSizes,
    c: &Counts,
    classes: usize,
) -> (f64, String, f64) {
    let (h, w) = IMAGE;
    let (ph, pw) = sizes.padded;
    // FPN levels P2..P6: conv strides 4..32, then the stride-2 1×1 max pool.
    let mut lv = vec![(ph / 4, pw / 4)];
    for _ in 0..3 {
        let (a, b) = *lv.last().unwrap();
        lv.push((a.div_ceil(2), b.div_ceil(2)));
    }
    let (a, b) = lv[3];
    lv.push(((a - 1) / 2 + 1, (b - 1) / 2 + 1));
    let anchors: usize = lv.iter().map(|(a, b)| 3 * a * b).sum();
    let f = 4.0;
    match stage {
        "transform" => (
            0.0,
            format!("{} px", ph * pw),
            f * (3 * h * w + 3 * ph * pw) as f64,
        ),
        "rpn proposals" => (
            0.0,
            format!("{anchors} anchors"),
            // objectness + 4 deltas per anchor read, boxes/scores/levels of the candidates written.
            f * (5 * anchors + 6 * c.rpn_candidates) as f64,
        ),
        "rpn nms" => {
            let n = c.rpn_candidates;
            (
                0.0,
                format!("{n} boxes, {:.1}M pairs", (n * n) as f64 / 1e6),
                // the IoU bitmask written (n × n bits) plus the boxes.
                (n * n.div_ceil(32) * 4 + 16 * n) as f64,
            )
        }
        "roi align" => {
            let out = c.proposals * 49 * 256;
            (
                0.0,
                format!("{:.1}M outputs", out as f64 / 1e6),
                f * out as f64,
            )
        }
        "box postprocess" => {
            let n = c.proposals * classes;
            (
                0.0,
                format!("{n} scores"),
                // logits + deltas read; per-class scores + boxes written.
                f * (10 * n) as f64,
            )
        }
        "box nms" => {
            let n = c.box_candidates;
            (
                0.0,
                format!("{n} boxes"),
                (n * n.div_ceil(32) * 4 + 16 * n) as f64,
            )
        }
        "finalize" => (
            0.0,
            format!("{} dets", c.detections),
            f * 8.0 * c.detections as f64,
        ),
        _ => (flops / 1e9, String::new(), 0.0),
    }
}

struct StageTimes {
    /// (stage, label, median seconds, flops) per dispatch.
    ops: Vec<(&'static str, String, f64, f64)>,
    wall_s: Vec<f64>,
    cores: Vec<f64>,
}

impl StageTimes {
    fn stage_s(&self) -> BTreeMap<&'static str, f64> {
        let mut m = BTreeMap::new();
        for (st, _, s, _) in &self.ops {
            *m.entry(*st).or_default() += s;
        }
        m
    }
    fn stage_flops(&self) -> BTreeMap<&'static str, f64> {
        let mut m = BTreeMap::new();
        for (st, _, _, f) in &self.ops {
            *m.entry(*st).or_default() += f;
        }
        m
    }
    fn mean_cores(&self) -> f64 {
        self.cores.iter().sum::<f64>() / self.cores.len().max(1) as f64
    }
}

/// `reps` runs of the given dispatches, each in its own timestamped pass, one submission per run.
fn time_stages(
    gpu: &Gpu,
    list: &[(&'static str, &Dispatch, f64)],
    reps: usize,
    what: &str,
) -> BenchResult<StageTimes> {
    let ds: Vec<&Dispatch> = list.iter().map(|(_, d, _)| *d).collect();
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); ds.len()];
    let (mut wall_s, mut cores) = (Vec::new(), Vec::new());
    for r in 0..reps.max(1) {
        let m = measure(|| Ok(gpu.time_dispatches(&ds)?))?;
        eprintln!(
            "  {what} timestamped run {r}: {:.2} s wall, {:.2} cores",
            m.wall_s,
            m.cpu_s / m.wall_s
        );
        wall_s.push(m.wall_s);
        cores.push(m.cpu_s / m.wall_s);
        for (i, s) in m.value.into_iter().enumerate() {
            per[i].push(s);
        }
    }
    Ok(StageTimes {
        ops: list
            .iter()
            .zip(&per)
            .map(|((st, d, f), v)| (*st, d.label.clone(), Stats::of(v).median, *f))
            .collect(),
        wall_s,
        cores,
    })
}

fn mib(b: f64) -> f64 {
    b / (1u64 << 20) as f64
}

fn alloc_json(gpu: &Gpu) -> Value {
    match allocator_bytes(gpu) {
        Some((a, r)) => json!({"allocated_bytes": a, "reserved_bytes": r}),
        None => Value::Null,
    }
}

fn run() -> BenchResult<()> {
    let reps = env_usize("MARROW_BENCH_REPS", 2).max(1);
    let stage_reps = env_usize("MARROW_BENCH_STAGE_REPS", 1).max(1);
    let small_reps = env_usize("MARROW_BENCH_SMALL_REPS", 0);
    let gpu = Gpu::new(&GpuOptions::default())?;
    let machine = machine(&gpu);
    let t_start = Instant::now();
    print_adapter(&gpu);
    let mut loads = vec![("start".to_string(), loadavg())];
    let ceil = ceilings(&gpu, 1, 2)?;
    loads.push(("after ceilings".into(), loadavg()));
    let alloc0 = alloc_json(&gpu);

    let (h, w) = IMAGE;
    let images: Vec<ImageF32> = (0..2)
        .map(|i| ImageF32 {
            h,
            w,
            data: random_values(&format!("image{i}"), 3 * h * w, 0.0, 1.0),
        })
        .collect();

    // ---- 91 classes: the whole model.
    let t0 = Instant::now();
    let ws = seeded_faster_rcnn(91)?;
    let weight_bytes_91 = uploaded_weight_bytes(&ws);
    let gen_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut det = Detector::new(&gpu, ws)?;
    let alloc_w91 = alloc_json(&gpu);
    let plan_bytes_91 = det.plan_bytes(h, w)?;
    let n_dispatches = det.timed_stages(h, w)?.len();
    let alloc_p91 = alloc_json(&gpu);
    let setup_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "91 classes: weights generated in {gen_s:.1} s, upload + plan {setup_s:.1} s; {n_dispatches} dispatches; \
         weights {:.1} MiB, plan {:.1} MiB",
        mib(weight_bytes_91 as f64),
        mib(plan_bytes_91 as f64)
    );
    // Warm-up (pipelines, first touch of every buffer) that also gives the live counts.
    let m = measure(|| Ok(det.detect_debug(&images[0])?))?;
    let (out0, st) = m.value;
    eprintln!(
        "  detect_debug (warm-up): {:.2} s, {:.2} cores",
        m.wall_s,
        m.cpu_s / m.wall_s
    );
    let warm_s = m.wall_s;
    let finite = st
        .tensors
        .iter()
        .all(|(_, _, v)| v.iter().all(|x| x.is_finite()));
    let counts_91 = Counts {
        proposals: st.proposals.len(),
        rpn_candidates: st.rpn_candidates,
        box_candidates: st.box_candidates,
        detections: out0.detections.len(),
    };
    eprintln!("  counts: {counts_91:?}; FPN finite: {finite}");
    let sizes = out0.sizes;
    let fpn: Vec<_> = st
        .tensors
        .iter()
        .filter(|(n, _, _)| n != "transform.image")
        .map(|(_, s, v)| (*s, v.clone()))
        .collect();
    drop(st);
    // 1. Per-stage timestamps (image 0 is in the input buffer from the warm-up).
    loads.push(("before 91-class timestamped".into(), loadavg()));
    let ts91 = {
        let list = det.timed_stages(h, w)?;
        time_stages(&gpu, &list, stage_reps, "91 classes")?
    };
    // 2. Whole model, detect(): one submission + one read-back.
    loads.push(("before detect() runs".into(), loadavg()));
    let m = measure(|| {
        let mut v = Vec::new();
        for i in 0..reps {
            let t = Instant::now();
            let d = det.detect(&images[(i + 1) % 2])?;
            let s = t.elapsed().as_secs_f64();
            eprintln!(
                "  detect() run {i}: {s:.2} s, {} detections",
                d.detections.len()
            );
            v.push(s);
        }
        Ok(v)
    })?;
    let whole = Stats::of(&m.value);
    let whole_cores = m.cpu_s / m.wall_s;
    loads.push(("after detect() runs".into(), loadavg()));
    let alloc_r91 = alloc_json(&gpu);
    let front_s: f64 = ts91
        .ops
        .iter()
        .filter(|o| FRONT.contains(&o.0))
        .map(|o| o.2)
        .sum();
    drop(det);

    // ---- 4 classes: heads only (teacher-forced on the same FPN levels), optionally whole.
    let ws = seeded_faster_rcnn(4)?;
    let weight_bytes_4 = uploaded_weight_bytes(&ws);
    let mut det4 = Detector::new(&gpu, ws)?;
    let plan_bytes_4 = det4.plan_bytes(h, w)?;
    let alloc_p4 = alloc_json(&gpu);
    let m = measure(|| Ok(det4.detect_teacher_forced((h, w), &fpn, None)?))?;
    let (out4, st4) = m.value;
    eprintln!(
        "4 classes: teacher-forced warm-up of the heads {:.2} s, {:.2} cores",
        m.wall_s,
        m.cpu_s / m.wall_s
    );
    let counts_4 = Counts {
        proposals: st4.proposals.len(),
        rpn_candidates: st4.rpn_candidates,
        box_candidates: st4.box_candidates,
        detections: out4.detections.len(),
    };
    eprintln!("  counts: {counts_4:?}");
    loads.push(("before 4-class timestamped".into(), loadavg()));
    let ts4 = {
        let list: Vec<_> = det4
            .timed_stages(h, w)?
            .into_iter()
            .filter(|(s, _, _)| !FRONT.contains(s))
            .collect();
        time_stages(&gpu, &list, stage_reps, "4 classes (heads)")?
    };
    let mut small_whole = Vec::new();
    let mut small_cores = Vec::new();
    for i in 0..small_reps {
        let m = measure(|| Ok(det4.detect(&images[i % 2])?))?;
        let c = m.cpu_s / m.wall_s;
        eprintln!(
            "  4-class detect() run {i}: {:.2} s, {c:.2} cores",
            m.wall_s
        );
        small_whole.push(m.wall_s);
        small_cores.push(c);
    }
    drop(det4);
    loads.push(("before torchvision".into(), loadavg()));

    // ---- torchvision.
    let tv_reps = env_usize("MARROW_BENCH_TORCH_REPS", 3);
    let tv91 = torchvision(91, tv_reps, 1);
    let tv4 = torchvision(4, tv_reps, 1);
    loads.push(("end".into(), loadavg()));
    let uptime_end = std::process::Command::new("uptime")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    // ---- Report.
    let sw = gpu.report.software;
    let gemm_pc = ceil.gemm_per_core();
    println!();
    println!(
        "Faster R-CNN ResNet-50-FPN on a {h}x{w} image -> {}x{} resized -> {}x{} padded, {} ({}); {} s total bench time so far",
        sizes.resized.0,
        sizes.resized.1,
        sizes.padded.0,
        sizes.padded.1,
        gpu.report.name,
        gpu.report.driver_info,
        t_start.elapsed().as_secs()
    );
    println!(
        "ceilings: GEMM {:.2} GFLOP/s on {:.2} cores = {gemm_pc:.2} GFLOP/s/core; copy {:.1} GB/s",
        ceil.gemm_gflops, ceil.gemm_cores, ceil.copy_gbs
    );
    let table = |ts: &StageTimes, counts: &Counts, classes: usize, stages: &[&str]| {
        let ss = ts.stage_s();
        let sf = ts.stage_flops();
        let cores = ts.mean_cores();
        let total: f64 = ss.values().sum();
        let mut rows = Vec::new();
        for st in stages {
            let s = ss.get(st).copied().unwrap_or(0.0);
            let f = sf.get(st).copied().unwrap_or(0.0);
            let (gf, elems, bytes) = stage_work(st, f, &sizes, counts, classes);
            let n = ts.ops.iter().filter(|o| o.0 == *st).count();
            let (rate, frac) = if gf > 0.0 {
                let g = gf / s;
                let frac = if sw {
                    g / cores / gemm_pc
                } else {
                    g / ceil.gemm_gflops
                };
                (format!("{g:.2} GFLOP/s"), format!("{:.0}%", 100.0 * frac))
            } else if bytes > 0.0 && s > 0.0 {
                let g = bytes / s / 1e9;
                (
                    format!("{g:.2} GB/s"),
                    format!("{:.1}%", 100.0 * g / ceil.copy_gbs),
                )
            } else {
                ("-".into(), "-".into())
            };
            rows.push(vec![
                st.to_string(),
                n.to_string(),
                if gf > 0.0 {
                    format!("{gf:.2}")
                } else {
                    "-".into()
                },
                if elems.is_empty() { "-".into() } else { elems },
                if bytes > 0.0 {
                    format!("{:.1}", mib(bytes))
                } else {
                    "-".into()
                },
                format!("{:.1}", s * 1e3),
                format!("{:.1}%", 100.0 * s / total),
                rate,
                frac,
            ]);
        }
        let tf: f64 = sf.values().sum();
        rows.push(vec![
            "sum of dispatches".into(),
            ts.ops.len().to_string(),
            format!("{:.1}", tf / 1e9),
            "-".into(),
            "-".into(),
            format!("{:.1}", total * 1e3),
            "100%".into(),
            format!("{:.2} GFLOP/s", tf / total / 1e9),
            if sw {
                format!("{:.0}%", 100.0 * tf / total / 1e9 / cores / gemm_pc)
            } else {
                format!("{:.0}%", 100.0 * tf / total / 1e9 / ceil.gemm_gflops)
            },
        ]);
        print_table(
            &[
                "stage",
                "dispatches",
                "GFLOP",
                "elements",
                "min MiB",
                "ms",
                "share",
                "rate",
                "%ceiling",
            ],
            &rows,
        );
        println!(
            "(timestamped runs: {} s wall on {} cores; %ceiling: GEMM stages {} the GEMM ceiling (the run's mean cores: a stage that got more than the mean shows > 100%), others GB/s of the fewest bytes / copy ceiling)",
            ts.wall_s
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            ts.cores
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            if sw {
                "per core used vs per core of"
            } else {
                "vs"
            }
        );
    };
    println!("\n91 classes, per stage (GPU timestamps, each dispatch its own pass, median of {stage_reps}); counts {counts_91:?}:");
    table(&ts91, &counts_91, 91, &STAGES);
    println!("\n4 classes, heads only (same method; front segment identical to the 91-class run); counts {counts_4:?}:");
    table(&ts4, &counts_4, 4, &STAGES[3..]);

    let total_flops_91: f64 = ts91.ops.iter().map(|o| o.3).sum();
    let heads4_s: f64 = ts4.ops.iter().map(|o| o.2).sum();
    let heads91_s: f64 = ts91.ops.iter().map(|o| o.2).sum::<f64>() - front_s;
    println!(
        "\nwhole model, 91 classes, detect() (one submission + one read-back), wall clock: median {:.2} s (min {:.2}, max {:.2}) over {reps} \
         after 1 warm-up + {stage_reps} timestamped; {:.2} GFLOP/s; process used {whole_cores:.2} of {} cores = {:.2} GFLOP/s/core",
        whole.median,
        whole.min,
        whole.max,
        total_flops_91 / whole.median / 1e9,
        cpus(),
        total_flops_91 / whole.median / 1e9 / whole_cores
    );
    // The 4-class whole model, from the 91-class detect() runs (same run, same contention):
    // replace the class-dependent stages' time by the 4-class one, scaling the box MLP (a GEMM,
    // whose 4-class timestamps may have run on fewer cores) by its FLOPs and taking the small
    // non-GEMM stages (postprocess, box NMS, finalize) as measured.
    let dep_s = |ts: &StageTimes, gemm: bool| -> (f64, f64) {
        let sel = ts.ops.iter().filter(|o| {
            if gemm {
                o.0 == "box mlp"
            } else {
                ["box postprocess", "box nms", "finalize"].contains(&o.0)
            }
        });
        sel.fold((0.0, 0.0), |(s, f), o| (s + o.2, f + o.3))
    };
    let (mlp91_s, mlp91_f) = dep_s(&ts91, true);
    let (_, mlp4_f) = dep_s(&ts4, true);
    let (rest91_s, _) = dep_s(&ts91, false);
    let (rest4_s, _) = dep_s(&ts4, false);
    let est4 = whole.median - mlp91_s - rest91_s + mlp91_s * mlp4_f / mlp91_f + rest4_s;
    println!(
        "sum of timestamps: front (transform+body+FPN) {front_s:.2} s, heads {heads91_s:.2} s (91 classes) / {heads4_s:.2} s (4 classes, {:.2} cores); \
         4-class whole model estimate (91-class detect() with the class-dependent stages swapped) = {est4:.2} s{}",
        ts4.mean_cores(),
        if small_whole.is_empty() {
            String::new()
        } else {
            format!(
                "; measured 4-class detect(): {:.2} s on {:.2} cores",
                Stats::of(&small_whole).median,
                Stats::of(&small_cores).median
            )
        }
    );
    println!(
        "memory (allocated-buffer accounting, not a driver measurement): 91 classes weights {:.1} MiB + plan {:.1} MiB = {:.1} MiB; \
         4 classes weights {:.1} MiB + plan {:.1} MiB = {:.1} MiB",
        mib(weight_bytes_91 as f64),
        mib(plan_bytes_91 as f64),
        mib((weight_bytes_91 + plan_bytes_91) as f64),
        mib(weight_bytes_4 as f64),
        mib(plan_bytes_4 as f64),
        mib((weight_bytes_4 + plan_bytes_4) as f64)
    );
    println!(
        "wgpu allocator report (bytes allocated, reserved): empty {alloc0}, +91-class weights {alloc_w91}, +plan {alloc_p91}, \
         after runs {alloc_r91}; 4-class (91 dropped) after plan {alloc_p4}"
    );
    for (c, tv) in [(91, &tv91), (4, &tv4)] {
        match tv {
            Ok(v) => {
                let g = |k: &str| v[k]["median_s"].as_f64().unwrap_or(f64::NAN);
                let tc = v["cpu_cores_used"].as_f64().unwrap_or(f64::NAN);
                println!(
                    "torchvision {} (torch {}), {c} classes, CPU, {} threads: median {:.2} s (transform {:.3}, backbone {:.2}, rpn {:.2}, roi_heads {:.2}, \
                     postprocess {:.4}); {} proposals, {} detections; process used {tc:.2} cores; {:.1} GFLOP/s/core",
                    v["torchvision"].as_str().unwrap_or("?"),
                    v["torch"].as_str().unwrap_or("?"),
                    v["threads"],
                    g("total_s"),
                    g("transform_s"),
                    g("backbone_s"),
                    g("rpn_s"),
                    g("roi_heads_s"),
                    g("postprocess_s"),
                    v["proposals"],
                    v["detections"],
                    total_flops_91 / g("total_s") / 1e9 / tc
                );
            }
            Err(why) => println!("torchvision {c} classes: skipped ({why})"),
        }
    }
    println!("load average: {loads:?}; uptime at end: {uptime_end}");
    println!(
        "outputs finite: {finite}; bench took {:.0} s",
        t_start.elapsed().as_secs_f64()
    );

    let ops_json = |ts: &StageTimes| -> Value {
        Value::Array(
            ts.ops
                .iter()
                .map(|(st, l, s, f)| json!({"stage": st, "label": l, "median_s": s, "flops": f}))
                .collect(),
        )
    };
    let counts_json = |c: &Counts| {
        json!({"proposals": c.proposals, "rpn_candidates": c.rpn_candidates,
               "box_candidates": c.box_candidates, "detections": c.detections})
    };
    let out = json!({
        "bench": "detector",
        "machine": machine,
        "image": [h, w],
        "resized": [sizes.resized.0, sizes.resized.1],
        "padded": [sizes.padded.0, sizes.padded.1],
        "weights": {"kind": "seedgen v1 random, fixture scales", "seed": SEED, "generate_s": gen_s, "upload_and_plan_s": setup_s},
        "ceilings": ceil.json,
        "loadavg": loads,
        "uptime_end": uptime_end,
        "classes91": {
            "counts": counts_json(&counts_91),
            "outputs_finite": finite,
            "warmup_detect_debug_s": warm_s,
            "stages_method": "GPU timestamps, each dispatch in its own pass, one submission per run",
            "stages_s": ts91.stage_s(),
            "stage_flops": ts91.stage_flops(),
            "stage_runs_wall_s": ts91.wall_s,
            "stage_runs_process_cpu_cores": ts91.cores,
            "ops": ops_json(&ts91),
            "whole": {
                "method": "Detector::detect (image upload, one submission, one read-back), wall clock, two images rotated",
                "time": whole.json(),
                "process_cpu_cores": whole_cores,
                "flops": total_flops_91,
            },
            "memory": {"method": "allocated-buffer accounting: uploaded weights + Detector::plan_bytes (not a driver measurement)",
                       "weight_bytes": weight_bytes_91, "plan_bytes": plan_bytes_91,
                       "allocator_empty": alloc0, "allocator_after_weights": alloc_w91,
                       "allocator_after_plan": alloc_p91, "allocator_after_runs": alloc_r91},
        },
        "classes4": {
            "counts": counts_json(&counts_4),
            "stages_method": "RPN + box-head dispatches only, teacher-forced on the 91-class run's FPN levels (identical backbone weights), GPU timestamps",
            "stages_s": ts4.stage_s(),
            "stage_flops": ts4.stage_flops(),
            "stage_runs_wall_s": ts4.wall_s,
            "stage_runs_process_cpu_cores": ts4.cores,
            "ops": ops_json(&ts4),
            "whole_estimate_s": est4,
            "whole_estimate_method": "91-class detect() median - 91-class (box mlp, postprocess, box nms, finalize) timestamps + 91-class box mlp x 4-class/91-class FLOPs + 4-class postprocess, box nms, finalize timestamps",
            "whole_detect_s": small_whole,
            "whole_detect_process_cpu_cores": small_cores,
            "memory": {"weight_bytes": weight_bytes_4, "plan_bytes": plan_bytes_4, "allocator_after_plan": alloc_p4},
        },
        "torchvision91": match &tv91 { Ok(v) => v.clone(), Err(e) => json!({"skipped": e}) },
        "torchvision4": match &tv4 { Ok(v) => v.clone(), Err(e) => json!({"skipped": e}) },
    });
    let path = write_json("detector", &out)?;
    println!("JSON: {}", path.display());
    Ok(())
}

/// torchvision's whole model on the CPU (see [`common::run_torchvision`]).
fn torchvision(classes: usize, reps: usize, warmup: usize) -> Result<Value, String> {
    eprintln!("torchvision ({classes} classes): {warmup} warm-up + {reps} runs with 2 threads ...");
    let extra = [
        "--full".to_string(),
        "--num-classes".to_string(),
        classes.to_string(),
    ];
    common::run_torchvision(&extra, IMAGE, reps, warmup)
}
