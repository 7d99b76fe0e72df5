//! The `marrow` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    },
    /// Run transform + ResNet body + FPN on an image and print the feature pyramid and timing.
    Features {
        image: PathBuf,
        #[arg(long)]
        weights: PathBuf,
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
        Cmd::Validate { weights, reference } => {
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
            let report = validate::validate_backbone(&g, ws, &dump)?;
            print!("{}", report.table());
            let rest = validate::unchecked_stages(&dump);
            if !rest.is_empty() {
                println!(
                    "not compared (the engine does not produce these stages yet): {}",
                    rest.join(", ")
                );
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
        Cmd::Features { image, weights } => {
            let ws = WeightStore::open(weights)?;
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
