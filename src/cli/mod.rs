pub mod count;
pub mod eval;
pub mod model;
pub mod serve;
