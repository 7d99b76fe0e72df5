//! The graph IR's planner with multi-input and in-place nodes (src/model/graph.rs): a chain of
//! linear layers planned on fresh random shapes against a CPU reference, buffer reuse by
//! lifetime, in-place updates of graph inputs, and the structural errors `Graph::shapes` reports.
//! (The refinement head's attention, cell and step nodes run end to end in tests/refine.rs.)

mod common;

use std::sync::Arc;

use common::{gpu, Rng};
use marrow::cpu::refine as cref;
use marrow::gpu::{Nhwc, Tensor};
use marrow::model::graph::Graph;
use marrow::ops::linalg::{Activation, Linear, LinearWeights};

fn layer(rng: &mut Rng, inputs: usize, outputs: usize) -> (Vec<f32>, Vec<f32>) {
    (
        rng.vec(outputs * inputs, -1.0, 1.0),
        rng.vec(outputs, -1.0, 1.0),
    )
}

fn apply(w: &[f32], b: &[f32], x: &[f32], k: usize, act: Activation) -> Vec<f32> {
    x.chunks_exact(k)
        .flat_map(|row| {
            cref::linear_row(w, b, row)
                .into_iter()
                .map(move |v| match act {
                    Activation::None => v,
                    Activation::Tanh => (v as f64).tanh() as f32,
                })
        })
        .collect()
}

/// x → linear(k0→k1, tanh) → linear(k1→k2) → linear(k2→k3) with `live` of `m` rows, planned by the
/// graph: the live rows equal the CPU chain, and the third value reuses the first one's buffer
/// (its last reader has run), so the plan allocates two activation buffers, not three.
#[test]
fn linear_chain_matches_cpu_and_reuses_buffers() {
    let g = gpu();
    let mut rng = Rng::for_test("linear_chain_matches_cpu_and_reuses_buffers");
    for case in 0..6 {
        let m = rng.range(1, 90);
        let live = rng.range(1, m);
        let k0 = rng.range(1, 50);
        let k1 = rng.range(8, 70);
        let k2 = rng.range(1, 50);
        // The last value fits in the first's buffer: the planner must reuse it.
        let k3 = rng.range(1, k1);
        let x = rng.vec(m * k0, -2.0, 2.0);
        let specs = [
            (k0, k1, Activation::Tanh),
            (k1, k2, Activation::None),
            (k2, k3, Activation::None),
        ];
        let host: Vec<(Vec<f32>, Vec<f32>)> = specs
            .iter()
            .map(|(a, b, _)| layer(&mut rng, *a, *b))
            .collect();

        let mut graph = Graph::default();
        let xv = graph.input("x");
        let count = graph.input("count");
        let mut v = xv;
        for (i, ((a, b, act), (w, bias))) in specs.iter().zip(&host).enumerate() {
            let weights = Arc::new(LinearWeights::upload(g, &format!("l{i}"), w, bias).unwrap());
            v = graph.linear(
                &format!("l{i}"),
                Linear::new(*a, *b, *act),
                weights,
                v,
                count,
                1,
            );
        }
        graph.output("y", v);
        let xt = Tensor::new(g, "x", Nhwc::new(m, 1, 1, k0)).unwrap();
        g.queue.write_buffer(&xt.buf, 0, bytemuck::cast_slice(&x));
        let ct = Tensor::new(g, "count", Nhwc::new(1, 1, 1, 1)).unwrap();
        g.queue
            .write_buffer(&ct.buf, 0, bytemuck::bytes_of(&(live as u32)));
        let plan = graph.plan(g, "chain", &[xt, ct]).unwrap();
        assert_eq!(plan.ops.len(), 3);
        let (b1, b2) = ((m * k1 * 4) as u64, (m * k2 * 4) as u64);
        assert_eq!(
            plan.activation_bytes,
            b1 + b2,
            "case {case}: [{m},{k1}] and [{m},{k2}] allocated, [{m},{k3}] reuses the first"
        );
        g.run("chain", plan.dispatches()).unwrap();
        let y = plan.output("y").unwrap();
        assert_eq!(y.shape, Nhwc::new(m, 1, 1, k3));
        let got: Vec<f32> = g.read_back_pod(&y.buf, m * k3).unwrap();
        let mut want = x[..live * k0].to_vec();
        for ((a, _, act), (w, b)) in specs.iter().zip(&host) {
            want = apply(w, b, &want, *a, *act);
        }
        for (i, (&gv, &wv)) in got[..live * k3].iter().zip(&want).enumerate() {
            // Three f32 layers of ≤ 70 terms of magnitude ≤ 2: a few 1e-5 relative to the sum of
            // |terms|, which is at most ~100 here.
            assert!(
                (gv - wv).abs() <= 2e-4 * (1.0 + wv.abs()),
                "case {case} (m {m}, live {live}, {k0}->{k1}->{k2}->{k3}): y[{}] = {gv}, cpu {wv}",
                i
            );
        }
    }
}

/// `linear_into` overwrites a graph input (state the caller owns) and allocates nothing.
#[test]
fn linear_into_updates_a_graph_input_in_place() {
    let g = gpu();
    let mut rng = Rng::for_test("linear_into_updates_a_graph_input_in_place");
    let (m, k, n, live) = (7, 5, 3, 4);
    let x = rng.vec(m * k, -1.0, 1.0);
    let (w, b) = layer(&mut rng, k, n);
    let mut graph = Graph::default();
    let xv = graph.input("x");
    let count = graph.input("count");
    let state = graph.input("state");
    let weights = Arc::new(LinearWeights::upload(g, "into", &w, &b).unwrap());
    graph.linear_into(
        "into",
        Linear::new(k, n, Activation::Tanh),
        weights,
        xv,
        count,
        1,
        state,
    );
    let xt = Tensor::new(g, "x", Nhwc::new(m, 1, 1, k)).unwrap();
    g.queue.write_buffer(&xt.buf, 0, bytemuck::cast_slice(&x));
    let ct = Tensor::new(g, "count", Nhwc::new(1, 1, 1, 1)).unwrap();
    g.queue
        .write_buffer(&ct.buf, 0, bytemuck::bytes_of(&(live as u32)));
    let st = Tensor::new(g, "state", Nhwc::new(m, 1, 1, n)).unwrap();
    g.queue
        .write_buffer(&st.buf, 0, bytemuck::cast_slice(&vec![9.0f32; m * n]));
    let plan = graph.plan(g, "into", &[xt, ct, st.clone()]).unwrap();
    assert_eq!(plan.activation_bytes, 0);
    g.run("into", plan.dispatches()).unwrap();
    let got: Vec<f32> = g.read_back_pod(&st.buf, m * n).unwrap();
    let want = apply(&w, &b, &x[..live * k], k, Activation::Tanh);
    for i in 0..m * n {
        if i < live * n {
            assert!(
                (got[i] - want[i]).abs() <= 1e-5,
                "state[{i}] = {}, cpu {}",
                got[i],
                want[i]
            );
        } else {
            assert_eq!(got[i], 9.0, "state[{i}] past the live rows was written");
        }
    }
}

/// Structural mistakes are errors naming the node (or the input), found before anything is
/// recorded.
#[test]
fn structural_errors_name_the_node() {
    let g = gpu();
    let w = Arc::new(LinearWeights::upload(g, "w", &[0.5; 12], &[0.0; 3]).unwrap());
    let shapes = [Nhwc::new(6, 1, 1, 4), Nhwc::new(1, 1, 1, 1)];

    // An in-place write to a planned value: its buffer could be reused while it is live.
    let mut graph = Graph::default();
    let x = graph.input("x");
    let count = graph.input("count");
    let y = graph.linear(
        "first",
        Linear::new(4, 3, Activation::None),
        w.clone(),
        x,
        count,
        1,
    );
    graph.linear_into(
        "writes a planned value",
        Linear::new(3, 3, Activation::None),
        Arc::new(LinearWeights::upload(g, "w2", &[0.5; 9], &[0.0; 3]).unwrap()),
        y,
        count,
        1,
        y,
    );
    let e = graph.shapes(&shapes).unwrap_err().to_string();
    assert!(
        e.contains("writes a planned value") && e.contains("only graph inputs"),
        "{e}"
    );

    // A node built by hand with the wrong arity: a linear layer with two in-place writes.
    let mut graph = Graph::default();
    let x = graph.input("x");
    let count = graph.input("count");
    graph.linear_into(
        "two writes",
        Linear::new(4, 3, Activation::None),
        w.clone(),
        x,
        count,
        1,
        x,
    );
    graph.nodes[0].writes.push(count);
    let e = graph.shapes(&shapes).unwrap_err().to_string();
    assert!(
        e.contains("two writes") && e.contains("2 in-place writes; the op takes 2 and 0..=1"),
        "{e}"
    );

    // A linear layer whose input has the wrong width.
    let mut graph = Graph::default();
    let x = graph.input("x");
    let count = graph.input("count");
    graph.linear(
        "too narrow",
        Linear::new(5, 3, Activation::None),
        w.clone(),
        x,
        count,
        1,
    );
    let e = graph.shapes(&shapes).unwrap_err().to_string();
    assert!(
        e.contains("too narrow") && e.contains("linear 5 -> 3"),
        "{e}"
    );

    // An in-place target too small for the rows it receives.
    let mut graph = Graph::default();
    let x = graph.input("x");
    let count = graph.input("count");
    let state = graph.input("state");
    graph.linear_into(
        "small target",
        Linear::new(4, 3, Activation::None),
        w,
        x,
        count,
        1,
        state,
    );
    let e = graph
        .shapes(&[shapes[0], shapes[1], Nhwc::new(5, 1, 1, 3)])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("small target") && e.contains("in-place output"),
        "{e}"
    );

    // Binding by name: the order of `named` does not matter, a missing, unknown or repeated
    // name is an error.
    let mut graph = Graph::default();
    graph.input("x");
    graph.input("count");
    let x = Tensor::new(g, "x", shapes[0]).unwrap();
    let c = Tensor::new(g, "count", shapes[1]).unwrap();
    let bound = graph.bind(&[("count", &c), ("x", &x)]).unwrap();
    assert_eq!(
        bound.iter().map(|t| t.shape).collect::<Vec<_>>(),
        shapes.to_vec(),
        "bound in the graph's input order"
    );
    assert!(Arc::ptr_eq(&bound[0].buf, &x.buf) && Arc::ptr_eq(&bound[1].buf, &c.buf));
    let bind_err = |named: &[(&str, &Tensor)]| match graph.bind(named) {
        Ok(_) => panic!(
            "binding {:?} was accepted",
            named.iter().map(|n| n.0).collect::<Vec<_>>()
        ),
        Err(e) => e.to_string(),
    };
    let e = bind_err(&[("x", &x)]);
    assert!(e.contains("\"count\" is not bound"), "{e}");
    let e = bind_err(&[("x", &x), ("count", &c), ("cnt", &c)]);
    assert!(e.contains("no graph input is named \"cnt\""), "{e}");
    let e = bind_err(&[("x", &x), ("count", &c), ("x", &x)]);
    assert!(e.contains("\"x\" bound twice"), "{e}");

    // The wrong number of inputs.
    let graph = Graph::default();
    let e = graph.shapes(&shapes).unwrap_err().to_string();
    assert!(e.contains("2 inputs given, 0 expected"), "{e}");
}
