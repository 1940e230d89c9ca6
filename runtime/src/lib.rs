//! kiln-runtime: executes graphs and serves the model's text interface.
//!
//! The reference executor, the sampler, tokenizers and chat templates built from model metadata alone. It never
//! depends on the compiler: a serving process needs only what a compiled model carries.

pub mod chat;
pub mod cpu;
pub mod cuda;
pub mod engine;
mod fastmath;
pub mod generate;
pub mod plan;
pub mod reference;
pub mod sampler;
pub mod stop;
pub mod tokenizer;

pub use cpu::CpuExecutor;
pub use cuda::CudaExecutor;
pub use engine::{Engine, ExecError, KernelTime, KvBudget, Logits, SeqTokens};
pub use fastmath::argmax;
pub use reference::ReferenceExecutor;
pub use sampler::{Sampler, SamplerConfig};
pub use tokenizer::Tokenizer;
