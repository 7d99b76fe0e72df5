//! Box-head post-processing kernels against the CPU reference (src/cpu/box_head.rs) on random
//! proposals, logits and deltas: candidate order, scores, boxes and the final rescale.

mod common;

use common::{gpu, Rng};
use marrow::cpu::box_head as cpu;
use marrow::ops::box_head::BoxPostprocess;

struct Case {
    k: usize,
    c: usize,
    resized: (usize, usize),
    logits: Vec<f32>,
    deltas: Vec<f32>,
    proposals: Vec<[f32; 4]>,
}

fn draw(rng: &mut Rng, k: usize, c: usize, resized: (usize, usize)) -> Case {
    let (h, w) = (resized.0 as f32, resized.1 as f32);
    let proposals: Vec<[f32; 4]> = (0..k)
        .map(|_| {
            let x1 = rng.uniform() * w;
            let y1 = rng.uniform() * h;
            // includes degenerate (zero-width) proposals
            let bw = if rng.range(0, 9) == 0 {
                0.0
            } else {
                rng.uniform() * w * 0.5
            };
            let bh = rng.uniform() * h * 0.5;
            [x1, y1, (x1 + bw).min(w), (y1 + bh).min(h)]
        })
        .collect();
    let logits = rng.vec(k * c, -3.0, 3.0);
    // include huge dw/dh that hit the ln(1000/16) clip
    let mut deltas = rng.vec(k * c * 4, -2.0, 2.0);
    for i in 0..deltas.len() / 50 {
        deltas[i * 50 + 2] = 40.0;
    }
    Case {
        k,
        c,
        resized,
        logits,
        deltas,
        proposals,
    }
}

/// True when a candidate sits within GPU-vs-CPU rounding of a discrete decision (the strict
/// score threshold or the min-size test): such inputs are redrawn rather than tolerated.
fn near_decision(case: &Case, op: &BoxPostprocess) -> bool {
    for k in 0..case.k {
        let s = cpu::softmax(&case.logits[k * case.c..(k + 1) * case.c]);
        for (cl, &score) in s.iter().enumerate().skip(1) {
            let d = &case.deltas[(k * case.c + cl) * 4..][..4];
            let b = cpu::clip(
                cpu::decode(
                    case.proposals[k],
                    [d[0], d[1], d[2], d[3]],
                    [10.0, 10.0, 5.0, 5.0],
                ),
                (case.resized.0 as f32, case.resized.1 as f32),
            );
            if (score - op.score_thresh).abs() < 1e-5
                || ((b[2] - b[0]) - op.min_size).abs() < 1e-3
                || ((b[3] - b[1]) - op.min_size).abs() < 1e-3
            {
                return true;
            }
        }
    }
    false
}

#[test]
fn candidates_and_finalize_match_cpu() {
    let g = gpu();
    let mut rng = Rng::for_test("candidates_and_finalize_match_cpu");
    for round in 0..6 {
        let c = rng.pick(&[2usize, 4, 8, 91]);
        let capacity = rng.range(1, 300);
        let k = if round == 0 {
            0
        } else {
            rng.range(1, capacity)
        };
        let resized = (rng.range(32, 900), rng.range(32, 900));
        let op = BoxPostprocess {
            num_classes: c,
            capacity,
            score_thresh: 0.05,
            min_size: 0.01,
            max_det: 100,
        };
        let mut case = draw(&mut rng, k, c, resized);
        while near_decision(&case, &op) {
            case = draw(&mut rng, k, c, resized);
        }
        let want = cpu::candidates(
            &case.logits,
            &case.deltas,
            &case.proposals,
            c,
            resized,
            0.05,
            0.01,
        );

        // Capacity-sized inputs: rows past the live count hold garbage the kernels must ignore.
        let mut logits = rng.vec(capacity * c, -50.0, 50.0);
        logits[..k * c].copy_from_slice(&case.logits);
        let mut deltas = rng.vec(capacity * c * 4, -50.0, 50.0);
        deltas[..k * c * 4].copy_from_slice(&case.deltas);
        let mut props = vec![[1.0f32, 2.0, 3.0, 4.0]; capacity];
        props[..k].copy_from_slice(&case.proposals);
        let lb = g.upload("logits", &logits).unwrap();
        let db = g.upload("deltas", &deltas).unwrap();
        let pb = g.upload("proposals", &props).unwrap();
        let cb = g.upload("count", &[k as u32]).unwrap();
        let bufs = op.buffers(g).unwrap();
        let ds = op
            .encode_candidates(g, &lb, &db, &pb, &cb, resized, &bufs)
            .unwrap();
        g.run("box_head test", ds.iter()).unwrap();
        let n = g.read_back_pod::<u32>(&bufs.cand_count, 1).unwrap()[0] as usize;
        assert_eq!(n, want.len(), "candidate count (C={c}, K={k})");
        let boxes: Vec<[f32; 4]> = g.read_back_pod(&bufs.cand_boxes, n).unwrap();
        let scores: Vec<f32> = g.read_back_pod(&bufs.cand_scores, n).unwrap();
        let labels: Vec<u32> = g.read_back_pod(&bufs.cand_labels, n).unwrap();
        let rows: Vec<u32> = g.read_back_pod(&bufs.cand_rows, n).unwrap();
        let mut max_box = 0f32;
        for i in 0..n {
            assert_eq!(labels[i], want[i].label, "order/label at {i}");
            assert_eq!(rows[i], want[i].row, "source proposal of candidate {i}");
            // exp() in WGSL is within a few ulp: scores ≤ 1e-6 abs, boxes ≤ 1e-5 relative to the
            // image size (decode multiplies exp(dw) by widths up to ~1000 px).
            assert!(
                (scores[i] - want[i].score).abs() <= 1e-6,
                "score {i}: {} vs {}",
                scores[i],
                want[i].score
            );
            for (g, w) in boxes[i].iter().zip(want[i].bbox) {
                max_box = max_box.max((g - w).abs());
            }
        }
        assert!(
            max_box <= 1e-5 * resized.0.max(resized.1) as f32,
            "box diff {max_box}"
        );
        eprintln!("C={c} K={k}/{capacity}: {n} candidates, max box diff {max_box:.2e}");

        // finalize: keep a random subset in a random order, rescale to a random original size
        let mut keep: Vec<u32> = (0..n as u32).filter(|_| rng.range(0, 2) == 0).collect();
        for i in (1..keep.len()).rev() {
            keep.swap(i, rng.range(0, i));
        }
        let orig = (rng.range(10, 3000), rng.range(10, 3000));
        let kb = g
            .upload(
                "keep",
                &if keep.is_empty() {
                    vec![0u32]
                } else {
                    keep.clone()
                },
            )
            .unwrap();
        let kc = g.upload("keep count", &[keep.len() as u32]).unwrap();
        let dets = g.storage("dets", 100 * 32).unwrap();
        let dc = g.storage("det count", 4).unwrap();
        let d = op
            .encode_finalize(g, bufs.candidates(), &kb, &kc, resized, orig, &dets, &dc)
            .unwrap();
        g.run("finalize test", [&d]).unwrap();
        let m = g.read_back_pod::<u32>(&dc, 1).unwrap()[0] as usize;
        assert_eq!(m, keep.len().min(100));
        let rows: Vec<[f32; 8]> = g.read_back_pod(&dets, m).unwrap();
        for (i, r) in rows.iter().enumerate() {
            let j = keep[i] as usize;
            let want_box = cpu::rescale(boxes[j], orig, resized);
            // multiplication by the same f32 ratio: exact
            assert_eq!(&r[..4], &want_box, "det {i}");
            assert_eq!(r[4], scores[j]);
            assert_eq!(r[5], labels[j] as f32);
        }
    }
}

#[test]
fn gather_rows_matches_cpu() {
    use marrow::ops::box_head::GatherRows;
    let g = gpu();
    let mut rng = Rng::for_test("gather_rows_matches_cpu");
    for _ in 0..4 {
        let n = rng.range(1, 3000);
        let max_rows = rng.range(1, 1000);
        let boxes: Vec<[f32; 4]> = (0..n)
            .map(|_| [rng.uniform(), rng.uniform(), rng.uniform(), rng.uniform()])
            .collect();
        let scores = rng.vec(n, 0.0, 1.0);
        let kept = rng.range(0, n.min(1500));
        let keep: Vec<u32> = (0..kept).map(|_| rng.range(0, n - 1) as u32).collect();
        let bb = g.upload("boxes", &boxes).unwrap();
        let sb = g.upload("scores", &scores).unwrap();
        let kb = g
            .upload(
                "keep",
                &if keep.is_empty() {
                    vec![0]
                } else {
                    keep.clone()
                },
            )
            .unwrap();
        let kc = g.upload("keep count", &[kept as u32]).unwrap();
        let ob = g.storage("out boxes", max_rows as u64 * 16).unwrap();
        let os = g.storage("out scores", max_rows as u64 * 4).unwrap();
        let oc = g.storage("out count", 4).unwrap();
        let d = GatherRows { max_rows }
            .encode(g, "gather", &bb, &sb, &kb, &kc, &ob, &os, &oc)
            .unwrap();
        g.run("gather", [&d]).unwrap();
        let m = g.read_back_pod::<u32>(&oc, 1).unwrap()[0] as usize;
        assert_eq!(m, kept.min(max_rows));
        let gb: Vec<[f32; 4]> = g.read_back_pod(&ob, m).unwrap();
        let gs: Vec<f32> = g.read_back_pod(&os, m).unwrap();
        for i in 0..m {
            assert_eq!(gb[i], boxes[keep[i] as usize]);
            assert_eq!(gs[i], scores[keep[i] as usize]);
        }
    }
}
