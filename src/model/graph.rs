//! A tiny dataflow IR for the network (convs and pools over NHWC values), and the planner that
//! turns it into dispatches for one input size: shapes are inferred, buffers are assigned by
//! lifetime (a value's buffer is reused once its last reader has run), and every dispatch is
//! recorded once so a plan can be replayed for each image of that size.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::{Dispatch, Gpu, Nhwc, Tensor};
use crate::ops::conv::{Conv2d, ConvWeights};
use crate::ops::pool::MaxPool2d;

/// Index of a value (an activation tensor) in a [`Graph`].
pub type ValueId = usize;

pub enum Op {
    Conv {
        op: Conv2d,
        weights: Arc<ConvWeights>,
        residual: Option<ValueId>,
    },
    Pool {
        op: MaxPool2d,
    },
}

pub struct Node {
    pub name: String,
    pub op: Op,
    pub input: ValueId,
    pub output: ValueId,
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

    pub fn conv(
        &mut self,
        name: &str,
        op: Conv2d,
        weights: Arc<ConvWeights>,
        input: ValueId,
        residual: Option<ValueId>,
    ) -> ValueId {
        let output = self.new_value();
        self.nodes.push(Node {
            name: name.to_string(),
            op: Op::Conv {
                op,
                weights,
                residual,
            },
            input,
            output,
        });
        output
    }

    pub fn pool(&mut self, name: &str, op: MaxPool2d, input: ValueId) -> ValueId {
        let output = self.new_value();
        self.nodes.push(Node {
            name: name.to_string(),
            op: Op::Pool { op },
            input,
            output,
        });
        output
    }

    /// Shapes of every value for the given input shapes (in `self.inputs` order).
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
        for ((_, v), s) in self.inputs.iter().zip(inputs) {
            shapes[*v] = Some(*s);
        }
        for n in &self.nodes {
            let x = shapes[n.input]
                .ok_or_else(|| Error::shape(&n.name, "input has no shape (graph order)"))?;
            let y = match &n.op {
                Op::Conv { op, .. } => op.out_shape(x),
                Op::Pool { op } => op.out_shape(x),
            }
            .map_err(|e| Error::shape(&n.name, e.to_string()))?;
            shapes[n.output] = Some(y);
        }
        Ok(shapes)
    }

    /// Plans the graph for `inputs` (tensors already on the GPU, in `self.inputs` order).
    pub fn plan(&self, gpu: &Gpu, label: &str, inputs: &[Tensor]) -> Result<Plan> {
        let in_shapes: Vec<Nhwc> = inputs.iter().map(|t| t.shape).collect();
        let shapes = self.shapes(&in_shapes)?;
        // Last reader of each value; graph outputs and inputs live to the end.
        let end = self.nodes.len();
        let mut last_use = vec![0usize; self.values];
        for (i, n) in self.nodes.iter().enumerate() {
            last_use[n.input] = last_use[n.input].max(i);
            if let Op::Conv {
                residual: Some(r), ..
            } = &n.op
            {
                last_use[*r] = last_use[*r].max(i);
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
            let shape = shapes[n.output].expect("shape inferred");
            // Best fit: the smallest free buffer that holds the value.
            let need = shape.bytes().max(4);
            let pick = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.size() >= need)
                .min_by_key(|(_, b)| b.size())
                .map(|(j, _)| j);
            let y = match pick {
                Some(j) => Tensor {
                    buf: free.swap_remove(j),
                    shape,
                },
                None => {
                    activation_bytes += need;
                    Tensor::new(gpu, &format!("{label}/{} (activation)", n.name), shape)?
                }
            };
            let x = tensors[n.input].clone().expect("input planned");
            let (dispatch, flops, min_bytes, conv) = match &n.op {
                Op::Conv {
                    op,
                    weights,
                    residual,
                } => {
                    let r = residual.map(|r| tensors[r].clone().expect("residual planned"));
                    let d = op.encode(gpu, &n.name, &x, weights, r.as_ref(), &y)?;
                    let rb = r.map(|t| t.shape.bytes()).unwrap_or(0);
                    let wb = (op.k() * op.cout + op.cout) as u64 * 4;
                    (
                        d,
                        op.flops(shape),
                        (x.shape.bytes() + wb + rb + shape.bytes()) as f64,
                        Some((*op, x.shape)),
                    )
                }
                Op::Pool { op } => (
                    op.encode(gpu, &n.name, &x, &y)?,
                    0.0,
                    (x.shape.bytes() + shape.bytes()) as f64,
                    None,
                ),
            };
            tensors[n.output] = Some(y);
            ops.push(PlannedOp {
                name: n.name.clone(),
                dispatch,
                flops,
                min_bytes,
                conv,
            });
            // Release values whose last reader was this node.
            let mut release = vec![n.input];
            if let Op::Conv {
                residual: Some(r), ..
            } = &n.op
            {
                release.push(*r);
            }
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
            if last_use[n.output] == 0 && !self.outputs.iter().any(|(_, o)| *o == n.output) {
                if let Some(t) = tensors[n.output].take() {
                    free.push(t.buf);
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
