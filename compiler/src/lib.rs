//! kiln-compiler: reads GGUF models and lowers them to kiln's IR.

pub mod gguf;
pub mod lower;
pub mod passes;
pub mod plan_writer;

pub use gguf::{GgufError, GgufFile};
pub use lower::{lower, LowerError, Lowered};
