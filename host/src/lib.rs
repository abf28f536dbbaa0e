//! The Ferrite host: tensor runtime, plugin manager, settings and CLI commands.

pub mod bench;
pub mod fsutil;
pub mod plugins;
pub mod runtime;
pub mod settings;

/// Text of a caught panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
