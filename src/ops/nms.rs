//! nms op (placeholder: being written).
