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
use crate::ops::pool::grid_1d;

const SOURCE: &str = include_str!("../../shaders/topk.wgsl");
const ENTRIES: [&str; 6] = [
    "topk_init",
    "topk_keys",
    "topk_hist",
    "topk_select",
    "topk_compact",
    "topk_rank",
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

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct TopkParams {
    pass: u32,
    n_seg: u32,
    total: u32,
    chunks: u32,
    seg: [[u32; 4]; MAX_SEGMENTS],
    out: [[u32; 4]; MAX_SEGMENTS],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct KeysParams {
    offset: u32,
    n: u32,
    pad: [u32; 2],
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

fn pipeline(gpu: &Gpu, e: usize) -> Result<std::sync::Arc<wgpu::ComputePipeline>> {
    let consts: Vec<(&str, ConstVal)> = FLAGS
        .iter()
        .enumerate()
        .map(|(i, f)| (*f, ConstVal::Bool(i == e)))
        .chain([("CHUNK", ConstVal::U32(CHUNK as u32))])
        .collect();
    gpu.pipeline(
        &Kernel {
            name: "topk",
            source: SOURCE,
            entry: ENTRIES[e],
        },
        &consts,
    )
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
            pass: pass as u32,
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
        let ub = gpu.uniform(&format!("{label} params"), &base);
        let mut out = Vec::with_capacity(8 + 2 * PASSES + self.lens.len());
        out.push(gpu.dispatch(
            format!("{label} init"),
            &pipeline(gpu, 0)?,
            Some(&ub),
            &[&b.hist, &b.state],
            [1, 1, 1],
        )?);
        let keys = pipeline(gpu, 1)?;
        for (l, inp) in inputs.iter().enumerate() {
            let kp = KeysParams {
                offset: base.seg[l][0],
                n: self.lens[l] as u32,
                pad: [0; 2],
            };
            let u = gpu.uniform(&format!("{label} keys {l} params"), &kp);
            out.push(gpu.dispatch(
                format!("{label} keys {l}"),
                &keys,
                Some(&u),
                &[inp, &b.keys],
                grid_1d(self.lens[l]),
            )?);
        }
        let (hist, select) = (pipeline(gpu, 2)?, pipeline(gpu, 3)?);
        let chunks = base.chunks as usize;
        let hist_grid = if chunks <= 65535 {
            [chunks as u32, 1, 1]
        } else {
            [65535, chunks.div_ceil(65535) as u32, 1]
        };
        for pass in 0..PASSES {
            let u = gpu.uniform(&format!("{label} pass {pass} params"), &self.params(pass));
            out.push(gpu.dispatch(
                format!("{label} histogram {pass}"),
                &hist,
                Some(&u),
                &[&b.keys, &b.state, &b.hist],
                hist_grid,
            )?);
            let grid = [self.lens.len() as u32, 1, 1];
            out.push(gpu.dispatch(
                format!("{label} select {pass}"),
                &select,
                Some(&u),
                &[&b.hist, &b.state],
                grid,
            )?);
        }
        out.push(gpu.dispatch(
            format!("{label} compact"),
            &pipeline(gpu, 4)?,
            Some(&ub),
            &[&b.keys, &b.state, &b.cand],
            grid_1d(self.total()),
        )?);
        let max_k = self.ks.iter().copied().max().unwrap_or(0);
        out.push(gpu.dispatch(
            format!("{label} rank"),
            &pipeline(gpu, 5)?,
            Some(&ub),
            &[&b.keys, &b.cand, &b.order],
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
