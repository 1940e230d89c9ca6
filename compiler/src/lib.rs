//! kiln-compiler: reads GGUF models and lowers them to kiln's IR.

pub mod gguf;
pub mod lower;

pub use gguf::{GgufError, GgufFile};
pub use lower::{lower, LowerError, Lowered};
