//! `marrow eval`: COCO AP/AR and counting metrics of the model on labelled images, through the
//! same [`Counter`] as `marrow count` and the library's one evaluator ([`marrow::eval`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use marrow::count::batch;
use marrow::count::document::{self, NOTICE};
use marrow::count::{CountOptions, Counter, Model, Tiling};
use marrow::eval::{coco, counting, labels, DetBox, EvalImage};
use marrow::gpu::Gpu;
use marrow::{Error, Result};

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Images and/or folders (walked recursively in sorted order).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Ground truth: a folder of YOLO label files (`<image stem>.txt`, classes.txt beside or
    /// above it) or a COCO JSON file.
    #[arg(long)]
    pub labels: PathBuf,
    /// marrow safetensors model; default: MARROW_WEIGHTS, else the built-in model.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Detections per image that AP/AR may use (pycocotools' last maxDets); fields can hold more
    /// than 100 cells. Raises the detector's own limit to match when it is lower.
    #[arg(long, default_value_t = 100)]
    pub max_dets: usize,
    /// Skip the model's refinement head (when it has one): evaluate the plain detector.
    #[arg(long)]
    pub no_refine: bool,
    /// Counting confidence for the counting metrics (AP uses every detection).
    #[arg(long, default_value_t = marrow::count::DEFAULT_THRESHOLD)]
    pub threshold: f32,
    /// auto, off, or a field size in px (as in `marrow count`).
    #[arg(long, default_value = "auto")]
    pub tile: Tiling,
    /// Write the metrics as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long, short)]
    pub quiet: bool,
}

/// Ground truth for the inputs, in input order.
fn ground_truth(
    a: &EvalArgs,
    paths: &[PathBuf],
    class_names: &[String],
) -> Result<(Vec<EvalImage>, Vec<String>)> {
    let mut warnings = Vec::new();
    let images = if a.labels.is_dir() {
        let sizes = paths
            .iter()
            .map(|p| {
                let (w, h) = marrow::image_io::image_size(p)?;
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Ok((name, w, h))
            })
            .collect::<Result<Vec<_>>>()?;
        let y = labels::read_yolo_dir(&a.labels, &sizes, class_names)?;
        warnings.extend(y.warnings);
        paths
            .iter()
            .zip(sizes)
            .zip(y.gt)
            .map(|((p, (_, w, h)), gt)| EvalImage {
                file: p.display().to_string(),
                width: w,
                height: h,
                gt,
                dets: Vec::new(),
            })
            .collect()
    } else {
        let g = labels::read_coco_json(&a.labels, class_names)?;
        let by_name: std::collections::HashMap<&str, usize> = g
            .images
            .iter()
            .enumerate()
            .map(|(i, im)| (base_name(&im.file_name), i))
            .collect();
        let mut out = Vec::with_capacity(paths.len());
        for p in paths {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let i = *by_name.get(name.as_str()).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: image {name} is not in the COCO file's images",
                    a.labels.display()
                ))
            })?;
            let info = &g.images[i];
            out.push(EvalImage {
                file: p.display().to_string(),
                width: info.width,
                height: info.height,
                gt: g.gt[i].clone(),
                dets: Vec::new(),
            });
        }
        if g.images.len() > paths.len() {
            warnings.push(format!(
                "{} of the COCO file's {} images were not given as inputs and are not evaluated",
                g.images.len() - paths.len(),
                g.images.len()
            ));
        }
        out
    };
    Ok((images, warnings))
}

fn base_name(s: &str) -> &str {
    Path::new(s)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(s)
}

pub fn run_eval(a: &EvalArgs, open_gpu: impl FnOnce() -> Result<Gpu>) -> Result<ExitCode> {
    if a.max_dets == 0 || a.max_dets > 10_000 {
        return Err(Error::Invalid(format!(
            "--max-dets {} must be in 1..=10000",
            a.max_dets
        )));
    }
    let paths = batch::collect_inputs(&a.inputs)?;
    if paths.is_empty() {
        return Err(Error::Invalid("no images found in the inputs".into()));
    }
    if let Some(j) = &a.json {
        super::count::create_parent(j)?;
        std::fs::File::create(j).map_err(|e| Error::Io {
            path: j.clone(),
            source: e,
        })?;
    }
    let mut model = Model::resolve(a.weights.as_deref())?;
    let cfg = &mut model.weights.config.box_head;
    if (cfg.detections_per_img as usize) < a.max_dets {
        cfg.detections_per_img = a.max_dets as u32;
        model.info.detections_per_img = a.max_dets as u32;
    }
    let class_names: Vec<String> = std::iter::once("__background__".to_string())
        .chain(model.info.classes.iter().cloned())
        .collect();
    let (mut images, warnings) = ground_truth(a, &paths, &class_names)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let gpu = open_gpu()?;
    let opts = CountOptions {
        threshold: a.threshold,
        tiling: a.tile,
        overlap: None,
        refine: !a.no_refine,
    };
    let mut counter = Counter::new(&gpu, model, opts)?;
    let mut progress = batch::Progress::new(paths.len(), a.quiet);
    let mut failed = Vec::new();
    let threads = batch::default_decode_threads();
    for d in batch::decode_ahead(paths.clone(), threads) {
        let file = d.path.display().to_string();
        match d.image.and_then(|img| counter.count(&file, &img)) {
            Ok(c) => {
                progress.tick(&file, &format!("{} cells", c.total));
                images[d.position].dets = c
                    .detections
                    .iter()
                    .map(|cell| DetBox {
                        bbox: cell.bbox.map(f64::from),
                        class: cell.label,
                        score: f64::from(cell.score),
                    })
                    .collect();
            }
            Err(e @ (Error::DeviceLost(_) | Error::OutOfMemory(_))) => return Err(e),
            Err(e) => {
                progress.tick(&file, &format!("FAILED: {e}"));
                failed.push((d.position, e.to_string()));
            }
        }
    }
    // A failed image is left out of the metrics (not scored as all-missed), and said so loudly.
    let failed_pos: std::collections::HashSet<usize> = failed.iter().map(|f| f.0).collect();
    let scored: Vec<EvalImage> = images
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !failed_pos.contains(i))
        .map(|(_, im)| im)
        .collect();
    let metrics = coco::evaluate(&scored, &class_names, [1, 10, a.max_dets]);
    let counts = counting::count_metrics(&scored, &class_names, f64::from(a.threshold), 0.5);

    println!("marrow {} — {NOTICE}", env!("CARGO_PKG_VERSION"));
    println!(
        "model {} (sha256 {}…) on {} images ({} failed), labels {}",
        counter.model.file,
        &counter.model.sha256[..12],
        scored.len(),
        failed.len(),
        a.labels.display()
    );
    println!(
        "output: {}",
        if counter.refines() {
            "refinement head"
        } else {
            "detector (no refinement head ran)"
        }
    );
    print!("{}", metrics.summary());
    println!("{:<16} {:>7} {:>7}", "class", "AP", "AP50");
    for (name, c) in &metrics.per_class.0 {
        println!("{:<16} {:>7.4} {:>7.4}", name, c.ap, c.ap50);
    }
    println!("counting at score ≥ {}:", a.threshold);
    println!(
        "{:<16} {:>6} {:>6} {:>7} {:>7} {:>7}",
        "class", "gt", "det", "MAE", "MRE", "exact"
    );
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    let all = ("all".to_string(), counts.total.clone());
    for (name, e) in counts.per_class.0.iter().chain(std::iter::once(&all)) {
        println!(
            "{:<16} {:>6} {:>6} {:>7} {:>7} {:>7}",
            name,
            e.gt,
            e.det,
            fmt(e.mae),
            fmt(e.mre),
            fmt(e.exact)
        );
    }
    println!("confusion at IoU 0.5 (rows: ground truth, columns: detected):");
    print!("{:<12}", "");
    for c in &counts.confusion.cols {
        print!(" {:>9}", c);
    }
    println!();
    for (r, row) in counts.confusion.rows.iter().zip(&counts.confusion.matrix) {
        print!("{r:<12}");
        for v in row {
            print!(" {v:>9}");
        }
        println!();
    }
    for (pos, e) in &failed {
        println!("FAILED {}: {e}", paths[*pos].display());
    }
    if let Some(j) = &a.json {
        let mut doc = serde_json::to_value(&metrics).map_err(|e| Error::Invalid(e.to_string()))?;
        let obj = doc
            .as_object_mut()
            .ok_or_else(|| Error::Invalid("metrics did not serialise to an object".into()))?;
        obj.insert(
            "counts".into(),
            serde_json::to_value(&counts).map_err(|e| Error::Invalid(e.to_string()))?,
        );
        obj.insert(
            "provenance".into(),
            serde_json::json!({
                "marrow_version": env!("CARGO_PKG_VERSION"),
                "notice": NOTICE,
                "model": counter.model,
                "labels": a.labels.display().to_string(),
                "images": scored.len(),
                "failed": failed.iter().map(|(p, e)| serde_json::json!({"file": paths[*p].display().to_string(), "error": e})).collect::<Vec<_>>(),
                "max_dets": a.max_dets,
                "threshold": a.threshold,
                "refinement_head": counter.refines(),
                "adapter": gpu.report.name,
                "time": document::now_rfc3339(),
                "warnings": warnings,
            }),
        );
        let text = serde_json::to_string_pretty(&doc).map_err(|e| Error::Invalid(e.to_string()))?;
        std::fs::write(j, text + "\n").map_err(|e| Error::Io {
            path: j.clone(),
            source: e,
        })?;
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
