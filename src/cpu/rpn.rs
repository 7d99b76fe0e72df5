//! CPU reference for the rpn kernels (placeholder: being written).
