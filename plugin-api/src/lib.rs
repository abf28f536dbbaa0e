//! The stable ABI between the Ferrite host and its plugins, and the safe layer plugins are
//! written against. Plugins never hold tensor data: [`Tensor`] is a handle to a host tensor and
//! every method is a host op.

pub mod abi;
pub mod adapter;
mod error;
pub mod family;
pub mod host;
pub mod nn;
pub mod op;
pub mod optim;
pub mod plugin;
pub mod tensor;

pub use abi::{ComponentKind, DType, LogLevel, OpCode, TensorId, WeightInfo};
pub use abi_stable;
pub use error::{Error, Result};
pub use family::{ModelInfo, Part, PartKind};
pub use host::{Generator, Weights, checkpoint, save_safetensors};
pub use nn::{AdaptableLayer, FusedRows};
pub use op::Op;
pub use plugin::{
    Adapter, Architecture, Captioner, Component, Descriptor, Masker, Optimizer, Param, Plugin,
    parse_options,
};
pub use serde_json;
pub use tensor::{Gradients, Tensor, ops};
