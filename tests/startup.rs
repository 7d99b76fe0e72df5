//! Start-up: the on-disk pipeline cache (written, reused, corrupt files ignored, disabled on
//! request) and results that do not depend on it. `startup_breakdown` (ignored) prints where the
//! first image's time goes:
//!
//!     cargo test --release --test startup -- --ignored --nocapture startup_breakdown
//!
//! (MESA_SHADER_CACHE_DISABLE=true for a cold driver; MARROW_NO_CACHE / MARROW_CACHE_DIR as the
//! CLI reads them; MARROW_PIPELINE_THREADS=0|1|n; MARROW_STARTUP_SIZES=480x640,575x575;
//! MARROW_STARTUP_PER_DISPATCH=1 for the first-dispatch cost per stage; MARROW_STARTUP_NO_RUN=1
//! to stop after the plan.)

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use marrow::count::Model;
use marrow::gpu::{Gpu, GpuOptions, PipelineCacheSetting};
use marrow::model::detector::{Detection, Detector};
use marrow::model::ImageF32;
use marrow::ops::pool::MaxPool2d;

fn seeded_model() -> Model {
    Model::open(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seeded_model.safetensors"),
    )
    .unwrap()
}

/// CPU seconds (user + system, all threads) this process has used; 0 where /proc is absent.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // Fields 14 and 15 of proc(5) (utime, stime) are the 12th and 13th after the name; ticks
    // are 1/100 s on Linux (USER_HZ).
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

fn image(h: usize, w: usize, seed: &str) -> ImageF32 {
    let mut rng = common::Rng::for_test(seed);
    ImageF32 {
        h,
        w,
        data: rng.vec(3 * h * w, 0.0, 1.0),
    }
}

#[test]
#[ignore = "measurement: prints the first image's time split; run with --nocapture"]
fn startup_breakdown() {
    let hw: Vec<(usize, usize)> = std::env::var("MARROW_STARTUP_SIZES")
        .ok()
        .map(|s| {
            s.split(',')
                .map(|p| {
                    let (h, w) = p.split_once('x').expect("HxW");
                    (h.parse().unwrap(), w.parse().unwrap())
                })
                .collect()
        })
        .unwrap_or_else(|| vec![(480, 640), (575, 575)]);
    let t = Instant::now();
    let model = seeded_model();
    let t_weights = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let gpu = Gpu::new(&GpuOptions::default()).unwrap();
    let t_gpu = t.elapsed().as_secs_f64();
    eprintln!("adapter: {} ({})", gpu.report.name, gpu.report.driver_info);
    let t = Instant::now();
    let cpu = cpu_secs();
    let mut det = Detector::new(&gpu, model.weights).unwrap();
    let t_det = t.elapsed().as_secs_f64();
    eprintln!(
        "weights {t_weights:.3} s, adapter {t_gpu:.3} s, detector build {t_det:.3} s \
         ({:.2} CPU s)",
        cpu_secs() - cpu
    );
    eprintln!("after Detector::new: {}", gpu.pipeline_stats());
    for (h, w) in hw {
        let img = image(h, w, "startup_breakdown");
        let s0 = gpu.pipeline_stats();
        let t = Instant::now();
        let n = det.timed_stages(h, w).unwrap().len();
        let t_plan = t.elapsed().as_secs_f64();
        let s1 = gpu.pipeline_stats();
        if std::env::var_os("MARROW_STARTUP_PER_DISPATCH").is_some() {
            // Each dispatch in its own submission, twice: the first pass pays whatever the
            // driver defers to a pipeline's first dispatch (lavapipe: the LLVM compile).
            let mut by_stage: Vec<(&str, usize, f64, f64)> = Vec::new();
            let mut passes = [Vec::new(), Vec::new()];
            for pass in &mut passes {
                for (stage, d, _) in det.timed_stages(h, w).unwrap() {
                    let t = Instant::now();
                    gpu.run(&d.label, [d]).unwrap();
                    pass.push((stage, t.elapsed().as_secs_f64()));
                }
            }
            for ((stage, a), (_, b)) in passes[0].iter().zip(&passes[1]) {
                match by_stage.iter_mut().find(|s| s.0 == *stage) {
                    Some(s) => {
                        s.1 += 1;
                        s.2 += a;
                        s.3 += b;
                    }
                    None => by_stage.push((stage, 1, *a, *b)),
                }
            }
            for (stage, n, a, b) in &by_stage {
                eprintln!(
                    "  {stage:16} {n:3} dispatches: first {a:7.3} s, second {b:7.3} s, \
                     first-use cost {:7.3} s",
                    a - b
                );
            }
            let (a, b) = by_stage
                .iter()
                .fold((0.0, 0.0), |(x, y), s| (x + s.2, y + s.3));
            eprintln!(
                "  total: first {a:.3} s, second {b:.3} s, first-use cost {:.3} s",
                a - b
            );
        }
        if std::env::var_os("MARROW_STARTUP_NO_RUN").is_some() {
            eprintln!(
                "{h}x{w}: plan {t_plan:.3} s ({n} dispatches; {} pipelines created in {:.3} s)",
                s1.created - s0.created,
                s1.create_secs - s0.create_secs
            );
            continue;
        }
        let t = Instant::now();
        det.detect(&img).unwrap();
        let t_run1 = t.elapsed().as_secs_f64();
        let t = Instant::now();
        det.detect(&img).unwrap();
        let t_run2 = t.elapsed().as_secs_f64();
        eprintln!(
            "{h}x{w}: plan {t_plan:.3} s ({n} dispatches; {} pipelines created in {:.3} s, \
             the rest {:.3} s buffers + bind groups), first run {t_run1:.3} s, second run {t_run2:.3} s",
            s1.created - s0.created,
            s1.create_secs - s0.create_secs,
            t_plan - (s1.create_secs - s0.create_secs)
        );
    }
    let st = gpu.pipeline_stats();
    eprintln!("{st}");
    for (k, c, s) in &st.per_kernel {
        eprintln!("  {k:28} {c:4} variants {s:8.3} s");
    }
    let t = Instant::now();
    let saved = gpu.save_pipeline_cache();
    eprintln!(
        "save: {saved:?} in {:.3} s; {:?}",
        t.elapsed().as_secs_f64(),
        gpu.pipeline_cache_report()
    );
}

/// A fresh folder under the target directory for one test (removed first).
fn temp_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("startup-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn gpu_with(setting: PipelineCacheSetting) -> Gpu {
    Gpu::with_pipeline_cache(&GpuOptions::default(), &setting).unwrap()
}

/// False (and says why) where the adapter's backend keeps no pipeline cache (not Vulkan).
fn cache_supported(g: &Gpu) -> bool {
    let r = g.pipeline_cache_report();
    if !r.enabled {
        eprintln!(
            "skipped: no pipeline cache on {} ({:?})",
            g.report.backend, r.off_reason
        );
    }
    r.enabled
}

/// Bit patterns, so that -0.0 / NaN differences count.
fn bits(d: &[Detection]) -> Vec<([u32; 4], u32, usize)> {
    d.iter()
        .map(|d| (d.bbox.map(f32::to_bits), d.score.to_bits(), d.label))
        .collect()
}

/// One cheap pipeline, so that a cache has something in it.
fn compile_one(g: &Gpu) {
    let (k, c) = MaxPool2d::STEM.variant();
    g.pipeline(&k, &c).unwrap();
    g.check().unwrap();
}

#[test]
fn shader_list_matches_the_shaders_folder() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut on_disk: Vec<String> = files_in(&dir)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = marrow::gpu::SHADER_SOURCES
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    listed.sort();
    assert_eq!(
        on_disk, listed,
        "src/gpu/cache.rs SHADER_SOURCES must list every shaders/*.wgsl (it keys the pipeline cache)"
    );
    for (name, src) in marrow::gpu::SHADER_SOURCES {
        assert_eq!(
            std::fs::read_to_string(dir.join(name)).unwrap(),
            src,
            "{name}"
        );
    }
}

fn fake_env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
    move |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| OsString::from(v))
    }
}

#[test]
fn cache_dir_follows_the_environment() {
    let s = PipelineCacheSetting::FromEnv;
    let dir = |pairs: &[(&str, &str)]| s.resolve_with(fake_env(pairs));
    let ok = |p: &str| Ok(PathBuf::from(p));
    assert_eq!(dir(&[("HOME", "/home/u")]), ok("/home/u/.cache/marrow"));
    assert_eq!(
        dir(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]),
        ok("/xdg/marrow")
    );
    // A relative XDG_CACHE_HOME is invalid (XDG base directory spec) and ignored.
    assert_eq!(
        dir(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "rel")]),
        ok("/home/u/.cache/marrow")
    );
    assert_eq!(
        dir(&[
            ("HOME", "/home/u"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("MARROW_CACHE_DIR", "/m")
        ]),
        ok("/m")
    );
    for off in ["1", "true", "yes"] {
        let e = dir(&[("MARROW_NO_CACHE", off), ("MARROW_CACHE_DIR", "/m")]).unwrap_err();
        assert!(e.contains("MARROW_NO_CACHE"), "MARROW_NO_CACHE={off}: {e}");
    }
    for on in ["0", ""] {
        assert_eq!(
            dir(&[("MARROW_NO_CACHE", on), ("MARROW_CACHE_DIR", "/m")]),
            ok("/m"),
            "MARROW_NO_CACHE={on:?}"
        );
    }
    assert!(dir(&[]).is_err(), "no HOME and no override: no cache");
    assert!(PipelineCacheSetting::Off
        .resolve_with(fake_env(&[("HOME", "/home/u")]))
        .is_err());
    assert_eq!(
        PipelineCacheSetting::Dir("/d".into()).resolve_with(fake_env(&[("MARROW_NO_CACHE", "1")])),
        ok("/d"),
        "an explicit folder wins over the environment"
    );
}

/// Run by `marrow_no_cache_disables_it` in a child process with its own environment (setting
/// variables in this multi-threaded process would race the other tests).
#[test]
#[ignore = "helper: run in a child process by marrow_no_cache_disables_it"]
fn env_child() {
    let g = Gpu::new(&GpuOptions::default()).unwrap();
    compile_one(&g);
    let saved = g.save_pipeline_cache();
    println!(
        "CHILD {}",
        serde_json::json!({
            "report": g.pipeline_cache_report(),
            "saved": format!("{saved:?}"),
        })
    );
}

fn run_child(envs: &[(&str, &Path)], no_cache: Option<&str>) -> serde_json::Value {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        "env_child",
        "--nocapture",
        "--test-threads=1",
    ]);
    for k in ["MARROW_NO_CACHE", "MARROW_CACHE_DIR", "XDG_CACHE_HOME"] {
        cmd.env_remove(k);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    if let Some(v) = no_cache {
        cmd.env("MARROW_NO_CACHE", v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("CHILD ").map(|(_, json)| json))
        .unwrap_or_else(|| panic!("no CHILD line in {stdout}"));
    serde_json::from_str(line).unwrap()
}

#[test]
fn marrow_no_cache_disables_it() {
    let dir = temp_dir("env");
    let on = run_child(&[("MARROW_CACHE_DIR", &dir)], None);
    if on["report"]["enabled"] != true {
        eprintln!("skipped: no pipeline cache on this adapter: {on}");
        return;
    }
    assert_eq!(files_in(&dir).len(), 1, "{on}");
    let off_dir = temp_dir("env-off");
    let off = run_child(&[("MARROW_CACHE_DIR", &off_dir)], Some("1"));
    assert_eq!(off["report"]["enabled"], false, "{off}");
    assert!(
        off["report"]["off_reason"]
            .as_str()
            .unwrap()
            .contains("MARROW_NO_CACHE"),
        "{off}"
    );
    assert_eq!(off["saved"], "Ok(None)", "{off}");
    assert!(
        files_in(&off_dir).is_empty(),
        "MARROW_NO_CACHE=1 wrote a cache"
    );
    // XDG_CACHE_HOME is used when MARROW_CACHE_DIR is not set.
    let xdg = temp_dir("env-xdg");
    let x = run_child(&[("XDG_CACHE_HOME", &xdg)], None);
    assert_eq!(x["report"]["enabled"], true, "{x}");
    assert_eq!(files_in(&xdg.join("marrow")).len(), 1, "{x}");
}

#[test]
fn pipeline_cache_is_written_then_reused_with_identical_results() {
    let dir = temp_dir("reuse");
    let img = image(120, 160, "pipeline_cache_reuse");
    let run = |g: &Gpu| {
        let mut det = Detector::new(g, seeded_model().weights).unwrap();
        let d = det.detect(&img).unwrap();
        // A second size reuses every size-independent variant.
        det.detect(&image(100, 77, "pipeline_cache_reuse_b"))
            .unwrap();
        (bits(&d.detections), g.pipeline_count(), g.pipeline_stats())
    };

    // First run: no file yet; the cache is filled and saved.
    let a = gpu_with(PipelineCacheSetting::Dir(dir.clone()));
    if !cache_supported(&a) {
        return;
    }
    let r = a.pipeline_cache_report();
    assert_eq!((r.loaded_bytes, r.warning.as_deref()), (0, None), "{r:?}");
    let (dets_a, count_a, stats_a) = run(&a);
    assert!(!dets_a.is_empty());
    eprintln!("first run: {stats_a}");
    assert_eq!(stats_a.created, count_a, "each variant compiled once");
    assert!(stats_a.reused > 0, "layers of one shape share a variant");
    let path = a.save_pipeline_cache().unwrap().expect("a cache file");
    assert_eq!(files_in(&dir), vec![path.clone()]);
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.starts_with(b"MARROWPC"));
    assert_eq!(
        a.save_pipeline_cache(),
        Ok(None),
        "unchanged data is not written again"
    );
    drop(a);

    // Second run: the file is loaded, and nothing about the results changes.
    let b = gpu_with(PipelineCacheSetting::Dir(dir.clone()));
    let r = b.pipeline_cache_report();
    assert!(r.enabled && r.warning.is_none(), "{r:?}");
    assert_eq!(r.path.as_deref(), Some(path.as_path()));
    assert_eq!(r.loaded_bytes as usize + 84, bytes.len(), "{r:?}");
    let (dets_b, count_b, stats_b) = run(&b);
    eprintln!("second run: {stats_b}");
    assert_eq!(
        dets_b, dets_a,
        "results differ with the pipeline cache loaded"
    );
    assert_eq!(count_b, count_a);
    assert_eq!(stats_b.created, stats_a.created);
    drop(b);

    // Without any cache: the same again.
    let c = gpu_with(PipelineCacheSetting::Off);
    assert!(!c.pipeline_cache_report().enabled);
    let (dets_c, count_c, _) = run(&c);
    assert_eq!(dets_c, dets_a, "results differ without the pipeline cache");
    assert_eq!(count_c, count_a);
    assert_eq!(c.save_pipeline_cache(), Ok(None));
}

#[test]
fn corrupt_cache_files_are_ignored_with_a_warning() {
    let dir = temp_dir("corrupt");
    let g = gpu_with(PipelineCacheSetting::Dir(dir.clone()));
    if !cache_supported(&g) {
        return;
    }
    compile_one(&g);
    let path = g.save_pipeline_cache().unwrap().expect("a cache file");
    drop(g);
    let good = std::fs::read(&path).unwrap();

    // The driver data inside a valid envelope, with a wgpu header for another device: wgpu
    // refuses it even with fallback (an "avoidable" mismatch), which must not become an error.
    let other_device = {
        let mut payload = good[84..].to_vec();
        payload[17] ^= 0x55; // wgpu header: adapter key (vendor / device)
        let mut f = good[..84].to_vec();
        f[52..84].copy_from_slice(&sha2_digest(&payload));
        f.extend_from_slice(&payload);
        f
    };
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let mut other_key = good.clone();
    other_key[20] ^= 1;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"not a cache at all, just text".to_vec(),
            "header",
        ),
        ("empty", Vec::new(), "header"),
        (
            "bad magic",
            [&b"XXXXXXXX"[..], &good[8..]].concat(),
            "magic",
        ),
        ("truncated", good[..good.len() - 7].to_vec(), "truncated"),
        ("extended", [&good[..], &b"tail"[..]].concat(), "extended"),
        ("bit flip", flipped, "checksum"),
        ("other key", other_key, "another marrow"),
        ("other device", other_device, "rejected"),
    ];
    for (what, bytes, why) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let g = gpu_with(PipelineCacheSetting::Dir(dir.clone()));
        let r = g.pipeline_cache_report();
        let w = r.warning.clone().unwrap_or_default();
        assert!(r.enabled, "{what}: {r:?}");
        assert!(
            w.contains("ignoring the pipeline cache") && w.contains(why),
            "{what}: warning {w:?}"
        );
        assert_eq!(r.loaded_bytes, 0, "{what}");
        // Compiling and running still work, and the stats line carries the warning.
        compile_one(&g);
        assert!(g.pipeline_stats().to_string().contains("warning"), "{what}");
        // The next save replaces the bad file with a good one.
        assert_eq!(g.save_pipeline_cache(), Ok(Some(path.clone())), "{what}");
        drop(g);
        let g = gpu_with(PipelineCacheSetting::Dir(dir.clone()));
        let r = g.pipeline_cache_report();
        assert!(
            r.warning.is_none() && r.loaded_bytes > 0,
            "{what}: not repaired: {r:?}"
        );
    }
    assert_eq!(files_in(&dir), vec![path], "no temporary files left behind");
}

fn sha2_digest(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

#[test]
fn stale_cache_files_are_removed_and_unwritable_folders_only_warn() {
    let dir = temp_dir("stale");
    let g = gpu_with(PipelineCacheSetting::Dir(dir.clone()));
    if !cache_supported(&g) {
        return;
    }
    let path = g.pipeline_cache_report().path.unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    // An older marrow's file for the same adapter, and an unrelated one.
    let (stem, _) = name.rsplit_once('-').unwrap();
    let stale = dir.join(format!("{stem}-0000000000000000.bin"));
    let unrelated = dir.join("notes.txt");
    std::fs::write(&stale, b"old").unwrap();
    std::fs::write(&unrelated, b"keep").unwrap();
    compile_one(&g);
    assert_eq!(g.save_pipeline_cache(), Ok(Some(path.clone())));
    assert_eq!(files_in(&dir), vec![path, unrelated]);

    // A cache folder that cannot be created: a warning from save, never an error elsewhere.
    let blocker = dir.join("file-not-dir");
    std::fs::write(&blocker, b"").unwrap();
    let g = gpu_with(PipelineCacheSetting::Dir(blocker.join("sub")));
    compile_one(&g);
    let e = g.save_pipeline_cache().unwrap_err();
    assert!(e.contains("could not write the pipeline cache"), "{e}");
    assert!(g.pipeline_cache_report().warning.is_some());
}

#[test]
fn prepared_pipelines_are_compiled_once() {
    let g = gpu_with(PipelineCacheSetting::Off);
    let v = |k: usize, s: usize| {
        MaxPool2d {
            ksize: k,
            stride: s,
            pad: 0,
        }
        .variant()
    };
    let variants = vec![v(2, 2), v(2, 3), v(2, 2), v(4, 1), v(2, 3)];
    assert_eq!(g.prepare_pipelines(&variants, 2).unwrap(), 3);
    assert_eq!(g.pipeline_count(), 3);
    assert_eq!(g.prepare_pipelines(&variants, 2).unwrap(), 0);
    let (k, c) = v(4, 1);
    g.pipeline(&k, &c).unwrap();
    let st = g.pipeline_stats();
    assert_eq!((st.created, g.pipeline_count(), st.reused), (3, 3, 1));
    assert_eq!(st.per_kernel.len(), 1);
}

/// torchvision's ResNet-18-FPN Faster R-CNN tensor list (FPN width `f`, box head `r`, `c`
/// classes with background), for a seeded detector of the other body.
fn resnet18_spec(f: usize, r: usize, c: usize) -> marrow::seedgen::SeedSpec {
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let bn = |t: &mut Vec<(String, Vec<usize>)>, name: &str, n: usize| {
        for p in ["weight", "bias", "running_mean", "running_var"] {
            t.push((format!("{name}.{p}"), vec![n]));
        }
    };
    t.push(("backbone.body.conv1.weight".into(), vec![64, 3, 7, 7]));
    bn(&mut t, "backbone.body.bn1", 64);
    let mut cin = 64;
    for l in 1..=4 {
        let ch = 64 << (l - 1);
        for b in 0..2 {
            let p = format!("backbone.body.layer{l}.{b}");
            let i = if b == 0 { cin } else { ch };
            t.push((format!("{p}.conv1.weight"), vec![ch, i, 3, 3]));
            bn(&mut t, &format!("{p}.bn1"), ch);
            t.push((format!("{p}.conv2.weight"), vec![ch, ch, 3, 3]));
            bn(&mut t, &format!("{p}.bn2"), ch);
            if b == 0 && l > 1 {
                t.push((format!("{p}.downsample.0.weight"), vec![ch, i, 1, 1]));
                bn(&mut t, &format!("{p}.downsample.1"), ch);
            }
        }
        cin = ch;
    }
    let conv = |t: &mut Vec<(String, Vec<usize>)>, name: &str, shape: Vec<usize>| {
        t.push((format!("{name}.bias"), vec![shape[0]]));
        t.push((format!("{name}.weight"), shape));
    };
    for (i, ch) in [64, 128, 256, 512].into_iter().enumerate() {
        conv(
            &mut t,
            &format!("backbone.fpn.inner_blocks.{i}.0"),
            vec![f, ch, 1, 1],
        );
        conv(
            &mut t,
            &format!("backbone.fpn.layer_blocks.{i}.0"),
            vec![f, f, 3, 3],
        );
    }
    conv(&mut t, "rpn.head.conv.0.0", vec![f, f, 3, 3]);
    conv(&mut t, "rpn.head.cls_logits", vec![3, f, 1, 1]);
    conv(&mut t, "rpn.head.bbox_pred", vec![12, f, 1, 1]);
    conv(&mut t, "roi_heads.box_head.fc6", vec![r, f * 49]);
    conv(&mut t, "roi_heads.box_head.fc7", vec![r, r]);
    conv(&mut t, "roi_heads.box_predictor.cls_score", vec![c, r]);
    conv(&mut t, "roi_heads.box_predictor.bbox_pred", vec![4 * c, r]);
    marrow::seedgen::SeedSpec {
        version: 1,
        seed: 20261201,
        scales: [
            ("backbone.body.".to_string(), 0.8f32),
            ("rpn.head.bbox_pred.".to_string(), 0.07),
            ("roi_heads.box_predictor.".to_string(), 0.1),
        ]
        .into_iter()
        .collect(),
        tensors: t,
    }
}

/// Pipelines a detector compiles for one input size, per backbone (no run needed: the plan
/// creates every pipeline it dispatches).
#[test]
#[ignore = "measurement: prints the pipeline variants of ResNet-50 and ResNet-18 detectors"]
fn variants_per_backbone() {
    let r50 = seeded_model().weights;
    let mut cfg = r50.config.clone();
    cfg.backbone = Some("resnet18".into());
    let r18 = marrow::model::weights::WeightStore::from_seed_spec(
        &resnet18_spec(128, 256, 4),
        cfg,
        "seedgen(resnet18-fpn128)",
    )
    .unwrap();
    for (name, ws) in [("resnet50-fpn64", r50), ("resnet18-fpn128", r18)] {
        let g = gpu_with(PipelineCacheSetting::Off);
        let mut det = Detector::new(&g, ws).unwrap();
        let n = det.timed_stages(480, 640).unwrap().len();
        let st = g.pipeline_stats();
        eprintln!(
            "{name}: {n} dispatches, {} distinct pipelines ({} requests answered from the map)",
            st.created, st.reused
        );
        for (k, c, s) in &st.per_kernel {
            eprintln!("  {k:28} {c:4} variants {s:8.3} s");
        }
        let img = image(480, 640, "variants_per_backbone");
        let t = Instant::now();
        let d = det.detect(&img).unwrap();
        eprintln!(
            "  first detect {:.2} s ({} detections)",
            t.elapsed().as_secs_f64(),
            d.detections.len()
        );
    }
}
