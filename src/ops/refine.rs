//! The refinement head's own kernels (shaders/refine.wgsl): gathering the detector's detections,
//! starting the per-detection state, batched attention over the 49 RoI bins, PyTorch's GRU and
//! LSTM cells, the per-box delta/stop step and the terminal classification. The projections are
//! [`crate::ops::linalg::Linear`] dispatches; RoIAlign, NMS and the final gather + rescale are the
//! detector's kernels. The stage that strings them together is `model::refine`.

use crate::error::{Error, Result};
use crate::gpu::{Buffer, ConstVal, Dispatch, Gpu, Kernel, Nhwc, Tensor};
use crate::ops::box_head::Candidates;
use crate::ops::contract::{params_struct, Binding, HostStruct, KernelIo, KernelVariant, Uniform};

const SOURCE: &str = include_str!("../../shaders/refine.wgsl");

const fn kernel(name: &'static str, entry: &'static str) -> Kernel {
    Kernel {
        name,
        source: SOURCE,
        entry,
    }
}

pub const KERNEL_GATHER: KernelIo = KernelIo {
    kernel: kernel("refine.gather_dets", "gather_dets"),
    params: None,
    storage: &[
        Binding::read("keep"),
        Binding::read("keep_count"),
        Binding::read("cand_boxes"),
        Binding::read("cand_scores"),
        Binding::read("cand_labels"),
        Binding::read("cand_rows"),
        Binding::read_write("input"),
        Binding::read_write("count"),
    ],
};
pub const KERNEL_START: KernelIo = KernelIo {
    kernel: kernel("refine.start", "start"),
    params: None,
    storage: &[
        Binding::read("input"),
        Binding::read("count"),
        Binding::read("features"),
        Binding::read_write("feat"),
        Binding::read_write("boxes"),
        Binding::read_write("state"),
        Binding::read_write("c").when("LSTM"),
    ],
};
pub const KERNEL_ATTENTION: KernelIo = KernelIo {
    kernel: kernel("refine.attention", "attention"),
    params: Some(Params::LAYOUT),
    storage: &[
        Binding::read("kv"),
        Binding::read("q"),
        Binding::read("beta"),
        Binding::read("count"),
        Binding::read("state"),
        Binding::read_write("ctx"),
        Binding::read_write("attn"),
    ],
};
pub const KERNEL_GRU: KernelIo = KernelIo {
    kernel: kernel("refine.gru_cell", "gru_cell"),
    params: None,
    storage: &[
        Binding::read("gi"),
        Binding::read("gh"),
        Binding::read("count"),
        Binding::read("state"),
        Binding::read_write("h"),
    ],
};
pub const KERNEL_LSTM: KernelIo = KernelIo {
    kernel: kernel("refine.lstm_cell", "lstm_cell"),
    params: None,
    storage: &[
        Binding::read("gi"),
        Binding::read("gh"),
        Binding::read("count"),
        Binding::read("state"),
        Binding::read_write("h"),
        Binding::read_write("c"),
    ],
};
pub const KERNEL_STEP: KernelIo = KernelIo {
    kernel: kernel("refine.step", "step"),
    params: Some(Params::LAYOUT),
    storage: &[
        Binding::read("heads"),
        Binding::read("count"),
        Binding::read_write("state"),
        Binding::read_write("boxes"),
        Binding::read_write("step_boxes"),
        Binding::read_write("stop_prob"),
    ],
};
pub const KERNEL_CLASSIFY: KernelIo = KernelIo {
    kernel: kernel("refine.classify", "classify"),
    params: Some(Params::LAYOUT),
    storage: &[
        Binding::read("logits"),
        Binding::read("boxes"),
        Binding::read("count"),
        Binding::read_write("cand_boxes"),
        Binding::read_write("cand_scores"),
        Binding::read_write("cand_labels"),
        Binding::read_write("cand_count"),
        Binding::read_write("terminal"),
    ],
};

params_struct! {
    struct Params {
        img_h: f32,
        img_w: f32,
        stop_threshold: f32,
        min_size: f32,
        step: u32,
        steps: u32,
        pad0: u32,
        pad1: u32,
    }
}

/// The recurrent cell (PyTorch layouts and gate orders).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CellKind {
    /// `nn.GRUCell`: gates r, z, n.
    Gru,
    /// `nn.LSTMCell`: gates i, f, g, o.
    Lstm,
}

impl CellKind {
    /// Gate blocks of H rows in `weight_ih` / `weight_hh`.
    pub fn gates(self) -> usize {
        match self {
            CellKind::Gru => 3,
            CellKind::Lstm => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CellKind::Gru => "gru",
            CellKind::Lstm => "lstm",
        }
    }
}

/// The entry points of shaders/refine.wgsl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Gather,
    Start,
    Attention,
    Cell,
    Step,
    Classify,
}

/// Sizes that shape the kernels: detection rows, hidden size H, key size K, the box
/// representation R (feature rows), classes N (with background) and the cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RefineKernels {
    pub cap: usize,
    pub hidden: usize,
    pub key: usize,
    pub feat: usize,
    pub classes: usize,
    pub cell: CellKind,
}

/// What every entry point's params carry: the clip window, the stop rule and the step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepParams {
    /// Resized (unpadded) image size (h, w).
    pub resized: (usize, usize),
    pub stop_threshold: f32,
    pub min_size: f32,
    pub steps: usize,
}

/// The head's per-detection state (the RoI features and projections are planned by the stage's
/// graph in `model::refine`). Tensors, so that the stage's graph can bind them as inputs that
/// its nodes update in place; shapes are [rows, 1, 1, cols].
pub struct RefineState {
    /// [cap, 8] f32: x1, y1, x2, y2, score, label, source feature row, 0.
    pub input: Tensor,
    /// [1] u32: live detections.
    pub count: Tensor,
    /// [cap, R] f32: each detection's box-head representation.
    pub feat: Tensor,
    /// [cap, 4] f32: current boxes (resized-image coordinates).
    pub boxes: Tensor,
    /// [cap, 2] u32: active flag, 1-based step it stopped at (0 = never).
    pub state: Tensor,
    /// [cap, H] f32 hidden state, and the LSTM cell state ([1] for a GRU).
    pub h: Tensor,
    pub c: Tensor,
}

impl RefineState {
    pub fn tensors(&self) -> [&Tensor; 7] {
        [
            &self.input,
            &self.count,
            &self.feat,
            &self.boxes,
            &self.state,
            &self.h,
            &self.c,
        ]
    }
}

/// The buffers the attention reads and writes.
pub struct AttentionIo<'a> {
    /// [cap·49, 2K]: keys | values.
    pub kv: &'a Buffer,
    /// [cap, K].
    pub q: &'a Buffer,
    /// [1]: the learned β.
    pub beta: &'a Buffer,
    /// [1] u32 live detections, [cap, 2] u32 per-detection flags.
    pub count: &'a Buffer,
    pub flags: &'a Buffer,
    /// [cap, K] context; [T, cap, 49] attention weights (debugging and validation).
    pub ctx: &'a Buffer,
    pub attn: &'a Buffer,
}

/// The buffers a recurrent cell reads and writes.
pub struct CellIo<'a> {
    /// [cap, G·H] each: W_ih x + b_ih and W_hh h + b_hh.
    pub gi: &'a Buffer,
    pub gh: &'a Buffer,
    pub count: &'a Buffer,
    pub flags: &'a Buffer,
    /// [cap, H] hidden state, updated in place; the LSTM's cell state (None for a GRU).
    pub h: &'a Buffer,
    pub c: Option<&'a Buffer>,
}

/// The buffers a refinement step reads and writes.
pub struct StepIo<'a> {
    /// [cap, 5]: 4 deltas and the stop logit.
    pub heads: &'a Buffer,
    pub count: &'a Buffer,
    /// [cap, 2] u32 flags and [cap, 4] boxes, updated in place.
    pub flags: &'a Buffer,
    pub boxes: &'a Buffer,
    /// [T, cap, 4] and [T, cap]: this step's boxes and stop probabilities.
    pub step_boxes: &'a Buffer,
    pub stop_prob: &'a Buffer,
}

impl RefineKernels {
    fn consts(&self, entry: Entry) -> Vec<(&'static str, ConstVal)> {
        let u = |v: usize| ConstVal::U32(v as u32);
        let lstm = self.cell == CellKind::Lstm;
        vec![
            ("CAP", u(self.cap)),
            ("HIDDEN", u(self.hidden)),
            ("KEY", u(self.key)),
            ("FEAT", u(self.feat)),
            ("CLASSES", u(self.classes)),
            ("GATHER", ConstVal::Bool(entry == Entry::Gather)),
            ("START", ConstVal::Bool(entry == Entry::Start)),
            ("ATTENTION", ConstVal::Bool(entry == Entry::Attention)),
            (
                "GRU",
                ConstVal::Bool(entry == Entry::Cell && self.cell == CellKind::Gru),
            ),
            (
                "LSTM",
                ConstVal::Bool(lstm && matches!(entry, Entry::Cell | Entry::Start)),
            ),
            ("STEP", ConstVal::Bool(entry == Entry::Step)),
            ("CLASSIFY", ConstVal::Bool(entry == Entry::Classify)),
        ]
    }

    fn check(&self) -> Result<()> {
        if self.cap == 0 || self.hidden == 0 || self.key == 0 || self.feat == 0 || self.classes < 2
        {
            return Err(Error::shape("refine", format!("degenerate head {self:?}")));
        }
        if self.cap > 65535 {
            return Err(Error::TooLarge(format!(
                "refine: {} detection rows (at most 65535)",
                self.cap
            )));
        }
        Ok(())
    }

    fn params(&self, gpu: &Gpu, label: &str, sp: &StepParams, step: usize) -> Uniform<Params> {
        Uniform::new(
            gpu,
            &format!("{label} params"),
            &Params {
                img_h: sp.resized.0 as f32,
                img_w: sp.resized.1 as f32,
                stop_threshold: sp.stop_threshold,
                min_size: sp.min_size,
                step: step as u32,
                steps: sp.steps as u32,
                pad0: 0,
                pad1: 0,
            },
        )
    }

    /// The per-detection state buffers for `cap` detections.
    pub fn state(&self, gpu: &Gpu, label: &str) -> Result<RefineState> {
        self.check()?;
        let t = |what: &str, rows: usize, cols: usize| {
            Tensor::new(
                gpu,
                &format!("{label} {what}"),
                Nhwc::new(rows.max(1), 1, 1, cols),
            )
        };
        let cap = self.cap;
        let lstm = self.cell == CellKind::Lstm;
        Ok(RefineState {
            input: t("input [D,8]", cap, 8)?,
            count: t("count", 1, 1)?,
            feat: t("features [D,R]", cap, self.feat)?,
            boxes: t("boxes [D,4]", cap, 4)?,
            state: t("state [D,2]", cap, 2)?,
            h: t("hidden [D,H]", cap, self.hidden)?,
            c: if lstm {
                t("cell state [D,H]", cap, self.hidden)?
            } else {
                t("cell state (unused by a GRU)", 1, 1)?
            },
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        gpu: &Gpu,
        label: &str,
        io: &KernelIo,
        entry: Entry,
        params: Option<&Uniform<Params>>,
        buffers: &[(&str, &Buffer)],
        grid: [u32; 3],
    ) -> Result<Dispatch> {
        self.check()?;
        let consts = self.consts(entry);
        let pipeline = io.pipeline(gpu, &consts)?;
        match params {
            Some(p) => io.dispatch(gpu, label, &pipeline, &consts, p, buffers, grid),
            None => io.dispatch_without_params(gpu, label, &pipeline, &consts, buffers, grid),
        }
    }

    /// The box head's NMS survivors (`keep`, count in `keep_count[0]`, capped at `cap`) → input
    /// rows and the live count.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_gather(
        &self,
        gpu: &Gpu,
        label: &str,
        keep: &Buffer,
        keep_count: &Buffer,
        cand: Candidates<'_>,
        cand_rows: &Buffer,
        st: &RefineState,
    ) -> Result<Dispatch> {
        self.run(
            gpu,
            label,
            &KERNEL_GATHER,
            Entry::Gather,
            None,
            &[
                ("keep", keep),
                ("keep_count", keep_count),
                ("cand_boxes", cand.boxes),
                ("cand_scores", cand.scores),
                ("cand_labels", cand.labels),
                ("cand_rows", cand_rows),
                ("input", &st.input.buf),
                ("count", &st.count.buf),
            ],
            [self.cap.div_ceil(64) as u32, 1, 1],
        )
    }

    /// Input rows → boxes, gathered features (`features` [rows, R], indexed by each input row's
    /// source row), active state and, for an LSTM, c = 0.
    pub fn encode_start(
        &self,
        gpu: &Gpu,
        label: &str,
        features: &Buffer,
        st: &RefineState,
    ) -> Result<Dispatch> {
        if features.size() < (self.feat * 4) as u64 {
            return Err(Error::shape(label, "features buffer smaller than one row"));
        }
        let mut bufs: Vec<(&str, &Buffer)> = vec![
            ("input", &st.input.buf),
            ("count", &st.count.buf),
            ("features", features),
            ("feat", &st.feat.buf),
            ("boxes", &st.boxes.buf),
            ("state", &st.state.buf),
        ];
        if self.cell == CellKind::Lstm {
            bufs.push(("c", &st.c.buf));
        }
        let width = self.feat.max(self.hidden);
        self.run(
            gpu,
            label,
            &KERNEL_START,
            Entry::Start,
            None,
            &bufs,
            [width.div_ceil(64) as u32, self.cap as u32, 1],
        )
    }

    /// Attention for step `step` (1-based): keys | values [cap·49, 2K] and queries [cap, K] →
    /// context [cap, K]; the weights go to `attn` [T, cap, 49] (debugging and validation).
    pub fn encode_attention(
        &self,
        gpu: &Gpu,
        label: &str,
        sp: &StepParams,
        step: usize,
        io: &AttentionIo,
    ) -> Result<Dispatch> {
        let need = [
            (io.kv, self.cap * 49 * 2 * self.key, "kv"),
            (io.q, self.cap * self.key, "q"),
            (io.ctx, self.cap * self.key, "ctx"),
            (io.attn, sp.steps * self.cap * 49, "attn"),
            (io.beta, 1, "beta"),
            (io.count, 1, "count"),
            (io.flags, self.cap * 2, "flags"),
        ];
        for (b, n, what) in need {
            if b.size() < n as u64 * 4 {
                return Err(Error::shape(
                    label,
                    format!("{what} buffer smaller than {n} values"),
                ));
            }
        }
        if step == 0 || step > sp.steps {
            return Err(Error::shape(label, format!("step {step} of {}", sp.steps)));
        }
        let params = self.params(gpu, label, sp, step);
        self.run(
            gpu,
            label,
            &KERNEL_ATTENTION,
            Entry::Attention,
            Some(&params),
            &[
                ("kv", io.kv),
                ("q", io.q),
                ("beta", io.beta),
                ("count", io.count),
                ("state", io.flags),
                ("ctx", io.ctx),
                ("attn", io.attn),
            ],
            [self.cap as u32, 1, 1],
        )
    }

    /// The recurrent cell on precomputed gates `gi` = W_ih x + b_ih and `gh` = W_hh h + b_hh
    /// ([cap, G·H] each); updates `h` (and `c`) of the active detections in place.
    pub fn encode_cell(&self, gpu: &Gpu, label: &str, io: &CellIo) -> Result<Dispatch> {
        let g = self.cap * self.cell.gates() * self.hidden;
        if io.gi.size() < g as u64 * 4 || io.gh.size() < g as u64 * 4 {
            return Err(Error::shape(
                label,
                format!("gate buffers smaller than {g} f32"),
            ));
        }
        let hb = (self.cap * self.hidden * 4) as u64;
        if io.h.size() < hb || io.c.is_some_and(|c| c.size() < hb) {
            return Err(Error::shape(
                label,
                format!("state buffers smaller than [{}, {}]", self.cap, self.hidden),
            ));
        }
        if io.count.size() < 4 || io.flags.size() < (self.cap * 8) as u64 {
            return Err(Error::shape(label, "count / flags buffers too small"));
        }
        let grid = [self.hidden.div_ceil(64) as u32, self.cap as u32, 1];
        match (self.cell, io.c) {
            (CellKind::Gru, None) => self.run(
                gpu,
                label,
                &KERNEL_GRU,
                Entry::Cell,
                None,
                &[
                    ("gi", io.gi),
                    ("gh", io.gh),
                    ("count", io.count),
                    ("state", io.flags),
                    ("h", io.h),
                ],
                grid,
            ),
            (CellKind::Lstm, Some(c)) => self.run(
                gpu,
                label,
                &KERNEL_LSTM,
                Entry::Cell,
                None,
                &[
                    ("gi", io.gi),
                    ("gh", io.gh),
                    ("count", io.count),
                    ("state", io.flags),
                    ("h", io.h),
                    ("c", c),
                ],
                grid,
            ),
            (cell, c) => Err(Error::shape(
                label,
                format!(
                    "a {} cell {} a cell-state buffer",
                    cell.name(),
                    if c.is_some() { "given" } else { "without" }
                ),
            )),
        }
    }

    /// Step `step` (1-based): heads [cap, 5] (4 deltas, the stop logit) → decoded, clipped boxes
    /// of the active detections and the stop rule; per-step boxes and stop probabilities go to
    /// `step_boxes` [T, cap, 4] and `stop_prob` [T, cap] (−1 where the detection had stopped).
    pub fn encode_step(
        &self,
        gpu: &Gpu,
        label: &str,
        sp: &StepParams,
        step: usize,
        io: &StepIo,
    ) -> Result<Dispatch> {
        if step == 0 || step > sp.steps {
            return Err(Error::shape(label, format!("step {step} of {}", sp.steps)));
        }
        if io.heads.size() < (self.cap * 5 * 4) as u64
            || io.step_boxes.size() < (sp.steps * self.cap * 16) as u64
            || io.stop_prob.size() < (sp.steps * self.cap * 4) as u64
            || io.boxes.size() < (self.cap * 16) as u64
            || io.flags.size() < (self.cap * 8) as u64
            || io.count.size() < 4
        {
            return Err(Error::shape(
                label,
                "heads / state / per-step buffers too small",
            ));
        }
        let params = self.params(gpu, label, sp, step);
        self.run(
            gpu,
            label,
            &KERNEL_STEP,
            Entry::Step,
            Some(&params),
            &[
                ("heads", io.heads),
                ("count", io.count),
                ("state", io.flags),
                ("boxes", io.boxes),
                ("step_boxes", io.step_boxes),
                ("stop_prob", io.stop_prob),
            ],
            [self.cap.div_ceil(64) as u32, 1, 1],
        )
    }

    /// Terminal classification: `logits` [cap, N] → per-detection (score, label) in `terminal`
    /// [cap, 2] and the boxes that pass the size filter, in detection order, as NMS candidates.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_classify(
        &self,
        gpu: &Gpu,
        label: &str,
        sp: &StepParams,
        logits: &Buffer,
        st: &RefineState,
        cand: Candidates<'_>,
        cand_count: &Buffer,
        terminal: &Buffer,
    ) -> Result<Dispatch> {
        if logits.size() < (self.cap * self.classes * 4) as u64
            || terminal.size() < (self.cap * 8) as u64
            || cand.boxes.size() < (self.cap * 16) as u64
        {
            return Err(Error::shape(label, "logits / candidate buffers too small"));
        }
        let params = self.params(gpu, label, sp, 0);
        self.run(
            gpu,
            label,
            &KERNEL_CLASSIFY,
            Entry::Classify,
            Some(&params),
            &[
                ("logits", logits),
                ("boxes", &st.boxes.buf),
                ("count", &st.count.buf),
                ("cand_boxes", cand.boxes),
                ("cand_scores", cand.scores),
                ("cand_labels", cand.labels),
                ("cand_count", cand_count),
                ("terminal", terminal),
            ],
            [1, 1, 1],
        )
    }
}

/// Every variant for both cells at the sizes of the shipped fixtures' kind of head (sizes are
/// consts, so these stand for the family in the contract test).
pub fn variants() -> Vec<KernelVariant> {
    let mut out = Vec::new();
    for cell in [CellKind::Gru, CellKind::Lstm] {
        let k = RefineKernels {
            cap: 100,
            hidden: 30,
            key: 20,
            feat: 256,
            classes: 4,
            cell,
        };
        out.push(KernelVariant::new(KERNEL_START, k.consts(Entry::Start)));
        out.push(KernelVariant::new(
            match cell {
                CellKind::Gru => KERNEL_GRU,
                CellKind::Lstm => KERNEL_LSTM,
            },
            k.consts(Entry::Cell),
        ));
        if cell == CellKind::Gru {
            for e in [
                Entry::Gather,
                Entry::Attention,
                Entry::Step,
                Entry::Classify,
            ] {
                let io = match e {
                    Entry::Gather => KERNEL_GATHER,
                    Entry::Attention => KERNEL_ATTENTION,
                    Entry::Step => KERNEL_STEP,
                    _ => KERNEL_CLASSIFY,
                };
                out.push(KernelVariant::new(io, k.consts(e)));
            }
        }
    }
    out
}
