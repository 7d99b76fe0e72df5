//! The one GPU worker: a thread that owns the [`Gpu`] and the [`Counter`] (wgpu objects never
//! leave it) and counts images from a queue, one at a time, so that HTTP requests are never
//! blocked by the detector and a batch of 500 fields runs while the reviewer works.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::case::{Case, Status};
use crate::count::document::{self, Provenance, NOTICE};
use crate::count::{CountOptions, Counter, Model, Tiling};
use crate::gpu::{Gpu, GpuOptions};
use crate::image_io;

/// One image to count: case index, image index, file.
pub struct Job {
    pub case: usize,
    pub image: usize,
    pub path: PathBuf,
}

/// What the page shows of the queue.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueState {
    /// Images sent to the worker since start, and how many of those it has finished.
    pub submitted: usize,
    pub finished: usize,
    pub failed: usize,
    /// The image being counted now (`case/key`).
    pub current: Option<String>,
    /// The GPU adapter, once open.
    pub adapter: Option<String>,
    /// Why the worker cannot count (no GPU adapter, a lost device); review of counted images
    /// goes on.
    pub error: Option<String>,
}

pub type Cases = Arc<Vec<Arc<Mutex<Case>>>>;

/// Locks a case. A panic while a case was locked cannot leave it half-changed (every change is
/// logged first, then applied in one step), so a poisoned lock is taken over, not propagated.
pub fn lock(case: &Mutex<Case>) -> std::sync::MutexGuard<'_, Case> {
    case.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the worker thread; returns the queue's sender.
pub fn spawn(
    model: Model,
    opts: CountOptions,
    gpu_opts: GpuOptions,
    cases: Cases,
    state: Arc<Mutex<QueueState>>,
) -> crate::Result<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("marrow-gpu".into())
        .spawn(move || run(model, opts, gpu_opts, cases, state, rx))
        .map_err(|e| crate::Error::Invalid(format!("cannot start the GPU worker thread: {e}")))?;
    Ok(tx)
}

fn set<F: FnOnce(&mut QueueState)>(state: &Mutex<QueueState>, f: F) {
    f(&mut state.lock().unwrap_or_else(|p| p.into_inner()));
}

fn run(
    model: Model,
    opts: CountOptions,
    gpu_opts: GpuOptions,
    cases: Cases,
    state: Arc<Mutex<QueueState>>,
    rx: mpsc::Receiver<Job>,
) {
    let threshold = opts.threshold;
    let tiling = match opts.tiling {
        Tiling::Auto => "auto".to_string(),
        Tiling::Off => "off".to_string(),
        Tiling::Size(n) => n.to_string(),
    };
    let overlap = opts.overlap;
    let gpu = match Gpu::new(&gpu_opts) {
        Ok(g) => g,
        Err(e) => return fail_all(&cases, &state, rx, e.to_string()),
    };
    let r = &gpu.report;
    let adapter = format!("{} ({}, {})", r.name, r.backend, r.driver_info);
    set(&state, |s| s.adapter = Some(adapter.clone()));
    let mut counter = match Counter::new(&gpu, model, opts) {
        Ok(c) => c,
        Err(e) => return fail_all(&cases, &state, rx, e.to_string()),
    };
    let provenance = Provenance {
        marrow_version: env!("CARGO_PKG_VERSION").into(),
        notice: NOTICE.into(),
        model: counter.model.clone(),
        threshold,
        adapter,
        time: document::now_rfc3339(),
        tiling,
        tile_overlap: overlap,
        refinement_head: counter.refines(),
        shard: None,
        inputs_total: 0,
        input_indices: Vec::new(),
    };
    let mut saved_cache = false;
    for job in rx {
        let Some(case) = cases.get(job.case) else {
            continue;
        };
        let key = {
            let mut c = lock(case);
            if c.images.get(job.image).is_none_or(|im| im.model.is_some()) {
                continue;
            }
            c.set_status(job.image, Status::Counting);
            format!("{}/{}", c.name, c.images[job.image].key)
        };
        set(&state, |s| s.current = Some(key.clone()));
        let file = lock(case).images[job.image].key.clone();
        let result = image_io::load_rgb8(&job.path)
            .and_then(|img| counter.count(&file, &img))
            .map_err(|e| e.to_string());
        if !saved_cache {
            // Keep compiled pipelines for the next start (a warning at most).
            if let Err(w) = gpu.save_pipeline_cache() {
                eprintln!("warning: {w}");
            }
            saved_cache = true;
        }
        let failed = result.is_err();
        if let Err(e) = &result {
            eprintln!("marrow serve: {key}: {e}");
        }
        let saved = lock(case).set_model_output(job.image, result, &provenance);
        if let Err(e) = saved {
            // The count cannot be kept on disk: the image stays unreviewable rather than
            // reviewable on a model output that a restart would not find.
            eprintln!("marrow serve: {key}: {e}");
            lock(case).images[job.image].status = Status::Failed(e.to_string());
        }
        set(&state, |s| {
            s.finished += 1;
            s.failed += usize::from(failed);
            s.current = None;
        });
    }
}

/// No GPU: every queued image fails with the reason, now and later.
fn fail_all(cases: &Cases, state: &Mutex<QueueState>, rx: mpsc::Receiver<Job>, error: String) {
    eprintln!("marrow serve: the GPU worker cannot count: {error}");
    set(state, |s| s.error = Some(error.clone()));
    for job in rx {
        if let Some(case) = cases.get(job.case) {
            lock(case).set_status(job.image, Status::Failed(format!("no GPU: {error}")));
        }
        set(state, |s| {
            s.finished += 1;
            s.failed += 1;
        });
    }
}
