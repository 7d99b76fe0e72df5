//! Non-maximum suppression on the GPU, decision-exact to torchvision's CPU `nms` and to both
//! `batched_nms` paths (docs/torchvision-semantics.md §7). Kernel: shaders/nms.wgsl; CPU reference:
//! [`crate::cpu::nms`].
//!
//! Inputs live in capacity-sized buffers with the live count on the GPU (a u32 at a given index),
//! so the op is recorded before the count is known. Four dispatches, all on the GPU:
//! 1. **rank**: stable descending order of the live scores (torch's order: NaN first, -0 == +0,
//!    ties by lower index first), computed as ranks with O(n²) comparisons;
//! 2. **prep** (one workgroup): the batched path choice from the live count, the coordinate
//!    trick's `f32(id) * (max + 1)` shift in f32, areas, boxes gathered in score order;
//! 3. **mask**: bit `b` of row `a` says sorted box `a` would suppress sorted box `b > a`
//!    (f32 IoU strictly above the threshold, decided without division, see the shader); rows are
//!    `ceil(capacity / 32)` u32 words (WGSL has no u64; torchvision CUDA's 64-bit blocks carry the
//!    same bits);
//! 4. **greedy** (one workgroup): the sequential keep rule over the mask, writing the kept
//!    *original* indices in score order, truncated to `max_out`, and their count.
//!
//! Batched mode replicates torchvision exactly: while the live count is at most
//! `trick_max_boxes` (1000 on a CPU tensor: `numel ≤ 4000`) the boxes are shifted by their
//! class offset in f32 and every pair is compared on the shifted, re-rounded coordinates (the
//! shift quantises them, so this is *not* the same as per-class NMS); above it, pairs of
//! different ids never suppress each other (the per-class "vanilla" loop, whose merged result is
//! the score order restricted to the kept boxes; ties in index order, where torchvision's final
//! sort is unstable).
//!
//! Exact for finite (or NaN) coordinates and a finite threshold ≥ 0; subnormal areas may be
//! flushed to zero by a GPU, which only matters for boxes narrower than ~1e-19.

use crate::error::{Error, Result};
use crate::gpu::{Buffer, ConstVal, Dispatch, Gpu, Kernel};
use crate::ops::contract::{params_struct, Binding, HostStruct, KernelIo, KernelVariant, Uniform};
use crate::ops::groups;

const SOURCE: &str = include_str!("../../shaders/nms.wgsl");

const fn stage(name: &'static str, entry: &'static str, storage: &'static [Binding]) -> KernelIo {
    KernelIo {
        kernel: Kernel {
            name,
            source: SOURCE,
            entry,
        },
        params: Some(Params::LAYOUT),
        storage,
    }
}

pub const RANK: KernelIo = stage(
    "nms_rank",
    "rank",
    &[
        Binding::read("scores"),
        Binding::read("count_in"),
        Binding::read_write("order"),
    ],
);
pub const PREP: KernelIo = stage(
    "nms_prep",
    "prep",
    &[
        Binding::read("boxes"),
        Binding::read("count_in"),
        Binding::read("order"),
        Binding::read_write("sbox"),
        Binding::read_write("sarea"),
        Binding::read_write("state"),
        Binding::read("ids").when("BATCHED"),
        Binding::read_write("sid").when("BATCHED"),
    ],
);
pub const MASK: KernelIo = stage(
    "nms_mask",
    "mask_rows",
    &[
        Binding::read("sbox"),
        Binding::read("sarea"),
        Binding::read("state"),
        Binding::read_write("mask"),
        Binding::read("sid").when("BATCHED"),
    ],
);
pub const GREEDY: KernelIo = stage(
    "nms_greedy",
    "greedy",
    &[
        Binding::read("mask"),
        Binding::read("order"),
        Binding::read("state"),
        Binding::read_write("keep_out"),
        Binding::read_write("count_out"),
    ],
);

/// The consts of stage `stage` (0 rank, 1 prep, 2 mask, 3 greedy); only the mask and greedy
/// stages depend on the capacity (`WORDS` u32 words per mask row).
fn stage_consts(stage: usize, batched: bool, words: usize) -> Vec<(&'static str, ConstVal)> {
    let mut v = vec![
        ("STAGE_RANK", ConstVal::Bool(stage == 0)),
        ("STAGE_PREP", ConstVal::Bool(stage == 1)),
        ("STAGE_MASK", ConstVal::Bool(stage == 2)),
        ("STAGE_GREEDY", ConstVal::Bool(stage == 3)),
        ("BATCHED", ConstVal::Bool(batched)),
    ];
    if stage >= 2 {
        v.push(("WORDS", ConstVal::U32(words as u32)));
    }
    v
}

/// The variants NMS compiles, plain and batched: rank and prep once each, mask and greedy per
/// capacity. Capacities vary with the image size and the model, so these are the ones that bound
/// them: 1, the RPN's at 800×1088 (4663) and its largest (5 levels × 1000), the box head's for 3
/// classes (1000 proposals), its cap (the detector's `MAX_BOX_CANDIDATES`, 16384), and the
/// largest the greedy pass's 32 KiB of workgroup memory allows.
pub fn variants() -> Vec<KernelVariant> {
    let capacities = [1, 4663, 5000, 3000, 16384, (8192 - 4) * 32];
    let mut out = Vec::new();
    for batched in [false, true] {
        out.push(KernelVariant::new(RANK, stage_consts(0, batched, 0)));
        out.push(KernelVariant::new(PREP, stage_consts(1, batched, 0)));
        for cap in capacities {
            let words = Nms::new(cap, 0.5, cap, batched).words();
            out.push(KernelVariant::new(MASK, stage_consts(2, batched, words)));
            out.push(KernelVariant::new(GREEDY, stage_consts(3, batched, words)));
        }
    }
    out
}

/// torchvision's CPU `batched_nms` takes the coordinate trick up to this many boxes.
pub const CPU_TRICK_MAX_BOXES: usize = crate::cpu::nms::CPU_TRICK_MAX_BOXES;

/// One NMS configuration. `capacity` is the candidate buffers' length (Kmax); `max_out` truncates
/// the kept list (RPN `post_nms_top_n` = 1000, detections 100).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nms {
    pub capacity: usize,
    /// Suppress when the f32 IoU is strictly greater. torchvision compares against a double; give
    /// the f32 rounded down from it (the literals 0.5 and 0.7 are).
    pub iou_thresh: f32,
    pub max_out: usize,
    /// `batched_nms` with per-candidate u32 ids (class labels or FPN levels); plain `nms` if false.
    pub batched: bool,
    /// Batched only: the coordinate trick applies while the live count is ≤ this.
    /// [`CPU_TRICK_MAX_BOXES`] reproduces torchvision on CPU (a CUDA reference would be 25 000).
    pub trick_max_boxes: usize,
}

/// The buffers one [`Nms::encode`] reads and writes. Counts are u32 at the given index.
/// `keep_count` may be the same buffer as `count` (the live count is copied before it is written).
pub struct NmsIo<'a> {
    /// [capacity, 4] f32 (x1, y1, x2, y2).
    pub boxes: &'a Buffer,
    /// [capacity] f32.
    pub scores: &'a Buffer,
    /// [capacity] u32 ids, required when batched (exact in f32 below 2^24). Ignored otherwise.
    pub ids: Option<&'a Buffer>,
    pub count: &'a Buffer,
    pub count_index: usize,
    /// [min(max_out, capacity)] u32: kept candidate indices in score order. Entries past the kept
    /// count are left untouched.
    pub keep: &'a Buffer,
    pub keep_count: &'a Buffer,
    pub keep_count_index: usize,
}

/// Scratch for one [`Nms`] configuration (reusable across images; not across concurrent encodes).
pub struct NmsScratch {
    pub capacity: usize,
    pub batched: bool,
    order: Buffer,
    sbox: Buffer,
    sarea: Buffer,
    sid: Option<Buffer>,
    state: Buffer,
    mask: Buffer,
}

params_struct! {
    struct Params {
        cap: u32,
        count_index: u32,
        out_index: u32,
        max_out: u32,
        trick_max: u32,
        thr_mant: u32,
        thr_exp: i32,
        tie_up: u32,
        zero: u32,
        pad0: u32,
        pad1: u32,
        pad2: u32,
    }
}

/// The rounding boundary of `f32(q) > thr`: the midpoint between `thr` and the next f32 above,
/// as (mantissa in [2^24, 2^25), exponent), and whether f32 rounding sends the midpoint itself up
/// (the next f32 has the even mantissa). For thr > 0 the midpoint has a 25-bit odd mantissa, so no
/// quotient of two f32 can equal it; the tie rule matters only for thr = 0.
pub fn threshold_midpoint(thr: f32) -> (u32, i32, bool) {
    let bits = if thr == 0.0 { 0 } else { thr.to_bits() };
    let e = (bits >> 23) & 0xff;
    let f = bits & 0x7f_ffff;
    let (mt, et) = if e == 0 {
        (f as u64, -149)
    } else {
        ((f | 0x80_0000) as u64, e as i32 - 150)
    };
    // (thr + next) / 2 = (2·Mt + 1)·2^(Et − 1).
    let (mut mm, mut em) = (2 * mt + 1, et - 1);
    while mm < 1 << 24 {
        mm <<= 1;
        em -= 1;
    }
    (mm as u32, em, bits & 1 == 1)
}

/// `x > 0` finite as (mantissa in [2^23, 2^24), exponent).
fn mant_exp(x: f32) -> (u64, i32) {
    let b = x.to_bits();
    let e = ((b >> 23) & 0xff) as i32;
    let f = b & 0x7f_ffff;
    if e == 0 {
        let s = f.leading_zeros() - 8;
        ((f << s) as u64, -149 - s as i32)
    } else {
        ((f | 0x80_0000) as u64, e - 150)
    }
}

/// Host mirror of the shader's division-free test `f32(inter / uni) > thr` for `inter > 0`
/// finite, with `mid = threshold_midpoint(thr)`. Tests check it against f32 division.
pub fn iou_exceeds(inter: f32, uni: f32, mid: (u32, i32, bool)) -> bool {
    let ub = uni.to_bits();
    let umag = ub & 0x7fff_ffff;
    if umag > 0x7f80_0000 {
        return false;
    }
    if umag == 0 {
        return ub == 0;
    }
    if ub & 0x8000_0000 != 0 {
        return false;
    }
    if inter.to_bits() >= 0x7f80_0000 {
        return umag < 0x7f80_0000;
    }
    if umag == 0x7f80_0000 {
        return false;
    }
    let (mi, ei) = mant_exp(inter);
    let (mu, eu) = mant_exp(uni);
    let d = ei - mid.1 - eu;
    if d <= 22 {
        return false;
    }
    if d >= 27 {
        return true;
    }
    let a = mi << d;
    let prod = mid.0 as u64 * mu;
    a > prod || (a == prod && mid.2)
}

impl Nms {
    /// A configuration with torchvision's CPU path rule.
    pub fn new(capacity: usize, iou_thresh: f32, max_out: usize, batched: bool) -> Nms {
        Nms {
            capacity,
            iou_thresh,
            max_out,
            batched,
            trick_max_boxes: CPU_TRICK_MAX_BOXES,
        }
    }

    /// u32 words per mask row.
    pub fn words(&self) -> usize {
        self.capacity.div_ceil(32)
    }

    /// Bytes of scratch: the mask (capacity × words × 4) dominates, 3.1 MB at capacity 5000.
    pub fn scratch_bytes(&self) -> u64 {
        let c = self.capacity as u64;
        c * self.words() as u64 * 4 + c * (4 + 16 + 4 + if self.batched { 4 } else { 0 }) + 8
    }

    fn check(&self, gpu: &Gpu) -> Result<()> {
        let op = "nms";
        if self.capacity == 0 || self.capacity > 1 << 24 {
            return Err(Error::shape(
                op,
                format!("capacity {} outside 1..=2^24", self.capacity),
            ));
        }
        if !self.iou_thresh.is_finite() || self.iou_thresh < 0.0 {
            return Err(Error::shape(
                op,
                format!("IoU threshold {} must be finite and ≥ 0", self.iou_thresh),
            ));
        }
        let wg_bytes = self.words() as u64 * 4 + 16;
        let limit = gpu.limits.max_compute_workgroup_storage_size as u64;
        if wg_bytes > limit {
            return Err(Error::TooLarge(format!(
                "nms capacity {}: the greedy pass needs {wg_bytes} bytes of workgroup memory, this adapter has {limit}",
                self.capacity
            )));
        }
        Ok(())
    }

    /// Allocates the scratch buffers for this configuration.
    pub fn scratch(&self, gpu: &Gpu, label: &str) -> Result<NmsScratch> {
        self.check(gpu)?;
        let c = self.capacity as u64;
        Ok(NmsScratch {
            capacity: self.capacity,
            batched: self.batched,
            order: gpu.storage(&format!("{label} order"), c * 4)?,
            sbox: gpu.storage(&format!("{label} sorted boxes"), c * 16)?,
            sarea: gpu.storage(&format!("{label} sorted areas"), c * 4)?,
            sid: if self.batched {
                Some(gpu.storage(&format!("{label} sorted ids"), c * 4)?)
            } else {
                None
            },
            state: gpu.storage(&format!("{label} state"), 8)?,
            mask: gpu.storage(&format!("{label} mask"), c * self.words() as u64 * 4)?,
        })
    }

    /// Records the four dispatches (run them in order, in one pass or several).
    pub fn encode(
        &self,
        gpu: &Gpu,
        label: &str,
        io: &NmsIo,
        scratch: &NmsScratch,
    ) -> Result<Vec<Dispatch>> {
        self.check(gpu)?;
        let op = label;
        if scratch.capacity != self.capacity || scratch.batched != self.batched {
            return Err(Error::shape(
                op,
                format!(
                    "scratch is for capacity {} batched {}, op is capacity {} batched {}",
                    scratch.capacity, scratch.batched, self.capacity, self.batched
                ),
            ));
        }
        let c = self.capacity as u64;
        let need = |name: &str, buf: &Buffer, bytes: u64| -> Result<()> {
            if buf.size() < bytes {
                return Err(Error::shape(
                    op,
                    format!("{name} buffer has {} bytes, needs {bytes}", buf.size()),
                ));
            }
            Ok(())
        };
        need("boxes", io.boxes, c * 16)?;
        need("scores", io.scores, c * 4)?;
        need("count", io.count, (io.count_index as u64 + 1) * 4)?;
        need("keep", io.keep, self.max_out.min(self.capacity) as u64 * 4)?;
        need(
            "keep count",
            io.keep_count,
            (io.keep_count_index as u64 + 1) * 4,
        )?;
        let ids = match (self.batched, io.ids) {
            (true, Some(ids)) => {
                need("ids", ids, c * 4)?;
                Some(ids)
            }
            (true, None) => return Err(Error::shape(op, "batched NMS needs an ids buffer")),
            (false, _) => None,
        };
        let u32_of = |v: usize, what: &str| -> Result<u32> {
            u32::try_from(v).map_err(|_| Error::shape(op, format!("{what} {v} exceeds u32")))
        };
        let (thr_mant, thr_exp, tie_up) = threshold_midpoint(self.iou_thresh);
        let params = Params {
            cap: self.capacity as u32,
            count_index: u32_of(io.count_index, "count index")?,
            out_index: u32_of(io.keep_count_index, "keep count index")?,
            max_out: self.max_out.min(self.capacity) as u32,
            trick_max: self.trick_max_boxes.min(u32::MAX as usize) as u32,
            thr_mant,
            thr_exp,
            tie_up: tie_up as u32,
            zero: 0,
            pad0: 0,
            pad1: 0,
            pad2: 0,
        };
        let ubuf = Uniform::new(gpu, &format!("{label} params"), &params);

        let words = self.words();
        let s = scratch;
        let row_groups = groups(self.capacity, 256);
        let record = |io_: &KernelIo,
                      stage: usize,
                      what: &str,
                      buffers: &[(&str, &Buffer)],
                      grid: [u32; 3]|
         -> Result<Dispatch> {
            let consts = stage_consts(stage, self.batched, words);
            let pipeline = io_.pipeline(gpu, &consts)?;
            io_.dispatch(
                gpu,
                format!("{label} {what}"),
                &pipeline,
                &consts,
                &ubuf,
                buffers,
                grid,
            )
        };

        let d_rank = record(
            &RANK,
            0,
            "rank",
            &[
                ("scores", io.scores),
                ("count_in", io.count),
                ("order", &s.order),
            ],
            [row_groups, 1, 1],
        )?;

        let mut prep_bufs: Vec<(&str, &Buffer)> = vec![
            ("boxes", io.boxes),
            ("count_in", io.count),
            ("order", &s.order),
            ("sbox", &s.sbox),
            ("sarea", &s.sarea),
            ("state", &s.state),
        ];
        if let (Some(ids), Some(sid)) = (ids, s.sid.as_ref()) {
            prep_bufs.extend([("ids", ids), ("sid", sid)]);
        }
        let d_prep = record(&PREP, 1, "prep", &prep_bufs, [1, 1, 1])?;

        let mut mask_bufs: Vec<(&str, &Buffer)> = vec![
            ("sbox", &s.sbox),
            ("sarea", &s.sarea),
            ("state", &s.state),
            ("mask", &s.mask),
        ];
        if let Some(sid) = s.sid.as_ref() {
            mask_bufs.push(("sid", sid));
        }
        let d_mask = record(&MASK, 2, "mask", &mask_bufs, [row_groups, words as u32, 1])?;

        let d_greedy = record(
            &GREEDY,
            3,
            "greedy",
            &[
                ("mask", &s.mask),
                ("order", &s.order),
                ("state", &s.state),
                ("keep_out", io.keep),
                ("count_out", io.keep_count),
            ],
            [1, 1, 1],
        )?;
        Ok(vec![d_rank, d_prep, d_mask, d_greedy])
    }
}
