//! The `marrow` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

use marrow::gpu::{self, Gpu, GpuOptions};
use marrow::model::weights::WeightStore;
use marrow::model::Backbone;
use marrow::validate::{self, RefDump};

#[derive(Parser)]
#[command(
    name = "marrow",
    version,
    about = "Cell detection and counting on any Vulkan / Metal / DX12 GPU (research use only)"
)]
struct Cli {
    /// Adapter index (see `marrow info`) or a substring of its name; also MARROW_ADAPTER.
    #[arg(long, global = true)]
    adapter: Option<String>,
    /// Accept an OpenGL adapter (off by default: wgpu would silently pick llvmpipe's GL).
    #[arg(long, global = true)]
    allow_gl: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the adapters, and the chosen one's backend, driver, features and limits.
    Info,
    /// Compare the engine with a torchvision reference dump (weights/make_reference.py), stage by
    /// stage; exits non-zero on any failure.
    Validate {
        /// marrow safetensors weights. Optional when the dump carries a seedgen spec (fixtures).
        #[arg(long)]
        weights: Option<PathBuf>,
        #[arg(long)]
        reference: PathBuf,
        /// Do not run the weights' refinement head: compare the plain detector (det.*) only.
        #[arg(long)]
        no_refine: bool,
    },
    /// Detect cells in an image: every detection (torchvision's output), then counts per class
    /// above the counting threshold.
    Detect {
        image: PathBuf,
        /// marrow safetensors model; default: MARROW_WEIGHTS, else the built-in model.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Confidence a detection needs to be counted (the paper's 0.7).
        #[arg(long, default_value_t = 0.7)]
        count_threshold: f32,
        /// Skip the weights' refinement head: the plain detector's (torchvision's) output.
        #[arg(long)]
        no_refine: bool,
    },
    /// Count cells in images and folders: per-image and total counts, the differential with 95 %
    /// intervals, and reports (JSON, CSV, COCO, GeoJSON, annotated images). Exit code 0 when every
    /// image was counted, 1 when some failed, 2 on a usage or fatal error.
    Count(cli::count::CountArgs),
    /// Evaluate the model on labelled images: COCO AP/AR (as pycocotools) and counting metrics.
    /// Exit code 1 when some image failed (it is left out of the metrics).
    Eval(cli::eval::EvalArgs),
    /// Merge the JSON reports of `marrow count --shard i/n` runs into one report.
    Merge {
        /// Shard reports (marrow count --json).
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// The merged JSON report.
        #[arg(long, short)]
        out: PathBuf,
        /// Also write the merged CSV.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Merge even when some inputs are in no report (a shard failed).
        #[arg(long)]
        allow_partial: bool,
    },
    /// The review workstation: a local web app in which a person checks, corrects, tallies and
    /// signs off the counts of folders of fields (open the printed address in a browser).
    Serve(cli::serve::ServeArgs),
    /// Describe a model without a GPU: classes, architecture, transform, anchors, thresholds,
    /// field, refinement head and SHA-256.
    Model {
        /// marrow safetensors model; default: MARROW_WEIGHTS, else the built-in model.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run transform + ResNet body + FPN on an image and print the feature pyramid and timing.
    Features {
        image: PathBuf,
        /// marrow safetensors model; default: MARROW_WEIGHTS, else the built-in model.
        #[arg(long)]
        weights: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn open_gpu(cli: &Cli) -> marrow::Result<Gpu> {
    let g = Gpu::new(&GpuOptions {
        adapter: cli.adapter.clone(),
        allow_gl: cli.allow_gl,
    })?;
    let r = &g.report;
    eprintln!(
        "adapter: {} ({}, {}, {}{})",
        r.name,
        r.backend,
        r.device_type,
        r.driver_info,
        if r.software {
            ", software rasteriser: slow"
        } else {
            ""
        }
    );
    Ok(g)
}

fn run(cli: Cli) -> marrow::Result<ExitCode> {
    match &cli.cmd {
        Cmd::Count(a) => cli::count::run_count(a, || open_gpu(&cli)),
        Cmd::Eval(a) => cli::eval::run_eval(a, || open_gpu(&cli)),
        Cmd::Serve(a) => cli::serve::run_serve(
            a,
            GpuOptions {
                adapter: cli.adapter.clone(),
                allow_gl: cli.allow_gl,
            },
        ),
        Cmd::Merge {
            reports,
            out,
            csv,
            allow_partial,
        } => cli::count::run_merge(reports, out, csv.as_deref(), *allow_partial),
        Cmd::Model { weights, json } => cli::model::run_model(weights.as_deref(), *json),
        Cmd::Info => {
            println!("marrow {}", env!("CARGO_PKG_VERSION"));
            println!("adapters:");
            for (i, a) in gpu::list_adapters(cli.allow_gl).iter().enumerate() {
                println!(
                    "  [{i}] {} — {} {} — driver {} {}{}",
                    a.name,
                    a.backend,
                    a.device_type,
                    a.driver,
                    a.driver_info,
                    if a.software { " (software)" } else { "" }
                );
            }
            let g = open_gpu(&cli)?;
            println!(
                "chosen: {}",
                serde_json::to_string_pretty(&g.report).unwrap_or_default()
            );
            println!(
                "capabilities: {}",
                serde_json::to_string_pretty(&g.caps).unwrap_or_default()
            );
            println!("features: {:?}", g.device.features());
            println!("limits: {:#?}", g.limits);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Validate {
            weights,
            reference,
            no_refine,
        } => {
            let dump = RefDump::open(reference)?;
            let ws = match weights {
                Some(p) => WeightStore::open(p)?,
                None => dump.seeded_weights()?.ok_or_else(|| {
                    marrow::Error::Invalid(format!(
                        "{} carries no seedgen spec: pass --weights",
                        reference.display()
                    ))
                })?,
            };
            let g = open_gpu(&cli)?;
            println!(
                "weights: {} ({}, hash {:016x})",
                ws.source.display(),
                ws.config
                    .backbone
                    .clone()
                    .unwrap_or_else(|| "inferred".into()),
                ws.hash
            );
            println!("reference: {}", reference.display());
            let t = std::time::Instant::now();
            let opts = validate::Options {
                refine: !*no_refine,
            };
            let report = validate::validate_all(&g, ws, &dump, &opts)?;
            print!("{}", report.table());
            if !dump.floor.is_empty() {
                println!(
                    "float64 floor: the dump records torch's own f32 error per stage; a row's verdict uses max(tol, {}×floor) (\"ok (floor)\": within that, above tol)",
                    validate::FLOOR_MULT
                );
            }
            let mut unchecked: Vec<(&str, Vec<&str>)> = Vec::new();
            for (stage, why) in &report.unchecked {
                match unchecked.iter_mut().find(|(w, _)| w == why) {
                    Some((_, v)) => v.push(stage),
                    None => unchecked.push((why, vec![stage])),
                }
            }
            for (why, stages) in unchecked {
                println!("not compared ({why}): {}", stages.join(", "));
            }
            println!(
                "{} in {:.1} s",
                if report.passed() { "PASS" } else { "FAIL" },
                t.elapsed().as_secs_f64()
            );
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Detect {
            image,
            weights,
            json,
            count_threshold,
            no_refine,
        } => {
            if !(0.0..=1.0).contains(count_threshold) {
                return Err(marrow::Error::Invalid(format!(
                    "--count-threshold {count_threshold} must be in [0, 1]"
                )));
            }
            let model = marrow::count::Model::resolve(weights.as_deref())?;
            let model_name = model.info.file.clone();
            let ws = model.weights;
            let img = marrow::image_io::load_rgb(image)?;
            let g = open_gpu(&cli)?;
            let hash = ws.hash;
            let mut det = marrow::model::detector::Detector::new(&g, ws)?;
            det.set_refine(!*no_refine);
            let t = std::time::Instant::now();
            let out = det.detect(&img)?;
            // Which output this is: the refinement head's, or the plain detector's (and why).
            let output = match (&out.refine, det.refine_head().is_some()) {
                (Some(r), _) => format!("refinement head ({}, {} steps)", r.cell, r.steps),
                (None, true) => "detector (refinement head skipped: --no-refine)".to_string(),
                (None, false) => "detector (the weights have no refinement head)".to_string(),
            };
            let secs = t.elapsed().as_secs_f64();
            let mut counts: Vec<(String, usize)> = (1..det.num_classes)
                .map(|c| (det.class_name(c), 0))
                .collect();
            for d in &out.detections {
                if d.score >= *count_threshold && d.label >= 1 && d.label < det.num_classes {
                    counts[d.label - 1].1 += 1;
                }
            }
            if *json {
                let dets: Vec<serde_json::Value> = out
                    .detections
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "bbox": d.bbox, "score": d.score, "label": d.label,
                            "class": det.class_name(d.label),
                        })
                    })
                    .collect();
                let doc = serde_json::json!({
                    "marrow_version": env!("CARGO_PKG_VERSION"),
                    "notice": "For research use only. Not for diagnostic use.",
                    "image": image.display().to_string(),
                    "image_size": [img.h, img.w],
                    "weights": model_name,
                    "weights_hash": format!("{hash:016x}"),
                    "adapter": g.report.name,
                    "count_threshold": count_threshold,
                    "box_score_threshold": det.weights.config.box_head.score_thresh,
                    "nms_threshold": det.weights.config.box_head.nms_thresh,
                    "output": if out.refine.is_some() { "refine" } else { "detector" },
                    "output_description": output,
                    "refine": out.refine,
                    "counts": counts.iter().map(|(n, c)| (n.clone(), *c)).collect::<std::collections::BTreeMap<_, _>>(),
                    "detections": dets,
                    "seconds": secs,
                });
                println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            } else {
                println!(
                    "marrow {} — for research use only",
                    env!("CARGO_PKG_VERSION")
                );
                println!(
                    "image {} ({}x{}), weights {} (hash {hash:016x})",
                    image.display(),
                    img.h,
                    img.w,
                    model_name
                );
                println!("output: {output}");
                if let Some(r) = &out.refine {
                    let per: Vec<String> = r
                        .stopped_at_step
                        .iter()
                        .enumerate()
                        .map(|(i, n)| format!("step {}: {n}", i + 1))
                        .collect();
                    println!(
                        "refinement: {} detections in; stopped at {}; never stopped: {}",
                        r.inputs,
                        per.join(", "),
                        r.never_stopped
                    );
                }
                println!(
                    "{:>4}  {:<16} {:>7}  box (x1, y1, x2, y2)",
                    "#", "class", "score"
                );
                for (i, d) in out.detections.iter().enumerate() {
                    println!(
                        "{i:>4}  {:<16} {:>7.4}  ({:.1}, {:.1}, {:.1}, {:.1})",
                        det.class_name(d.label),
                        d.score,
                        d.bbox[0],
                        d.bbox[1],
                        d.bbox[2],
                        d.bbox[3]
                    );
                }
                println!("counts at score ≥ {count_threshold}:");
                for (n, c) in &counts {
                    println!("  {n:<16} {c}");
                }
                println!("{} detections in {secs:.2} s", out.detections.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Features { image, weights } => {
            let ws = marrow::count::Model::resolve(weights.as_deref())?.weights;
            let img = marrow::image_io::load_rgb(image)?;
            let g = open_gpu(&cli)?;
            let mut engine = Backbone::new(&g, ws)?;
            println!(
                "backbone: {} + FPN {}",
                engine.arch.name(),
                engine.arch.fpn_channels
            );
            let t = std::time::Instant::now();
            let out = engine.run(&img)?;
            let first = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            engine.run(&img)?;
            let second = t.elapsed().as_secs_f64();
            println!(
                "image {}x{} → resized {:?} → padded {:?}",
                img.h, img.w, out.sizes.resized, out.sizes.padded
            );
            for (name, s, d) in &out.tensors {
                let mean = d.iter().map(|v| *v as f64).sum::<f64>() / d.len().max(1) as f64;
                let max = d.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
                println!("  {name:<16} {s}  mean {mean:+.4e}  max {max:+.4e}");
            }
            println!("time: first run {first:.3} s (plans + pipelines), second {second:.3} s (incl. read-back)");
            Ok(ExitCode::SUCCESS)
        }
    }
}
