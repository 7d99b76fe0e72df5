//! A small dataflow IR for the network and the planner that turns it into dispatches for one
//! input size: shapes are inferred, buffers are assigned by lifetime (a value's buffer is reused
//! once its last reader has run), and every dispatch is recorded once so a plan can be replayed
//! for each image of that size.
//!
//! Values are NHWC f32 tensors (or u32 of the same size); a row-major matrix [rows, cols] is any
//! value whose `n·h·w` is the rows and `c` the columns, so the box head's RoIAlign output
//! [D, 7, 7, C] is directly the [D·49, C] input of a linear layer. The ops are the backbone's
//! convolutions and pools, and the linear algebra of the refinement head: linear layers (matmul +
//! bias + activation), multi-level RoIAlign, batched attention (scores, row softmax and context
//! fused in one kernel), the recurrent cells (elementwise over the gates) and the refinement step.
//!
//! A node reads values and either produces one new value (planned here) or updates **state** in
//! place: a graph input the caller owns (the refinement head's hidden state, boxes, per-box
//! flags, debug outputs). Only graph inputs may be written in place, so a planned buffer is never
//! overwritten while a later node still needs its value; `Graph::shapes` checks this.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::{Buffer, Dispatch, Gpu, Nhwc, Tensor, Variant};
use crate::ops::conv::{Conv2d, ConvWeights};
use crate::ops::linalg::{Linear, LinearIo, LinearWeights};
use crate::ops::pool::MaxPool2d;
use crate::ops::refine::{AttentionIo, CellIo, CellKind, RefineKernels, StepIo, StepParams};
use crate::ops::roi_align::MultiScaleRoiAlign;

/// Index of a value (an activation tensor) in a [`Graph`].
pub type ValueId = usize;

pub enum Op {
    /// Inputs `[x]`; the residual (added in the epilogue) is `residual`.
    Conv {
        op: Conv2d,
        weights: Arc<ConvWeights>,
        residual: Option<ValueId>,
    },
    /// Inputs `[x]`.
    Pool { op: MaxPool2d },
    /// `y = act(x Wᵀ + b)` over the rows of x. Inputs `[x, count]`: only the first
    /// `count[0] × rows_per_count` rows (at most all of x's) are computed, so one recorded
    /// dispatch serves any number of live detections.
    Linear {
        op: Linear,
        weights: Arc<LinearWeights>,
        rows_per_count: usize,
    },
    /// torchvision's MultiScaleRoIAlign of the first `count[0]` boxes. Inputs
    /// `[p2, p3, p4, p5, boxes, count]`; output `[capacity, out, out, C]`.
    RoiAlign {
        op: MultiScaleRoiAlign,
        /// Resized, unpadded image (h, w): the level scales come from it.
        image_size: (usize, usize),
    },
    /// One query per detection over its 49 keys: `softmax(β · q·k / √K)`-weighted values (the
    /// refinement head's attention, docs/refinement.md). Inputs `[kv, q, count, flags]` with kv
    /// the fused [keys | values] projection; output the context [cap, 1, 1, K]; writes the
    /// weights into the per-step debug buffer `[attn]`.
    Attention {
        kernels: RefineKernels,
        params: StepParams,
        step: usize,
        beta: Arc<Buffer>,
    },
    /// The GRU / LSTM cell on precomputed gate pre-activations. Inputs `[gi, gh, count, flags]`;
    /// writes `[h]` (GRU) or `[h, c]` (LSTM) of the active detections in place.
    Cell { kernels: RefineKernels },
    /// Delta decoding, clipping and the stop rule for one step. Inputs `[heads, count]`; writes
    /// `[flags, boxes, step_boxes, stop_prob]`.
    RefineStep {
        kernels: RefineKernels,
        params: StepParams,
        step: usize,
    },
}

impl Op {
    /// The pipeline variant a node of this op compiles, for compiling ahead of the first plan
    /// (the refinement head's own kernels compile when its stage is first planned).
    pub fn variant(&self) -> Option<Variant> {
        match self {
            Op::Conv { op, .. } => Some(op.variant(op.tile())),
            Op::Pool { op } => Some(op.variant()),
            Op::Linear { op, .. } => Some(op.variant()),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Op::Conv { .. } => "conv",
            Op::Pool { .. } => "pool",
            Op::Linear { .. } => "linear",
            Op::RoiAlign { .. } => "roi_align",
            Op::Attention { .. } => "attention",
            Op::Cell { .. } => "cell",
            Op::RefineStep { .. } => "refine step",
        }
    }

    /// The inputs the op takes and the in-place writes it accepts (a linear layer produces a
    /// value or overwrites one graph input: 0 or 1 writes).
    fn arity(&self) -> (usize, std::ops::RangeInclusive<usize>) {
        match self {
            Op::Conv { .. } | Op::Pool { .. } => (1, 0..=0),
            Op::Linear { .. } => (2, 0..=1),
            Op::RoiAlign { .. } => (6, 0..=0),
            Op::Attention { .. } => (4, 1..=1),
            Op::Cell { kernels } => match kernels.cell {
                CellKind::Gru => (4, 1..=1),
                CellKind::Lstm => (4, 2..=2),
            },
            Op::RefineStep { .. } => (2, 4..=4),
        }
    }
}

pub struct Node {
    pub name: String,
    pub op: Op,
    /// Values read, in the op's order (see [`Op`]).
    pub inputs: Vec<ValueId>,
    /// The value produced, or `None` for a node that only updates state in place.
    pub output: Option<ValueId>,
    /// Graph inputs updated in place, in the op's order.
    pub writes: Vec<ValueId>,
}

impl Node {
    /// Every value the node reads, the conv's residual included.
    pub fn reads(&self) -> impl Iterator<Item = ValueId> + '_ {
        let residual = match &self.op {
            Op::Conv { residual, .. } => *residual,
            _ => None,
        };
        self.inputs.iter().copied().chain(residual)
    }
}

#[derive(Default)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub inputs: Vec<(String, ValueId)>,
    pub outputs: Vec<(String, ValueId)>,
    values: usize,
}

/// One node's dispatch with what a benchmark needs to report it.
pub struct PlannedOp {
    pub name: String,
    pub dispatch: Dispatch,
    pub flops: f64,
    /// Fewest bytes the op must move: inputs read once, weights read once, output written once.
    pub min_bytes: f64,
    pub conv: Option<(Conv2d, Nhwc)>,
}

pub struct Plan {
    pub ops: Vec<PlannedOp>,
    pub inputs: Vec<(String, Tensor)>,
    pub outputs: Vec<(String, Tensor)>,
    /// Bytes of activation buffers this plan allocated (after lifetime reuse).
    pub activation_bytes: u64,
}

/// Rows of a value read as a matrix (`n·h·w`).
fn rows(s: &Nhwc) -> usize {
    s.n * s.h * s.w
}

impl Graph {
    pub fn new_value(&mut self) -> ValueId {
        self.values += 1;
        self.values - 1
    }

    pub fn input(&mut self, name: &str) -> ValueId {
        let v = self.new_value();
        self.inputs.push((name.to_string(), v));
        v
    }

    pub fn output(&mut self, name: &str, v: ValueId) {
        self.outputs.push((name.to_string(), v));
    }

    /// Adds a node reading `inputs` and updating `writes` in place; with `output` it also
    /// produces a new value, which is returned.
    fn push(
        &mut self,
        name: &str,
        op: Op,
        inputs: Vec<ValueId>,
        output: bool,
        writes: Vec<ValueId>,
    ) -> Option<ValueId> {
        let output = output.then(|| self.new_value());
        self.nodes.push(Node {
            name: name.to_string(),
            op,
            inputs,
            output,
            writes,
        });
        output
    }

    /// Adds a node producing a new value.
    fn add(&mut self, name: &str, op: Op, inputs: Vec<ValueId>) -> ValueId {
        self.push(name, op, inputs, true, Vec::new())
            .expect("an output was asked for")
    }

    /// Adds a node that only updates graph inputs in place.
    fn add_update(&mut self, name: &str, op: Op, inputs: Vec<ValueId>, writes: Vec<ValueId>) {
        self.push(name, op, inputs, false, writes);
    }

    pub fn conv(
        &mut self,
        name: &str,
        op: Conv2d,
        weights: Arc<ConvWeights>,
        input: ValueId,
        residual: Option<ValueId>,
    ) -> ValueId {
        self.add(
            name,
            Op::Conv {
                op,
                weights,
                residual,
            },
            vec![input],
        )
    }

    pub fn pool(&mut self, name: &str, op: MaxPool2d, input: ValueId) -> ValueId {
        self.add(name, Op::Pool { op }, vec![input])
    }

    /// A linear layer over the rows of `x`, of which `count[0] × rows_per_count` are live.
    pub fn linear(
        &mut self,
        name: &str,
        op: Linear,
        weights: Arc<LinearWeights>,
        x: ValueId,
        count: ValueId,
        rows_per_count: usize,
    ) -> ValueId {
        let lin = Op::Linear {
            op,
            weights,
            rows_per_count,
        };
        self.add(name, lin, vec![x, count])
    }

    /// A linear layer whose result overwrites the graph input `y` (state such as a hidden state).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_into(
        &mut self,
        name: &str,
        op: Linear,
        weights: Arc<LinearWeights>,
        x: ValueId,
        count: ValueId,
        rows_per_count: usize,
        y: ValueId,
    ) {
        let lin = Op::Linear {
            op,
            weights,
            rows_per_count,
        };
        self.add_update(name, lin, vec![x, count], vec![y]);
    }

    pub fn roi_align(
        &mut self,
        name: &str,
        op: MultiScaleRoiAlign,
        image_size: (usize, usize),
        levels: [ValueId; 4],
        boxes: ValueId,
        count: ValueId,
    ) -> ValueId {
        let mut ins = levels.to_vec();
        ins.extend([boxes, count]);
        self.add(name, Op::RoiAlign { op, image_size }, ins)
    }

    /// The attention of refinement step `step`; returns the context.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        name: &str,
        kernels: RefineKernels,
        params: StepParams,
        step: usize,
        beta: Arc<Buffer>,
        [kv, q, count, flags]: [ValueId; 4],
        attn: ValueId,
    ) -> ValueId {
        let op = Op::Attention {
            kernels,
            params,
            step,
            beta,
        };
        self.push(name, op, vec![kv, q, count, flags], true, vec![attn])
            .expect("an output was asked for")
    }

    /// The recurrent cell: updates `state` (`[h]`, or `[h, c]` for an LSTM) in place.
    pub fn cell(
        &mut self,
        name: &str,
        kernels: RefineKernels,
        [gi, gh, count, flags]: [ValueId; 4],
        state: &[ValueId],
    ) {
        self.add_update(
            name,
            Op::Cell { kernels },
            vec![gi, gh, count, flags],
            state.to_vec(),
        );
    }

    /// Refinement step `step`: decodes `heads` into the boxes and applies the stop rule.
    #[allow(clippy::too_many_arguments)]
    pub fn refine_step(
        &mut self,
        name: &str,
        kernels: RefineKernels,
        params: StepParams,
        step: usize,
        [heads, count]: [ValueId; 2],
        [flags, boxes, step_boxes, stop_prob]: [ValueId; 4],
    ) {
        self.add_update(
            name,
            Op::RefineStep {
                kernels,
                params,
                step,
            },
            vec![heads, count],
            vec![flags, boxes, step_boxes, stop_prob],
        );
    }

    /// Shapes of every value for the given input shapes (in `self.inputs` order). Also checks the
    /// graph's structure: arities, values defined before use, in-place writes only to inputs.
    pub fn shapes(&self, inputs: &[Nhwc]) -> Result<Vec<Option<Nhwc>>> {
        if inputs.len() != self.inputs.len() {
            return Err(Error::shape(
                "graph",
                format!(
                    "{} inputs given, {} expected",
                    inputs.len(),
                    self.inputs.len()
                ),
            ));
        }
        let mut shapes = vec![None; self.values];
        let mut is_input = vec![false; self.values];
        for ((_, v), s) in self.inputs.iter().zip(inputs) {
            shapes[*v] = Some(*s);
            is_input[*v] = true;
        }
        for n in &self.nodes {
            let (ni, nw) = n.op.arity();
            if n.inputs.len() != ni || !nw.contains(&n.writes.len()) {
                return Err(Error::shape(
                    &n.name,
                    format!(
                        "{} node with {} inputs and {} in-place writes; the op takes {ni} and \
                         {}..={}",
                        n.op.kind(),
                        n.inputs.len(),
                        n.writes.len(),
                        nw.start(),
                        nw.end()
                    ),
                ));
            }
            let nw = n.writes.len();
            let mut ins = Vec::with_capacity(ni);
            for v in n.reads().chain(n.writes.iter().copied()) {
                let s = shapes.get(v).copied().flatten().ok_or_else(|| {
                    Error::shape(&n.name, format!("value {v} has no shape (graph order)"))
                })?;
                ins.push(s);
            }
            if let Some(&w) = n.writes.iter().find(|w| !is_input[**w]) {
                return Err(Error::shape(
                    &n.name,
                    format!(
                        "writes value {w} in place, but only graph inputs (state the caller \
                         owns) may be: a planned buffer can be reused while its value is live"
                    ),
                ));
            }
            let y = out_shape(&n.op, &ins[..ni], &ins[ins.len() - nw..])
                .map_err(|e| Error::shape(&n.name, e))?;
            match (n.output, y) {
                (Some(o), Some(y)) => shapes[o] = Some(y),
                (None, None) => {}
                _ => {
                    return Err(Error::shape(
                        &n.name,
                        format!("{} node: output does not match the op", n.op.kind()),
                    ))
                }
            }
        }
        Ok(shapes)
    }

    /// The graph's inputs in their order, looked up by name in `named`: a tensor bound to the
    /// wrong input cannot slip through by position. Every input must be given exactly once and
    /// no name may be unknown.
    pub fn bind(&self, named: &[(&str, &Tensor)]) -> Result<Vec<Tensor>> {
        for (i, (n, _)) in named.iter().enumerate() {
            if !self.inputs.iter().any(|(g, _)| g == n) {
                return Err(Error::shape(
                    "graph",
                    format!("no graph input is named {n:?}"),
                ));
            }
            if named[..i].iter().any(|(m, _)| m == n) {
                return Err(Error::shape("graph", format!("input {n:?} bound twice")));
            }
        }
        self.inputs
            .iter()
            .map(|(g, _)| {
                named
                    .iter()
                    .find(|(n, _)| n == g)
                    .map(|(_, t)| (*t).clone())
                    .ok_or_else(|| Error::shape("graph", format!("input {g:?} is not bound")))
            })
            .collect()
    }

    /// Plans the graph for `inputs` (tensors already on the GPU, in `self.inputs` order).
    pub fn plan(&self, gpu: &Gpu, label: &str, inputs: &[Tensor]) -> Result<Plan> {
        let in_shapes: Vec<Nhwc> = inputs.iter().map(|t| t.shape).collect();
        let shapes = self.shapes(&in_shapes)?;
        // Last reader of each value; graph outputs and inputs live to the end.
        let end = self.nodes.len();
        let mut last_use = vec![0usize; self.values];
        for (i, n) in self.nodes.iter().enumerate() {
            for v in n.reads() {
                last_use[v] = last_use[v].max(i);
            }
        }
        for (_, v) in self.outputs.iter().chain(self.inputs.iter()) {
            last_use[*v] = end;
        }
        let mut tensors: Vec<Option<Tensor>> = vec![None; self.values];
        for ((_, v), t) in self.inputs.iter().zip(inputs) {
            tensors[*v] = Some(t.clone());
        }
        // Free list of (buffer) that can be re-bound to a new value.
        let mut free: Vec<Arc<wgpu::Buffer>> = Vec::new();
        let mut activation_bytes = 0u64;
        let mut ops = Vec::with_capacity(self.nodes.len());
        for (i, n) in self.nodes.iter().enumerate() {
            let y = match n.output {
                None => None,
                Some(o) => {
                    let shape = shapes[o].expect("shape inferred");
                    // Best fit: the smallest free buffer that holds the value.
                    let need = shape.bytes().max(4);
                    let pick = free
                        .iter()
                        .enumerate()
                        .filter(|(_, b)| b.size() >= need)
                        .min_by_key(|(_, b)| b.size())
                        .map(|(j, _)| j);
                    Some(match pick {
                        Some(j) => Tensor {
                            buf: free.swap_remove(j),
                            shape,
                        },
                        None => {
                            activation_bytes += need;
                            Tensor::new(gpu, &format!("{label}/{} (activation)", n.name), shape)?
                        }
                    })
                }
            };
            let get = |v: ValueId| tensors[v].clone().expect("value planned");
            let ins: Vec<Tensor> = n.inputs.iter().map(|&v| get(v)).collect();
            let writes: Vec<Tensor> = n.writes.iter().map(|&v| get(v)).collect();
            let residual = match &n.op {
                Op::Conv { residual, .. } => residual.map(get),
                _ => None,
            };
            let planned = encode(gpu, n, &ins, residual.as_ref(), y.as_ref(), &writes)?;
            if let (Some(o), Some(y)) = (n.output, y) {
                tensors[o] = Some(y);
            }
            ops.push(planned);
            // Release values whose last reader was this node.
            let mut release: Vec<ValueId> = n.reads().collect();
            release.sort_unstable();
            release.dedup();
            for v in release {
                if last_use[v] == i {
                    if let Some(t) = tensors[v].take() {
                        free.push(t.buf);
                    }
                }
            }
            // A value nobody reads (dead output) is released at once.
            if let Some(o) = n.output {
                if last_use[o] == 0 && !self.outputs.iter().any(|(_, v)| *v == o) {
                    if let Some(t) = tensors[o].take() {
                        free.push(t.buf);
                    }
                }
            }
        }
        let outputs = self
            .outputs
            .iter()
            .map(|(name, v)| (name.clone(), tensors[*v].clone().expect("output planned")))
            .collect();
        Ok(Plan {
            ops,
            inputs: self
                .inputs
                .iter()
                .zip(inputs)
                .map(|((n, _), t)| (n.clone(), t.clone()))
                .collect(),
            outputs,
            activation_bytes,
        })
    }
}

/// The output shape of `op` (None for an in-place op) given the shapes of its inputs and of the
/// state it writes; checks what the shapes must agree on.
fn out_shape(op: &Op, ins: &[Nhwc], writes: &[Nhwc]) -> std::result::Result<Option<Nhwc>, String> {
    let at_least = |s: &Nhwc, elems: usize, what: &str| {
        if s.len() < elems {
            Err(format!("{what} is {s}, fewer than {elems} values"))
        } else {
            Ok(())
        }
    };
    Ok(match op {
        Op::Conv { op, .. } => Some(op.out_shape(ins[0]).map_err(|e| e.to_string())?),
        Op::Pool { op } => Some(op.out_shape(ins[0]).map_err(|e| e.to_string())?),
        Op::Linear {
            op, rows_per_count, ..
        } => {
            let x = ins[0];
            if x.c != op.inputs {
                return Err(format!(
                    "linear {} -> {}: input is {x}",
                    op.inputs, op.outputs
                ));
            }
            if *rows_per_count == 0 {
                return Err("linear with 0 rows per count".into());
            }
            at_least(&ins[1], 1, "count")?;
            let y = Nhwc::new(x.n, x.h, x.w, op.outputs);
            match writes.first() {
                None => Some(y),
                Some(t) => {
                    at_least(t, y.len(), "in-place output")?;
                    None
                }
            }
        }
        Op::RoiAlign { op, .. } => {
            for (i, l) in ins[..4].iter().enumerate() {
                if l.c != op.channels {
                    return Err(format!(
                        "level {i} is {l}; expected {} channels",
                        op.channels
                    ));
                }
            }
            at_least(&ins[4], op.capacity * 4, "boxes")?;
            at_least(&ins[5], 1, "count")?;
            Some(Nhwc::new(op.capacity, op.output, op.output, op.channels))
        }
        Op::Attention { kernels: k, .. } => {
            let (kv, q) = (ins[0], ins[1]);
            if rows(&kv) != k.cap * 49 || kv.c != 2 * k.key {
                return Err(format!(
                    "keys|values are {kv}; expected {} rows of {}",
                    k.cap * 49,
                    2 * k.key
                ));
            }
            if rows(&q) != k.cap || q.c != k.key {
                return Err(format!(
                    "query is {q}; expected {} rows of {}",
                    k.cap, k.key
                ));
            }
            at_least(&ins[2], 1, "count")?;
            at_least(&ins[3], k.cap * 2, "flags")?;
            Some(Nhwc::new(k.cap, 1, 1, k.key))
        }
        Op::Cell { kernels: k } => {
            let g = k.cell.gates() * k.hidden;
            for (s, what) in [(ins[0], "input gates"), (ins[1], "hidden gates")] {
                if rows(&s) != k.cap || s.c != g {
                    return Err(format!("{what} are {s}; expected {} rows of {g}", k.cap));
                }
            }
            at_least(&ins[2], 1, "count")?;
            at_least(&ins[3], k.cap * 2, "flags")?;
            for w in writes {
                at_least(w, k.cap * k.hidden, "cell state")?;
            }
            None
        }
        Op::RefineStep {
            kernels: k, params, ..
        } => {
            if rows(&ins[0]) != k.cap || ins[0].c != 5 {
                return Err(format!(
                    "heads are {}; expected {} rows of 5",
                    ins[0], k.cap
                ));
            }
            at_least(&ins[1], 1, "count")?;
            at_least(&writes[0], k.cap * 2, "flags")?;
            at_least(&writes[1], k.cap * 4, "boxes")?;
            at_least(&writes[2], params.steps * k.cap * 4, "step boxes")?;
            at_least(&writes[3], params.steps * k.cap, "stop probabilities")?;
            None
        }
    })
}

/// Records node `n`'s dispatch on planned tensors.
fn encode(
    gpu: &Gpu,
    n: &Node,
    ins: &[Tensor],
    residual: Option<&Tensor>,
    y: Option<&Tensor>,
    writes: &[Tensor],
) -> Result<PlannedOp> {
    let label = n.name.as_str();
    let out = || y.or(writes.first()).expect("node has an output or a write");
    let bytes = |ts: &[&Tensor]| ts.iter().map(|t| t.shape.bytes() as f64).sum::<f64>();
    let (dispatch, flops, min_bytes, conv) = match &n.op {
        Op::Conv { op, weights, .. } => {
            let (x, y) = (&ins[0], out());
            let d = op.encode(gpu, label, x, weights, residual, y)?;
            let wb = (op.k() * op.cout + op.cout) as f64 * 4.0;
            let rb = residual.map(|t| t.shape.bytes() as f64).unwrap_or(0.0);
            (
                d,
                op.flops(y.shape),
                bytes(&[x, y]) + wb + rb,
                Some((*op, x.shape)),
            )
        }
        Op::Pool { op } => {
            let (x, y) = (&ins[0], out());
            (op.encode(gpu, label, x, y)?, 0.0, bytes(&[x, y]), None)
        }
        Op::Linear {
            op,
            weights,
            rows_per_count,
        } => {
            let (x, count, y) = (&ins[0], &ins[1], out());
            let m_cap = rows(&x.shape);
            let io = LinearIo {
                x: &x.buf,
                w: &weights.w,
                b: &weights.b,
                count: &count.buf,
                y: &y.buf,
                m_cap,
                rows_per_count: *rows_per_count,
            };
            let wb = ((op.inputs + 1) * op.outputs) as f64 * 4.0;
            (
                op.encode(gpu, label, &io)?,
                op.flops(m_cap),
                bytes(&[x]) + wb + (m_cap * op.outputs) as f64 * 4.0,
                None,
            )
        }
        Op::RoiAlign { op, image_size } => {
            let levels = [&ins[0], &ins[1], &ins[2], &ins[3]];
            let y = out();
            let d = op.encode(
                gpu,
                label,
                levels,
                *image_size,
                0,
                &ins[4].buf,
                &ins[5].buf,
                &y.buf,
            )?;
            // Each output value reads 4 samples × (bilinear) 4 taps at most; count the output.
            (d, 0.0, bytes(&[y]), None)
        }
        Op::Attention {
            kernels,
            params,
            step,
            beta,
        } => {
            let ctx = y.expect("attention has an output");
            let io = AttentionIo {
                kv: &ins[0].buf,
                q: &ins[1].buf,
                beta,
                count: &ins[2].buf,
                flags: &ins[3].buf,
                ctx: &ctx.buf,
                attn: &writes[0].buf,
            };
            (
                kernels.encode_attention(gpu, label, params, *step, &io)?,
                // Scores and context: a multiply-add per key (value) element and bin.
                (kernels.cap * 49 * kernels.key * 4) as f64,
                bytes(&[&ins[0], &ins[1], ctx]),
                None,
            )
        }
        Op::Cell { kernels } => {
            let io = CellIo {
                gi: &ins[0].buf,
                gh: &ins[1].buf,
                count: &ins[2].buf,
                flags: &ins[3].buf,
                h: &writes[0].buf,
                c: writes.get(1).map(|t| &*t.buf),
            };
            (
                kernels.encode_cell(gpu, label, &io)?,
                0.0,
                bytes(&[&ins[0], &ins[1]]) + bytes(&writes.iter().collect::<Vec<_>>()),
                None,
            )
        }
        Op::RefineStep {
            kernels,
            params,
            step,
        } => {
            let io = StepIo {
                heads: &ins[0].buf,
                count: &ins[1].buf,
                flags: &writes[0].buf,
                boxes: &writes[1].buf,
                step_boxes: &writes[2].buf,
                stop_prob: &writes[3].buf,
            };
            (
                kernels.encode_step(gpu, label, params, *step, &io)?,
                0.0,
                bytes(&[&ins[0]]) + (kernels.cap * 4 * 4) as f64,
                None,
            )
        }
    };
    Ok(PlannedOp {
        name: n.name.clone(),
        dispatch,
        flops,
        min_bytes,
        conv,
    })
}

impl Plan {
    pub fn dispatches(&self) -> impl Iterator<Item = &Dispatch> {
        self.ops.iter().map(|o| &o.dispatch)
    }

    pub fn output(&self, name: &str) -> Option<&Tensor> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn total_flops(&self) -> f64 {
        self.ops.iter().map(|o| o.flops).sum()
    }
}
