//! rpn op (placeholder: being written).
