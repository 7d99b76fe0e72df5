//! The counting application: tiling merges, the Counter against the detector it wraps, and
//! `marrow count` / `marrow merge` end to end (outputs, exit codes, shards).
//!
//! The GPU runs use the seeded random model (`tests/fixtures/seeded_model.safetensors`, ResNet-50
//! FPN 64 at min_size 160): its detections are meaningless but deterministic, which is what
//! consistency checks need. Real-model parity with torchvision is in `tests/default_model.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use marrow::count::document::{ImageEntry, Report};
use marrow::count::tiling::{self, Field};
use marrow::count::{merge_fields, CountOptions, Counter, Model, Tiling};
use marrow::image_io::Rgb8;
use marrow::model::detector::Detector;
use marrow::validate::matching::iou;

const SEEDED: &str = "tests/fixtures/seeded_model.safetensors";

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("marrow-count-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Simulated fields: every field "detects" each cell it overlaps, its box jittered by a few
/// pixels (independently per field, as two fields estimate a border cell independently) and cut
/// at the field's edges for cells it sees only in part. The merge must return each cell once.
#[test]
fn tiled_merge_counts_each_simulated_cell_once() {
    let mut rng = common::Rng::for_test("tiled_merge");
    for trial in 0..6 {
        let (w, h) = (rng.range(900, 2600) as u32, rng.range(700, 2000) as u32);
        let field = rng.pick(&[384u32, 512, 640]);
        let overlap = tiling::default_overlap(field);
        let fields: Vec<Field> = tiling::fields(w, h, field, overlap).unwrap();
        // Non-overlapping cells of up to overlap/2 px, many of them on field boundaries.
        let mut cells: Vec<([f32; 4], usize)> = Vec::new();
        let max_cell = (overlap / 2) as usize;
        for _ in 0..4000 {
            if cells.len() >= 150 {
                break;
            }
            let s = rng.range(12, max_cell) as f32;
            let x = rng.uniform() * (w as f32 - s);
            let y = rng.uniform() * (h as f32 - s);
            let b = [x, y, x + s, y + s];
            if cells.iter().all(|(c, _)| iou(c, &b) == 0.0) {
                cells.push((b, 1 + rng.range(0, 3)));
            }
        }
        let per_field: Vec<Vec<(usize, [f32; 4], f32)>> = fields
            .iter()
            .map(|f| {
                let (fx, fy) = (f.x0 as f32, f.y0 as f32);
                let (fw, fh) = (f.width as f32, f.height as f32);
                cells
                    .iter()
                    .filter_map(|(c, label)| {
                        // Two estimates of one cell differ by up to 5 % of its size (≤ 6 px).
                        let amp = (0.05 * (c[2] - c[0])).min(3.0);
                        let mut j = || (rng.uniform() - 0.5) * 2.0 * amp;
                        let b = [
                            c[0] - fx + j(),
                            c[1] - fy + j(),
                            c[2] - fx + j(),
                            c[3] - fy + j(),
                        ];
                        let cut = [b[0].max(0.0), b[1].max(0.0), b[2].min(fw), b[3].min(fh)];
                        (cut[2] - cut[0] > 2.0 && cut[3] - cut[1] > 2.0)
                            .then(|| (*label, cut, 0.5 + 0.5 * rng.uniform()))
                    })
                    .collect()
            })
            .collect();
        let merged = merge_fields(&fields, &per_field, overlap as f32 / 4.0, 0.5);
        assert_eq!(
            merged.len(),
            cells.len(),
            "trial {trial}: {w}x{h}, field {field}: {} detections for {} cells",
            merged.len(),
            cells.len()
        );
        for (c, label) in &cells {
            let hits: Vec<_> = merged.iter().filter(|(_, b, _)| iou(b, c) > 0.5).collect();
            assert_eq!(
                hits.len(),
                1,
                "trial {trial}: cell {c:?} found {} times",
                hits.len()
            );
            assert_eq!(hits[0].0, *label, "class kept");
        }
    }
}

fn example_images() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("examples/txl-pbc/images")
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// A small real field (a crop of a bundled example), so lavapipe runs stay short.
fn small_field(src: &Path, x0: u32, y0: u32, size: u32) -> Rgb8 {
    let img = marrow::image_io::load_rgb8(src).unwrap();
    let (w, h) = (size.min(img.width - x0), size.min(img.height - y0));
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in y0..y0 + h {
        let row = ((y * img.width + x0) * 3) as usize;
        data.extend_from_slice(&img.data[row..row + (w * 3) as usize]);
    }
    Rgb8 {
        width: w,
        height: h,
        data,
    }
}

fn save_png(img: &Rgb8, path: &Path) {
    image::save_buffer(
        path,
        &img.data,
        img.width,
        img.height,
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
}

/// The Counter's untiled result is the detector's own output with the threshold applied; the
/// tiled result is exactly `merge_fields` of the detector run on each field.
#[test]
fn counter_matches_the_detector_untiled_and_tiled() {
    let g = common::gpu();
    let img = small_field(&example_images()[0], 0, 0, 400);
    let model = Model::open(Path::new(SEEDED)).unwrap();
    let weights = model.weights.clone();
    let mut counter = Counter::new(
        g,
        model,
        CountOptions {
            threshold: 0.1,
            tiling: Tiling::Off,
            overlap: None,
            refine: true,
        },
    )
    .unwrap();
    let mut det = Detector::new(g, weights).unwrap();

    let whole = counter.count("field", &img).unwrap();
    let want = det.detect(&img.to_f32()).unwrap().detections;
    assert!(
        !want.is_empty(),
        "the seeded model detects something at 0.05"
    );
    assert_eq!(whole.detections.len(), want.len());
    for (c, d) in whole.detections.iter().zip(&want) {
        assert_eq!((c.label, c.bbox, c.score), (d.label, d.bbox, d.score));
        assert_eq!(c.counted, d.score >= 0.1);
        assert_eq!(c.class, counter.model.classes[d.label - 1]);
    }
    let counted: usize = whole.counts.values().sum();
    assert_eq!(counted, want.iter().filter(|d| d.score >= 0.1).count());
    assert_eq!(whole.total, counted);
    assert!(whole.tiles.is_none());

    counter.opts.tiling = Tiling::Size(256);
    let tiled = counter.count("field", &img).unwrap();
    let info = tiled
        .tiles
        .clone()
        .expect("a 400 px image in 256 px fields is cut");
    let fields = tiling::fields(img.width, img.height, 256, info.overlap).unwrap();
    assert_eq!(info.fields, fields.len());
    let per_field: Vec<_> = fields
        .iter()
        .map(|f| {
            let crop = marrow::count::crop_f32(&img, f.x0, f.y0, f.width, f.height);
            det.detect(&crop)
                .unwrap()
                .detections
                .into_iter()
                .map(|d| (d.label, d.bbox, d.score))
                .collect::<Vec<_>>()
        })
        .collect();
    let merged = merge_fields(&fields, &per_field, info.overlap as f32 / 4.0, 0.5);
    assert_eq!(tiled.detections.len(), merged.len());
    for (c, (l, b, s)) in tiled.detections.iter().zip(&merged) {
        assert_eq!((c.label, c.bbox, c.score), (*l, *b, *s));
        assert!(
            b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= img.width as f32 && b[3] <= img.height as f32
        );
    }
}

fn marrow_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_marrow"));
    c.env_remove("MARROW_WEIGHTS");
    c
}

/// `marrow count` over a folder with two real fields and one corrupt file: exit code 1, the
/// corrupt file reported and the rest counted; every output format written and consistent with
/// the JSON report; two shards merged equal the unsharded run.
#[test]
fn count_cli_outputs_failures_shards_and_merge() {
    let dir = tmp_dir("cli");
    let inputs = dir.join("fields");
    std::fs::create_dir_all(inputs.join("sub")).unwrap();
    let ex = example_images();
    save_png(&small_field(&ex[0], 100, 60, 224), &inputs.join("a.png"));
    save_png(&small_field(&ex[3], 0, 0, 200), &inputs.join("sub/b.png"));
    std::fs::write(inputs.join("c.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    std::fs::write(
        inputs.join("notes.txt"),
        b"not an image, skipped by the folder walk",
    )
    .unwrap();
    let out = dir.join("out");
    let run = |extra: &[&str]| {
        marrow_cmd()
            .args([
                "count",
                "--weights",
                SEEDED,
                "--threshold",
                "0.1",
                "--quiet",
            ])
            .arg(&inputs)
            .args(extra)
            .output()
            .unwrap()
    };
    let json = out.join("all.json");
    let o = run(&[
        "--json",
        json.to_str().unwrap(),
        "--csv",
        out.join("all.csv").to_str().unwrap(),
        "--coco",
        out.join("coco.json").to_str().unwrap(),
        "--geojson",
        out.join("geo").to_str().unwrap(),
        "--annotate",
        out.join("ann").to_str().unwrap(),
        "--target",
        "500",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(1),
        "one file failed: {stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("FAILED") && stdout.contains("c.jpg"),
        "{stdout}"
    );
    assert!(stdout.contains("fewer than the target of 500"), "{stdout}");

    let rep = Report::read(&json).unwrap();
    let files: Vec<&str> = rep.images.iter().map(|e| e.file()).collect();
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(
        files[0].ends_with("a.png")
            && files[1].ends_with("c.jpg")
            && files[2].ends_with("sub/b.png"),
        "sorted walk: {files:?}"
    );
    match &rep.images[1] {
        ImageEntry::Failed { error, .. } => assert!(error.contains("c.jpg"), "{error}"),
        e => panic!("c.jpg should have failed: {e:?}"),
    }
    assert_eq!(
        (rep.summary.counted_images, rep.summary.failed_images),
        (2, 1)
    );
    let p = &rep.provenance;
    assert!(p.notice.contains("research use only"));
    assert_eq!(
        p.model.sha256,
        marrow::count::sha256_hex(&std::fs::read(SEEDED).unwrap())
    );
    assert_eq!(p.threshold, 0.1);
    let counted: Vec<_> = rep.images.iter().filter_map(|e| e.counted()).collect();
    let total: usize = counted.iter().map(|c| c.total).sum();
    assert_eq!(rep.summary.total, total);
    assert_eq!(rep.summary.target_reached, Some(false));
    for c in &counted {
        assert_eq!(c.total, c.detections.iter().filter(|d| d.counted).count());
        assert!(c.detections.windows(2).all(|w| w[0].score >= w[1].score));
    }

    // COCO: every detection, counted or not.
    let coco: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("coco.json")).unwrap()).unwrap();
    assert_eq!(
        coco.len(),
        counted.iter().map(|c| c.detections.len()).sum::<usize>()
    );
    // CSV: header + 3 images + TOTAL.
    let csv = std::fs::read_to_string(out.join("all.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    // GeoJSON and annotated images: one per counted image.
    for (d, ext) in [("geo", ".geojson"), ("ann", ".annotated.png")] {
        let mut names: Vec<String> = std::fs::read_dir(out.join(d))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![format!("a{ext}"), format!("b{ext}")], "{d}");
    }

    // Two shards, merged, equal the unsharded run (images, counts, detections, summary).
    let s0 = out.join("s0.json");
    let s1 = out.join("s1.json");
    // Shard 0/2 takes inputs 0 and 2 (a.png, sub/b.png), shard 1/2 input 1 (the broken c.jpg).
    assert_eq!(
        run(&[
            "--shard",
            "0/2",
            "--target",
            "500",
            "--json",
            s0.to_str().unwrap()
        ])
        .status
        .code(),
        Some(0)
    );
    assert_eq!(
        run(&[
            "--shard",
            "1/2",
            "--target",
            "500",
            "--json",
            s1.to_str().unwrap()
        ])
        .status
        .code(),
        Some(1)
    );
    let merged = out.join("merged.json");
    let o = marrow_cmd()
        .args(["merge", s0.to_str().unwrap(), s1.to_str().unwrap(), "--out"])
        .arg(&merged)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "merged report still has the failed file"
    );
    let m = Report::read(&merged).unwrap();
    assert_eq!(m.images, rep.images);
    assert_eq!(m.summary, rep.summary);
    // A missing shard is refused unless --allow-partial.
    let o = marrow_cmd()
        .args(["merge", s0.to_str().unwrap(), "--out"])
        .arg(out.join("p.json"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("in no report"));
}

/// Usage and fatal errors exit 2 before any GPU work and name the file.
#[test]
fn count_cli_usage_errors_exit_2_naming_the_problem() {
    let dir = tmp_dir("usage");
    let img = dir.join("a.png");
    save_png(&small_field(&example_images()[0], 0, 0, 64), &img);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--weights".into(),
                dir.join("missing.safetensors").display().to_string(),
            ],
            "missing.safetensors",
        ),
        (
            vec![
                "--weights".into(),
                SEEDED.into(),
                "--json".into(),
                "/proc/marrow/x.json".into(),
            ],
            "/proc/marrow/x.json",
        ),
        (
            vec![
                "--weights".into(),
                SEEDED.into(),
                "--annotate".into(),
                "/proc/marrow-ann".into(),
            ],
            "/proc/marrow-ann",
        ),
        (
            vec![
                "--weights".into(),
                SEEDED.into(),
                "--threshold".into(),
                "1.5".into(),
            ],
            "threshold",
        ),
        (
            vec![
                "--weights".into(),
                SEEDED.into(),
                "--shard".into(),
                "2/2".into(),
            ],
            "--shard",
        ),
        (
            vec![
                "--weights".into(),
                SEEDED.into(),
                "--tile".into(),
                "8".into(),
            ],
            "--tile",
        ),
    ];
    for (args, needle) in cases {
        let o = marrow_cmd()
            .arg("count")
            .arg(&img)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let o = marrow_cmd()
        .args(["count"])
        .arg(dir.join("nowhere"))
        .args(["--weights", SEEDED])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nowhere"));
}

/// The bad-input corpus as one batch: every file that decodes is counted, every other one is
/// reported with an error naming it, and the run goes on to the end (exit code 1).
#[test]
fn a_batch_of_bad_inputs_counts_everything_else() {
    let dir = tmp_dir("corpus");
    let json = dir.join("report.json");
    let corpus = Path::new("tests/bad_inputs/images");
    let o = marrow_cmd()
        .args([
            "count",
            "--weights",
            SEEDED,
            "--quiet",
            "--tile",
            "off",
            "--json",
        ])
        .arg(&json)
        .arg(corpus)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let rep = Report::read(&json).unwrap();
    let files = marrow::count::batch::collect_inputs(&[corpus.to_path_buf()]).unwrap();
    assert_eq!(rep.images.len(), files.len());
    let (mut good, mut bad) = (0, 0);
    for (e, f) in rep.images.iter().zip(&files) {
        assert_eq!(e.file(), f.display().to_string());
        match (marrow::image_io::load_rgb8(f), e) {
            (Ok(img), ImageEntry::Counted(c)) => {
                assert_eq!((c.width, c.height), (img.width, img.height));
                good += 1;
            }
            (Err(_), ImageEntry::Failed { error, .. }) => {
                let name = f.file_name().unwrap().to_string_lossy();
                assert!(error.contains(name.as_ref()), "{error}");
                bad += 1;
            }
            (d, e) => panic!("{}: decode {:?} but report {e:?}", f.display(), d.err()),
        }
    }
    assert!(good >= 5 && bad >= 10, "{good} good, {bad} bad");
}

/// `marrow model` describes a file from its tensors and config without touching a GPU (an
/// adapter that does not exist is not an error here), in JSON and text; a file that is not a
/// model is an error naming it.
#[test]
fn model_cli_describes_a_file_without_a_gpu() {
    let out = marrow_cmd()
        .args([
            "--adapter",
            "no-such-adapter",
            "model",
            "--json",
            "--weights",
        ])
        .arg(SEEDED)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes = std::fs::read(SEEDED).unwrap();
    assert_eq!(d["sha256"], marrow::count::sha256_hex(&bytes));
    assert_eq!(d["classes"], serde_json::json!(["WBC", "RBC", "platelet"]));
    assert_eq!(d["backbone"], "resnet50");
    assert_eq!(d["fpn_width"], 64);
    assert_eq!(d["representation_size"], 1024);
    assert_eq!(d["anchors_per_location"], 3);
    assert_eq!(d["config"]["transform"]["min_size"], 160);
    assert_eq!(
        d["config"]["rpn"]["anchor_sizes"],
        serde_json::json!([32.0, 64.0, 128.0, 256.0, 512.0])
    );
    // Tensor and parameter counts are those of the seed spec the file carries (its metadata,
    // independent of the weight store that `describe` reads).
    let dump = marrow::validate::RefDump::open(Path::new(SEEDED)).unwrap();
    let spec =
        marrow::seedgen::SeedSpec::from_json(&dump.metadata[marrow::seedgen::SEEDGEN_KEY]).unwrap();
    assert_eq!(d["tensors"], spec.tensors.len());
    assert_eq!(
        d["parameters"],
        spec.tensors
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>()
    );

    let out = marrow_cmd()
        .args(["model", "--weights", SEEDED])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "resnet50 + FPN 64, box head 1024",
        "aspect ratios 0.5 / 1 / 2 (3 per location)",
        "short side 160 (long side ≤ 700)",
        "classes         WBC, RBC, platelet",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }

    let out = marrow_cmd()
        .args(["model", "--weights", "README.md"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("README.md"), "{err}");
}
