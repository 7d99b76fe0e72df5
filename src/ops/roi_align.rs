//! roi_align op (placeholder: being written).
