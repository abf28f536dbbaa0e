//! The Ferrite host: tensor runtime, plugin manager, settings and CLI commands.

pub mod adapters;
pub mod bench;
pub mod data;
pub mod fsutil;
#[cfg(feature = "gui")]
pub mod gui;
pub mod plugins;
pub mod runtime;
pub mod sample;
pub mod settings;
pub mod train;
