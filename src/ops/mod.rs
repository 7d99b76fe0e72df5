//! One module per kernel family: an op struct with its shape checks, its pipeline variant and the
//! dispatch it records. The WGSL lives in `shaders/<family>.wgsl`.

pub mod box_head;
pub mod contract;
pub mod conv;
pub mod linalg;
pub mod nms;
pub mod pool;
pub mod refine;
pub mod roi_align;
pub mod rpn;
pub mod topk;
pub mod transform;

/// Ceil-divide for workgroup counts.
pub(crate) fn groups(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}
