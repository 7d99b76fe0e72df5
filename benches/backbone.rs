//! The whole backbone — transform + ResNet-50 body + FPN (256) — on a 480×640 image (resized to
//! 800×1066, padded to 800×1088), random seeded weights:
//! 1. MARROW_BENCH_STAGE_REPS (default 1) runs with every dispatch in its own pass with GPU
//!    timestamps, all in one submission: the per-stage breakdown (transform / body / FPN) and the
//!    slowest dispatches. The first of these also warms everything up.
//! 2. MARROW_BENCH_WARMUP (default 0) more untimed runs, then MARROW_BENCH_REPS (default 2)
//!    runs of the whole in ONE submission (one pass), wall clock around submit + wait, two input
//!    images rotated: the median is the headline.
//! 3. torchvision's CPU time for the same backbone and input with 2 threads
//!    (weights/bench_torchvision.py, MARROW_BENCH_TORCH_REPS runs after 1 warm-up; skipped with a
//!    message when python3 cannot import torch + torchvision, or with MARROW_BENCH_TORCH=0).
//!
//! A run on lavapipe (2 cores) takes tens of seconds; the defaults keep the bench under 10 min.
//!
//!     cargo bench --bench backbone
//!     MARROW_BENCH_REPS=1 MARROW_BENCH_TORCH=0 cargo bench --bench backbone
//!
//! Results: a summary on stdout and target/marrow-bench/backbone.json.

mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use common::*;
use marrow::gpu::{Dispatch, Gpu, GpuOptions};
use marrow::model::stages::{BackboneNet, BackboneStage, Stage};
use serde_json::{json, Value};

const IMAGE: (usize, usize) = (480, 640);

fn main() {
    if let Err(e) = run() {
        eprintln!("backbone benchmark failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> BenchResult<()> {
    let reps = env_usize("MARROW_BENCH_REPS", 2).max(1);
    let warmup = env_usize("MARROW_BENCH_WARMUP", 0);
    let stage_reps = env_usize("MARROW_BENCH_STAGE_REPS", 1);
    let gpu = Gpu::new(&GpuOptions::default())?;
    let machine = machine(&gpu);
    print_adapter(&gpu);

    let t0 = Instant::now();
    let ws = seeded_resnet50_fpn()?;
    let gen_s = t0.elapsed().as_secs_f64();
    let cfg = ws.config.transform.clone();
    let (h, w) = IMAGE;
    let t0 = Instant::now();
    // The detector's own backbone stage (as `model::Backbone` plans it): transform, then the
    // body + FPN plan, each dispatch tagged with its stage when recorded.
    let net = BackboneNet::new(&gpu, &ws, true)?;
    ws.check_all_used("backbone.")?;
    let stage = BackboneStage::new(&gpu, &net, &cfg, h, w)?;
    let (sizes, img, x, plan) = (stage.sizes, &stage.image, &stage.x, &stage.plan);
    let staged = stage.segment().staged();
    let setup_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "weights generated in {gen_s:.1} s; upload + plan {setup_s:.1} s; image {h}x{w} -> resized {}x{} -> padded {}x{}; \
         {} dispatches, {:.1} MiB of activation buffers",
        sizes.resized.0,
        sizes.resized.1,
        sizes.padded.0,
        sizes.padded.1,
        plan.ops.len() + 1,
        plan.activation_bytes as f64 / (1 << 20) as f64
    );

    // FLOPs and fewest bytes per stage, from the plan.
    let mut flops: BTreeMap<&str, f64> = BTreeMap::new();
    let mut bytes: BTreeMap<&str, f64> = BTreeMap::new();
    // staged[0] is the transform (it reads the image and writes the padded image), then one
    // dispatch per plan op.
    let op_bytes = |i: usize| {
        if i == 0 {
            (img.shape.bytes() + x.shape.bytes()) as f64
        } else {
            plan.ops[i - 1].min_bytes
        }
    };
    for (i, s) in staged.iter().enumerate() {
        *flops.entry(s.stage).or_default() += s.flops;
        *bytes.entry(s.stage).or_default() += op_bytes(i);
    }
    let total_flops: f64 = flops.values().sum();
    eprintln!(
        "GFLOP: body {:.1}, FPN {:.1}, total {:.1}",
        flops["body"] / 1e9,
        flops["fpn"] / 1e9,
        total_flops / 1e9
    );

    let images = [
        random_values("image0", 3 * h * w, 0.0, 1.0),
        random_values("image1", 3 * h * w, 0.0, 1.0),
    ];
    let all: Vec<&Dispatch> = stage.segment().dispatches().collect();
    let run_once = |i: usize| -> BenchResult<f64> {
        gpu.queue
            .write_buffer(&img.buf, 0, bytemuck::cast_slice(&images[i % 2]));
        let t = Instant::now();
        gpu.run("backbone (bench)", all.iter().copied())?;
        Ok(t.elapsed().as_secs_f64())
    };
    // 1. Per-dispatch timestamps (each dispatch its own pass, all in one submission): the
    //    per-stage breakdown. The first of these runs is also the warm-up of the whole
    //    (pipelines, first touch of every activation buffer): a full backbone on lavapipe takes
    //    tens of seconds, so a separate untimed run would blow the time budget.
    eprintln!(
        "each run takes tens of seconds on a software adapter: {stage_reps} timestamped run(s) \
         (the first is the warm-up), {warmup} more warm-up, {reps} wall-clock runs"
    );
    let mut per_op: Vec<Vec<f64>> = vec![Vec::new(); all.len()];
    let mut stage_wall = Vec::new();
    let mut stage_cores = Vec::new();
    for r in 0..stage_reps.max(1) {
        gpu.queue
            .write_buffer(&img.buf, 0, bytemuck::cast_slice(&images[r % 2]));
        let m = measure(|| Ok(gpu.time_dispatches(&all)?))?;
        eprintln!("  timestamped run {r}: {:.2} s wall", m.wall_s);
        stage_wall.push(m.wall_s);
        stage_cores.push(m.cpu_s / m.wall_s);
        for (i, s) in m.value.into_iter().enumerate() {
            per_op[i].push(s);
        }
    }
    // 2. The whole backbone in one submission, wall clock.
    let mut warm = Vec::new();
    for i in 0..warmup {
        let s = run_once(i)?;
        eprintln!("  warm-up {i}: {s:.2} s");
        warm.push(s);
    }
    let load_before = loadavg();
    let m = measure(|| {
        let mut v = Vec::new();
        for i in 0..reps {
            let s = run_once(i)?;
            eprintln!("  run {i}: {s:.2} s");
            v.push(s);
        }
        Ok(v)
    })?;
    let whole = Stats::of(&m.value);
    let cores = m.cpu_s / m.wall_s;

    let names: Vec<String> = std::iter::once("transform".to_string())
        .chain(plan.ops.iter().map(|o| o.name.clone()))
        .collect();
    let op_med: Vec<f64> = per_op.iter().map(|v| Stats::of(v).median).collect();
    let mut stage_s: BTreeMap<&str, f64> = BTreeMap::new();
    for (st, s) in staged.iter().zip(&op_med) {
        *stage_s.entry(st.stage).or_default() += s;
    }
    let sum_s: f64 = stage_s.values().sum();

    // Sanity: the outputs are finite (random weights must not overflow; NaN would hide bugs).
    let p6 = plan.output("fpn.pool").expect("fpn.pool output");
    let p6v = p6.read(&gpu)?;
    let finite = p6v.iter().all(|v| v.is_finite());

    let load_after = loadavg();
    let tv = torchvision(env_usize("MARROW_BENCH_TORCH_REPS", 5), 1);

    println!();
    println!(
        "ResNet-50-FPN backbone (transform + body + FPN-256) on a {h}x{w} image -> {}x{} padded, {} ({})",
        sizes.padded.0, sizes.padded.1, gpu.report.name, gpu.report.driver_info
    );
    println!(
        "marrow, one submission, wall clock: median {:.2} s (min {:.2}, max {:.2}) over {reps} after {stage_reps} timestamped + {warmup} warm-up run(s); \
         {:.2} GFLOP/s; process used {cores:.2} of {} cores; load {load_before:.2} -> {load_after:.2}",
        whole.median,
        whole.min,
        whole.max,
        total_flops / whole.median / 1e9,
        cpus()
    );
    let mut rows = Vec::new();
    for st in ["transform", "body", "fpn"] {
        let s = stage_s.get(st).copied().unwrap_or(0.0);
        let f = flops.get(st).copied().unwrap_or(0.0);
        let b = bytes.get(st).copied().unwrap_or(0.0);
        rows.push(vec![
            st.to_string(),
            format!("{:.1}", f / 1e9),
            format!("{:.0}", b / (1 << 20) as f64),
            format!("{:.0}", s * 1e3),
            format!("{:.1}%", 100.0 * s / sum_s),
            if f > 0.0 {
                format!("{:.2}", f / s / 1e9)
            } else {
                "-".into()
            },
        ]);
    }
    rows.push(vec![
        "sum of dispatches".into(),
        format!("{:.1}", total_flops / 1e9),
        format!("{:.0}", bytes.values().sum::<f64>() / (1 << 20) as f64),
        format!("{:.0}", sum_s * 1e3),
        "100%".into(),
        format!("{:.2}", total_flops / sum_s / 1e9),
    ]);
    println!("per stage (timestamps, each dispatch in its own pass, median of {stage_reps}):");
    print_table(
        &["stage", "GFLOP", "min MiB", "ms", "share", "GFLOP/s"],
        &rows,
    );
    let mut top: Vec<(usize, f64)> = op_med.iter().copied().enumerate().collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("slowest dispatches:");
    for (i, s) in top.iter().take(8) {
        let f = staged[*i].flops;
        println!(
            "  {:<40} {:>8.0} ms  {:>6.2} GFLOP/s",
            names[*i],
            s * 1e3,
            f / s / 1e9
        );
    }
    println!(
        "timestamped run(s): {} s wall with {} cores used",
        stage_wall
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        stage_cores
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("outputs finite: {finite}");
    match &tv {
        Ok(v) => {
            let tm = v["total_s"]["median_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "torchvision {} (torch {}), CPU, {} threads: median {:.2} s (transform {:.3}, body {:.2}, FPN {:.2}); \
                 process used {:.2} cores; marrow/torchvision = {:.1}x",
                v["torchvision"].as_str().unwrap_or("?"),
                v["torch"].as_str().unwrap_or("?"),
                v["threads"],
                tm,
                v["transform_s"]["median_s"].as_f64().unwrap_or(f64::NAN),
                v["body_s"]["median_s"].as_f64().unwrap_or(f64::NAN),
                v["fpn_s"]["median_s"].as_f64().unwrap_or(f64::NAN),
                v["cpu_cores_used"].as_f64().unwrap_or(f64::NAN),
                whole.median / tm
            );
            // Other processes share the CPU: per core each process actually got, the two are
            // comparable even when the contention differed between the two measurements.
            let tv_cores = v["cpu_cores_used"].as_f64().unwrap_or(f64::NAN);
            let m_pc = total_flops / whole.median / 1e9 / cores;
            let t_pc = total_flops / tm / 1e9 / tv_cores;
            println!(
                "per core used: marrow {m_pc:.2} GFLOP/s/core, torchvision {t_pc:.2} GFLOP/s/core \
                 ({:.1}x); on all {} cores that is about {:.1} s vs {:.1} s",
                t_pc / m_pc,
                cpus(),
                total_flops / 1e9 / (m_pc * cpus() as f64),
                total_flops / 1e9 / (t_pc * cpus() as f64)
            );
        }
        Err(why) => println!("torchvision: skipped ({why})"),
    }

    let ops_json: Vec<Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (st, f, b) = (staged[i].stage, staged[i].flops, op_bytes(i));
            json!({"name": n, "stage": st, "flops": f, "min_bytes": b, "samples_s": per_op[i], "median_s": op_med[i]})
        })
        .collect();
    let out = json!({
        "bench": "backbone",
        "machine": machine,
        "image": [h, w],
        "resized": [sizes.resized.0, sizes.resized.1],
        "padded": [sizes.padded.0, sizes.padded.1],
        "weights": {"kind": "seedgen v1 random", "seed": SEED, "generate_s": gen_s, "upload_and_plan_s": setup_s},
        "activation_bytes": plan.activation_bytes,
        "flops": flops,
        "min_bytes": bytes,
        "marrow": {
            "method": "transform + body + FPN in one submission (one compute pass), wall clock around submit + wait; two images rotated; warmed up by the timestamped run(s) first",
            "warmup_s": warm,
            "whole": whole.json(),
            "gflops": total_flops / whole.median / 1e9,
            "process_cpu_cores": cores,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "stages_s": stage_s,
            "stages_method": "GPU timestamps, each dispatch in its own pass, one submission",
            "stage_reps": stage_reps,
            "stage_runs_wall_s": stage_wall,
            "stage_runs_process_cpu_cores": stage_cores,
            "outputs_finite": finite,
            "ops": ops_json,
        },
        "torchvision": match &tv { Ok(v) => v.clone(), Err(e) => json!({"skipped": e}) },
    });
    let path = write_json("backbone", &out)?;
    println!("JSON: {}", path.display());
    Ok(())
}

/// torchvision's backbone on the CPU (see [`common::run_torchvision`]).
fn torchvision(reps: usize, warmup: usize) -> Result<Value, String> {
    eprintln!("torchvision: {warmup} warm-up + {reps} runs with 2 threads ...");
    common::run_torchvision(&[], IMAGE, reps, warmup)
}
