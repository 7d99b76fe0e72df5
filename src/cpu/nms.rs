//! CPU reference for the nms kernels (placeholder: being written).
