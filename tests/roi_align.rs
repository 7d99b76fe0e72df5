//! MultiScaleRoIAlign: the CPU reference against torchvision itself (tests/fixtures/
//! roi_align_cases.safetensors, made by weights/make_roi_align_fixture.py), then the WGSL kernel
//! against the CPU reference on fresh random level sizes, channel counts, boxes and counts.

mod common;

use std::path::PathBuf;

use common::{gpu, Rng};
use marrow::cpu::roi_align as cref;
use marrow::cpu::{diff, nchw_to_nhwc};
use marrow::gpu::{Nhwc, Tensor};
use marrow::ops::roi_align::{self as op, MultiScaleRoiAlign};
use marrow::validate::RefDump;

fn fixture() -> RefDump {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/roi_align_cases.safetensors");
    RefDump::open(&p).expect("roi_align fixture (python3 weights/make_roi_align_fixture.py)")
}

fn i64s<'a>(d: &'a RefDump, name: &str) -> &'a [i64] {
    d.tensors[name].i64().expect("i64 tensor")
}

fn boxes_of(v: &[f32]) -> Vec<[f32; 4]> {
    v.chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect()
}

fn next_up(x: f32) -> f32 {
    f32::from_bits(x.to_bits() + 1)
}
fn next_down(x: f32) -> f32 {
    f32::from_bits(x.to_bits() - 1)
}

#[test]
fn level_mapper_matches_torchvision() {
    let d = fixture();
    let (_, thr) = d.f32("levels.thresholds", 1).unwrap();
    let ours = op::level_thresholds(2);
    for i in 0..3 {
        assert_eq!(
            ours[i].to_bits(),
            thr[i].to_bits(),
            "threshold {i}: ours {} torch {}",
            ours[i],
            thr[i]
        );
    }
    let (_, b) = d.f32("levels.boxes", 2).unwrap();
    let ids = i64s(&d, "levels.ids");
    let mut n_edge = 0;
    for (k, b) in boxes_of(b).into_iter().enumerate() {
        // torch's NaN level is a garbage int64 that matches no level.
        let want = (0..4).contains(&ids[k]).then_some(ids[k] as usize);
        assert_eq!(
            cref::level_of(b),
            want,
            "box {k} {b:?} (area {})",
            cref::box_area(b)
        );
        assert_eq!(
            cref::level_from_thresholds(cref::box_area(b), &ours),
            want,
            "thresholds, box {k} {b:?}"
        );
        n_edge += usize::from(thr.iter().any(|&t| (cref::box_area(b) - t).abs() < 0.1));
    }
    eprintln!(
        "{} boxes, {n_edge} within 0.1 px² of a threshold: all levels equal torchvision's",
        ids.len()
    );
    // The IEEE f32 formula agrees with torch's thresholds around each of them except at the one
    // area where torch's MKL sqrt is off by an ulp (documented in cpu::roi_align::mapper_level).
    let formula = op::formula_thresholds(2);
    assert_eq!(formula[..2], ours[..2]);
    assert_eq!(formula[2].to_bits(), ours[2].to_bits() + 1);
    for &t in &ours {
        let mut a = t;
        for _ in 0..400 {
            a = next_down(a);
        }
        for _ in 0..800 {
            let f = cref::mapper_level(a, 2, 5);
            assert_eq!(f, cref::level_from_thresholds(a, &formula), "area {a}");
            if a != ours[2] {
                assert_eq!(f, cref::level_from_thresholds(a, &ours), "area {a}");
            }
            a = next_up(a);
        }
    }
}

fn check_close(what: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    let d = diff(got, want);
    assert_eq!(d.nonfinite, 0, "{what}: non-finite values");
    assert!(d.rel_max <= tol, "{what}: {d:?}");
    d.rel_max
}

#[test]
fn cpu_roi_align_matches_torchvision() {
    let d = fixture();
    let mut worst = 0f64;
    for i in 0.. {
        let Ok((xs, x)) = d.f32(&format!("ra{i}.input"), 4) else {
            assert!(i >= 6, "fixture has only {i} roi_align cases");
            break;
        };
        let (n, c, h, w) = (xs[0], xs[1], xs[2], xs[3]);
        let shape = Nhwc::new(n, h, w, c);
        let x = nchw_to_nhwc(x, n, c, h, w);
        let (_, rois) = d.f32(&format!("ra{i}.rois"), 2).unwrap();
        let (_, scale) = d.f32(&format!("ra{i}.scale"), 1).unwrap();
        let cfg = i64s(&d, &format!("ra{i}.cfg"));
        let (out, sr, aligned) = (cfg[0] as usize, cfg[1] as i32, cfg[2] != 0);
        let (_, want) = d.f32(&format!("ra{i}.out"), 4).unwrap();
        let mut got = Vec::new();
        for r in rois.chunks_exact(5) {
            let b = [r[1], r[2], r[3], r[4]];
            got.extend(cref::roi_align_nhwc(
                &x,
                shape,
                &[b],
                r[0] as usize,
                scale[0],
                out,
                sr,
                aligned,
            ));
        }
        let k = rois.len() / 5;
        let got = cref::pooled_to_torchvision(&got, k, out, c);
        let e = check_close(
            &format!("ra{i} (out {out}, sr {sr}, aligned {aligned})"),
            &got,
            want,
            1e-6,
        );
        eprintln!("ra{i}: {k} rois {shape} out {out} sr {sr} aligned {aligned}: rel {e:.2e}");
        worst = worst.max(e);
    }
    eprintln!("worst max|diff|/max|ref| vs torchvision: {worst:.2e}");
}

#[test]
fn cpu_multiscale_matches_torchvision() {
    let d = fixture();
    let sz = i64s(&d, "ms.image_size");
    let image = (sz[0] as usize, sz[1] as usize);
    let mut host = Vec::new();
    for l in 2..6 {
        let (s, x) = d.f32(&format!("ms.p{l}"), 4).unwrap();
        let shape = Nhwc::new(s[0], s[2], s[3], s[1]);
        host.push((nchw_to_nhwc(x, s[0], s[1], s[2], s[3]), shape));
    }
    let levels = [0, 1, 2, 3].map(|i| (host[i].0.as_slice(), host[i].1));
    let (_, b) = d.f32("ms.boxes", 2).unwrap();
    let boxes = boxes_of(b);
    let (_, want) = d.f32("ms.out", 4).unwrap();
    let c = host[0].1.c;
    let got = cref::multiscale_roi_align_nhwc(levels, image, &boxes, 0, 7, 2, false);
    let got = cref::pooled_to_torchvision(&got, boxes.len(), 7, c);
    let e = check_close("multiscale", &got, want, 1e-6);
    let mut per_level = [0usize; 4];
    for b in &boxes {
        if let Some(l) = cref::level_of(*b) {
            per_level[l] += 1;
        }
    }
    eprintln!(
        "multiscale: {} boxes, per level {per_level:?}: rel {e:.2e}",
        boxes.len()
    );
    assert!(
        per_level.iter().all(|&n| n > 0),
        "fixture should cover every level"
    );
}

/// Boxes in resized-image coordinates that stress every rule: proposal-like, outside, partly
/// outside, degenerate, sub-pixel, huge, negative, inverted, NaN, at the level thresholds (±ulps,
/// with exact areas), and sample points exactly on the -1 / H cuts and the H - 1 edge.
fn adversarial_boxes(
    rng: &mut Rng,
    h: f32,
    w: f32,
    level_hw: [(usize, usize); 4],
    n_random: usize,
) -> Vec<[f32; 4]> {
    let mut v = Vec::new();
    for _ in 0..n_random {
        let x1 = -0.2 * w + 1.3 * w * rng.uniform();
        let y1 = -0.2 * h + 1.3 * h * rng.uniform();
        let m = 1.5 * h.max(w);
        let bw = (0.05f32.ln() + (m / 0.05).ln() * rng.uniform()).exp();
        let bh = (0.05f32.ln() + (m / 0.05).ln() * rng.uniform()).exp();
        v.push([x1, y1, x1 + bw, y1 + bh]);
    }
    v.extend([
        [2.0 * w, 2.0 * h, 3.0 * w, 3.0 * h],
        [-3.0 * w, -3.0 * h, -2.0 * w, -2.0 * h],
        [-0.5 * w, -0.5 * h, 0.5 * w, 0.5 * h],
        [0.5 * w, 0.5 * h, 1.5 * w, 1.5 * h],
        [0.3 * w, 0.2 * h, 0.3 * w, 0.9 * h],
        [0.3 * w, 0.2 * h, 0.3 * w, 0.2 * h],
        [0.41 * w, 0.37 * h, 0.41 * w + 0.013, 0.37 * h + 0.007],
        [-10.0 * w, -10.0 * h, 10.0 * w, 10.0 * h],
        [0.0, 0.0, w, h],
        [0.7 * w, 0.6 * h, 0.2 * w, 0.1 * h],
        [0.7 * w, 0.6 * h, 0.2 * w, 0.9 * h],
        [-4.0, -3.0, -1.0, -0.5],
        [f32::NAN, 0.0, 10.0, 10.0],
    ]);
    // Exact areas at the thresholds: width 512 (a power of two), height area/512.
    for t in op::level_thresholds(2) {
        let mut a = t;
        for _ in 0..2 {
            a = next_down(a);
        }
        for _ in 0..5 {
            let x1 = rng.range(0, 8) as f32;
            v.push([x1, 0.0, x1 + 512.0, a / 512.0]);
            a = next_up(a);
        }
    }
    // sqrt(area) = 112, 224, 448 exactly and ±1 ulp.
    for s in [112f32, 224.0, 448.0] {
        for s in [next_down(s), s, next_up(s)] {
            v.push([0.0, 0.0, s, s]);
        }
    }
    // Samples exactly on the cuts of each level (aligned = false, sampling 2, output 7: a box 7
    // feature px tall gives bin 1 and samples at +0.25 / +0.75, all exact), and 1/64 px beyond.
    // The other side is chosen so that the area falls well inside that level's range.
    for (l, &(fh, fw)) in level_hw.iter().enumerate() {
        let inv = (4u32 << l) as f32;
        let target = [56f32, 158.0, 316.0, 632.0][l];
        let side = target * target / (7.0 * inv);
        for d in [0.0f32, 1.0 / 64.0, -1.0 / 64.0] {
            let st = fh as f32 - 6.75 + d;
            v.push([0.0, st * inv, side, (st + 7.0) * inv]);
            let st = fh as f32 - 7.25 + d; // a sample row exactly on y = H - 1
            v.push([0.0, st * inv, side, (st + 7.0) * inv]);
            let st = -1.25 - d;
            v.push([0.0, st * inv, side, (st + 7.0) * inv]);
            let st = fw as f32 - 6.75 + d;
            v.push([st * inv, 0.0, (st + 7.0) * inv, side]);
        }
    }
    v
}

struct Levels {
    image: (usize, usize),
    shapes: [Nhwc; 4],
    host: Vec<Vec<f32>>,
}

impl Levels {
    fn hw(&self) -> [(usize, usize); 4] {
        self.shapes.map(|s| (s.h, s.w))
    }
}

/// Random level sizes that torchvision's scale inference maps to 1/4 .. 1/32 (odd sizes allowed:
/// the padded sizes need not be multiples of 32 here).
fn random_levels(rng: &mut Rng, n: usize, c: usize) -> Levels {
    let pool = MultiScaleRoiAlign::box_head(1, c);
    loop {
        let (h, w) = (rng.range(70, 260), rng.range(40, 300));
        let mut hs = [h.div_ceil(4) + rng.range(0, 3), 0, 0, 0];
        let mut ws = [w.div_ceil(4) + rng.range(0, 3), 0, 0, 0];
        for l in 1..4 {
            hs[l] = hs[l - 1].div_ceil(2);
            ws[l] = ws[l - 1].div_ceil(2);
        }
        let shapes = [0, 1, 2, 3].map(|l| Nhwc::new(n, hs[l], ws[l], c));
        let g = gpu();
        let t: Vec<Tensor> = shapes
            .iter()
            .map(|&s| Tensor::new(g, "probe", Nhwc::new(s.n, s.h, s.w, s.c)).unwrap())
            .collect();
        if pool.scales([&t[0], &t[1], &t[2], &t[3]], (h, w)).is_err() {
            continue;
        }
        // Distinct magnitudes per level, so a wrong level can never pass the comparison.
        let host = (0..4)
            .map(|l| {
                rng.vec(shapes[l].len(), -1.0, 1.0)
                    .into_iter()
                    .map(|v| v + 3.0 * (l as f32 + 1.0))
                    .collect()
            })
            .collect();
        return Levels {
            image: (h, w),
            shapes,
            host,
        };
    }
}

struct Case {
    pool: MultiScaleRoiAlign,
    batch: usize,
    count: usize,
}

/// Runs the kernel and the CPU reference; returns max|diff|/max|ref| over the live rows.
fn run_case(lv: &Levels, boxes: &[[f32; 4]], case: &Case) -> f64 {
    let g = gpu();
    let pool = case.pool;
    let c = pool.channels;
    let levels: Vec<Tensor> = (0..4)
        .map(|l| Tensor::from_host(g, &format!("P{}", l + 2), lv.shapes[l], &lv.host[l]).unwrap())
        .collect();
    let mut bflat = vec![0f32; pool.capacity * 4];
    for (i, b) in boxes.iter().enumerate().take(pool.capacity) {
        bflat[i * 4..i * 4 + 4].copy_from_slice(b);
    }
    let bbuf = g.upload("boxes", &bflat).unwrap();
    let cbuf = g.upload("count", &[case.count as u32]).unwrap();
    // Sentinel-filled: rows at or beyond the count must stay untouched.
    let sentinel = 1234.5f32;
    let obuf = g
        .upload("pooled", &vec![sentinel; pool.out_len().max(1)])
        .unwrap();
    let d = pool
        .encode(
            g,
            "roi_align under test",
            [&levels[0], &levels[1], &levels[2], &levels[3]],
            lv.image,
            case.batch,
            &bbuf,
            &cbuf,
            &obuf,
        )
        .unwrap();
    g.run("roi_align test", [&d]).unwrap();
    let got = g.read_back(&obuf, pool.out_len()).unwrap();

    let live = case.count.min(pool.capacity);
    let hl: [(&[f32], Nhwc); 4] = [0, 1, 2, 3].map(|l| (lv.host[l].as_slice(), lv.shapes[l]));
    let want = cref::multiscale_roi_align_nhwc(
        hl,
        lv.image,
        &boxes[..live],
        case.batch,
        pool.output,
        pool.sampling_ratio,
        pool.aligned,
    );
    let row = pool.output * pool.output * c;
    assert!(
        got[live * row..].iter().all(|&v| v == sentinel),
        "rows beyond the count were written"
    );
    // Per row, so that one wrong level or flipped sample cannot hide behind a large other row.
    let mut worst = 0f64;
    let whole = diff(&got[..live * row], &want);
    assert_eq!(whole.nonfinite, 0);
    for r in 0..live {
        let dr = diff(&got[r * row..(r + 1) * row], &want[r * row..(r + 1) * row]);
        let e = dr.max_abs / whole.max_ref.max(1e-30);
        assert!(
            e <= 1e-5,
            "row {r} box {:?} (level {:?}): max_abs {:.3e}, max|ref| {:.3e}",
            boxes[r],
            cref::level_of(boxes[r]),
            dr.max_abs,
            whole.max_ref
        );
        worst = worst.max(e);
    }
    worst
}

#[test]
fn gpu_multiscale_random_against_cpu() {
    let mut rng = Rng::for_test("gpu_multiscale_random_against_cpu");
    let mut worst = 0f64;
    for case in 0..10 {
        let c = rng.pick(&[1usize, 2, 3, 5, 7, 9, 13, 4]);
        let n = rng.range(1, 2);
        let lv = random_levels(&mut rng, n, c);
        let mut boxes =
            adversarial_boxes(&mut rng, lv.image.0 as f32, lv.image.1 as f32, lv.hw(), 12);
        // shuffle so that every kind of box meets every count
        for i in (1..boxes.len()).rev() {
            let j = rng.range(0, i);
            boxes.swap(i, j);
        }
        let (output, sampling_ratio, aligned) = match case {
            0 | 1 => (7, 2, false),
            2 => (7, 2, true),
            3 => (7, 0, false),
            4 => (7, 0, true),
            5 => (5, 3, false),
            _ => (7, rng.pick(&[2, 2, 1, 0, -1]), rng.range(0, 1) == 1),
        };
        let capacity = boxes.len();
        let count = match case % 4 {
            0 => capacity,
            1 => rng.range(1, capacity),
            2 => 1,
            _ => capacity + 5, // over capacity: clamped
        };
        let pool = MultiScaleRoiAlign {
            output,
            sampling_ratio,
            aligned,
            capacity,
            channels: c,
        };
        let batch = rng.range(0, n - 1);
        let e = run_case(&lv, &boxes, &Case { pool, batch, count });
        eprintln!(
            "case {case}: image {:?} P2 {} batch {batch} out {output} sr {sampling_ratio} aligned {aligned} \
             count {count}/{capacity}: rel {e:.2e}",
            lv.image, lv.shapes[0]
        );
        worst = worst.max(e);
    }
    eprintln!("worst GPU vs CPU: {worst:.2e} of max|ref|");
}

#[test]
fn gpu_level_assignment_at_thresholds() {
    // A 512×512 image (P5 16×16): boxes 512 wide with exact areas at every threshold ±8 ulps, all
    // inside the maps, over level features of different magnitude (3, 6, 9, 12 ± 1).
    let mut rng = Rng::for_test("gpu_level_assignment_at_thresholds");
    let c = 3;
    let shapes = [128usize, 64, 32, 16].map(|s| Nhwc::new(1, s, s, c));
    let host = (0..4)
        .map(|l| {
            rng.vec(shapes[l].len(), -1.0, 1.0)
                .into_iter()
                .map(|v| v + 3.0 * (l as f32 + 1.0))
                .collect()
        })
        .collect();
    let lv = Levels {
        image: (512, 512),
        shapes,
        host,
    };
    let mut boxes = Vec::new();
    let mut want_levels = Vec::new();
    for t in op::level_thresholds(2) {
        let mut a = t;
        for _ in 0..8 {
            a = next_down(a);
        }
        for _ in 0..17 {
            let b = [0.0, 0.0, 512.0, a / 512.0];
            assert_eq!(cref::box_area(b), a);
            want_levels.push(cref::level_of(b).unwrap());
            boxes.push(b);
            a = next_up(a);
        }
    }
    // Each run of 17 crosses exactly one level boundary in the middle.
    for run in want_levels.chunks(17) {
        assert_eq!(run[7] + 1, run[8], "levels {run:?}");
    }
    let pool = MultiScaleRoiAlign::box_head(boxes.len(), c);
    let e = run_case(
        &lv,
        &boxes,
        &Case {
            pool,
            batch: 0,
            count: boxes.len(),
        },
    );
    eprintln!("{} threshold boxes: levels exact, rel {e:.2e}", boxes.len());
}

#[test]
fn gpu_count_zero_writes_nothing() {
    let mut rng = Rng::for_test("gpu_count_zero_writes_nothing");
    let lv = random_levels(&mut rng, 1, 6);
    let boxes = adversarial_boxes(&mut rng, lv.image.0 as f32, lv.image.1 as f32, lv.hw(), 4);
    let pool = MultiScaleRoiAlign::box_head(boxes.len(), 6);
    run_case(
        &lv,
        &boxes,
        &Case {
            pool,
            batch: 0,
            count: 0,
        },
    );
    // capacity 0 records an empty dispatch
    let pool = MultiScaleRoiAlign::box_head(0, 6);
    run_case(
        &lv,
        &[],
        &Case {
            pool,
            batch: 0,
            count: 0,
        },
    );
}

#[test]
fn bad_inputs_are_errors() {
    let g = gpu();
    let mk = |h: usize, c: usize| Tensor::new(g, "lvl", Nhwc::new(1, h, h, c)).unwrap();
    let (a, b, cc, d) = (mk(32, 4), mk(16, 4), mk(8, 4), mk(4, 4));
    let wrong_c = mk(16, 5);
    let boxes = g.storage("boxes", 10 * 16).unwrap();
    let count = g.upload("count", &[0u32]).unwrap();
    let out = g.storage("out", 10 * 49 * 4 * 4).unwrap();
    let pool = MultiScaleRoiAlign::box_head(10, 4);
    let encode = |op: &MultiScaleRoiAlign, levels: [&Tensor; 4], image: (usize, usize), batch| {
        op.encode(g, "roi align", levels, image, batch, &boxes, &count, &out)
    };
    assert!(encode(&pool, [&a, &b, &cc, &d], (128, 128), 0).is_ok());
    // batch index past the batch
    assert!(encode(&pool, [&a, &b, &cc, &d], (128, 128), 1).is_err());
    // a level with the wrong channel count
    assert!(encode(&pool, [&a, &wrong_c, &cc, &d], (128, 128), 0).is_err());
    // scales that do not halve level to level
    assert!(encode(&pool, [&a, &a, &cc, &d], (128, 128), 0).is_err());
    // an empty image size
    assert!(encode(&pool, [&a, &b, &cc, &d], (0, 128), 0).is_err());
    // a capacity larger than the buffers
    let big = MultiScaleRoiAlign::box_head(11, 4);
    assert!(encode(&big, [&a, &b, &cc, &d], (128, 128), 0).is_err());
}

#[test]
fn layout_helpers_agree() {
    let mut rng = Rng::for_test("layout_helpers_agree");
    let (k, p, c, o) = (3, 7, 5, 4);
    let x = rng.vec(k * p * p * c, -1.0, 1.0);
    let tv = cref::pooled_to_torchvision(&x, k, p, c);
    assert_eq!(cref::pooled_from_torchvision(&tv, k, p, c), x);
    assert_eq!(
        tv[(c * p * p) + 2 * p * p + 3 * p + 4],
        x[((p + 3) * p + 4) * c + 2]
    );
    // fc6 on torchvision's flattening == fc6 with permuted columns on the kernel's layout
    let w = rng.vec(o * c * p * p, -1.0, 1.0);
    let wp = op::fc6_weight_to_nhwc(&w, o, c, p).unwrap();
    for r in 0..k {
        for j in 0..o {
            let a: f64 = (0..c * p * p)
                .map(|i| w[j * c * p * p + i] as f64 * tv[r * c * p * p + i] as f64)
                .sum();
            let b: f64 = (0..c * p * p)
                .map(|i| wp[j * c * p * p + i] as f64 * x[r * c * p * p + i] as f64)
                .sum();
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
    }
    assert!(op::fc6_weight_to_nhwc(&w[1..], o, c, p).is_err());
}
