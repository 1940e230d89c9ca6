//! kiln-ir: the facts every stage of kiln shares.
//!
//! Quantization formats and their reference dequantizers, tensor types, the graph with its text form and
//! verifier, model metadata, and the weight-source interface executors read through.

pub mod activation;
pub mod cpu_abi;
pub mod cuda_abi;
pub mod dequant;
pub mod dot;
pub mod format;
pub mod graph;
pub mod layout;
pub mod model;
pub mod op;
pub mod plan;
pub mod quantize;
pub mod schedule;
pub mod text;
pub mod tl;
pub mod types;
pub mod verify;
pub mod weights;

pub use format::QuantFormat;
pub use graph::{Graph, Node, NodeId, Operand, WeightDecl, WeightId};
pub use op::{Activation, Op, RopeParams, RopeStyle};
pub use types::{DType, Dim, TensorType};
pub use verify::{verify, VerifyError};
