pub mod count;
pub mod eval;
pub mod serve;
