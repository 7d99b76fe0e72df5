//! NMS: the CPU reference against torchvision (committed fixture), the shader's division-free
//! threshold test against f32 division, and the GPU op against the CPU reference, bit-exact (the
//! same kept indices in the same order) on thousands of random boxes with exact score ties,
//! duplicates, zero-area and NaN boxes, IoUs exactly at / one ULP around the thresholds, 0 and 1
//! candidates, and batched NMS on both torchvision paths.

mod common;

use std::path::Path;

use common::{gpu, Rng};
use marrow::cpu::nms as cpu;
use marrow::gpu::{Buffer, Gpu};
use marrow::ops::nms::{iou_exceeds, threshold_midpoint, Nms, NmsIo};
use marrow::validate::RefDump;

const THR_07: f32 = 0.7;
const THR_05: f32 = 0.5;

/// Clustered random boxes in [0, extent]² (many IoUs near the thresholds), with some exact
/// duplicates and zero-area boxes.
fn random_boxes(rng: &mut Rng, n: usize, extent: f32) -> Vec<[f32; 4]> {
    let k = (n / 12).max(1);
    let centres: Vec<(f32, f32, f32, f32)> = (0..k)
        .map(|_| {
            let s = 8.0 + 120.0 * rng.uniform();
            (
                extent * rng.uniform(),
                extent * rng.uniform(),
                s,
                s * (0.5 + rng.uniform()),
            )
        })
        .collect();
    let mut boxes: Vec<[f32; 4]> = (0..n)
        .map(|_| {
            let (cx, cy, sw, sh) = centres[rng.range(0, k - 1)];
            let x = cx + sw * 0.3 * (rng.uniform() - 0.5);
            let y = cy + sh * 0.3 * (rng.uniform() - 0.5);
            let w = sw * (0.75 + 0.5 * rng.uniform());
            let h = sh * (0.75 + 0.5 * rng.uniform());
            let c = |v: f32| v.clamp(0.0, extent);
            [
                c(x - w / 2.0),
                c(y - h / 2.0),
                c(x + w / 2.0),
                c(y + h / 2.0),
            ]
        })
        .collect();
    for _ in 0..n / 25 {
        let (s, d) = (rng.range(0, n - 1), rng.range(0, n - 1));
        boxes[d] = boxes[s];
    }
    for _ in 0..n / 40 {
        let i = rng.range(0, n - 1);
        boxes[i][2] = boxes[i][0];
    }
    boxes
}

/// Sigmoid-like scores, a third of them on a coarse grid: exact ties, as f32 saturation gives.
fn random_scores(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let s = 1.0 / (1.0 + (-6.0 * (rng.uniform() - 0.5)).exp());
            if rng.range(0, 2) == 0 {
                (s * 16.0).round() / 16.0
            } else {
                s
            }
        })
        .collect()
}

fn read_u32(g: &Gpu, buf: &Buffer, n: usize) -> Vec<u32> {
    // read_back is f32-typed; the bits are copied untouched.
    g.read_back(buf, n)
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Runs the op with the live candidates at the front of capacity-sized buffers whose tail holds
/// garbage (NaN scores, huge boxes), the live count at index 1 of a small buffer and the kept
/// count written to index 2 of the same buffer. Returns the kept indices.
fn run_gpu(
    rng: &mut Rng,
    op: &Nms,
    boxes: &[[f32; 4]],
    scores: &[f32],
    ids: Option<&[u32]>,
) -> Vec<usize> {
    let g = gpu();
    let n = boxes.len();
    assert!(n <= op.capacity);
    let mut b = boxes.to_vec();
    let mut s = scores.to_vec();
    let mut c = ids.map(|v| v.to_vec()).unwrap_or_default();
    for k in n..op.capacity {
        let x = 1e6 * rng.uniform();
        b.push([-x, -1e6, x + k as f32, 1e6]);
        s.push(if k % 2 == 0 { f32::NAN } else { 2.0 });
        c.push(rng.range(0, 90) as u32);
    }
    let boxes_buf = g.upload("nms test boxes", &b).unwrap();
    let scores_buf = g.upload("nms test scores", &s).unwrap();
    let ids_buf = ids.map(|_| g.upload("nms test ids", &c).unwrap());
    let counts = g
        .upload("nms test counts", &[99u32, n as u32, 12345])
        .unwrap();
    let keep = g
        .upload(
            "nms test keep",
            &vec![u32::MAX; op.max_out.min(op.capacity).max(1)],
        )
        .unwrap();
    let scratch = op.scratch(g, "nms test").unwrap();
    let io = NmsIo {
        boxes: &boxes_buf,
        scores: &scores_buf,
        ids: ids_buf.as_ref(),
        count: &counts,
        count_index: 1,
        keep: &keep,
        keep_count: &counts,
        keep_count_index: 2,
    };
    let ds = op.encode(g, "nms under test", &io, &scratch).unwrap();
    let t = std::time::Instant::now();
    g.run("nms test", ds.iter()).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let cnt = read_u32(g, &counts, 3);
    assert_eq!(cnt[0], 99, "count buffer index 0 clobbered");
    assert_eq!(cnt[1], n as u32, "live count clobbered");
    let k = cnt[2] as usize;
    assert!(
        k <= op.max_out.min(n),
        "kept count {k} > max_out {} / n {n}",
        op.max_out
    );
    eprintln!(
        "  gpu nms n={n} cap={} batched={} kept={k} in {:.1} ms",
        op.capacity,
        op.batched,
        secs * 1e3
    );
    read_u32(g, &keep, k.max(1))[..k]
        .iter()
        .map(|&v| v as usize)
        .collect()
}

fn check_exact(what: &str, got: &[usize], want: &[usize], max_out: usize) {
    let want = &want[..want.len().min(max_out)];
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: GPU keep differs from the CPU reference (lengths {} vs {}), first at {first}: {:?} vs {:?}",
            got.len(),
            want.len(),
            &got[first..(first + 5).min(got.len())],
            &want[first..(first + 5).min(want.len())]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// CPU reference against torchvision

/// Equal as lists once each run of equal scores is sorted (torchvision's vanilla final sort is
/// not stable; §7.2).
fn same_up_to_tie_order(got: &[usize], want: &[usize], scores: &[f32]) -> bool {
    if got.len() != want.len() {
        return false;
    }
    let canon = |v: &[usize]| {
        let mut v = v.to_vec();
        // The order is by score descending already; sorting by (score desc, index) only reorders
        // within ties.
        v.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
        v
    };
    let scores_in_order = |v: &[usize]| v.iter().map(|&i| scores[i].to_bits()).collect::<Vec<_>>();
    scores_in_order(got) == scores_in_order(want) && canon(got) == canon(want)
}

/// One case of tests/fixtures/nms_cases.safetensors (weights/make_nms_fixture.py).
struct FixtureCase {
    name: String,
    boxes: Vec<[f32; 4]>,
    scores: Vec<f32>,
    /// Batched cases only.
    ids: Option<Vec<u32>>,
    thr: f32,
    keep: Vec<usize>,
    /// torchvision's per-class path on the same input, where stored.
    vanilla_keep: Option<Vec<usize>>,
}

fn fixture_cases() -> Vec<FixtureCase> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nms_cases.safetensors");
    let dump = RefDump::open(&path).unwrap();
    let mut kinds: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&dump.metadata["marrow.nms_cases"]).unwrap();
    let version = kinds.remove("__torchvision__").unwrap();
    eprintln!("fixture made by torchvision {version}");
    let ints = |name: &str| -> Option<Vec<i64>> {
        dump.tensors.get(name).map(|t| t.i64().unwrap().to_vec())
    };
    kinds
        .iter()
        .map(|(name, kind)| {
            let (_, b) = dump.f32(&format!("{name}.boxes"), 2).unwrap();
            let ids = match kind.as_str() {
                "nms" => None,
                "batched" => Some(
                    ints(&format!("{name}.idxs"))
                        .unwrap()
                        .iter()
                        .map(|&v| v as u32)
                        .collect(),
                ),
                k => panic!("unknown case kind {k}"),
            };
            let as_usize = |v: Vec<i64>| v.into_iter().map(|i| i as usize).collect();
            FixtureCase {
                name: name.clone(),
                boxes: b
                    .chunks_exact(4)
                    .map(|c| [c[0], c[1], c[2], c[3]])
                    .collect(),
                scores: dump.f32(&format!("{name}.scores"), 1).unwrap().1.to_vec(),
                ids,
                thr: dump.f32(&format!("{name}.thr"), 1).unwrap().1[0],
                keep: as_usize(ints(&format!("{name}.keep")).unwrap()),
                vanilla_keep: ints(&format!("{name}.vanilla_keep")).map(as_usize),
            }
        })
        .collect()
}

/// torchvision's keep list against ours: exact, except that the vanilla path's final sort is not
/// stable in torchvision, so there only the order within runs of equal scores may differ.
fn assert_matches_torchvision(what: &str, got: &[usize], c: &FixtureCase) {
    if c.ids.is_none() || c.boxes.len() <= cpu::CPU_TRICK_MAX_BOXES {
        assert_eq!(got, c.keep, "{what}: differs from torchvision");
    } else {
        assert!(
            same_up_to_tie_order(got, &c.keep, &c.scores),
            "{what}: differs from torchvision"
        );
    }
}

#[test]
fn cpu_reference_matches_torchvision_fixture() {
    let cases = fixture_cases();
    assert!(cases.len() >= 5);
    for c in &cases {
        let got = match &c.ids {
            None => cpu::nms(&c.boxes, &c.scores, c.thr),
            Some(ids) => cpu::batched_nms(&c.boxes, &c.scores, ids, c.thr),
        };
        assert_matches_torchvision(&format!("cpu {}", c.name), &got, c);
        if let (Some(want_v), Some(ids)) = (&c.vanilla_keep, &c.ids) {
            let got_v = cpu::batched_nms_vanilla(&c.boxes, &c.scores, ids, c.thr);
            assert!(
                same_up_to_tie_order(&got_v, want_v, &c.scores),
                "{}: forced vanilla differs",
                c.name
            );
            let differ = !same_up_to_tie_order(&got, &got_v, &c.scores);
            eprintln!(
                "{}: trick and per-class paths {}",
                c.name,
                if differ { "differ" } else { "agree" }
            );
            // The near-threshold case exists to pin the trick's f32 arithmetic.
            assert!(c.name != "trick_quant" || differ);
        }
        eprintln!(
            "{}: {} boxes, {} kept, thr {}: matches torchvision",
            c.name,
            c.boxes.len(),
            c.keep.len(),
            c.thr
        );
    }
}

/// The GPU op on torchvision's own inputs gives torchvision's keep lists.
#[test]
fn gpu_matches_torchvision_fixture() {
    let mut rng = Rng::for_test("gpu_matches_torchvision_fixture");
    for c in &fixture_cases() {
        let n = c.boxes.len();
        let op = Nms::new(n + rng.range(0, 100), c.thr, n, c.ids.is_some());
        let got = run_gpu(&mut rng, &op, &c.boxes, &c.scores, c.ids.as_deref());
        assert_matches_torchvision(&format!("gpu {}", c.name), &got, c);
    }
}

// ---------------------------------------------------------------------------------------------
// The shader's threshold test, mirrored on the host

fn next_up(x: f32) -> f32 {
    f32::from_bits(x.to_bits() + 1)
}
fn next_down(x: f32) -> f32 {
    // Positive x only (0 stays 0).
    f32::from_bits(x.to_bits().saturating_sub(1))
}

#[test]
fn division_free_threshold_matches_f32_division() {
    let mut rng = Rng::for_test("division_free_threshold_matches_f32_division");
    let mut thresholds = vec![0.0f32, THR_05, THR_07, 0.3, 1.0, 0.999_999_94];
    for _ in 0..20 {
        thresholds.push(rng.uniform());
    }
    let mut near = 0usize;
    for &t in &thresholds {
        let mid = threshold_midpoint(t);
        for k in 0..200_000 {
            // Union from tiny to huge; inter either random or a few ULPs around t·union (the
            // hard cases, where a 2.5-ULP division would flip).
            let uni = f32::from_bits(rng.range(0x0080_0000, 0x7f00_0000) as u32);
            let inter = if k % 2 == 0 {
                let q = next_up(t).max(f32::MIN_POSITIVE) * uni;
                let mut v = q;
                for _ in 0..rng.range(0, 6) {
                    v = if rng.range(0, 1) == 0 {
                        next_up(v)
                    } else {
                        next_down(v)
                    };
                }
                v
            } else {
                uni * rng.uniform() * 1.5
            };
            if inter <= 0.0 || !inter.is_finite() {
                continue;
            }
            let want = inter / uni > t;
            if ((inter / uni) - t).abs() <= 4.0 * (next_up(t) - t) {
                near += 1;
            }
            assert_eq!(
                iou_exceeds(inter, uni, mid),
                want,
                "thr {t:e}: inter {inter:e} ({:#x}) / union {uni:e} ({:#x}) = {:e}",
                inter.to_bits(),
                uni.to_bits(),
                inter / uni
            );
        }
    }
    // Subnormal and special operands.
    let mid = threshold_midpoint(THR_05);
    for (i, u) in [
        (1e-45f32, 1e-45f32),
        (1e-40, 3e-40),
        (3e-40, 1e-40),
        (1.0, 0.0),
        (1.0, -0.0),
        (1.0, f32::INFINITY),
    ] {
        assert_eq!(iou_exceeds(i, u, mid), i / u > THR_05, "{i:e} / {u:e}");
    }
    assert!(near > 100_000, "too few near-threshold cases: {near}");
    eprintln!("{near} quotients within 4 ULP of a threshold decided exactly");
}

// ---------------------------------------------------------------------------------------------
// GPU against the CPU reference

#[test]
fn gpu_nms_random_thousands() {
    let mut rng = Rng::for_test("gpu_nms_random_thousands");
    for case in 0..3 {
        let n = match case {
            0 => 4663,
            _ => rng.range(2000, 5000),
        };
        let thr = rng.pick(&[THR_07, THR_05]);
        let extent = rng.pick(&[800.0, 1333.0]);
        let boxes = random_boxes(&mut rng, n, extent);
        let scores = random_scores(&mut rng, n);
        let want = cpu::nms(&boxes, &scores, thr);
        let max_out = if case == 2 {
            want.len() / 2
        } else {
            1000.max(want.len())
        };
        let op = Nms::new(n + rng.range(0, 300), thr, max_out, false);
        eprintln!("case {case}: n {n} thr {thr} cpu keeps {}", want.len());
        let got = run_gpu(&mut rng, &op, &boxes, &scores, None);
        check_exact(&format!("nms case {case}"), &got, &want, max_out);
    }
}

/// `pairs` box pairs (A, B) on rows y = 2k .. 2k+1 (isolated from each other): A = [0, y, W, y+1]
/// and B = [0, y, w, y+1] with w chosen so that the f32 IoU w / ((W + w) − w) is exactly t
/// (kind 0), one ULP above (kind 1) or one ULP below (kind 2). A never scores below B (ties
/// included: A has the lower index). Returns boxes, scores and each pair's kind.
fn threshold_pairs(rng: &mut Rng, t: f32, pairs: usize) -> (Vec<[f32; 4]>, Vec<f32>, Vec<usize>) {
    let mut boxes = Vec::new();
    let mut scores = Vec::new();
    let mut kinds = Vec::new();
    for k in 0..pairs {
        let big_w = 1.0 + 2000.0 * rng.uniform();
        let want_kind = k % 3;
        // Walk w from t·W one ULP at a time towards an IoU in the wanted relation to t.
        let mut w = t * big_w;
        let mut found = None;
        for _ in 0..200 {
            let a = [0.0, 0.0, big_w, 1.0];
            let b = [0.0, 0.0, w, 1.0];
            let iou = cpu::iou(&a, cpu::area(&a), &b, cpu::area(&b));
            let kind = if iou == t {
                0
            } else if iou == next_up(t) {
                1
            } else if iou == next_down(t) {
                2
            } else {
                3
            };
            if kind == want_kind {
                found = Some(w);
                break;
            }
            let up = match want_kind {
                0 => iou < t,
                1 => iou <= t,
                _ => iou < next_down(t),
            };
            w = if up { next_up(w) } else { next_down(w) };
        }
        let Some(w) = found else { continue };
        let y = boxes.len() as f32;
        boxes.push([0.0, y, big_w, y + 1.0]);
        boxes.push([0.0, y, w, y + 1.0]);
        let s = rng.uniform();
        scores.push(s);
        scores.push(if rng.range(0, 1) == 0 { s } else { s * 0.5 });
        kinds.push(want_kind);
    }
    (boxes, scores, kinds)
}

#[test]
fn gpu_nms_iou_exactly_at_threshold() {
    let mut rng = Rng::for_test("gpu_nms_iou_exactly_at_threshold");
    for &t in &[THR_07, THR_05] {
        let (boxes, scores, kinds) = threshold_pairs(&mut rng, t, 1500);
        let counts: Vec<usize> = (0..3)
            .map(|k| kinds.iter().filter(|&&v| v == k).count())
            .collect();
        assert!(
            counts.iter().all(|&c| c > 100),
            "thr {t}: too few constructed pairs {counts:?}"
        );
        let want = cpu::nms(&boxes, &scores, t);
        // The reference itself: B survives exactly when its IoU is not above t.
        let kept: std::collections::HashSet<usize> = want.iter().copied().collect();
        for (p, &kind) in kinds.iter().enumerate() {
            assert!(kept.contains(&(2 * p)));
            assert_eq!(!kept.contains(&(2 * p + 1)), kind == 1, "pair {p}");
        }
        let op = Nms::new(boxes.len(), t, boxes.len(), false);
        let got = run_gpu(&mut rng, &op, &boxes, &scores, None);
        eprintln!("thr {t}: pairs at / above / below = {counts:?}");
        check_exact(&format!("threshold pairs at {t}"), &got, &want, op.max_out);
    }
}

/// Near-threshold pairs with high labels on the trick path: the f32 class offset (~1.8e5, spacing
/// 1/64 px) re-rounds the coordinates and flips many decisions relative to per-class NMS. The GPU
/// must reproduce the trick, not per-class NMS.
#[test]
fn gpu_batched_trick_quantisation_is_reproduced() {
    let mut rng = Rng::for_test("gpu_batched_trick_quantisation_is_reproduced");
    for &t in &[THR_05, THR_07] {
        let (boxes, scores, kinds) = threshold_pairs(&mut rng, t, 500);
        let ids: Vec<u32> = kinds
            .iter()
            .flat_map(|_| {
                let c = rng.range(40, 90) as u32;
                [c, c]
            })
            .collect();
        assert!(boxes.len() <= cpu::CPU_TRICK_MAX_BOXES);
        let want = cpu::batched_nms(&boxes, &scores, &ids, t);
        let per_class = cpu::batched_nms_vanilla(&boxes, &scores, &ids, t);
        let flips = {
            let a: std::collections::HashSet<_> = want.iter().collect();
            let b: std::collections::HashSet<_> = per_class.iter().collect();
            a.symmetric_difference(&b).count()
        };
        eprintln!(
            "thr {t}: {} pairs, the trick flips {flips} decisions of per-class NMS",
            kinds.len()
        );
        assert!(flips > 10, "the construction should make the trick matter");
        let op = Nms::new(boxes.len() + 7, t, boxes.len(), true);
        let got = run_gpu(&mut rng, &op, &boxes, &scores, Some(&ids));
        check_exact(
            &format!("trick quantisation at {t}"),
            &got,
            &want,
            op.max_out,
        );
    }
}

#[test]
fn gpu_nms_degenerate_boxes() {
    let mut rng = Rng::for_test("gpu_nms_degenerate_boxes");
    let n = 1200;
    let mut boxes = random_boxes(&mut rng, n, 300.0);
    let mut scores = random_scores(&mut rng, n);
    for i in 0..n {
        match rng.range(0, 19) {
            // zero width, zero height, a point: 0/0 IoU against each other
            0 => boxes[i][2] = boxes[i][0],
            1 => boxes[i][3] = boxes[i][1],
            2 => boxes[i] = [boxes[i][0], boxes[i][1], boxes[i][0], boxes[i][1]],
            // NaN coordinate or score (never suppresses, never suppressed; NaN sorts first)
            3 => boxes[i][rng.range(0, 3)] = f32::NAN,
            4 => scores[i] = f32::NAN,
            5 => scores[i] = if rng.range(0, 1) == 0 { 0.0 } else { -0.0 },
            // duplicated degenerate box
            6 if i > 0 => {
                boxes[i] = [
                    boxes[i - 1][0],
                    boxes[i - 1][1],
                    boxes[i - 1][0],
                    boxes[i - 1][3],
                ];
            }
            _ => {}
        }
    }
    for &thr in &[THR_05, THR_07, 0.0] {
        let want = cpu::nms(&boxes, &scores, thr);
        let op = Nms::new(n, thr, n, false);
        let got = run_gpu(&mut rng, &op, &boxes, &scores, None);
        check_exact(&format!("degenerate boxes thr {thr}"), &got, &want, n);
    }
}

#[test]
fn gpu_nms_zero_and_one_candidates() {
    let mut rng = Rng::for_test("gpu_nms_zero_and_one_candidates");
    for batched in [false, true] {
        let op = Nms::new(64, THR_07, 100, batched);
        let ids = [3u32];
        let id = batched.then_some(&ids[..0]);
        assert!(run_gpu(&mut rng, &op, &[], &[], id).is_empty());
        let id = batched.then_some(&ids[..]);
        let got = run_gpu(&mut rng, &op, &[[1.0, 2.0, 3.0, 4.0]], &[0.5], id);
        assert_eq!(got, vec![0]);
        // capacity 1
        let op = Nms::new(1, THR_07, 1, batched);
        assert_eq!(
            run_gpu(&mut rng, &op, &[[1.0, 2.0, 3.0, 4.0]], &[0.5], id),
            vec![0]
        );
    }
}

/// Boxes with large class offsets (labels up to 90 at ~1333 px): the trick's f32 shift
/// quantises coordinates to 1/128 px, which the GPU must reproduce.
#[test]
fn gpu_batched_trick_path() {
    let mut rng = Rng::for_test("gpu_batched_trick_path");
    let mut differ = 0;
    for case in 0..4 {
        let n = if case == 0 {
            1000
        } else {
            rng.range(200, 1000)
        };
        let thr = rng.pick(&[THR_05, THR_07]);
        let boxes = random_boxes(&mut rng, n, 1333.0);
        let scores = random_scores(&mut rng, n);
        let ids: Vec<u32> = (0..n)
            .map(|_| {
                if rng.range(0, 1) == 0 {
                    rng.range(1, 3) as u32
                } else {
                    rng.range(1, 90) as u32
                }
            })
            .collect();
        let want = cpu::batched_nms(&boxes, &scores, &ids, thr);
        let vanilla = cpu::batched_nms_vanilla(&boxes, &scores, &ids, thr);
        if want != vanilla {
            differ += 1;
        }
        let max_out = rng.pick(&[100, 1000]);
        let op = Nms::new(n + rng.range(0, 1200), thr, max_out, true);
        let got = run_gpu(&mut rng, &op, &boxes, &scores, Some(&ids));
        check_exact(&format!("trick case {case} (n {n})"), &got, &want, max_out);
    }
    eprintln!("trick result differed from per-class NMS in {differ} of 4 cases");
}

#[test]
fn gpu_batched_vanilla_path() {
    let mut rng = Rng::for_test("gpu_batched_vanilla_path");
    for case in 0..2 {
        let n = if case == 0 {
            1001
        } else {
            rng.range(1500, 4663)
        };
        let thr = rng.pick(&[THR_05, THR_07]);
        let boxes = random_boxes(&mut rng, n, 800.0);
        let scores = random_scores(&mut rng, n);
        let levels = rng.range(2, 5) as u32;
        let ids: Vec<u32> = (0..n)
            .map(|_| rng.range(0, levels as usize - 1) as u32)
            .collect();
        let want = cpu::batched_nms(&boxes, &scores, &ids, thr);
        let op = Nms::new(n, thr, 1000, true);
        let got = run_gpu(&mut rng, &op, &boxes, &scores, Some(&ids));
        check_exact(&format!("vanilla case {case} (n {n})"), &got, &want, 1000);
    }
}

/// The path is chosen from the live count on the GPU: the same buffers at 1000 and 1001 live
/// boxes take different paths, and a configurable threshold moves the switch.
#[test]
fn gpu_batched_path_switch_follows_live_count() {
    let mut rng = Rng::for_test("gpu_batched_path_switch_follows_live_count");
    let boxes = random_boxes(&mut rng, 1001, 1333.0);
    let scores = random_scores(&mut rng, 1001);
    let ids: Vec<u32> = (0..1001).map(|_| rng.range(1, 90) as u32).collect();
    for n in [1000, 1001] {
        let want = cpu::batched_nms(&boxes[..n], &scores[..n], &ids[..n], THR_05);
        let op = Nms::new(1100, THR_05, n, true);
        let got = run_gpu(&mut rng, &op, &boxes[..n], &scores[..n], Some(&ids[..n]));
        check_exact(&format!("n = {n}"), &got, &want, n);
    }
    // trick_max_boxes = 0 forces the per-class path even for few boxes.
    let n = 600;
    let want = cpu::batched_nms_vanilla(&boxes[..n], &scores[..n], &ids[..n], THR_07);
    let op = Nms {
        trick_max_boxes: 0,
        ..Nms::new(n, THR_07, n, true)
    };
    let got = run_gpu(&mut rng, &op, &boxes[..n], &scores[..n], Some(&ids[..n]));
    check_exact("forced vanilla", &got, &want, n);
}

#[test]
fn nms_bad_inputs_are_errors() {
    let g = gpu();
    let small = g.upload("small", &[0f32; 4]).unwrap();
    let big = g.upload("big", &[0f32; 64]).unwrap();
    let op = Nms::new(16, THR_07, 8, true);
    let scratch = op.scratch(g, "bad").unwrap();
    let io = |boxes, ids| NmsIo {
        boxes,
        scores: &big,
        ids,
        count: &big,
        count_index: 0,
        keep: &big,
        keep_count: &big,
        keep_count_index: 1,
    };
    assert!(op.encode(g, "ok", &io(&big, Some(&big)), &scratch).is_ok());
    assert!(op.encode(g, "no ids", &io(&big, None), &scratch).is_err());
    assert!(op
        .encode(g, "small boxes", &io(&small, Some(&big)), &scratch)
        .is_err());
    assert!(op
        .encode(g, "small ids", &io(&big, Some(&small)), &scratch)
        .is_err());
    let other = Nms::new(8, THR_07, 8, true);
    assert!(other
        .encode(g, "scratch mismatch", &io(&big, Some(&big)), &scratch)
        .is_err());
    for thr in [f32::NAN, -0.1, f32::INFINITY] {
        let bad = Nms::new(16, thr, 8, true);
        assert!(bad.scratch(g, "bad thr").is_err());
        assert!(bad
            .encode(g, "bad thr", &io(&big, Some(&big)), &scratch)
            .is_err());
    }
    assert!(Nms::new(0, THR_07, 8, false).scratch(g, "cap 0").is_err());
    // A capacity whose greedy pass cannot fit in workgroup memory is an error, not a panic.
    assert!(Nms::new(1 << 24, THR_07, 8, false)
        .scratch(g, "huge")
        .is_err());
}
