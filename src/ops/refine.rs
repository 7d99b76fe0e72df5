//! The refinement head's own kernels (shaders/refine.wgsl): gathering the detector's detections,
//! starting the per-detection state, batched attention over the 49 RoI bins, PyTorch's GRU and
//! LSTM cells, the per-box delta/stop step and the terminal classification. The projections are
//! [`crate::ops::linalg::Linear`] dispatches; RoIAlign, NMS and the final gather + rescale are the
//! detector's kernels. The stage that strings them together is `model::refine`.

use crate::error::{Error, Result};
use crate::gpu::{Buffer, ConstVal, Dispatch, Gpu, Kernel};
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

/// The head's small per-detection buffers (the big ones, RoI features and projections, are
/// owned by the stage in `model::refine`).
pub struct RefineState {
    /// [cap, 8] f32: x1, y1, x2, y2, score, label, source feature row, 0.
    pub input: Buffer,
    /// [1] u32: live detections.
    pub count: Buffer,
    /// [cap, R] f32: each detection's box-head representation.
    pub feat: Buffer,
    /// [cap, 4] f32: current boxes (resized-image coordinates).
    pub boxes: Buffer,
    /// [cap, 2] u32: active flag, 1-based step it stopped at (0 = never).
    pub state: Buffer,
    /// [cap, H] f32 hidden state, and the LSTM cell state (4 bytes for a GRU).
    pub h: Buffer,
    pub c: Buffer,
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
        let b = |what: &str, elems: usize| {
            gpu.storage(&format!("{label} {what}"), elems.max(1) as u64 * 4)
        };
        let cap = self.cap;
        Ok(RefineState {
            input: b("input [D,8]", cap * 8)?,
            count: b("count", 1)?,
            feat: b("features [D,R]", cap * self.feat)?,
            boxes: b("boxes [D,4]", cap * 4)?,
            state: b("state [D,2]", cap * 2)?,
            h: b("hidden [D,H]", cap * self.hidden)?,
            c: b(
                "cell state [D,H]",
                if self.cell == CellKind::Lstm {
                    cap * self.hidden
                } else {
                    1
                },
            )?,
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
                ("input", &st.input),
                ("count", &st.count),
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
            ("input", &st.input),
            ("count", &st.count),
            ("features", features),
            ("feat", &st.feat),
            ("boxes", &st.boxes),
            ("state", &st.state),
        ];
        if self.cell == CellKind::Lstm {
            bufs.push(("c", &st.c));
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

    /// Attention for step `step` (1-based): `kv` [cap·49, 2K] (keys | values), `q` [cap, K] →
    /// `ctx` [cap, K]; the weights go to `attn` [T, cap, 49] (debugging and validation).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_attention(
        &self,
        gpu: &Gpu,
        label: &str,
        sp: &StepParams,
        step: usize,
        kv: &Buffer,
        q: &Buffer,
        beta: &Buffer,
        st: &RefineState,
        ctx: &Buffer,
        attn: &Buffer,
    ) -> Result<Dispatch> {
        let need = [
            (kv, self.cap * 49 * 2 * self.key, "kv"),
            (q, self.cap * self.key, "q"),
            (ctx, self.cap * self.key, "ctx"),
            (attn, sp.steps * self.cap * 49, "attn"),
            (beta, 1, "beta"),
        ];
        for (b, n, what) in need {
            if b.size() < n as u64 * 4 {
                return Err(Error::shape(
                    label,
                    format!("{what} buffer smaller than {n} f32"),
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
                ("kv", kv),
                ("q", q),
                ("beta", beta),
                ("count", &st.count),
                ("state", &st.state),
                ("ctx", ctx),
                ("attn", attn),
            ],
            [self.cap as u32, 1, 1],
        )
    }

    /// The recurrent cell on precomputed gates `gi` = W_ih x + b_ih and `gh` = W_hh h + b_hh
    /// ([cap, G·H] each); updates `h` (and `c`) of the active detections in place.
    pub fn encode_cell(
        &self,
        gpu: &Gpu,
        label: &str,
        gi: &Buffer,
        gh: &Buffer,
        st: &RefineState,
    ) -> Result<Dispatch> {
        let g = self.cap * self.cell.gates() * self.hidden;
        if gi.size() < g as u64 * 4 || gh.size() < g as u64 * 4 {
            return Err(Error::shape(
                label,
                format!("gate buffers smaller than {g} f32"),
            ));
        }
        let grid = [self.hidden.div_ceil(64) as u32, self.cap as u32, 1];
        match self.cell {
            CellKind::Gru => self.run(
                gpu,
                label,
                &KERNEL_GRU,
                Entry::Cell,
                None,
                &[
                    ("gi", gi),
                    ("gh", gh),
                    ("count", &st.count),
                    ("state", &st.state),
                    ("h", &st.h),
                ],
                grid,
            ),
            CellKind::Lstm => self.run(
                gpu,
                label,
                &KERNEL_LSTM,
                Entry::Cell,
                None,
                &[
                    ("gi", gi),
                    ("gh", gh),
                    ("count", &st.count),
                    ("state", &st.state),
                    ("h", &st.h),
                    ("c", &st.c),
                ],
                grid,
            ),
        }
    }

    /// Step `step` (1-based): `heads` [cap, 5] (4 deltas, the stop logit) → decoded, clipped boxes
    /// of the active detections and the stop rule; per-step boxes and stop probabilities go to
    /// `step_boxes` [T, cap, 4] and `stop_prob` [T, cap] (−1 where the detection had stopped).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_step(
        &self,
        gpu: &Gpu,
        label: &str,
        sp: &StepParams,
        step: usize,
        heads: &Buffer,
        st: &RefineState,
        step_boxes: &Buffer,
        stop_prob: &Buffer,
    ) -> Result<Dispatch> {
        if step == 0 || step > sp.steps {
            return Err(Error::shape(label, format!("step {step} of {}", sp.steps)));
        }
        if heads.size() < (self.cap * 5 * 4) as u64
            || step_boxes.size() < (sp.steps * self.cap * 16) as u64
            || stop_prob.size() < (sp.steps * self.cap * 4) as u64
        {
            return Err(Error::shape(label, "heads / per-step buffers too small"));
        }
        let params = self.params(gpu, label, sp, step);
        self.run(
            gpu,
            label,
            &KERNEL_STEP,
            Entry::Step,
            Some(&params),
            &[
                ("heads", heads),
                ("count", &st.count),
                ("state", &st.state),
                ("boxes", &st.boxes),
                ("step_boxes", step_boxes),
                ("stop_prob", stop_prob),
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
                ("boxes", &st.boxes),
                ("count", &st.count),
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
