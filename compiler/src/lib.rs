//! kiln-compiler: reads GGUF models, lowers them to kiln's IR, optimizes the graph, generates native code and
//! writes plan files.

pub mod codegen;
pub mod gguf;
pub mod lower;
pub mod passes;
pub mod plan_writer;
pub mod quantize;

pub use gguf::{GgufError, GgufFile};
pub use lower::{lower, LowerError, Lowered};
