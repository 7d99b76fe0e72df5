//! `marrow count` and `marrow merge`: the counting application on top of [`marrow::count`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use marrow::count::batch::{self, Progress, Shard};
use marrow::count::document::{self, ImageEntry, Provenance, Report, NOTICE};
use marrow::count::{annotate, report, CountOptions, Counter, Model, Tiling};
use marrow::gpu::Gpu;
use marrow::{Error, Result};

/// Arguments of `marrow count` (parsed by clap in main.rs).
#[derive(clap::Args, Debug)]
pub struct CountArgs {
    /// Images and/or folders (walked recursively in sorted order).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// marrow safetensors model; default: MARROW_WEIGHTS, else the built-in model.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Counting confidence: detections with score ≥ this are counted (the paper's 0.7).
    #[arg(long, default_value_t = marrow::count::DEFAULT_THRESHOLD)]
    pub threshold: f32,
    /// auto (cut images larger than 1.5× the model's training field), off, or a field size in px.
    #[arg(long, default_value = "auto")]
    pub tile: Tiling,
    /// Overlap between fields in px (must exceed the largest cell); default half a field.
    #[arg(long)]
    pub tile_overlap: Option<u32>,
    /// Skip the model's refinement head (when it has one): count the plain detector's output.
    #[arg(long)]
    pub no_refine: bool,
    /// Cells wanted for the differential (e.g. 200 or 500); the report says whether it was reached.
    #[arg(long)]
    pub target: Option<usize>,
    /// Take every n-th input: i/n with 0 ≤ i < n (Slurm / Kubernetes array jobs).
    #[arg(long)]
    pub shard: Option<Shard>,
    /// Write the full report (provenance, per-image counts and detections, summary) as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write one CSV row per image with counts and percentages.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write COCO results JSON with every detection (for AP computation).
    #[arg(long)]
    pub coco: Option<PathBuf>,
    /// Write one QuPath-importable GeoJSON per image into this folder.
    #[arg(long)]
    pub geojson: Option<PathBuf>,
    /// Write one annotated PNG per image into this folder.
    #[arg(long)]
    pub annotate: Option<PathBuf>,
    /// CPU threads decoding images ahead of the GPU (default: cores − 1, at least 1).
    #[arg(long)]
    pub decode_threads: Option<usize>,
    /// No progress output on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print where start-up time went (adapter, weights, pipelines, first image).
    #[arg(long)]
    pub timings: bool,
}

/// Checks every output location before any GPU work, so that a typo in a path costs nothing.
/// Files are created (truncated) now and written at the end; folders are created if missing.
fn prepare_outputs(a: &CountArgs) -> Result<()> {
    for f in [&a.json, &a.csv, &a.coco].into_iter().flatten() {
        create_parent(f)?;
        File::create(f).map_err(|e| Error::Io {
            path: f.clone(),
            source: e,
        })?;
    }
    for d in [&a.geojson, &a.annotate].into_iter().flatten() {
        std::fs::create_dir_all(d).map_err(|e| Error::Io {
            path: d.clone(),
            source: e,
        })?;
        // Creating the folder can succeed where writing into it fails (read-only mounts).
        let probe = d.join(".marrow-write-test");
        File::create(&probe).map_err(|e| Error::Io {
            path: d.clone(),
            source: e,
        })?;
        let _ = std::fs::remove_file(probe);
    }
    Ok(())
}

/// Creates the folder a named output file goes into (only that folder).
pub fn create_parent(f: &Path) -> Result<()> {
    match f.parent() {
        Some(p) if !p.as_os_str().is_empty() => std::fs::create_dir_all(p).map_err(|e| Error::Io {
            path: f.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

pub fn run_count(a: &CountArgs, open_gpu: impl FnOnce() -> Result<Gpu>) -> Result<ExitCode> {
    let opts = CountOptions {
        threshold: a.threshold,
        tiling: a.tile,
        overlap: a.tile_overlap,
        refine: !a.no_refine,
    };
    opts.check()?;
    let all = batch::collect_inputs(&a.inputs)?;
    if all.is_empty() {
        return Err(Error::Invalid(format!(
            "no images found in {} (looked for {})",
            a.inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            batch::IMAGE_EXTENSIONS.join(", ")
        )));
    }
    let indices: Vec<usize> = match a.shard {
        Some(s) => s.indices(all.len()),
        None => (0..all.len()).collect(),
    };
    prepare_outputs(a)?;

    let t0 = Instant::now();
    let model = Model::resolve(a.weights.as_deref())?;
    let t_weights = t0.elapsed().as_secs_f64();
    let t = Instant::now();
    let gpu = open_gpu()?;
    let t_adapter = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut counter = Counter::new(&gpu, model, opts)?;
    let t_build = t.elapsed().as_secs_f64();
    let provenance_base = Provenance {
        marrow_version: env!("CARGO_PKG_VERSION").into(),
        notice: NOTICE.into(),
        model: counter.model.clone(),
        threshold: a.threshold,
        adapter: format!(
            "{} ({}, {})",
            gpu.report.name, gpu.report.backend, gpu.report.driver_info
        ),
        time: document::now_rfc3339(),
        tiling: match a.tile {
            Tiling::Auto => "auto".into(),
            Tiling::Off => "off".into(),
            Tiling::Size(n) => n.to_string(),
        },
        tile_overlap: a.tile_overlap,
        refinement_head: counter.refines(),
        shard: a.shard.map(|s| s.to_string()),
        inputs_total: all.len(),
        input_indices: indices.clone(),
    };

    let threads = a
        .decode_threads
        .unwrap_or_else(batch::default_decode_threads);
    let paths: Vec<PathBuf> = indices.iter().map(|&i| all[i].clone()).collect();
    // Output names per input, decided once so that equal stems from different folders get
    // distinct annotated PNGs, matching the GeoJSON names.
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let stems = report::output_stems(names.iter().map(String::as_str));
    let mut progress = Progress::new(paths.len(), a.quiet);
    let mut entries: Vec<ImageEntry> = Vec::with_capacity(paths.len());
    let mut first_image: Option<f64> = None;
    let t_batch = Instant::now();
    for d in batch::decode_ahead(paths, threads) {
        let file = d.path.display().to_string();
        let t = Instant::now();
        let entry = d.image.and_then(|img| {
            let c = counter.count(&file, &img)?;
            if let Some(dir) = &a.annotate {
                let stem = &stems[d.position];
                annotate::write_annotated_as(dir, stem, &img, &c, &counter.model, a.threshold)?;
            }
            Ok(c)
        });
        if first_image.is_none() {
            first_image = Some(t.elapsed().as_secs_f64());
            // Keep the compiled pipelines for the next run (a no-op where the backend has no
            // pipeline cache); failing to write it is a warning, never an error.
            if let Err(w) = gpu.save_pipeline_cache() {
                eprintln!("warning: {w}");
            }
        }
        match entry {
            Ok(c) => {
                progress.tick(&file, &format!("{} cells", c.total));
                entries.push(ImageEntry::Counted(c));
            }
            // A lost device or exhausted memory ends the run: every later image would fail too.
            Err(e @ (Error::DeviceLost(_) | Error::OutOfMemory(_))) => return Err(e),
            Err(e) => {
                let msg = e.to_string();
                progress.tick(&file, &format!("FAILED: {msg}"));
                entries.push(ImageEntry::Failed { file, error: msg });
            }
        }
    }
    let batch_secs = t_batch.elapsed().as_secs_f64();
    let rep = Report::new(provenance_base, entries, a.target);
    write_outputs(a, &rep)?;
    print_table(&rep);
    let n = rep.images.len();
    if a.timings {
        eprintln!(
            "timings: weights {t_weights:.3} s, adapter {t_adapter:.3} s, detector build {t_build:.3} s, \
             first image {:.3} s (plans + pipelines + run); batch {n} images in {batch_secs:.2} s = {:.3} img/s",
            first_image.unwrap_or(0.0),
            n as f64 / batch_secs.max(1e-9)
        );
        eprintln!("{}", gpu.pipeline_stats());
    }
    Ok(if rep.summary.failed_images > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn write_outputs(a: &CountArgs, rep: &Report) -> Result<()> {
    if let Some(p) = &a.json {
        write_json(p, rep)?;
    }
    if let Some(p) = &a.csv {
        report::write_csv(p, rep)?;
    }
    if let Some(p) = &a.coco {
        report::write_coco(p, rep)?;
    }
    if let Some(d) = &a.geojson {
        report::write_geojson_dir(d, rep)?;
    }
    Ok(())
}

pub fn write_json(path: &Path, rep: &Report) -> Result<()> {
    create_parent(path)?;
    let text = serde_json::to_string_pretty(rep).map_err(|e| {
        Error::Invalid(format!(
            "{}: cannot serialise the report: {e}",
            path.display()
        ))
    })?;
    std::fs::write(path, text + "\n").map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// The readable table on stdout: one line per image, then the differential of the batch.
pub fn print_table(rep: &Report) {
    let classes = &rep.provenance.model.classes;
    let m = &rep.provenance.model;
    println!("marrow {} — {}", rep.provenance.marrow_version, NOTICE);
    println!(
        "model {} (sha256 {}…), counting score ≥ {}",
        m.file,
        &m.sha256[..12.min(m.sha256.len())],
        rep.provenance.threshold
    );
    let w = rep
        .images
        .iter()
        .map(|e| e.file().chars().count())
        .max()
        .unwrap_or(4)
        .clamp(4, 60);
    print!("{:<w$}", "file");
    for c in classes {
        print!(" {:>9}", trunc(c, 9));
    }
    println!(" {:>7}", "total");
    for e in &rep.images {
        let name = trunc(e.file(), w);
        match e {
            ImageEntry::Counted(c) => {
                print!("{name:<w$}");
                for cl in classes {
                    print!(" {:>9}", c.counts.get(cl).copied().unwrap_or(0));
                }
                println!(
                    " {:>7}{}",
                    c.total,
                    c.tiles
                        .as_ref()
                        .map(|t| format!("  ({} fields)", t.fields))
                        .unwrap_or_default()
                );
            }
            ImageEntry::Failed { error, .. } => println!("{name:<w$} FAILED: {error}"),
        }
    }
    let s = &rep.summary;
    println!(
        "\n{} of {} images counted{}; {} cells",
        s.counted_images,
        s.images,
        if s.failed_images > 0 {
            format!(", {} FAILED", s.failed_images)
        } else {
            String::new()
        },
        s.total
    );
    println!(
        "{:<16} {:>7} {:>8}  95% CI (Wilson)",
        "class", "cells", "percent"
    );
    for c in classes {
        let d = &s.differential[c];
        println!(
            "{:<16} {:>7} {:>7.1}%  {:.1}–{:.1}%",
            trunc(c, 16),
            s.counts.get(c).copied().unwrap_or(0),
            d.percent,
            d.ci95[0],
            d.ci95[1]
        );
    }
    if let Some(r) = s.me_ratio {
        println!("M:E ratio {r:.2}");
    }
    if let (Some(t), Some(reached)) = (s.target, s.target_reached) {
        if reached {
            println!("target of {t} cells reached ({} counted)", s.total);
        } else {
            println!(
                "NOTE: only {} cells counted, fewer than the target of {t}: count more fields",
                s.total
            );
        }
    }
}

fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let tail: String = s
            .chars()
            .rev()
            .take(n - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}

/// `marrow merge`: shard reports → one report (JSON, and optionally CSV / COCO).
pub fn run_merge(
    reports: &[PathBuf],
    out: &Path,
    csv: Option<&Path>,
    allow_partial: bool,
) -> Result<ExitCode> {
    let parts = reports
        .iter()
        .map(|p| Report::read(p).map(|r| (p.clone(), r)))
        .collect::<Result<Vec<_>>>()?;
    let merged = document::merge(&parts, allow_partial)?;
    write_json(out, &merged)?;
    if let Some(c) = csv {
        report::write_csv(c, &merged)?;
    }
    print_table(&merged);
    Ok(if merged.summary.failed_images > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
