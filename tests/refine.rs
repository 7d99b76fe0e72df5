//! The refinement head (docs/design.md §6): the linear kernel against a CPU matmul, and the whole
//! GPU stage (attention, GRU / LSTM cells, step, stop rule, classification, NMS, rescale) against
//! the CPU reference on fresh random shapes — hidden and key sizes that are not multiples of 4, a
//! single detection and 100, 1 and 5 steps, every stop pattern, zero detections — and the load
//! errors of a head that disagrees with its config or the detector.

mod common;

use common::{gpu, Rng};
use marrow::cpu::refine::{self as cref, HeadWeights};
use marrow::gpu::{Gpu, Nhwc, Tensor};
use marrow::model::config::ModelConfig;
use marrow::model::refine::{RefineHead, RefineInput, RefineInputs, RefineStage};
use marrow::model::weights::{HostTensor, WeightStore};
use marrow::ops::linalg::{Activation, Linear, LinearIo};

fn rel_close(a: f32, b: f32, tol: f32, scale: f32) -> bool {
    (a - b).abs() <= tol * scale.max(b.abs()).max(1e-6)
}

#[test]
fn linear_matches_cpu_on_random_shapes() {
    let g = gpu();
    let mut rng = Rng::for_test("linear_matches_cpu_on_random_shapes");
    for case in 0..8 {
        let k = rng.range(1, 70);
        let n = rng.range(1, 40);
        let per = rng.pick(&[1usize, 49]);
        let cap = rng.range(1, 12);
        let live = rng.range(0, cap);
        let act = rng.pick(&[Activation::None, Activation::Tanh]);
        let m_cap = cap * per;
        let x = rng.vec(m_cap * k, -2.0, 2.0);
        let w = rng.vec(n * k, -1.0, 1.0);
        let b = rng.vec(n, -1.0, 1.0);
        let sentinel = vec![-7.0f32; m_cap * n];
        let xb = g.upload("x", &x).unwrap();
        let wb = g.upload("w", &w).unwrap();
        let bb = g.upload("b", &b).unwrap();
        let cb = g.upload("count", &[live as u32]).unwrap();
        let yb = g.upload("y", &sentinel).unwrap();
        let op = Linear::new(k, n, act);
        let d = op
            .encode(
                g,
                "linear test",
                &LinearIo {
                    x: &xb,
                    w: &wb,
                    b: &bb,
                    count: &cb,
                    y: &yb,
                    m_cap,
                    rows_per_count: per,
                },
            )
            .unwrap();
        g.run("linear test", [&d]).unwrap();
        let y: Vec<f32> = g.read_back_pod(&yb, m_cap * n).unwrap();
        for m in 0..m_cap {
            let want = cref::linear_row(&w, &b, &x[m * k..(m + 1) * k]);
            for o in 0..n {
                let got = y[m * n + o];
                if m >= live * per {
                    assert_eq!(
                        got, -7.0,
                        "case {case}: row {m} past the live rows was written"
                    );
                    continue;
                }
                let want = match act {
                    Activation::None => want[o],
                    Activation::Tanh => (want[o] as f64).tanh() as f32,
                };
                // f32 accumulation over k ≤ 70 terms of magnitude ≤ 2: error ≤ k·ε·Σ|terms|.
                let bound: f32 = (0..k)
                    .map(|i| (x[m * k + i] * w[o * k + i]).abs())
                    .sum::<f32>()
                    + 1.0;
                assert!(
                    (got - want).abs() <= 1e-5 * bound,
                    "case {case} (k {k}, n {n}, {act:?}): y[{m},{o}] = {got}, cpu {want}"
                );
            }
        }
    }
}

/// A random head of `cell` with hidden `h`, key `k`, on a detector of FPN width `c`,
/// representation `r` and `n` classes; `stop_bias` shifts the stop logit.
struct RandomHead {
    store: WeightStore,
    host: HeadWeights,
}

#[allow(clippy::too_many_arguments)]
fn random_head(
    rng: &mut Rng,
    lstm: bool,
    h: usize,
    k: usize,
    c: usize,
    r: usize,
    n: usize,
    steps: usize,
    stop_bias: f32,
) -> RandomHead {
    let g = if lstm { 4 } else { 3 };
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let lin = |rng: &mut Rng, name: &str, o: usize, i: usize, scale: f32, bias: f32| {
        let s = scale / (i as f32).sqrt();
        let w = rng.vec(o * i, -s, s);
        let b: Vec<f32> = rng.vec(o, -s, s).into_iter().map(|v| v + bias).collect();
        (
            format!("{name}.weight"),
            vec![o, i],
            w,
            format!("{name}.bias"),
            vec![o],
            b,
        )
    };
    let mut push = |v: (String, Vec<usize>, Vec<f32>, String, Vec<usize>, Vec<f32>)| {
        t.push((v.0, v.1, v.2));
        t.push((v.3, v.4, v.5));
    };
    push(lin(rng, "refine.init", h, r, 2.0, 0.0));
    push(lin(rng, "refine.key", k, c, 2.0, 0.0));
    push(lin(rng, "refine.value", k, c, 2.0, 0.0));
    push(lin(rng, "refine.query", k, h, 2.0, 0.0));
    push(lin(rng, "refine.delta", 4, h, 1.0, 0.0));
    push(lin(rng, "refine.stop", 1, h, 2.0, stop_bias));
    push(lin(rng, "refine.critic", 1, h, 1.0, 0.0));
    push(lin(rng, "refine.cls", n, h, 4.0, 0.0));
    let ih = lin(rng, "refine.cell", g * h, k, 1.5, 0.0);
    let hh = lin(rng, "refine.cell", g * h, h, 1.5, 0.0);
    t.push(("refine.cell.weight_ih".into(), ih.1, ih.2));
    t.push(("refine.cell.bias_ih".into(), ih.4, ih.5));
    t.push(("refine.cell.weight_hh".into(), hh.1, hh.2));
    t.push(("refine.cell.bias_hh".into(), hh.4, hh.5));
    let beta = 0.5 + rng.uniform() * 2.0;
    t.push(("refine.beta".into(), vec![1], vec![beta]));
    let get = |name: &str| t.iter().find(|x| x.0 == name).unwrap().2.clone();
    let host = HeadWeights {
        lstm,
        hidden: h,
        key: k,
        init_w: get("refine.init.weight"),
        init_b: get("refine.init.bias"),
        key_w: get("refine.key.weight"),
        key_b: get("refine.key.bias"),
        value_w: get("refine.value.weight"),
        value_b: get("refine.value.bias"),
        query_w: get("refine.query.weight"),
        query_b: get("refine.query.bias"),
        beta,
        w_ih: get("refine.cell.weight_ih"),
        w_hh: get("refine.cell.weight_hh"),
        b_ih: get("refine.cell.bias_ih"),
        b_hh: get("refine.cell.bias_hh"),
        delta_w: get("refine.delta.weight"),
        delta_b: get("refine.delta.bias"),
        stop_w: get("refine.stop.weight"),
        stop_b: get("refine.stop.bias"),
        cls_w: get("refine.cls.weight"),
        cls_b: get("refine.cls.bias"),
    };
    let config = ModelConfig {
        refine: Some(serde_json::json!({
            "cell": if lstm { "lstm" } else { "gru" },
            "hidden": h, "key": k, "steps": steps,
            "stop_threshold": 0.5, "nms_thresh": 0.5,
        })),
        ..Default::default()
    };
    let store = WeightStore::from_tensors(
        "random-head.safetensors",
        config,
        t.into_iter()
            .map(|(n, shape, data)| (n, HostTensor { shape, data })),
    )
    .unwrap();
    RandomHead { store, host }
}

struct Scene {
    resized: (usize, usize),
    orig: (usize, usize),
    levels: Vec<(Nhwc, Vec<f32>)>,
    boxes: Vec<[f32; 4]>,
    features: Vec<Vec<f32>>,
}

fn random_scene(rng: &mut Rng, c: usize, r: usize, d: usize) -> Scene {
    let resized = (rng.range(64, 260), rng.range(64, 260));
    let padded = (resized.0.div_ceil(32) * 32, resized.1.div_ceil(32) * 32);
    let orig = (
        (resized.0 as f32 * (0.5 + rng.uniform() * 1.5)) as usize + 1,
        (resized.1 as f32 * (0.5 + rng.uniform() * 1.5)) as usize + 1,
    );
    let levels = [4, 8, 16, 32]
        .iter()
        .map(|s| {
            let sh = Nhwc::new(1, padded.0 / s, padded.1 / s, c);
            (sh, rng.vec(sh.len(), -1.0, 1.0))
        })
        .collect();
    let boxes = (0..d)
        .map(|_| {
            let w = 4.0 + rng.uniform() * (resized.1 as f32 - 4.0);
            let h = 4.0 + rng.uniform() * (resized.0 as f32 - 4.0);
            let x = rng.uniform() * (resized.1 as f32 - w);
            let y = rng.uniform() * (resized.0 as f32 - h);
            [x, y, x + w, y + h]
        })
        .collect();
    let features = (0..d).map(|_| rng.vec(r, 0.0, 2.0)).collect();
    Scene {
        resized,
        orig,
        levels,
        boxes,
        features,
    }
}

/// Runs the GPU stage on a scene: (final detections, debug outputs).
fn run_gpu(
    g: &Gpu,
    head: &RefineHead,
    s: &Scene,
    max_det: usize,
) -> (
    Vec<marrow::model::refine::RefinedDetection>,
    marrow::model::refine::RefineDebug,
) {
    let lv: Vec<Tensor> = s
        .levels
        .iter()
        .map(|(sh, d)| Tensor::from_host(g, "level", *sh, d).unwrap())
        .collect();
    let r = head.representation;
    let mut feats: Vec<f32> = s.features.iter().flatten().copied().collect();
    feats.resize(max_det.max(1) * r, 0.0);
    let fb = g.upload("features", &feats).unwrap();
    let stage = RefineStage::new(
        g,
        head,
        &RefineInputs {
            levels: [&lv[0], &lv[1], &lv[2], &lv[3]],
            resized: s.resized,
            orig: s.orig,
            features: &fb,
        },
        max_det,
        1e-2,
    )
    .unwrap();
    let rows: Vec<RefineInput> = s
        .boxes
        .iter()
        .map(|b| RefineInput {
            bbox: *b,
            score: 0.9,
            label: 1,
        })
        .collect();
    stage.write_input(g, &rows).unwrap();
    g.run("refine test", stage.dispatch_list()).unwrap();
    (
        stage.read_detections(g).unwrap(),
        stage.read_debug(g).unwrap(),
    )
}

/// Events that an f32 GPU and an f64 CPU may legitimately decide differently: a stop
/// probability at the threshold, a box at a pyramid-level boundary, terminal scores or class
/// logits in a near tie, an IoU at the NMS threshold.
fn knife_edge(out: &cref::HeadOutput) -> Option<String> {
    for (t, sp) in out.stop_prob.iter().enumerate() {
        for (i, s) in sp.iter().enumerate() {
            if *s >= 0.0 && (s - 0.5).abs() < 2e-4 {
                return Some(format!("stop prob {s} at step {} det {i}", t + 1));
            }
        }
    }
    for sb in out.step_boxes.iter() {
        for b in sb {
            let a = ((b[2] - b[0]) * (b[3] - b[1])).max(0.0).sqrt();
            if [112.0f32, 224.0, 448.0]
                .iter()
                .any(|e| (a - e).abs() < 0.01)
            {
                return Some(format!("box side {a} at a level boundary"));
            }
        }
    }
    for l in &out.logits {
        let mut fg: Vec<f32> = l[1..].to_vec();
        fg.sort_by(|a, b| b.partial_cmp(a).unwrap());
        if fg.len() > 1 && fg[0] - fg[1] < 1e-4 {
            return Some("near-tied class logits".into());
        }
    }
    let mut sc: Vec<f32> = out.terminal.iter().map(|t| t.0).collect();
    sc.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if sc.windows(2).any(|w| w[1] - w[0] < 2e-6) {
        return Some("near-tied scores".into());
    }
    let last = out.step_boxes.last().cloned().unwrap_or_default();
    for i in 0..last.len() {
        for j in 0..i {
            if out.terminal[i].1 != out.terminal[j].1 {
                continue;
            }
            let iou = marrow::validate::matching::iou(&last[i], &last[j]) as f32;
            if (iou - 0.5).abs() < 1e-4 {
                return Some(format!("IoU {iou} at the NMS threshold"));
            }
        }
    }
    None
}

/// One random case: draws until no knife edge, then compares every output.
#[allow(clippy::too_many_arguments)]
fn check_case(
    rng: &mut Rng,
    lstm: bool,
    h: usize,
    k: usize,
    d: usize,
    steps: usize,
    stop_bias: f32,
) -> Vec<u32> {
    check_case_where(rng, lstm, h, k, d, steps, stop_bias, None)
}

/// A wanted stop-step pattern: its description and its test.
type Pattern<'a> = (&'a str, fn(&[u32]) -> bool);

/// [`check_case`], redrawing (on the CPU reference alone, which is cheap) until the stop steps
/// satisfy `pattern`, when one is given.
#[allow(clippy::too_many_arguments)]
fn check_case_where(
    rng: &mut Rng,
    lstm: bool,
    h: usize,
    k: usize,
    d: usize,
    steps: usize,
    stop_bias: f32,
    pattern: Option<Pattern>,
) -> Vec<u32> {
    let g = gpu();
    let (c, r, n) = (
        rng.pick(&[4usize, 8, 13]),
        rng.range(5, 40),
        rng.range(2, 6),
    );
    let attempts = if pattern.is_some() { 3000 } else { 20 };
    for attempt in 0..attempts {
        let rh = random_head(rng, lstm, h, k, c, r, n, steps, stop_bias);
        let s = random_scene(rng, c, r, d);
        let lv: Vec<(&[f32], Nhwc)> = s.levels.iter().map(|(sh, v)| (v.as_slice(), *sh)).collect();
        let want = cref::run_head(
            &rh.host,
            steps,
            0.5,
            0.5,
            [lv[0], lv[1], lv[2], lv[3]],
            s.resized,
            s.orig,
            &s.boxes,
            &s.features,
            100,
            1e-2,
        );
        if let Some(why) = knife_edge(&want) {
            eprintln!("attempt {attempt}: redraw ({why})");
            continue;
        }
        if let Some((what, ok)) = pattern {
            if !ok(&want.stop_step) {
                continue;
            }
            eprintln!("attempt {attempt}: {what}: stop steps {:?}", want.stop_step);
        }
        let head = RefineHead::load(g, &rh.store, c, r, n)
            .unwrap()
            .expect("a head");
        let (dets, dbg) = run_gpu(g, &head, &s, 100);
        let ctx = format!(
            "{} H={h} K={k} C={c} R={r} N={n} D={d} T={steps} image {:?}",
            if lstm { "lstm" } else { "gru" },
            s.resized
        );
        assert_eq!(dbg.detections, d, "{ctx}: live count");
        assert_eq!(dbg.stop_step, want.stop_step, "{ctx}: stop steps");
        // Boxes are image coordinates (up to ~260 px); after T steps of f32 projections and
        // bilinear sampling they agree with the f64 reference to ~1e-4 px per step.
        let img = s.resized.0.max(s.resized.1) as f32;
        for t in 0..steps {
            for i in 0..d {
                let gb = &dbg.step_boxes[t][i * 4..i * 4 + 4];
                for j in 0..4 {
                    assert!(
                        (gb[j] - want.step_boxes[t][i][j]).abs() <= 2e-5 * img,
                        "{ctx}: step {} det {i} box {:?} vs cpu {:?}",
                        t + 1,
                        gb,
                        want.step_boxes[t][i]
                    );
                }
                let sp = want.stop_prob[t][i];
                let gp = dbg.stop_prob[t][i];
                if sp < 0.0 {
                    assert_eq!(
                        gp,
                        -1.0,
                        "{ctx}: frozen det {i} got a stop prob at step {}",
                        t + 1
                    );
                } else {
                    assert!((gp - sp).abs() <= 1e-4, "{ctx}: stop prob {gp} vs {sp}");
                    for b in 0..49 {
                        let (ga, wa) = (dbg.attention[t][i * 49 + b], want.attention[t][i][b]);
                        assert!((ga - wa).abs() <= 1e-4, "{ctx}: attention {ga} vs {wa}");
                    }
                }
            }
        }
        for i in 0..d {
            for u in 0..h {
                let (gv, wv) = (dbg.hidden[i * h + u], want.hidden[i][u]);
                assert!((gv - wv).abs() <= 1e-4, "{ctx}: h[{i},{u}] {gv} vs {wv}");
            }
            for cl in 0..n {
                let (gv, wv) = (dbg.logits[i * n + cl], want.logits[i][cl]);
                assert!(rel_close(gv, wv, 1e-4, 1.0), "{ctx}: logit {gv} vs {wv}");
            }
            assert_eq!(
                dbg.terminal[i].1, want.terminal[i].1,
                "{ctx}: label of det {i}"
            );
            assert!((dbg.terminal[i].0 - want.terminal[i].0).abs() <= 1e-5);
        }
        assert_eq!(dets.len(), want.detections.len(), "{ctx}: final detections");
        let scale = s.orig.0.max(s.orig.1) as f32;
        for (gd, wd) in dets.iter().zip(&want.detections) {
            assert_eq!(gd.label, wd.2, "{ctx}: final label");
            assert!((gd.score - wd.1).abs() <= 1e-5, "{ctx}: final score");
            for j in 0..4 {
                assert!(
                    (gd.bbox[j] - wd.0[j]).abs() <= 2e-5 * scale,
                    "{ctx}: final box"
                );
            }
        }
        return want.stop_step;
    }
    match pattern {
        Some((what, _)) => panic!("{attempts} random draws: none gave {what} off a knife edge"),
        None => panic!("{attempts} random draws all hit a knife edge"),
    }
}

/// Both cells on the same spread of shapes: a mix of stops at H, K not multiples of 4, one
/// detection over 5 steps, 100 detections (1 step for the GRU, 5 for the LSTM), then a fully
/// random shape and stop bias.
fn cell_matches_cpu_on_random_shapes(lstm: bool, name: &str) {
    let mut rng = Rng::for_test(name);
    let t100 = if lstm { 5 } else { 1 };
    check_case(&mut rng, lstm, 13, 9, 20, 3, 0.0);
    check_case(&mut rng, lstm, 7, 11, 1, 5, 0.0);
    check_case(&mut rng, lstm, 30, 20, 100, t100, 0.0);
    let (h, k, d, t) = (
        rng.range(1, 40),
        rng.range(1, 33),
        rng.range(1, 30),
        rng.range(1, 5),
    );
    let bias = rng.uniform() * 4.0 - 2.0;
    check_case(&mut rng, lstm, h, k, d, t, bias);
}

#[test]
fn gru_head_matches_cpu_on_random_shapes() {
    cell_matches_cpu_on_random_shapes(false, "gru_head_matches_cpu_on_random_shapes");
}

#[test]
fn lstm_head_matches_cpu_on_random_shapes() {
    cell_matches_cpu_on_random_shapes(true, "lstm_head_matches_cpu_on_random_shapes");
}

#[test]
fn stop_patterns_all_none_and_mixed() {
    let mut rng = Rng::for_test("stop_patterns_all_none_and_mixed");
    for lstm in [false, true] {
        let all = check_case(&mut rng, lstm, 11, 7, 12, 3, 40.0);
        assert!(
            all.iter().all(|&s| s == 1),
            "a +40 stop bias must stop every box at step 1: {all:?}"
        );
        let none = check_case(&mut rng, lstm, 11, 7, 12, 3, -40.0);
        assert!(
            none.iter().all(|&s| s == 0),
            "a -40 stop bias must never stop: {none:?}"
        );
    }
    // A mix: some stop at step 1, some later, some never. Random heads give it in a minority of
    // draws, so the CPU reference is redrawn until it shows the mix; then the GPU is compared.
    let mixed = |s: &[u32]| s.contains(&0) && s.contains(&1) && s.iter().any(|&v| v > 1);
    for lstm in [false, true] {
        let bias = rng.uniform() * 1.0 - 0.5;
        check_case_where(
            &mut rng,
            lstm,
            11,
            7,
            40,
            4,
            bias,
            Some(("stops at step 1, later and never", mixed)),
        );
    }
}

#[test]
fn zero_detections_go_through() {
    let g = gpu();
    let mut rng = Rng::for_test("zero_detections_go_through");
    for lstm in [false, true] {
        let rh = random_head(&mut rng, lstm, 10, 6, 8, 12, 4, 3, 0.0);
        let head = RefineHead::load(g, &rh.store, 8, 12, 4).unwrap().unwrap();
        let s = random_scene(&mut rng, 8, 12, 0);
        let (dets, dbg) = run_gpu(g, &head, &s, 100);
        assert!(dets.is_empty());
        assert_eq!(dbg.detections, 0);
    }
}

fn load_err(store: &WeightStore, c: usize, r: usize, n: usize) -> String {
    match RefineHead::load(gpu(), store, c, r, n) {
        Ok(_) => panic!("expected a load error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn mismatched_heads_are_load_errors_naming_the_tensor() {
    let mut rng = Rng::for_test("mismatched_heads_are_load_errors_naming_the_tensor");
    let rh = random_head(&mut rng, false, 10, 6, 8, 12, 4, 3, 0.0);
    // Against the wrong detector: FPN width, representation, classes.
    let e = load_err(&rh.store, 16, 12, 4);
    assert!(
        e.contains("refine.key.weight") && e.contains("[6, 16]"),
        "{e}"
    );
    let e = load_err(&rh.store, 8, 24, 4);
    assert!(e.contains("refine.init.weight"), "{e}");
    let e = load_err(&rh.store, 8, 12, 5);
    assert!(e.contains("refine.cls.weight"), "{e}");
    // Config vs tensors.
    // The same tensors (less `drop`) under another `refine` config.
    let rebuilt = |v: Option<serde_json::Value>, drop: &str| {
        let mut cfg = rh.store.config.clone();
        cfg.refine = v;
        let t: Vec<_> = rh
            .store
            .names()
            .filter(|n| *n != drop)
            .map(|n| {
                let s = rh.store.shape(n).unwrap().to_vec();
                let data = rh.store.get(n, &s).unwrap().to_vec();
                (n.to_string(), HostTensor { shape: s, data })
            })
            .collect();
        WeightStore::from_tensors("head.safetensors", cfg, t).unwrap()
    };
    let with_config = |v: serde_json::Value| rebuilt(Some(v), "");
    let e = load_err(
        &with_config(serde_json::json!({"cell": "gru", "hidden": 11, "key": 6, "steps": 3})),
        8,
        12,
        4,
    );
    assert!(
        e.contains("refine.hidden") && e.contains("refine.init.weight"),
        "{e}"
    );
    let e = load_err(
        &with_config(serde_json::json!({"cell": "lstm", "hidden": 10, "key": 6, "steps": 3})),
        8,
        12,
        4,
    );
    assert!(e.contains("refine.cell.weight_ih"), "{e}");
    let e = load_err(
        &with_config(serde_json::json!({"cell": "rnn", "hidden": 10, "key": 6, "steps": 3})),
        8,
        12,
        4,
    );
    assert!(e.contains("\"rnn\""), "{e}");
    let e = load_err(
        &with_config(serde_json::json!({"cell": "gru", "hidden": 10, "key": 6, "steps": 0})),
        8,
        12,
        4,
    );
    assert!(e.contains("steps"), "{e}");
    let e = load_err(
        &with_config(serde_json::json!({"cell": "gru", "hidden": 10, "key": 6})),
        8,
        12,
        4,
    );
    assert!(e.contains("steps"), "{e}");
    let e = load_err(&with_config(serde_json::Value::Null), 8, 12, 4);
    assert!(e.contains("no `refine` object"), "{e}");
    // A missing tensor.
    let e = load_err(
        &rebuilt(rh.store.config.refine.clone(), "refine.beta"),
        8,
        12,
        4,
    );
    assert!(e.contains("refine.beta") && e.contains("missing"), "{e}");
}

/// One committed fixture: the head's inputs, parameters and PyTorch's (float64) outputs.
struct Fixture {
    name: String,
    meta: serde_json::Value,
    f32s: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>,
    i32s: std::collections::HashMap<String, Vec<i32>>,
}

fn read_fixture(path: &std::path::Path) -> Fixture {
    use safetensors::{Dtype, SafeTensors};
    let bytes = std::fs::read(path).unwrap();
    let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        md.metadata()
            .as_ref()
            .and_then(|m| m.get("marrow.refine_fixture"))
            .expect("marrow.refine_fixture metadata"),
    )
    .unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut f32s = std::collections::HashMap::new();
    let mut i32s = std::collections::HashMap::new();
    for (name, view) in st.tensors() {
        match view.dtype() {
            Dtype::F32 => {
                f32s.insert(
                    name.clone(),
                    (
                        view.shape().to_vec(),
                        bytemuck::pod_collect_to_vec(view.data()),
                    ),
                );
            }
            Dtype::I32 => {
                i32s.insert(name.clone(), bytemuck::pod_collect_to_vec(view.data()));
            }
            other => panic!("{name}: unexpected dtype {other:?}"),
        }
    }
    Fixture {
        name: path.file_stem().unwrap().to_string_lossy().into(),
        meta,
        f32s,
        i32s,
    }
}

/// The whole head, teacher-forced from the fixture's detections and features, against PyTorch's
/// module (weights/refine.py, run in float64 by weights/make_refine_fixture.py): every fixture,
/// both cells. Boxes and logits within 1e-4 relative; stop steps, labels and the NMS survivors
/// identical (the fixtures are drawn away from every knife edge).
#[test]
fn head_matches_pytorch_fixtures() {
    let g = gpu();
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/refine");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 8, "fixtures missing in {}", dir.display());
    let mut cells = std::collections::BTreeSet::new();
    for path in paths {
        let fx = read_fixture(&path);
        let m = &fx.meta;
        let u = |k: &str| m[k].as_u64().unwrap() as usize;
        let (h, c, r, n, t) = (
            u("hidden"),
            u("fpn_channels"),
            u("representation"),
            u("num_classes"),
            u("steps"),
        );
        let pair = |k: &str| {
            (
                m[k][0].as_u64().unwrap() as usize,
                m[k][1].as_u64().unwrap() as usize,
            )
        };
        let (resized, orig) = (pair("resized"), pair("orig"));
        cells.insert(m["cell"].as_str().unwrap().to_string());
        let config = ModelConfig {
            refine: Some(serde_json::json!({
                "cell": m["cell"], "hidden": h, "key": m["key"], "steps": t,
                "stop_threshold": m["stop_threshold"], "nms_thresh": m["nms_thresh"],
            })),
            ..Default::default()
        };
        let tensors: Vec<(String, HostTensor)> = fx
            .f32s
            .iter()
            .filter(|(k, _)| k.starts_with("refine."))
            .map(|(k, (s, d))| {
                (
                    k.clone(),
                    HostTensor {
                        shape: s.clone(),
                        data: d.clone(),
                    },
                )
            })
            .collect();
        let store = WeightStore::from_tensors(&fx.name, config, tensors).unwrap();
        let head = RefineHead::load(g, &store, c, r, n).unwrap().expect("head");
        let levels: Vec<(Nhwc, Vec<f32>)> = (0..4)
            .map(|l| {
                let (s, d) = &fx.f32s[&format!("fpn.{l}")];
                let sh = Nhwc::new(1, s[2], s[3], s[1]);
                (sh, marrow::cpu::nchw_to_nhwc(d, 1, s[1], s[2], s[3]))
            })
            .collect();
        let (bs, bd) = &fx.f32s["input.boxes"];
        let d = bs[0];
        let boxes: Vec<[f32; 4]> = bd
            .chunks_exact(4)
            .map(|b| [b[0], b[1], b[2], b[3]])
            .collect();
        let feats = &fx.f32s["input.features"].1;
        let scene = Scene {
            resized,
            orig,
            levels,
            boxes,
            features: feats.chunks_exact(r.max(1)).map(|f| f.to_vec()).collect(),
        };
        let (dets, dbg) = run_gpu(g, &head, &scene, u("detections_per_img"));
        let ctx = &fx.name;
        let stop: Vec<u32> = fx.i32s["expect.stop_step"]
            .iter()
            .map(|&s| s as u32)
            .collect();
        assert_eq!(dbg.stop_step, stop, "{ctx}: stop steps");
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * b.abs().max(1.0);
        let sb = &fx.f32s["expect.step_boxes"].1;
        let sp = &fx.f32s["expect.stop_prob"].1;
        let at = &fx.f32s["expect.attention"].1;
        for step in 0..t {
            for i in 0..d {
                let active = stop[i] == 0 || step < stop[i] as usize;
                for j in 0..4 {
                    let (gv, wv) = (dbg.step_boxes[step][i * 4 + j], sb[(step * d + i) * 4 + j]);
                    assert!(
                        close(gv, wv),
                        "{ctx}: step {} det {i} box[{j}] {gv} vs {wv}",
                        step + 1
                    );
                }
                if active {
                    let (gv, wv) = (dbg.stop_prob[step][i], sp[step * d + i]);
                    assert!((gv - wv).abs() <= 1e-5, "{ctx}: stop prob {gv} vs {wv}");
                    for b in 0..49 {
                        let (gv, wv) =
                            (dbg.attention[step][i * 49 + b], at[(step * d + i) * 49 + b]);
                        assert!((gv - wv).abs() <= 1e-5, "{ctx}: attention {gv} vs {wv}");
                    }
                } else {
                    assert_eq!(
                        dbg.stop_prob[step][i], -1.0,
                        "{ctx}: a stopped detection moved on"
                    );
                }
            }
        }
        let hid = &fx.f32s["expect.hidden"].1;
        for (i, (gv, wv)) in dbg.hidden.iter().zip(hid).enumerate() {
            assert!((gv - wv).abs() <= 1e-4, "{ctx}: hidden[{i}] {gv} vs {wv}");
        }
        let lg = &fx.f32s["expect.logits"].1;
        for (i, (gv, wv)) in dbg.logits.iter().zip(lg).enumerate() {
            assert!(close(*gv, *wv), "{ctx}: logit[{i}] {gv} vs {wv}");
        }
        let eb = &fx.f32s["expect.boxes"].1;
        let es = &fx.f32s["expect.scores"].1;
        let el = &fx.i32s["expect.labels"];
        assert_eq!(dets.len(), es.len(), "{ctx}: final detections");
        for (k, det) in dets.iter().enumerate() {
            assert_eq!(
                det.label as i32, el[k],
                "{ctx}: label of final detection {k}"
            );
            assert!(
                (det.score - es[k]).abs() <= 1e-5,
                "{ctx}: score {} vs {}",
                det.score,
                es[k]
            );
            for j in 0..4 {
                assert!(
                    close(det.bbox[j], eb[k * 4 + j]),
                    "{ctx}: final box {k}: {:?}",
                    det.bbox
                );
            }
        }
        eprintln!(
            "{ctx}: D={d} T={t} H={h}: {} refined detections match",
            dets.len()
        );
    }
    assert_eq!(cells.len(), 2, "fixtures cover both cells");
}
