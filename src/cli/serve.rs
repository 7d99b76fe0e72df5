//! `marrow serve`: arguments, then [`marrow::serve::run`].

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use marrow::count::{CountOptions, Model, Tiling};
use marrow::gpu::GpuOptions;
use marrow::serve::{self, ServeConfig};
use marrow::{Error, Result};

/// Arguments of `marrow serve` (parsed by clap in main.rs).
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Folders of fields to review, one case each (walked recursively). None: a case of
    /// uploads only, in --case (default ./marrow-case).
    pub folders: Vec<PathBuf>,
    /// marrow safetensors model; default: MARROW_WEIGHTS, else the built-in model.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// The case folder (model output, audit log, uploads, exports); default
    /// FOLDER/.marrow-case. Only with at most one folder.
    #[arg(long = "case")]
    pub case_dir: Option<PathBuf>,
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 8600)]
    pub port: u16,
    /// Address to listen on. Anything but loopback exposes the images to the network and
    /// needs --token.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Secret (≥ 16 characters) a browser must present (open the address with ?token=…);
    /// also MARROW_TOKEN.
    #[arg(long, env = "MARROW_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Largest image upload, in MiB.
    #[arg(long, default_value_t = 64)]
    pub max_upload_mb: usize,
    /// Cells wanted in the differential (e.g. 200 or 500); the page shows when it is reached.
    #[arg(long, default_value_t = 200)]
    pub target: usize,
    /// Counting confidence: detections with score ≥ this are counted (the paper's 0.7).
    #[arg(long, default_value_t = marrow::count::DEFAULT_THRESHOLD)]
    pub threshold: f32,
    /// auto (cut images larger than 1.5× the model's training field), off, or a field size in px.
    #[arg(long, default_value = "auto")]
    pub tile: Tiling,
    /// Skip the model's refinement head (when it has one): review the plain detector's output.
    #[arg(long)]
    pub no_refine: bool,
}

pub fn run_serve(a: &ServeArgs, gpu: GpuOptions) -> Result<ExitCode> {
    let count = CountOptions {
        threshold: a.threshold,
        tiling: a.tile,
        overlap: None,
        refine: !a.no_refine,
    };
    count.check()?;
    if a.max_upload_mb == 0 || a.max_upload_mb > 1024 {
        return Err(Error::Invalid(
            "--max-upload-mb must be between 1 and 1024".into(),
        ));
    }
    let model = Model::resolve(a.weights.as_deref())?;
    serve::run(
        ServeConfig {
            folders: a.folders.clone(),
            case_dir: a.case_dir.clone(),
            host: a.host,
            port: a.port,
            token: a.token.clone().filter(|t| !t.is_empty()),
            max_upload: a.max_upload_mb << 20,
            target: Some(a.target),
            count,
            gpu,
        },
        model,
    )?;
    Ok(ExitCode::SUCCESS)
}
