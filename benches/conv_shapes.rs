//! Every distinct convolution of ResNet-50-FPN (FPN 256) at the padded 800×1088 input (a 480×640
//! image resized to 800×1066 and padded to a multiple of 32), timed alone with GPU timestamp
//! queries (wall clock when the adapter has none): warm-up, then the median of
//! MARROW_BENCH_REPS repetitions with two input buffers rotated. Each shape is reported as
//! GFLOP/s, as a fraction of a GEMM ceiling measured with our own conv kernel on the same adapter,
//! and as a fraction of the roofline min(GEMM ceiling, arithmetic intensity × copy bandwidth).
//!
//!     cargo bench --bench conv_shapes
//!     MARROW_BENCH_REPS=5 MARROW_BENCH_FILTER=layer3 cargo bench --bench conv_shapes
//!
//! Results: a table on stdout and target/marrow-bench/conv_shapes.json.

mod common;

use std::sync::Arc;

use common::*;
use marrow::gpu::{Gpu, GpuOptions, Nhwc, Tensor};
use marrow::model::backbone::BackboneBuilder;
use marrow::model::graph::Op;
use marrow::ops::conv::{Conv2d, ConvWeights, Residual};
use marrow::ops::transform::TransformSizes;
use serde_json::json;

/// One distinct convolution: the op (with its fused epilogue), its input and residual shapes.
struct Shape {
    names: Vec<String>,
    op: Conv2d,
    x: Nhwc,
    y: Nhwc,
    r: Option<Nhwc>,
    weights: Arc<ConvWeights>,
}

impl Shape {
    fn stage(&self) -> &'static str {
        if self.names[0].starts_with("backbone.fpn") {
            "fpn"
        } else {
            "body"
        }
    }
    fn flops(&self) -> f64 {
        self.op.flops(self.y)
    }
    /// Fewest bytes: input, weights + bias, residual read once; output written once.
    fn min_bytes(&self) -> f64 {
        let wb = (self.op.k() * self.op.cout + self.op.cout) as u64 * 4;
        (self.x.bytes() + wb + self.r.map(|r| r.bytes()).unwrap_or(0) + self.y.bytes()) as f64
    }
    fn label(&self) -> String {
        let n = &self.names[0];
        let short = n.strip_prefix("backbone.").unwrap_or(n);
        if self.names.len() > 1 {
            format!("{short} (x{})", self.names.len())
        } else {
            short.to_string()
        }
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("conv_shapes benchmark failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> BenchResult<()> {
    let reps = env_usize("MARROW_BENCH_REPS", 3).max(1);
    let warmup = env_usize("MARROW_BENCH_WARMUP", 1);
    let filter = env_filter();
    let gpu = Gpu::new(&GpuOptions::default())?;
    let per_core = gpu.report.software;
    let machine = machine(&gpu);
    print_adapter(&gpu);
    if gpu.report.software {
        eprintln!(
            "note: software adapter: the whole sweep takes several minutes (MARROW_BENCH_REPS, \
             MARROW_BENCH_FILTER shorten it)"
        );
    }

    let ws = seeded_resnet50_fpn()?;
    let sizes = TransformSizes::new(480, 640, &ws.config.transform)?;
    let input = Nhwc::new(1, sizes.padded.0, sizes.padded.1, 3);
    eprintln!(
        "input: 480x640 image -> resized {}x{} -> padded {} ",
        sizes.resized.0, sizes.resized.1, input
    );
    let graph = BackboneBuilder::new(&gpu, &ws)?.full()?;
    let shapes = graph.shapes(&[input])?;
    let mut distinct: Vec<Shape> = Vec::new();
    let mut net_flops = [0.0f64; 2];
    for node in &graph.nodes {
        let Op::Conv {
            op,
            weights,
            residual,
        } = &node.op
        else {
            continue;
        };
        let x = shapes[node.inputs[0]].expect("shape");
        let y = shapes[node.output.expect("a conv has an output")].expect("shape");
        let r = residual.map(|v| shapes[v].expect("shape"));
        net_flops[node.name.starts_with("backbone.fpn") as usize] += op.flops(y);
        match distinct
            .iter_mut()
            .find(|s| s.op == *op && s.x == x && s.r == r)
        {
            Some(s) => s.names.push(node.name.clone()),
            None => distinct.push(Shape {
                names: vec![node.name.clone()],
                op: *op,
                x,
                y,
                r,
                weights: weights.clone(),
            }),
        }
    }
    let total_convs: usize = distinct.iter().map(|s| s.names.len()).sum();
    eprintln!(
        "{} convolutions, {} distinct shapes; network conv GFLOP: body {:.1}, FPN {:.1}",
        total_convs,
        distinct.len(),
        net_flops[0] / 1e9,
        net_flops[1] / 1e9
    );
    if let Some(f) = &filter {
        distinct.retain(|s| s.names.iter().any(|n| n.contains(f.as_str())));
        eprintln!("MARROW_BENCH_FILTER={f:?}: {} shapes", distinct.len());
    }
    let sweep: f64 = distinct.iter().map(|s| s.flops()).sum::<f64>() * (warmup + reps) as f64;
    eprintln!(
        "this sweep runs {:.0} GFLOP of convolutions (warm-up {warmup} + {reps} reps per shape)",
        sweep / 1e9
    );

    let ceil = ceilings(&gpu, warmup, reps)?;
    eprintln!(
        "ceilings: GEMM {:.2} GFLOP/s ({:.2} per core used), copy {:.2} GB/s, balance {:.1} FLOP/byte",
        ceil.gemm_gflops,
        ceil.gemm_per_core(),
        ceil.copy_gbs,
        ceil.balance()
    );

    let mut rows = Vec::new();
    let mut table = Vec::new();
    for (i, s) in distinct.iter().enumerate() {
        let lbl = s.label();
        eprintln!("[{}/{}] {lbl} ...", i + 1, distinct.len());
        let xa = Tensor::from_host(&gpu, "x0", s.x, &random_values("x0", s.x.len(), 0.0, 1.0))?;
        let xb = Tensor::from_host(&gpu, "x1", s.x, &random_values("x1", s.x.len(), 0.0, 1.0))?;
        let res = match s.r {
            Some(r) => Some(Tensor::from_host(
                &gpu,
                "residual",
                r,
                &random_values("r", r.len(), 0.0, 1.0),
            )?),
            None => None,
        };
        let y = Tensor::new(&gpu, "y", s.y)?;
        let da = s.op.encode(
            &gpu,
            &format!("{lbl} (x0)"),
            &xa,
            &s.weights,
            res.as_ref(),
            &y,
        )?;
        let db = s.op.encode(
            &gpu,
            &format!("{lbl} (x1)"),
            &xb,
            &s.weights,
            res.as_ref(),
            &y,
        )?;
        let load0 = loadavg();
        let m = measure(|| time_rotated(&gpu, &[&da, &db], warmup, reps))?;
        let st = m.value;
        let cores = m.cpu_s / m.wall_s;
        let flops = s.flops();
        let bytes = s.min_bytes();
        let ai = flops / bytes;
        let gflops = flops / st.median / 1e9;
        let roof = ceil.roof_gflops(ai);
        let bound = if ai > ceil.balance() {
            "compute"
        } else {
            "memory"
        };
        // On a software adapter the shader threads share the CPU with everything else on the
        // machine: compare per core the process got. On a real GPU, compare raw GFLOP/s.
        let frac = if per_core {
            (gflops / cores) / ceil.gemm_per_core()
        } else {
            gflops / roof
        };
        let (mm, kk, nn) = (s.y.n * s.y.h * s.y.w, s.op.k(), s.op.cout);
        table.push(vec![
            lbl.clone(),
            s.stage().into(),
            format!("{}->{}", s.op.cin, s.op.cout),
            format!("{}x{}/{}", s.op.kh, s.op.kw, s.op.stride),
            format!("{}x{}", s.x.h, s.x.w),
            format!("{}x{}", s.y.h, s.y.w),
            epilogue(&s.op),
            format!("{mm}x{kk}x{nn}"),
            format!("{:.2}", flops / 1e9),
            format!("{ai:.0}"),
            bound.into(),
            format!("{:.1}", st.median * 1e3),
            format!("{gflops:.2}"),
            format!("{cores:.2}"),
            format!("{:.2}", gflops / cores),
            format!("{:.0}%", 100.0 * frac),
            format!("{:.0}", st.median * 1e3 * s.names.len() as f64),
        ]);
        rows.push(json!({
            "label": lbl,
            "layers": s.names,
            "stage": s.stage(),
            "cin": s.op.cin, "cout": s.op.cout, "kh": s.op.kh, "kw": s.op.kw,
            "stride": s.op.stride, "pad": s.op.pad,
            "relu": s.op.relu,
            "residual": format!("{:?}", s.op.residual),
            "input_nhwc": [s.x.n, s.x.h, s.x.w, s.x.c],
            "output_nhwc": [s.y.n, s.y.h, s.y.w, s.y.c],
            "residual_nhwc": s.r.map(|r| vec![r.n, r.h, r.w, r.c]),
            "gemm_mkn": [mm, kk, nn],
            "flops": flops,
            "min_bytes": bytes,
            "flop_per_byte": ai,
            "time": st.json(),
            "gflops": gflops,
            "frac_gemm_ceiling": gflops / ceil.gemm_gflops,
            "roof_gflops": roof,
            "frac_roofline": gflops / roof,
            "bound": bound,
            "process_cpu_cores": cores,
            "gflops_per_core": gflops / cores,
            "frac_gemm_ceiling_per_core": (gflops / cores) / ceil.gemm_per_core(),
            "frac_ceiling_reported": frac,
            "loadavg_before": load0,
            "count_in_network": s.names.len(),
            "network_time_s": st.median * s.names.len() as f64,
        }));
    }

    let head = [
        "shape",
        "stage",
        "CIN->COUT",
        "k/s",
        "in HxW",
        "out HxW",
        "epilogue",
        "GEMM MxKxN",
        "GFLOP",
        "FLOP/B",
        "bound",
        "ms",
        "GFLOP/s",
        "cores",
        "GF/s/core",
        "%ceiling",
        "net ms",
    ];
    println!();
    println!(
        "conv shapes of ResNet-50-FPN at {}x{} on {} ({}); median of {reps} after {warmup} warm-up; \
         GEMM ceiling {:.2} GFLOP/s on {:.2} cores ({:.2} per core), copy {:.2} GB/s; \
         %ceiling = {}",
        input.h,
        input.w,
        gpu.report.name,
        gpu.report.driver_info,
        ceil.gemm_gflops,
        ceil.gemm_cores,
        ceil.gemm_per_core(),
        ceil.copy_gbs,
        if per_core {
            "GFLOP/s per core used / GEMM ceiling per core used (software adapter, shared CPU)"
        } else {
            "GFLOP/s / min(GEMM ceiling, FLOP/B x copy GB/s)"
        }
    );
    print_table(&head, &table);
    let by_stage = |st: &str| -> (f64, f64) {
        rows.iter()
            .filter(|r| r["stage"] == st)
            .map(|r| {
                (
                    r["network_time_s"].as_f64().unwrap_or(0.0),
                    r["flops"].as_f64().unwrap_or(0.0)
                        * r["count_in_network"].as_f64().unwrap_or(0.0),
                )
            })
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    let (tb, fb) = by_stage("body");
    let (tf, ff) = by_stage("fpn");
    println!(
        "sum over the network (count x median, convs only): body {:.2} s ({:.1} GFLOP, {:.2} GFLOP/s), \
         FPN {:.2} s ({:.1} GFLOP, {:.2} GFLOP/s)",
        tb,
        fb / 1e9,
        fb / tb / 1e9,
        tf,
        ff / 1e9,
        ff / tf / 1e9
    );
    let load_end = loadavg();
    println!("load average at the end: {load_end:.2} on {} CPUs", cpus());

    let out = json!({
        "bench": "conv_shapes",
        "machine": machine,
        "loadavg_at_end": load_end,
        "input_nhwc": [input.n, input.h, input.w, input.c],
        "image": [480, 640],
        "resized": [sizes.resized.0, sizes.resized.1],
        "reps": reps,
        "warmup": warmup,
        "filter": filter,
        "timing": if gpu.caps.timestamps { "GPU timestamp queries, one pass per dispatch" } else { "wall clock around submit + wait" },
        "network_conv_flops": {"body": net_flops[0], "fpn": net_flops[1]},
        "ceilings": ceil.json,
        "shapes": rows,
        "sum_network": {"body_s": tb, "body_flops": fb, "fpn_s": tf, "fpn_flops": ff},
    });
    let path = write_json("conv_shapes", &out)?;
    println!("JSON: {}", path.display());
    Ok(())
}

fn epilogue(op: &Conv2d) -> String {
    let r = match op.residual {
        Residual::None => "",
        Residual::Same => "+res",
        Residual::Nearest => "+up2",
    };
    let a = if op.relu { "+relu" } else { "" };
    let s = format!("{r}{a}");
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}
