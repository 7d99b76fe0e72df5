//! Shared benchmark helpers: the ResNet-50-FPN tensor list for seeded (random) weights, timing
//! with GPU timestamp queries and medians, the two ceilings every kernel is reported against (a
//! large GEMM through our own conv kernel, a large copy), machine facts (adapter, CPU, load), and
//! JSON output under `target/marrow-bench/`.
//!
//! Knobs (environment): MARROW_BENCH_REPS (timed repetitions), MARROW_BENCH_WARMUP (untimed
//! runs first), MARROW_BENCH_FILTER (substring of a layer name), MARROW_BENCH_GEMM (comma list of
//! M=N=K sizes for the GEMM ceiling), MARROW_ADAPTER (which adapter).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use marrow::gpu::{ConstVal, Dispatch, Gpu, Kernel, Nhwc, Tensor};
use marrow::model::config::ModelConfig;
use marrow::model::weights::WeightStore;
use marrow::ops::conv::{Conv2d, Residual};
use marrow::seedgen::{SeedSpec, SEEDGEN_VERSION};
use serde_json::{json, Value};

pub type BenchResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The seed of the benchmark's random weights (any value: timing does not depend on it).
pub const SEED: u64 = 20261125;

/// An env var as a number, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

pub fn env_filter() -> Option<String> {
    std::env::var("MARROW_BENCH_FILTER")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Every tensor of torchvision's `fasterrcnn_resnet50_fpn` backbone (body + FPN with `fpn`
/// channels), in `state_dict` order, with its shape. FrozenBatchNorm2d has no
/// `num_batches_tracked`.
pub fn resnet50_fpn_tensors(fpn: usize) -> Vec<(String, Vec<usize>)> {
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    fn bn(t: &mut Vec<(String, Vec<usize>)>, p: &str, c: usize) {
        for s in ["weight", "bias", "running_mean", "running_var"] {
            t.push((format!("{p}.{s}"), vec![c]));
        }
    }
    let b = "backbone.body";
    t.push((format!("{b}.conv1.weight"), vec![64, 3, 7, 7]));
    bn(&mut t, &format!("{b}.bn1"), 64);
    let mut cin = 64;
    for (l, blocks) in [3usize, 4, 6, 3].into_iter().enumerate() {
        let planes = 64 << l;
        for i in 0..blocks {
            let p = format!("{b}.layer{}.{i}", l + 1);
            t.push((format!("{p}.conv1.weight"), vec![planes, cin, 1, 1]));
            bn(&mut t, &format!("{p}.bn1"), planes);
            t.push((format!("{p}.conv2.weight"), vec![planes, planes, 3, 3]));
            bn(&mut t, &format!("{p}.bn2"), planes);
            t.push((format!("{p}.conv3.weight"), vec![planes * 4, planes, 1, 1]));
            bn(&mut t, &format!("{p}.bn3"), planes * 4);
            if i == 0 {
                t.push((
                    format!("{p}.downsample.0.weight"),
                    vec![planes * 4, cin, 1, 1],
                ));
                bn(&mut t, &format!("{p}.downsample.1"), planes * 4);
            }
            cin = planes * 4;
        }
    }
    for i in 0..4 {
        let p = format!("backbone.fpn.inner_blocks.{i}.0");
        t.push((format!("{p}.weight"), vec![fpn, 256 << i, 1, 1]));
        t.push((format!("{p}.bias"), vec![fpn]));
    }
    for i in 0..4 {
        let p = format!("backbone.fpn.layer_blocks.{i}.0");
        t.push((format!("{p}.weight"), vec![fpn, fpn, 3, 3]));
        t.push((format!("{p}.bias"), vec![fpn]));
    }
    t
}

/// Random (seedgen v1) ResNet-50-FPN-256 backbone weights with torchvision's default transform
/// (min 800, max 1333). The per-layer scales are the fixtures' (activations stay O(1) through
/// 50 random layers; timing does not depend on values, but NaN/inf would hide a bug).
pub fn seeded_resnet50_fpn() -> BenchResult<WeightStore> {
    let scales: BTreeMap<String, f32> = [
        ("backbone.body.layer1.", 0.85f32),
        ("backbone.body.layer2.", 0.8),
        ("backbone.body.layer3.", 0.8),
        ("backbone.body.layer4.", 0.8),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let spec = SeedSpec {
        version: SEEDGEN_VERSION,
        seed: SEED,
        scales,
        tensors: resnet50_fpn_tensors(256),
    };
    let config = ModelConfig {
        backbone: Some("resnet50".into()),
        ..ModelConfig::default()
    };
    Ok(WeightStore::from_seed_spec(
        &spec,
        config,
        &format!("seedgen(seed {SEED}) resnet50-fpn256"),
    )?)
}

/// The detection heads' tensors of torchvision's `fasterrcnn_resnet50_fpn` (RPN head over
/// `fpn` channels with 3 anchors per location, TwoMLPHead with `rep` units, FastRCNNPredictor
/// with `classes` classes including background), in `state_dict` order.
pub fn faster_rcnn_head_tensors(
    fpn: usize,
    rep: usize,
    classes: usize,
) -> Vec<(String, Vec<usize>)> {
    let a = 3;
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let mut lin = |name: &str, o: usize, i: Vec<usize>| {
        let mut w = vec![o];
        w.extend(i);
        t.push((format!("{name}.weight"), w));
        t.push((format!("{name}.bias"), vec![o]));
    };
    lin("rpn.head.conv.0.0", fpn, vec![fpn, 3, 3]);
    lin("rpn.head.cls_logits", a, vec![fpn, 1, 1]);
    lin("rpn.head.bbox_pred", 4 * a, vec![fpn, 1, 1]);
    lin("roi_heads.box_head.fc6", rep, vec![fpn * 7 * 7]);
    lin("roi_heads.box_head.fc7", rep, vec![rep]);
    lin("roi_heads.box_predictor.cls_score", classes, vec![rep]);
    lin("roi_heads.box_predictor.bbox_pred", 4 * classes, vec![rep]);
    t
}

/// Random (seedgen v1) weights for the whole `fasterrcnn_resnet50_fpn` (FPN 256, box head 1024)
/// with `classes` classes and torchvision's default transform and head settings. The scales are
/// the fixtures' (weights/make_fixtures.py): activations O(1) through the body, RPN objectness
/// and class scores spread. Timing of the heads depends a little on the values (live proposal
/// and candidate counts): the bench reports those counts.
pub fn seeded_faster_rcnn(classes: usize) -> BenchResult<WeightStore> {
    let scales: BTreeMap<String, f32> = [
        ("backbone.body.layer1.", 0.85f32),
        ("backbone.body.layer2.", 0.8),
        ("backbone.body.layer3.", 0.8),
        ("backbone.body.layer4.", 0.8),
        ("rpn.head.cls_logits.", 0.4),
        ("rpn.head.bbox_pred.", 0.07),
        ("roi_heads.box_predictor.cls_score.", 0.15),
        ("roi_heads.box_predictor.bbox_pred.", 0.1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut tensors = resnet50_fpn_tensors(256);
    tensors.extend(faster_rcnn_head_tensors(256, 1024, classes));
    let spec = SeedSpec {
        version: SEEDGEN_VERSION,
        seed: SEED,
        scales,
        tensors,
    };
    let config = ModelConfig {
        backbone: Some("resnet50".into()),
        ..ModelConfig::default()
    };
    Ok(WeightStore::from_seed_spec(
        &spec,
        config,
        &format!("seedgen(seed {SEED}) fasterrcnn_resnet50_fpn, {classes} classes"),
    )?)
}

/// Bytes of weights the engine uploads for a store: every conv / linear weight (rank >= 2) plus
/// one bias per output channel (a BatchNorm folds into the conv's weight and a bias; BN tensors
/// themselves are not uploaded). The RPN head is uploaded once and shared by the five levels.
pub fn uploaded_weight_bytes(ws: &WeightStore) -> u64 {
    ws.names()
        .filter(|n| n.ends_with(".weight"))
        .filter_map(|n| ws.shape(n))
        .filter(|s| s.len() >= 2)
        .map(|s| (s.iter().product::<usize>() + s[0]) as u64 * 4)
        .sum()
}

/// wgpu's own allocator report (total allocated bytes, total reserved capacity) when the
/// backend provides one (Vulkan, DX12 through gpu-allocator); `None` otherwise.
pub fn allocator_bytes(gpu: &Gpu) -> Option<(u64, u64)> {
    gpu.device
        .generate_allocator_report()
        .map(|r| (r.total_allocated_bytes, r.total_reserved_bytes))
}

/// Median, min, max of samples (seconds).
#[derive(Debug, Clone)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stats {
    pub fn of(samples: &[f64]) -> Stats {
        let mut s = samples.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            s[n / 2]
        } else {
            0.5 * (s[n / 2 - 1] + s[n / 2])
        };
        Stats {
            median,
            min: s.first().copied().unwrap_or(f64::NAN),
            max: s.last().copied().unwrap_or(f64::NAN),
            samples: samples.to_vec(),
        }
    }

    pub fn json(&self) -> Value {
        json!({"median_s": self.median, "min_s": self.min, "max_s": self.max, "samples_s": self.samples})
    }
}

/// CPU seconds (user + system, all threads) this process has used so far. lavapipe runs its
/// shader threads inside our process, so CPU time / wall time says how many cores the "GPU" got:
/// below the core count means other processes were competing for the CPU.
pub fn process_cpu_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the ")" that ends the command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // f[0] is field 3 (state), so field k is f[k - 3].
    (ticks(11) + ticks(12)) / clk_tck()
}

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Wall and process-CPU time around `f`.
pub struct Measured<T> {
    pub value: T,
    pub wall_s: f64,
    pub cpu_s: f64,
}

pub fn measure<T>(f: impl FnOnce() -> BenchResult<T>) -> BenchResult<Measured<T>> {
    let c0 = process_cpu_s();
    let t0 = Instant::now();
    let value = f()?;
    let wall_s = t0.elapsed().as_secs_f64();
    Ok(Measured {
        value,
        wall_s,
        cpu_s: process_cpu_s() - c0,
    })
}

/// Times `variants` (the same kernel bound to different inputs, rotated so no repetition reads
/// the buffer the previous one just read): `warmup` untimed dispatches, then `reps` timed ones in
/// one submission, each in its own pass with timestamp queries (GPU seconds).
pub fn time_rotated(
    gpu: &Gpu,
    variants: &[&Dispatch],
    warmup: usize,
    reps: usize,
) -> BenchResult<Stats> {
    if warmup > 0 {
        let w: Vec<&Dispatch> = (0..warmup).map(|i| variants[i % variants.len()]).collect();
        gpu.time_dispatches(&w)?;
    }
    let r: Vec<&Dispatch> = (0..reps.max(1))
        .map(|i| variants[i % variants.len()])
        .collect();
    Ok(Stats::of(&gpu.time_dispatches(&r)?))
}

/// Facts about where the numbers came from.
pub fn machine(gpu: &Gpu) -> Value {
    let cmd = |c: &str, args: &[&str]| -> String {
        std::process::Command::new(c)
            .args(args)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let lscpu = cmd("lscpu", &[]);
    let field = |k: &str| {
        lscpu
            .lines()
            .find(|l| l.trim_start().starts_with(k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    json!({
        "adapter": gpu.report,
        "timestamps": gpu.caps.timestamps,
        "cpu_model": field("Model name"),
        "cpus": field("CPU(s)"),
        "lp_num_threads": std::env::var("LP_NUM_THREADS").ok(),
        "date_utc": cmd("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "uptime_at_start": cmd("uptime", &[]),
        "loadavg_at_start": loadavg(),
        "marrow_version": env!("CARGO_PKG_VERSION"),
        "git_head": cmd("git", &["rev-parse", "--short", "HEAD"]),
    })
}

/// The 1-minute load average (other engineers share this machine's cores).
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `target/marrow-bench/<name>.json` (honours CARGO_TARGET_DIR).
pub fn write_json(name: &str, v: &Value) -> BenchResult<PathBuf> {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("marrow-bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(v)?)?;
    Ok(path)
}

/// Deterministic pseudo-random values in [lo, hi) for inputs (seedgen's generator).
pub fn random_values(name: &str, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let key = marrow::seedgen::tensor_key(SEED, name);
    (0..n as u64)
        .map(|i| {
            let u = (marrow::seedgen::splitmix64(key ^ i) >> 40) as f32 / 16_777_216.0;
            lo + (hi - lo) * u
        })
        .collect()
}

/// The ceilings measured on this adapter.
#[derive(Debug, Clone)]
pub struct Ceilings {
    /// Best GFLOP/s of our conv kernel as a plain GEMM (1×1 conv, M = N = K).
    pub gemm_gflops: f64,
    /// CPU cores this process got while that GEMM ran (lavapipe; see [`process_cpu_s`]).
    pub gemm_cores: f64,
    /// Best GB/s (bytes read + bytes written) of a large copy.
    pub copy_gbs: f64,
    pub json: Value,
}

impl Ceilings {
    /// The roofline: what an op of `ai` FLOP/byte could reach at best.
    pub fn roof_gflops(&self, ai: f64) -> f64 {
        self.gemm_gflops.min(ai * self.copy_gbs)
    }
    /// FLOP/byte above which an op is compute-bound on this adapter.
    pub fn balance(&self) -> f64 {
        self.gemm_gflops / self.copy_gbs
    }
    /// GEMM ceiling per CPU core the process got (contention-adjusted, software adapters only).
    pub fn gemm_per_core(&self) -> f64 {
        self.gemm_gflops / self.gemm_cores
    }
    /// The contention-free estimate: per-core ceiling times the machine's cores.
    pub fn gemm_all_cores(&self) -> f64 {
        self.gemm_per_core() * cpus() as f64
    }
}

/// GEMM ceiling: our conv kernel as a 1×1 conv with M = N = K = `s` (input [1, s/64, 64, s]),
/// for each size; the best GFLOP/s per CPU core used is the ceiling (returns GFLOP/s, cores).
pub fn gemm_ceiling(
    gpu: &Gpu,
    sizes: &[usize],
    warmup: usize,
    reps: usize,
) -> BenchResult<(f64, f64, Value)> {
    let mut best = 0.0f64;
    let mut best_cores = f64::NAN;
    let mut rows = Vec::new();
    for &s in sizes {
        let op = Conv2d {
            cin: s,
            cout: s,
            kh: 1,
            kw: 1,
            stride: 1,
            pad: 0,
            relu: false,
            residual: Residual::None,
        };
        let xs = Nhwc::new(1, s / 64, 64, s);
        let ys = op.out_shape(xs)?;
        let w = random_values(&format!("gemm{s}.w"), s * s, -0.05, 0.05);
        let b = vec![0.0f32; s];
        let weights = op.upload(gpu, &format!("gemm {s} weights"), &w, &b)?;
        let xa = Tensor::from_host(
            gpu,
            "gemm A0",
            xs,
            &random_values("gemm.a0", xs.len(), -1.0, 1.0),
        )?;
        let xb = Tensor::from_host(
            gpu,
            "gemm A1",
            xs,
            &random_values("gemm.a1", xs.len(), -1.0, 1.0),
        )?;
        let y = Tensor::new(gpu, "gemm C", ys)?;
        let da = op.encode(gpu, &format!("gemm {s}^3 (A0)"), &xa, &weights, None, &y)?;
        let db = op.encode(gpu, &format!("gemm {s}^3 (A1)"), &xb, &weights, None, &y)?;
        let m = measure(|| time_rotated(gpu, &[&da, &db], warmup, reps))?;
        let st = m.value;
        let cores = m.cpu_s / m.wall_s;
        let flops = op.flops(ys);
        let g = flops / st.median / 1e9;
        eprintln!(
            "  gemm M=N=K={s}: {:.1} ms median, {g:.2} GFLOP/s ({cores:.2} cores)",
            st.median * 1e3
        );
        // Pick by GFLOP/s per core the process got: other processes share a software
        // adapter's cores, and the raw best would just be the least contended size.
        let per = |g: f64, c: f64| {
            if gpu.report.software && c.is_finite() && c > 0.0 {
                g / c
            } else {
                g
            }
        };
        if best == 0.0 || per(g, cores) > per(best, best_cores) {
            best = g;
            best_cores = cores;
        }
        rows.push(
            json!({"m": s, "n": s, "k": s, "flops": flops, "gflops": g, "time": st.json(),
                         "process_cpu_cores": cores, "loadavg": loadavg()}),
        );
    }
    Ok((best, best_cores, Value::Array(rows)))
}

const COPY_WGSL: &str = r#"
// A trivial vec4 copy with a grid-stride loop: the bandwidth a streaming kernel can reach.
struct P { n: u32, stride: u32, pad0: u32, pad1: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;
@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    var i = gid.x;
    loop {
        if (i >= p.n) { break; }
        dst[i] = src[i];
        i += p.stride;
    }
}
"#;

const COPY_KERNEL: Kernel = Kernel {
    name: "bench_copy",
    source: COPY_WGSL,
    entry: "main",
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CopyParams {
    n: u32,
    stride: u32,
    pad0: u32,
    pad1: u32,
}

/// Copy ceiling: `bytes` copied by `copy_buffer_to_buffer` (timed with timestamps written inside
/// the encoder when the adapter allows, else wall clock) and by a vec4 copy kernel (timed with
/// pass timestamps). GB/s counts the bytes read plus the bytes written.
pub fn copy_ceiling(
    gpu: &Gpu,
    bytes: u64,
    warmup: usize,
    reps: usize,
) -> BenchResult<(f64, Value)> {
    let n4 = (bytes / 16) as usize;
    let bytes = n4 as u64 * 16;
    let src = gpu.upload("copy src", &random_values("copy.src", n4 * 4, 0.0, 1.0))?;
    let dst = gpu.storage("copy dst", bytes)?;

    // 1. copy_buffer_to_buffer.
    let inside = gpu
        .device
        .features()
        .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);
    let mut enc_samples = Vec::new();
    let mut method = "wall clock (submit + wait)";
    for i in 0..warmup + reps.max(1) {
        let s = if inside {
            method = "timestamps inside the encoder";
            time_copy_timestamps(gpu, &src, &dst, bytes)?
        } else {
            let t = Instant::now();
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("bench copy"),
                });
            enc.copy_buffer_to_buffer(&src, 0, &dst, 0, Some(bytes));
            gpu.queue.submit([enc.finish()]);
            gpu.wait()?;
            t.elapsed().as_secs_f64()
        };
        if i >= warmup {
            enc_samples.push(s);
        }
    }
    let enc_st = Stats::of(&enc_samples);
    let enc_gbs = 2.0 * bytes as f64 / enc_st.median / 1e9;
    eprintln!(
        "  copy_buffer_to_buffer {} MiB: {:.2} ms, {enc_gbs:.2} GB/s",
        bytes >> 20,
        enc_st.median * 1e3
    );

    // 2. A copy kernel.
    let pipe = gpu.pipeline(&COPY_KERNEL, &[] as &[(&str, ConstVal)])?;
    let groups = 1024u32;
    let params = CopyParams {
        n: n4 as u32,
        stride: groups * 64,
        pad0: 0,
        pad1: 0,
    };
    let u = gpu.uniform("copy params", &params);
    let d = gpu.dispatch(
        "copy kernel",
        &pipe,
        Some(&u),
        &[&src, &dst],
        [groups, 1, 1],
    )?;
    let k_st = time_rotated(gpu, &[&d], warmup, reps)?;
    let k_gbs = 2.0 * bytes as f64 / k_st.median / 1e9;
    eprintln!(
        "  copy kernel {} MiB: {:.2} ms, {k_gbs:.2} GB/s",
        bytes >> 20,
        k_st.median * 1e3
    );

    let best = enc_gbs.max(k_gbs);
    Ok((
        best,
        json!({
            "bytes": bytes,
            "copy_buffer_to_buffer": {"method": method, "gbs": enc_gbs, "time": enc_st.json()},
            "copy_kernel": {"method": "pass timestamps", "gbs": k_gbs, "time": k_st.json()},
        }),
    ))
}

fn time_copy_timestamps(
    gpu: &Gpu,
    src: &wgpu::Buffer,
    dst: &wgpu::Buffer,
    bytes: u64,
) -> BenchResult<f64> {
    let qs = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("bench copy timestamps"),
        ty: wgpu::QueryType::Timestamp,
        count: 2,
    });
    let resolve = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("bench copy timestamp resolve"),
        size: 16,
        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("bench copy timestamp staging"),
        size: 16,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = gpu
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("bench copy (timed)"),
        });
    enc.write_timestamp(&qs, 0);
    enc.copy_buffer_to_buffer(src, 0, dst, 0, Some(bytes));
    enc.write_timestamp(&qs, 1);
    enc.resolve_query_set(&qs, 0..2, &resolve, 0);
    enc.copy_buffer_to_buffer(&resolve, 0, &staging, 0, Some(16));
    gpu.queue.submit([enc.finish()]);
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    gpu.device.poll(wgpu::PollType::Wait {
        submission_index: None,
        timeout: Some(Duration::from_secs(600)),
    })?;
    gpu.check()?;
    rx.recv()??;
    let raw: Vec<u64> = {
        let view = staging.get_mapped_range(..)?;
        bytemuck::cast_slice::<u8, u64>(&view[..16]).to_vec()
    };
    staging.unmap();
    let period = gpu.queue.get_timestamp_period() as f64 * 1e-9;
    Ok(raw[1].saturating_sub(raw[0]) as f64 * period)
}

/// Both ceilings, printed.
pub fn ceilings(gpu: &Gpu, warmup: usize, reps: usize) -> BenchResult<Ceilings> {
    let sizes: Vec<usize> = std::env::var("MARROW_BENCH_GEMM")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![1024, 2048]);
    eprintln!("ceilings:");
    let (gemm, gemm_cores, gj) = gemm_ceiling(gpu, &sizes, warmup, reps)?;
    let (copy, cj) = copy_ceiling(gpu, 64 << 20, warmup, reps)?;
    Ok(Ceilings {
        gemm_gflops: gemm,
        gemm_cores,
        copy_gbs: copy,
        json: json!({"gemm_gflops": gemm, "gemm_process_cpu_cores": gemm_cores, "copy_gbs": copy,
                     "gemm": gj, "copy": cj, "balance_flop_per_byte": gemm / copy}),
    })
}

/// A Markdown table (pasteable into docs/perf.md): first column left-aligned, others right.
pub fn print_table(head: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = w[i])
                } else {
                    format!("{c:>w$}", w = w[i])
                }
            })
            .collect();
        println!("| {} |", s.join(" | "));
    };
    line(head.iter().map(|s| s.to_string()).collect());
    println!(
        "|{}|",
        w.iter()
            .enumerate()
            .map(|(i, n)| if i == 0 {
                format!(":{}", "-".repeat(n + 1))
            } else {
                format!("{}:", "-".repeat(n + 1))
            })
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in rows {
        line(r.clone());
    }
}

/// Runs `weights/bench_torchvision.py` (torchvision on the CPU, 2 threads, same input size) with
/// `extra` arguments and parses its JSON (the last `{`-line of stdout). `Err` explains a skip:
/// `MARROW_BENCH_TORCH=0`, no python3, or torch / torchvision not importable.
pub fn run_torchvision(
    extra: &[String],
    image: (usize, usize),
    reps: usize,
    warmup: usize,
) -> Result<serde_json::Value, String> {
    if std::env::var("MARROW_BENCH_TORCH").is_ok_and(|v| v == "0") {
        return Err("MARROW_BENCH_TORCH=0".into());
    }
    let ok = std::process::Command::new("python3")
        .args(["-c", "import torch, torchvision"])
        .output()
        .map_err(|e| format!("python3 not runnable: {e}"))?;
    if !ok.status.success() {
        return Err("python3 cannot import torch and torchvision".into());
    }
    let (h, w) = image;
    let mut args: Vec<String> = vec!["weights/bench_torchvision.py".into()];
    args.extend(extra.iter().cloned());
    for (k, v) in [
        ("--height", h),
        ("--width", w),
        ("--threads", 2),
        ("--reps", reps),
        ("--warmup", warmup),
    ] {
        args.push(k.into());
        args.push(v.to_string());
    }
    let out = std::process::Command::new("python3")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(&args)
        .output()
        .map_err(|e| format!("running weights/bench_torchvision.py: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "weights/bench_torchvision.py failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(last)
        .map_err(|e| format!("bench_torchvision.py printed no JSON ({e}): {stdout}"))
}

/// The adapter line every benchmark starts with: name, backend, driver, timestamps, load.
pub fn print_adapter(gpu: &Gpu) {
    eprintln!(
        "adapter: {} ({}, {}), timestamps: {}; load average {:.2} on {} CPUs",
        gpu.report.name,
        gpu.report.backend,
        gpu.report.driver_info,
        gpu.caps.timestamps,
        loadavg(),
        cpus()
    );
}
