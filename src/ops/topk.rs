//! Segmented exact top-k (the RPN's per-level top-k of the raw objectness logits).
//! Kernel: shaders/topk.wgsl (design notes there).
//!
//! For segments of lengths n_l (each a separate f32 buffer, concatenated logically in order) and
//! k_l = min(k, n_l), writes `order` [Σ k_l] u32: the global (concatenated) indices of each
//! segment's k_l largest values, segment-major, each segment in descending value order with ties
//! broken by the lower index (a stable descending sort), NaN ranked largest as `torch.topk` does.
//! Everything stays on the GPU; the dispatch list is fixed by the shapes alone.

use crate::error::{Error, Result};
use crate::gpu::{Buffer, ConstVal, Dispatch, Gpu, Kernel};
use crate::ops::contract::{params_struct, Binding, HostStruct, KernelIo, KernelVariant, Uniform};
use crate::ops::pool::grid_1d;

const SOURCE: &str = include_str!("../../shaders/topk.wgsl");

const fn entry(
    entry: &'static str,
    params: crate::ops::contract::StructLayout,
    storage: &'static [Binding],
) -> KernelIo {
    KernelIo {
        kernel: Kernel {
            name: "topk",
            source: SOURCE,
            entry,
        },
        params: Some(params),
        storage,
    }
}

/// The six entry points, in dispatch order (index = the K_* flag that selects it).
pub const ENTRIES: [KernelIo; 6] = [
    entry(
        "topk_init",
        TopkParams::LAYOUT,
        &[Binding::read_write("hist"), Binding::read_write("state")],
    ),
    entry(
        "topk_keys",
        KeysParams::LAYOUT,
        &[Binding::read("values"), Binding::read_write("keys")],
    ),
    entry(
        "topk_hist",
        TopkParams::LAYOUT,
        &[
            Binding::read("keys"),
            Binding::read("state"),
            Binding::read_write("hist"),
        ],
    ),
    entry(
        "topk_select",
        TopkParams::LAYOUT,
        &[Binding::read("hist"), Binding::read_write("state")],
    ),
    entry(
        "topk_compact",
        TopkParams::LAYOUT,
        &[
            Binding::read("keys"),
            Binding::read_write("state"),
            Binding::read_write("cand"),
        ],
    ),
    entry(
        "topk_rank",
        TopkParams::LAYOUT,
        &[
            Binding::read("keys"),
            Binding::read("cand"),
            Binding::read_write("order"),
        ],
    ),
];
const FLAGS: [&str; 6] = [
    "K_INIT",
    "K_KEYS",
    "K_HIST",
    "K_SELECT",
    "K_COMPACT",
    "K_RANK",
];

/// Most segments one top-k handles (the FPN has 5 levels).
pub const MAX_SEGMENTS: usize = 8;
/// Longest segment: the index is a 24-bit field of the composite key.
pub const MAX_SEGMENT_LEN: usize = 1 << 24;
/// Radix-select passes (4 over the value key, 3 over the index).
const PASSES: usize = 7;
/// Elements per histogram workgroup (4 per invocation): P2 at 800x1088 (163 200 logits) spreads
/// over 160 workgroups, enough to fill a large GPU; each flushes at most 256 bins.
const CHUNK: usize = 1024;
const STATE_WORDS: usize = 48;
/// Largest k_l: the rank kernel is O(k²) per segment (k is ~1000 in the RPN).
pub const MAX_K: usize = 16384;

params_struct! {
    struct TopkParams {
        /// The radix pass (`pass` is a WGSL keyword).
        pass_: u32,
        n_seg: u32,
        total: u32,
        chunks: u32,
        seg: [[u32; 4]; MAX_SEGMENTS],
        out: [[u32; 4]; MAX_SEGMENTS],
    }
}

params_struct! {
    struct KeysParams {
        offset: u32,
        n: u32,
        pad0: u32,
        pad1: u32,
    }
}

/// The shapes of one segmented top-k.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentedTopK {
    /// Segment lengths n_l.
    pub lens: Vec<usize>,
    /// k_l = min(k, n_l).
    pub ks: Vec<usize>,
}

/// GPU scratch of a [`SegmentedTopK`] and its output `order` [Σ k_l] u32.
pub struct TopKBuffers {
    pub keys: Buffer,
    pub hist: Buffer,
    pub state: Buffer,
    pub cand: Buffer,
    pub order: Buffer,
}

/// The consts of entry point `e` (its K_* flag set, the others clear).
fn consts(e: usize) -> Vec<(&'static str, ConstVal)> {
    FLAGS
        .iter()
        .enumerate()
        .map(|(i, f)| (*f, ConstVal::Bool(i == e)))
        .chain([("CHUNK", ConstVal::U32(CHUNK as u32))])
        .collect()
}

/// The compiled entry point `e` with its consts.
struct Stage {
    io: KernelIo,
    consts: Vec<(&'static str, ConstVal)>,
    pipeline: std::sync::Arc<wgpu::ComputePipeline>,
}

fn stage(gpu: &Gpu, e: usize) -> Result<Stage> {
    let consts = consts(e);
    Ok(Stage {
        io: ENTRIES[e],
        pipeline: ENTRIES[e].pipeline(gpu, &consts)?,
        consts,
    })
}

impl Stage {
    fn dispatch<T: HostStruct>(
        &self,
        gpu: &Gpu,
        label: String,
        params: &Uniform<T>,
        buffers: &[(&str, &Buffer)],
        grid: [u32; 3],
    ) -> Result<Dispatch> {
        self.io.dispatch(
            gpu,
            label,
            &self.pipeline,
            &self.consts,
            params,
            buffers,
            grid,
        )
    }
}

/// Every variant the top-k compiles: one per entry point.
pub fn variants() -> Vec<KernelVariant> {
    (0..ENTRIES.len())
        .map(|e| KernelVariant::new(ENTRIES[e], consts(e)))
        .collect()
}

impl SegmentedTopK {
    pub fn new(lens: &[usize], k: usize) -> Result<SegmentedTopK> {
        if lens.is_empty() || lens.len() > MAX_SEGMENTS {
            return Err(Error::shape(
                "topk",
                format!("{} segments (1..={MAX_SEGMENTS} supported)", lens.len()),
            ));
        }
        if let Some(n) = lens.iter().find(|&&n| n > MAX_SEGMENT_LEN) {
            return Err(Error::shape(
                "topk",
                format!("segment of {n} values (at most {MAX_SEGMENT_LEN})"),
            ));
        }
        if lens.iter().sum::<usize>() > u32::MAX as usize / 2 {
            return Err(Error::shape("topk", "too many values in total"));
        }
        let ks: Vec<usize> = lens.iter().map(|&n| n.min(k)).collect();
        if ks.iter().any(|&k| k > MAX_K) {
            return Err(Error::shape(
                "topk",
                format!("k = {k} per segment (at most {MAX_K})"),
            ));
        }
        Ok(SegmentedTopK {
            lens: lens.to_vec(),
            ks,
        })
    }

    pub fn total(&self) -> usize {
        self.lens.iter().sum()
    }

    /// Σ k_l: the length of `order`.
    pub fn kmax(&self) -> usize {
        self.ks.iter().sum()
    }

    /// Start of each segment in the concatenated array.
    pub fn offsets(&self) -> Vec<usize> {
        prefix(&self.lens)
    }

    /// First output slot of each segment.
    pub fn out_offsets(&self) -> Vec<usize> {
        prefix(&self.ks)
    }

    pub fn buffers(&self, gpu: &Gpu, label: &str) -> Result<TopKBuffers> {
        Ok(TopKBuffers {
            keys: gpu.storage(&format!("{label} keys"), self.total() as u64 * 4)?,
            hist: gpu.storage(
                &format!("{label} histograms"),
                (PASSES * MAX_SEGMENTS * 256 * 4) as u64,
            )?,
            state: gpu.storage(&format!("{label} state"), STATE_WORDS as u64 * 4)?,
            cand: gpu.storage(&format!("{label} candidates"), self.kmax() as u64 * 4)?,
            order: gpu.storage(&format!("{label} order"), self.kmax() as u64 * 4)?,
        })
    }

    fn params(&self, pass: usize) -> TopkParams {
        let mut p = TopkParams {
            pass_: pass as u32,
            n_seg: self.lens.len() as u32,
            total: self.total() as u32,
            chunks: 0,
            seg: [[0; 4]; MAX_SEGMENTS],
            out: [[0; 4]; MAX_SEGMENTS],
        };
        let (offs, outs) = (self.offsets(), self.out_offsets());
        let mut chunk = 0usize;
        for l in 0..self.lens.len() {
            p.seg[l] = [
                offs[l] as u32,
                self.lens[l] as u32,
                chunk as u32,
                self.ks[l] as u32,
            ];
            p.out[l][0] = outs[l] as u32;
            chunk += self.lens[l].div_ceil(CHUNK);
        }
        p.chunks = chunk as u32;
        p
    }

    /// Records the whole top-k: `inputs[l]` holds segment l's n_l f32 values (at least).
    pub fn encode(
        &self,
        gpu: &Gpu,
        label: &str,
        inputs: &[&Buffer],
        b: &TopKBuffers,
    ) -> Result<Vec<Dispatch>> {
        if inputs.len() != self.lens.len() {
            return Err(Error::shape(
                label,
                format!("{} inputs for {} segments", inputs.len(), self.lens.len()),
            ));
        }
        for (l, (inp, &n)) in inputs.iter().zip(&self.lens).enumerate() {
            if inp.size() < n as u64 * 4 {
                return Err(Error::shape(
                    label,
                    format!("segment {l}: buffer of {} bytes for {n} values", inp.size()),
                ));
            }
        }
        let kmax = self.kmax() as u64 * 4;
        if b.keys.size() < self.total() as u64 * 4 || b.cand.size() < kmax || b.order.size() < kmax
        {
            return Err(Error::shape(
                label,
                "scratch buffers are smaller than this top-k needs",
            ));
        }
        let base = self.params(0);
        let ub = Uniform::new(gpu, &format!("{label} params"), &base);
        let mut out = Vec::with_capacity(8 + 2 * PASSES + self.lens.len());
        out.push(stage(gpu, 0)?.dispatch(
            gpu,
            format!("{label} init"),
            &ub,
            &[("hist", &b.hist), ("state", &b.state)],
            [1, 1, 1],
        )?);
        let keys = stage(gpu, 1)?;
        for (l, inp) in inputs.iter().enumerate() {
            let kp = KeysParams {
                offset: base.seg[l][0],
                n: self.lens[l] as u32,
                pad0: 0,
                pad1: 0,
            };
            let u = Uniform::new(gpu, &format!("{label} keys {l} params"), &kp);
            out.push(keys.dispatch(
                gpu,
                format!("{label} keys {l}"),
                &u,
                &[("values", *inp), ("keys", &b.keys)],
                grid_1d(self.lens[l]),
            )?);
        }
        let (hist, select) = (stage(gpu, 2)?, stage(gpu, 3)?);
        let chunks = base.chunks as usize;
        let hist_grid = if chunks <= 65535 {
            [chunks as u32, 1, 1]
        } else {
            [65535, chunks.div_ceil(65535) as u32, 1]
        };
        for pass in 0..PASSES {
            let u = Uniform::new(
                gpu,
                &format!("{label} pass {pass} params"),
                &self.params(pass),
            );
            out.push(hist.dispatch(
                gpu,
                format!("{label} histogram {pass}"),
                &u,
                &[("keys", &b.keys), ("state", &b.state), ("hist", &b.hist)],
                hist_grid,
            )?);
            let grid = [self.lens.len() as u32, 1, 1];
            out.push(select.dispatch(
                gpu,
                format!("{label} select {pass}"),
                &u,
                &[("hist", &b.hist), ("state", &b.state)],
                grid,
            )?);
        }
        out.push(stage(gpu, 4)?.dispatch(
            gpu,
            format!("{label} compact"),
            &ub,
            &[("keys", &b.keys), ("state", &b.state), ("cand", &b.cand)],
            grid_1d(self.total()),
        )?);
        let max_k = self.ks.iter().copied().max().unwrap_or(0);
        out.push(stage(gpu, 5)?.dispatch(
            gpu,
            format!("{label} rank"),
            &ub,
            &[("keys", &b.keys), ("cand", &b.cand), ("order", &b.order)],
            [max_k.div_ceil(256).max(1) as u32, self.lens.len() as u32, 1],
        )?);
        Ok(out)
    }
}

fn prefix(v: &[usize]) -> Vec<usize> {
    let mut acc = 0;
    v.iter()
        .map(|&x| {
            let o = acc;
            acc += x;
            o
        })
        .collect()
}
