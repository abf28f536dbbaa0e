//! The engine: everything a run does above the tensor runtime — plugins, config, data, training,
//! sampling and adapters. No windowing and no command line: the GUI and the `ferrite` binary
//! drive it.

pub mod adapters;
pub mod caption;
pub mod config;
pub mod data;
pub mod embeddings;
pub mod hub;
pub mod label;
pub mod mask;
pub mod model_file;
pub mod plugins;
pub mod sample;
pub mod settings;
pub mod train;
pub mod video;

pub use ferrite_runtime as runtime;
pub use ferrite_runtime::fsutil;
