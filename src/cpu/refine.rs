//! CPU reference for the refinement head (docs/design.md §6): plain loops, f64 accumulation, the
//! detector's CPU RoIAlign, decode, clip, softmax and batched NMS. The GPU stage
//! (`model::refine`) is tested against this on random shapes, and against PyTorch's module
//! through committed fixtures.

use crate::cpu::box_head::{clip, decode, rescale};
use crate::cpu::nms::batched_nms;
use crate::cpu::roi_align::multiscale_roi_align_nhwc;
use crate::gpu::Nhwc;

/// The head's parameters as stored (PyTorch layouts, names of design §6 without `refine.`).
#[derive(Debug, Clone)]
pub struct HeadWeights {
    pub lstm: bool,
    pub hidden: usize,
    pub key: usize,
    pub init_w: Vec<f32>,
    pub init_b: Vec<f32>,
    pub key_w: Vec<f32>,
    pub key_b: Vec<f32>,
    pub value_w: Vec<f32>,
    pub value_b: Vec<f32>,
    pub query_w: Vec<f32>,
    pub query_b: Vec<f32>,
    pub beta: f32,
    pub w_ih: Vec<f32>,
    pub w_hh: Vec<f32>,
    pub b_ih: Vec<f32>,
    pub b_hh: Vec<f32>,
    pub delta_w: Vec<f32>,
    pub delta_b: Vec<f32>,
    pub stop_w: Vec<f32>,
    pub stop_b: Vec<f32>,
    pub cls_w: Vec<f32>,
    pub cls_b: Vec<f32>,
}

/// `y = W x + b` for one row (W [out, in]), accumulated in f64.
pub fn linear_row(w: &[f32], b: &[f32], x: &[f32]) -> Vec<f32> {
    let n = b.len();
    let k = x.len();
    (0..n)
        .map(|o| {
            let acc: f64 = (0..k).map(|i| w[o * k + i] as f64 * x[i] as f64).sum();
            (acc + b[o] as f64) as f32
        })
        .collect()
}

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// Softmax attention of one query over `keys`/`values` ([49, K] each): (weights, context).
pub fn attention(keys: &[f32], values: &[f32], q: &[f32], beta: f32) -> (Vec<f32>, Vec<f32>) {
    let k = q.len();
    let bins = keys.len() / k;
    let s: Vec<f64> = (0..bins)
        .map(|j| {
            let d: f64 = (0..k).map(|i| keys[j * k + i] as f64 * q[i] as f64).sum();
            beta as f64 * d / (k as f64).sqrt()
        })
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
    let sum: f64 = e.iter().sum();
    let a: Vec<f64> = e.iter().map(|v| v / sum).collect();
    let ctx = (0..k)
        .map(|i| {
            (0..bins)
                .map(|j| a[j] * values[j * k + i] as f64)
                .sum::<f64>() as f32
        })
        .collect();
    (a.iter().map(|v| *v as f32).collect(), ctx)
}

/// PyTorch `GRUCell` (gates r, z, n) on gates `gi` = W_ih x + b_ih, `gh` = W_hh h + b_hh.
pub fn gru_cell(gi: &[f32], gh: &[f32], h: &[f32]) -> Vec<f32> {
    let n = h.len();
    (0..n)
        .map(|u| {
            let r = sigmoid(gi[u] as f64 + gh[u] as f64);
            let z = sigmoid(gi[n + u] as f64 + gh[n + u] as f64);
            let c = (gi[2 * n + u] as f64 + r * gh[2 * n + u] as f64).tanh();
            ((1.0 - z) * c + z * h[u] as f64) as f32
        })
        .collect()
}

/// PyTorch `LSTMCell` (gates i, f, g, o): (h', c').
pub fn lstm_cell(gi: &[f32], gh: &[f32], c: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = c.len();
    let mut h2 = vec![0f32; n];
    let mut c2 = vec![0f32; n];
    for u in 0..n {
        let g = |j: usize| gi[j * n + u] as f64 + gh[j * n + u] as f64;
        let i = sigmoid(g(0));
        let f = sigmoid(g(1));
        let gg = g(2).tanh();
        let o = sigmoid(g(3));
        let cn = f * c[u] as f64 + i * gg;
        c2[u] = cn as f32;
        h2[u] = (o * cn.tanh()) as f32;
    }
    (h2, c2)
}

/// What the head computes for D detections.
#[derive(Debug, Clone, Default)]
pub struct HeadOutput {
    /// Per step: [D, 4] boxes, [D] stop probabilities (−1 once stopped), [D, 49] attention
    /// (empty rows once stopped).
    pub step_boxes: Vec<Vec<[f32; 4]>>,
    pub stop_prob: Vec<Vec<f32>>,
    pub attention: Vec<Vec<Vec<f32>>>,
    pub stop_step: Vec<u32>,
    pub hidden: Vec<Vec<f32>>,
    pub logits: Vec<Vec<f32>>,
    /// Terminal (score, label) per detection.
    pub terminal: Vec<(f32, usize)>,
    /// After the small-box filter, NMS, top-k and rescale: (box, score, label).
    pub detections: Vec<([f32; 4], f32, usize)>,
}

/// Runs the head: `levels` P2..P5 (NHWC), input `boxes` (resized coords) with their features
/// (`features[i]` = R values).
#[allow(clippy::too_many_arguments)]
pub fn run_head(
    w: &HeadWeights,
    steps: usize,
    stop_threshold: f32,
    nms_thresh: f32,
    levels: [(&[f32], Nhwc); 4],
    resized: (usize, usize),
    orig: (usize, usize),
    boxes: &[[f32; 4]],
    features: &[Vec<f32>],
    max_det: usize,
    min_size: f32,
) -> HeadOutput {
    let d = boxes.len();
    let (hn, kn) = (w.hidden, w.key);
    let c = levels[0].1.c;
    let mut out = HeadOutput::default();
    let mut b: Vec<[f32; 4]> = boxes.to_vec();
    let mut h: Vec<Vec<f32>> = features
        .iter()
        .map(|f| {
            linear_row(&w.init_w, &w.init_b, f)
                .into_iter()
                .map(|v| (v as f64).tanh() as f32)
                .collect()
        })
        .collect();
    let mut cs: Vec<Vec<f32>> = vec![vec![0f32; hn]; d];
    let mut active = vec![true; d];
    let mut stop_step = vec![0u32; d];
    let img = (resized.0 as f32, resized.1 as f32);
    for t in 1..=steps {
        let x = multiscale_roi_align_nhwc(levels, resized, &b, 0, 7, 2, false);
        let mut sb = Vec::with_capacity(d);
        let mut sp = Vec::with_capacity(d);
        let mut at = Vec::with_capacity(d);
        for i in 0..d {
            if !active[i] {
                sb.push(b[i]);
                sp.push(-1.0);
                at.push(Vec::new());
                continue;
            }
            let xi = &x[i * 49 * c..(i + 1) * 49 * c];
            let mut keys = Vec::with_capacity(49 * kn);
            let mut values = Vec::with_capacity(49 * kn);
            for j in 0..49 {
                keys.extend(linear_row(&w.key_w, &w.key_b, &xi[j * c..(j + 1) * c]));
                values.extend(linear_row(&w.value_w, &w.value_b, &xi[j * c..(j + 1) * c]));
            }
            let q = linear_row(&w.query_w, &w.query_b, &h[i]);
            let (a, ctx) = attention(&keys, &values, &q, w.beta);
            let gi = linear_row(&w.w_ih, &w.b_ih, &ctx);
            let gh = linear_row(&w.w_hh, &w.b_hh, &h[i]);
            if w.lstm {
                let (h2, c2) = lstm_cell(&gi, &gh, &cs[i]);
                h[i] = h2;
                cs[i] = c2;
            } else {
                h[i] = gru_cell(&gi, &gh, &h[i]);
            }
            let delta = linear_row(&w.delta_w, &w.delta_b, &h[i]);
            let s = sigmoid(linear_row(&w.stop_w, &w.stop_b, &h[i])[0] as f64) as f32;
            b[i] = clip(
                decode(
                    b[i],
                    [delta[0], delta[1], delta[2], delta[3]],
                    [10.0, 10.0, 5.0, 5.0],
                ),
                img,
            );
            sb.push(b[i]);
            sp.push(s);
            at.push(a);
            if s > stop_threshold {
                active[i] = false;
                stop_step[i] = t as u32;
            }
        }
        out.step_boxes.push(sb);
        out.stop_prob.push(sp);
        out.attention.push(at);
    }
    let mut cand_boxes = Vec::new();
    let mut cand_scores = Vec::new();
    let mut cand_labels = Vec::new();
    for i in 0..d {
        let l = linear_row(&w.cls_w, &w.cls_b, &h[i]);
        let m = l.iter().fold(f64::NEG_INFINITY, |a, v| a.max(*v as f64));
        let sum: f64 = l.iter().map(|v| (*v as f64 - m).exp()).sum();
        let mut label = 1;
        for cidx in 2..l.len() {
            if l[cidx] > l[label] {
                label = cidx;
            }
        }
        let score = ((l[label] as f64 - m).exp() / sum) as f32;
        out.terminal.push((score, label));
        out.logits.push(l);
        let bx = b[i];
        if bx[2] - bx[0] >= min_size && bx[3] - bx[1] >= min_size {
            cand_boxes.push(bx);
            cand_scores.push(score);
            cand_labels.push(label as u32);
        }
    }
    let keep = batched_nms(&cand_boxes, &cand_scores, &cand_labels, nms_thresh);
    out.detections = keep
        .into_iter()
        .take(max_det)
        .map(|j| {
            (
                rescale(cand_boxes[j], orig, resized),
                cand_scores[j],
                cand_labels[j] as usize,
            )
        })
        .collect();
    out.stop_step = stop_step;
    out.hidden = h;
    out
}
