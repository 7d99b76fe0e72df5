//! RPN post-head stages: anchors (bit-exact vs torchvision), per-level top-k (exact vs the CPU
//! reference, with many exact ties), decode, and the whole pre-NMS candidate chain, on random inputs
//! and teacher-forced from torchvision (tests/fixtures/rpn_*.safetensors, made by
//! weights/make_rpn_fixture.py).

mod common;

use std::path::Path;

use common::{gpu, Rng};
use marrow::cpu::rpn as cpu;
use marrow::gpu::{Buffer, Gpu, Nhwc, Tensor};
use marrow::ops::rpn::{RpnBuffers, RpnPlan, RpnProposals};
use marrow::ops::topk::SegmentedTopK;
use marrow::validate::RefDump;

fn fixture(name: &str) -> RefDump {
    RefDump::open(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn read_u32(g: &Gpu, b: &Buffer, n: usize) -> Vec<u32> {
    g.read_back(b, n)
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn i64s(d: &RefDump, name: &str) -> Vec<i64> {
    d.tensors[name].i64().unwrap().to_vec()
}

fn pairs(v: &[i64]) -> Vec<(usize, usize)> {
    v.chunks(2)
        .map(|c| (c[0] as usize, c[1] as usize))
        .collect()
}

/// FPN feature sizes for a padded size (P2..P5 = /4../32, pool = ceil(P5 / 2)).
fn fpn_sizes(padded: (usize, usize)) -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = [4, 8, 16, 32]
        .iter()
        .map(|s| (padded.0 / s, padded.1 / s))
        .collect();
    let (h5, w5) = v[3];
    v.push((h5.div_ceil(2), w5.div_ceil(2)));
    v
}

fn anchor_bytes(a: &[[f32; 4]]) -> Vec<u8> {
    a.iter().flatten().flat_map(|v| v.to_le_bytes()).collect()
}

fn gpu_anchors(g: &Gpu, plan: &RpnPlan) -> Vec<[f32; 4]> {
    let out = g.storage("anchors", plan.anchors() as u64 * 16).unwrap();
    let d = plan.encode_anchors(g, "anchors", &out).unwrap();
    g.run("anchors", d.iter()).unwrap();
    g.read_back(&out, plan.anchors() * 4)
        .unwrap()
        .chunks(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect()
}

#[test]
fn anchors_bit_exact_vs_torchvision() {
    let g = gpu();
    let dump = fixture("rpn_anchors.safetensors");
    let meta: serde_json::Value =
        serde_json::from_str(&dump.metadata["marrow.rpn.anchors"]).unwrap();
    let mut custom = 0;
    for (tag, m) in meta.as_object().unwrap() {
        // Cases with `sizes` / `ratios` come from a non-default AnchorGenerator (a config's
        // rpn.anchor_sizes / aspect_ratios); the others from torchvision's default one.
        let floats = |k: &str| -> Option<Vec<f32>> {
            m.get(k).map(|v| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
        };
        let mut op = RpnProposals::default();
        if let (Some(sizes), Some(ratios)) = (floats("sizes"), floats("ratios")) {
            op.anchor_sizes = sizes;
            op.aspect_ratios = ratios;
            custom += 1;
        }
        let padded = (
            m["padded"][0].as_u64().unwrap() as usize,
            m["padded"][1].as_u64().unwrap() as usize,
        );
        let feat = pairs(&i64s(&dump, &format!("anchors.{tag}.feat")));
        assert_eq!(feat, fpn_sizes(padded), "{tag}: feature sizes");
        let strides = pairs(&i64s(&dump, &format!("anchors.{tag}.strides")));
        assert_eq!(cpu::strides(padded, &feat), strides, "{tag}: strides");
        let counts: Vec<usize> = i64s(&dump, &format!("anchors.{tag}.counts"))
            .iter()
            .map(|&c| c as usize)
            .collect();
        let want_hash = u64::from_str_radix(m["fnv1a64"].as_str().unwrap(), 16).unwrap();

        let host = cpu::anchors(padded, &feat, &op.anchor_sizes, &op.aspect_ratios);
        let plan = op.plan(&feat, padded, padded).unwrap();
        assert_eq!(plan.topk.lens, counts, "{tag}: per-level counts");
        let dev = gpu_anchors(g, &plan);
        for (who, a) in [("cpu", &host), ("gpu", &dev)] {
            assert_eq!(a.len(), counts.iter().sum::<usize>(), "{tag} {who}: count");
            if let Some(all) = dump.tensors.get(&format!("anchors.{tag}.all")) {
                let all = all.f32().unwrap();
                let bad = a
                    .iter()
                    .flatten()
                    .zip(all)
                    .filter(|(x, y)| x.to_bits() != y.to_bits())
                    .count();
                assert_eq!(bad, 0, "{tag} {who}: {bad} anchor coordinates differ");
            } else {
                let sample = dump.tensors[&format!("anchors.{tag}.sample")]
                    .f32()
                    .unwrap();
                let mine: Vec<f32> = a.iter().step_by(97).flatten().copied().collect();
                assert_eq!(mine.len(), sample.len(), "{tag} {who}: sample length");
                assert!(
                    mine.iter()
                        .zip(sample)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{tag} {who}: sample differs"
                );
            }
            assert_eq!(
                marrow::seedgen::fnv1a64(&anchor_bytes(a)),
                want_hash,
                "{tag} {who}: anchor hash"
            );
        }
        eprintln!(
            "anchors {tag}: {} anchors, sizes {:?}, ratios {:?}, strides {strides:?}: bit-exact \
             (cpu and gpu)",
            host.len(),
            op.anchor_sizes,
            op.aspect_ratios
        );
    }
    assert_eq!(
        custom, 2,
        "the fixture's two non-default anchor generators were compared"
    );
}

/// Values with many exact ties: a few levels of a coarse grid, ±0, occasional NaN / ±inf.
fn tied_values(rng: &mut Rng, n: usize, distinct: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.range(0, 199) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => -0.0,
            4 => 0.0,
            _ => (rng.range(0, distinct) as f32 - distinct as f32 / 2.0) * 0.37,
        })
        .collect()
}

fn run_topk(g: &Gpu, lens: &[usize], k: usize, values: &[Vec<f32>]) -> Vec<u32> {
    let op = SegmentedTopK::new(lens, k).unwrap();
    let bufs = op.buffers(g, "topk").unwrap();
    let ins: Vec<Buffer> = values
        .iter()
        .map(|v| g.upload("topk in", v).unwrap())
        .collect();
    let refs: Vec<&Buffer> = ins.iter().collect();
    let d = op.encode(g, "topk", &refs, &bufs).unwrap();
    g.run("topk", d.iter()).unwrap();
    read_u32(g, &bufs.order, op.kmax())
}

#[test]
fn topk_random_ties_against_cpu() {
    let g = gpu();
    let mut rng = Rng::for_test("topk_random_ties_against_cpu");
    for case in 0..10 {
        let nseg = rng.range(1, 5);
        let k = rng.pick(&[1usize, 7, 100, 1000, 1500]);
        let lens: Vec<usize> = (0..nseg)
            .map(|s| match (case + s) % 5 {
                0 => k,                                 // k == n
                1 => rng.range(1, k.max(2) - 1).max(1), // k > n
                2 => rng.range(1, 9),
                _ => rng.range(k, 9000),
            })
            .collect();
        let values: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(s, &n)| {
                if (case + s) % 7 == 3 {
                    vec![1.25; n] // all equal: the index passes decide everything
                } else {
                    let distinct = rng.pick(&[3usize, 40, 5000]);
                    tied_values(&mut rng, n, distinct)
                }
            })
            .collect();
        let got = run_topk(g, &lens, k, &values);
        let flat: Vec<f32> = values.concat();
        let want: Vec<u32> = cpu::topk_per_level(&flat, &lens, k)
            .into_iter()
            .map(|i| i as u32)
            .collect();
        eprintln!(
            "topk case {case}: lens {lens:?} k {k}: {} selected",
            want.len()
        );
        assert_eq!(got, want, "top-k differs (lens {lens:?}, k {k})");
    }
}

#[test]
fn topk_p2_size_level() {
    // P2 of an 800x1088 image: 163 200 logits → k = 1000; a second level of constant values.
    let g = gpu();
    let mut rng = Rng::for_test("topk_p2_size_level");
    let lens = [200 * 272 * 3, 50 * 68 * 3];
    let values = vec![tied_values(&mut rng, lens[0], 2000), vec![-3.5; lens[1]]];
    let t = std::time::Instant::now();
    let got = run_topk(g, &lens, 1000, &values);
    eprintln!(
        "topk over {:?}: {:.1} ms (incl. upload)",
        lens,
        t.elapsed().as_secs_f64() * 1e3
    );
    let want: Vec<u32> = cpu::topk_per_level(&values.concat(), &lens, 1000)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    assert_eq!(got, want);
}

struct Outputs {
    order: Vec<u32>,
    raw_boxes: Vec<[f32; 4]>,
    raw_scores: Vec<f32>,
    cand: cpu::Candidates,
}

fn boxes_of(v: Vec<f32>) -> Vec<[f32; 4]> {
    v.chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect()
}

/// Runs the GPU stage on concatenated logits [A_total] and deltas [A_total][4].
fn run_rpn(g: &Gpu, plan: &RpnPlan, logits: &[f32], deltas: &[[f32; 4]]) -> Outputs {
    let mut obj = Vec::new();
    let mut del = Vec::new();
    for lv in &plan.levels {
        let (h, w) = lv.feat;
        let r = lv.anchor_offset..lv.anchor_offset + lv.n;
        obj.push(
            Tensor::from_host(
                g,
                "objectness",
                Nhwc::new(1, h, w, plan.a),
                &logits[r.clone()],
            )
            .unwrap(),
        );
        let d: Vec<f32> = deltas[r].iter().flatten().copied().collect();
        del.push(Tensor::from_host(g, "deltas", Nhwc::new(1, h, w, 4 * plan.a), &d).unwrap());
    }
    let b: RpnBuffers = plan.buffers(g, "rpn").unwrap();
    let d = plan
        .encode(
            g,
            "rpn",
            &obj.iter().collect::<Vec<_>>(),
            &del.iter().collect::<Vec<_>>(),
            &b,
        )
        .unwrap();
    g.run("rpn", d.iter()).unwrap();
    let k = plan.kmax();
    let n = read_u32(g, &b.count, 1)[0] as usize;
    assert!(n <= k);
    Outputs {
        order: read_u32(g, &b.topk.order, k),
        raw_boxes: boxes_of(g.read_back(&b.raw_boxes, 4 * k).unwrap()),
        raw_scores: g.read_back(&b.raw_scores, k).unwrap(),
        cand: cpu::Candidates {
            boxes: boxes_of(g.read_back(&b.boxes, 4 * n).unwrap()),
            scores: g.read_back(&b.scores, n).unwrap(),
            levels: read_u32(g, &b.levels, n),
            anchor_index: Vec::new(),
        },
    }
}

/// max |a - b| over coordinates, relative to the box's scale (its largest |coordinate|, width or
/// height, at least 1 px): x1 = cx - w/2 cancels, so a few-ULP exp on w shows up as an absolute
/// error of the size of w's ULP, not of x1's.
fn box_err(a: &[f32; 4], b: &[f32; 4]) -> f64 {
    box_err_scaled(a, b, b)
}

/// Max coordinate error of `a` vs `b`, relative to the magnitudes of the box `scale_of` (its
/// coordinates and sides, at least 1 px).
fn box_err_scaled(a: &[f32; 4], b: &[f32; 4], scale_of: &[f32; 4]) -> f64 {
    let b_ = scale_of;
    let scale = b_
        .iter()
        .map(|v| v.abs() as f64)
        .chain([(b_[2] - b_[0]).abs() as f64, (b_[3] - b_[1]).abs() as f64])
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    (0..4)
        .map(|i| (a[i] as f64 - b[i] as f64).abs())
        .fold(0.0, f64::max)
        / scale
}

fn random_geometry(rng: &mut Rng) -> ((usize, usize), (usize, usize)) {
    let padded = (32 * rng.range(1, 7), 32 * rng.range(1, 9));
    let resized = (
        rng.range(padded.0 - 31, padded.0),
        rng.range(padded.1 - 31, padded.1),
    );
    (padded, resized)
}

fn random_deltas(rng: &mut Rng, n: usize) -> Vec<[f32; 4]> {
    (0..n)
        .map(|_| {
            let mut d = [0f32; 4];
            for (c, v) in d.iter_mut().enumerate() {
                *v = match rng.range(0, 19) {
                    0 if c >= 2 => rng.pick(&[40.0, 1e4, 3.0e38, f32::INFINITY]), // clipped to ln(1000/16)
                    1 if c >= 2 => rng.pick(&[-30.0, -100.0, f32::NEG_INFINITY]), // ~zero-size box
                    2 if c < 2 => rng.pick(&[-50.0, 50.0]), // far off the image
                    _ => (rng.uniform() - 0.5) * 3.0,
                };
            }
            d
        })
        .collect()
}

#[test]
fn decode_and_candidates_against_cpu() {
    let g = gpu();
    let mut rng = Rng::for_test("decode_and_candidates_against_cpu");
    let (mut worst_box, mut worst_score) = (0f64, 0f64);
    for case in 0..6 {
        let (padded, resized) = random_geometry(&mut rng);
        let feat = fpn_sizes(padded);
        let op = RpnProposals {
            pre_nms_top_n: rng.pick(&[1usize, 50, 300, 1000]),
            min_size: rng.pick(&[1e-3f32, 2.0]),
            score_thresh: rng.pick(&[0.0f32, 0.3]),
            ..RpnProposals::default()
        };
        let plan = op.plan(&feat, padded, resized).unwrap();
        let n = plan.anchors();
        let logits = if case % 2 == 0 {
            tied_values(&mut rng, n, 30)
        } else {
            rng.vec(n, -8.0, 8.0)
        };
        let deltas = random_deltas(&mut rng, n);
        let anchors = cpu::anchors(padded, &feat, &op.anchor_sizes, &op.aspect_ratios);
        let got = run_rpn(g, &plan, &logits, &deltas);

        let want_order = cpu::topk_per_level(&logits, &plan.topk.lens, op.pre_nms_top_n);
        assert_eq!(
            got.order.iter().map(|&i| i as usize).collect::<Vec<_>>(),
            want_order,
            "case {case}: top-k"
        );
        // Decode (before clipping) of every selected anchor.
        for (j, &i) in want_order.iter().enumerate() {
            let want = cpu::decode(anchors[i], deltas[i]);
            let gb = got.raw_boxes[j];
            for c in 0..4 {
                let (a, b) = (gb[c], want[c]);
                assert!(
                    a.is_nan() == b.is_nan() && (a.is_infinite() == b.is_infinite()),
                    "case {case} slot {j}: {gb:?} vs {want:?}"
                );
                if a.is_infinite() {
                    assert_eq!(a, b);
                }
            }
            if gb.iter().chain(&want).all(|v| v.is_finite()) {
                let e = box_err(&gb, &want);
                worst_box = worst_box.max(e);
                assert!(
                    e <= 2e-6,
                    "case {case} slot {j}: decode {gb:?} vs {want:?} (deltas {:?})",
                    deltas[i]
                );
            }
            let ds = (got.raw_scores[j] as f64 - cpu::sigmoid(logits[i]) as f64).abs();
            assert!(
                ds <= 1e-6 || (got.raw_scores[j].is_nan() && logits[i].is_nan()),
                "case {case}: score"
            );
        }
        let want = cpu::candidates(
            &logits,
            &deltas,
            &anchors,
            &plan.topk.lens,
            resized,
            op.pre_nms_top_n,
            op.min_size,
            op.score_thresh,
        );
        eprintln!(
            "case {case}: padded {padded:?} resized {resized:?} anchors {n} top-k {} candidates {} (min_size {}, thresh {})",
            plan.kmax(),
            want.boxes.len(),
            op.min_size,
            op.score_thresh
        );
        assert_eq!(
            got.cand.levels, want.levels,
            "case {case}: candidate levels / count"
        );
        for (j, (a, b)) in got.cand.boxes.iter().zip(&want.boxes).enumerate() {
            // A clipped coordinate can be a small difference of the large unclipped operands
            // (pcy ± ph/2), so its rounding error scales with the unclipped box, not the clipped
            // one: normalise by the pre-clip decode of the same anchor.
            let i = want.anchor_index[j];
            let raw = cpu::decode(anchors[i], deltas[i]);
            let e = box_err_scaled(a, b, &raw);
            worst_box = worst_box.max(e);
            assert!(
                e <= 2e-6,
                "case {case} candidate {j}: {a:?} vs {b:?} (unclipped {raw:?})"
            );
            let ds = (got.cand.scores[j] as f64 - want.scores[j] as f64).abs();
            worst_score = worst_score.max(ds);
            assert!(
                ds <= 1e-6,
                "case {case} candidate {j}: score {} vs {}",
                got.cand.scores[j],
                want.scores[j]
            );
        }
    }
    eprintln!("worst box rel err {worst_box:.2e}, worst score abs err {worst_score:.2e}");
}

#[test]
fn teacher_forced_torchvision_chain() {
    let g = gpu();
    let d = fixture("rpn_chain.safetensors");
    let logits = d.f32("chain.logits", 1).unwrap().1.to_vec();
    let deltas: Vec<[f32; 4]> = boxes_of(d.f32("chain.deltas", 2).unwrap().1.to_vec());
    let feat = pairs(&i64s(&d, "chain.feat"));
    let p = i64s(&d, "chain.padded");
    let r = i64s(&d, "chain.resized");
    let (padded, resized) = (
        (p[0] as usize, p[1] as usize),
        (r[0] as usize, r[1] as usize),
    );
    let want_topk: Vec<usize> = i64s(&d, "chain.topk").iter().map(|&i| i as usize).collect();
    let want_boxes = boxes_of(d.f32("chain.boxes", 2).unwrap().1.to_vec());
    let want_scores = d.f32("chain.scores", 1).unwrap().1.to_vec();
    let want_levels: Vec<u32> = i64s(&d, "chain.levels").iter().map(|&l| l as u32).collect();

    let op = RpnProposals::default();
    let plan = op.plan(&feat, padded, resized).unwrap();
    assert_eq!(plan.anchors(), logits.len());
    let got = run_rpn(g, &plan, &logits, &deltas);

    // torch.topk's tie order is unspecified: compare the value sequence exactly and the indices
    // as sets within runs of equal logits.
    let same_values = |a: &[usize], b: &[usize]| {
        a.iter()
            .zip(b)
            .all(|(&i, &j)| logits[i].to_bits() == logits[j].to_bits())
    };
    let got_order: Vec<usize> = got.order.iter().map(|&i| i as usize).collect();
    assert_eq!(got_order.len(), want_topk.len());
    assert!(
        same_values(&got_order, &want_topk),
        "top-k value sequence differs from torchvision"
    );
    let mut a = got_order.clone();
    let mut b = want_topk.clone();
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b, "top-k sets differ");
    let cpu_order = cpu::topk_per_level(&logits, &plan.topk.lens, op.pre_nms_top_n);
    assert_eq!(got_order, cpu_order, "gpu vs cpu top-k");
    let reordered = got_order
        .iter()
        .zip(&want_topk)
        .filter(|(x, y)| x != y)
        .count();

    // CPU reference vs torchvision.
    let anchors = cpu::anchors(padded, &feat, &op.anchor_sizes, &op.aspect_ratios);
    let c = cpu::candidates(
        &logits,
        &deltas,
        &anchors,
        &plan.topk.lens,
        resized,
        op.pre_nms_top_n,
        op.min_size,
        op.score_thresh,
    );
    for (who, boxes, scores, levels) in [
        ("cpu", &c.boxes, &c.scores, &c.levels),
        ("gpu", &got.cand.boxes, &got.cand.scores, &got.cand.levels),
    ] {
        assert_eq!(levels, &want_levels, "{who}: candidate levels / count");
        let (mut eb, mut es) = (0f64, 0f64);
        for j in 0..boxes.len() {
            // Rows from exactly tied logits may sit in either order: match against the
            // torchvision row with the same score whose box is closest.
            let q = (0..want_boxes.len())
                .filter(|&q| q == j || want_scores[q].to_bits() == want_scores[j].to_bits())
                .min_by(|&x, &y| {
                    box_err(&boxes[j], &want_boxes[x])
                        .total_cmp(&box_err(&boxes[j], &want_boxes[y]))
                })
                .unwrap();
            let e = box_err(&boxes[j], &want_boxes[q]);
            assert!(
                e <= 2e-6,
                "{who} candidate {j}: {:?} vs {:?}",
                boxes[j],
                want_boxes[q]
            );
            eb = eb.max(
                (0..4)
                    .map(|i| (boxes[j][i] - want_boxes[q][i]).abs() as f64)
                    .fold(0.0, f64::max),
            );
            es = es.max((scores[j] as f64 - want_scores[q] as f64).abs());
        }
        eprintln!(
            "{who} vs torchvision: {} candidates, max |Δbox| {eb:.2e} px, max |Δscore| {es:.2e}, {reordered} top-k slots in a different tie order",
            boxes.len()
        );
        assert!(eb <= 1e-3 && es <= 1e-6, "{who}: box {eb} score {es}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let op = RpnProposals::default();
    assert!(
        op.plan(&[(4, 4)], (64, 64), (64, 64)).is_err(),
        "1 level for 5 sizes"
    );
    assert!(
        op.plan(&fpn_sizes((64, 64)), (64, 64), (65, 64)).is_err(),
        "resized > padded"
    );
    assert!(
        op.plan(&fpn_sizes((64, 64)), (64, 64), (0, 64)).is_err(),
        "empty image"
    );
    let mut feat = fpn_sizes((64, 64));
    feat[2] = (0, 3);
    assert!(op.plan(&feat, (64, 64), (64, 64)).is_err(), "empty level");
    let plan = op.plan(&fpn_sizes((64, 96)), (64, 96), (60, 90)).unwrap();
    let b = plan.buffers(g, "bad").unwrap();
    let t = |h, w, c| Tensor::new(g, "t", Nhwc::new(1, h, w, c)).unwrap();
    let obj: Vec<Tensor> = plan
        .levels
        .iter()
        .map(|l| t(l.feat.0, l.feat.1, 3))
        .collect();
    let del: Vec<Tensor> = plan
        .levels
        .iter()
        .map(|l| t(l.feat.0, l.feat.1, 12))
        .collect();
    let o: Vec<&Tensor> = obj.iter().collect();
    let dl: Vec<&Tensor> = del.iter().collect();
    assert!(plan.encode(g, "ok", &o, &dl, &b).is_ok());
    assert!(plan.encode(g, "swapped", &dl, &o, &b).is_err());
    assert!(plan.encode(g, "short", &o[..4], &dl[..4], &b).is_err());
    assert!(SegmentedTopK::new(&[], 10).is_err());
    assert!(SegmentedTopK::new(&[1 << 25], 10).is_err());
}
