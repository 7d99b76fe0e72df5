pub mod count;
pub mod eval;
