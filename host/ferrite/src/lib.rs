//! The `ferrite` binary's library face: the layers below under one name, for the CLI, tests and
//! tools. Runtime (`ferrite-runtime`) → engine (`ferrite-engine`) → GUI (`ferrite-gui`, feature
//! `gui`).

pub use ferrite_engine::{
    adapters, caption, config, data, embeddings, fsutil, hub, label, mask, model_file, plugins,
    runtime, sample, settings, train, video,
};
#[cfg(feature = "gui")]
pub use ferrite_gui as gui;
pub use ferrite_runtime::bench;
