//! CPU reference for the roi_align kernels (placeholder: being written).
