//! A test plugin whose initialisation reports an error.

use ferrite_plugin_api::{
    Component, ComponentKind, Descriptor, Plugin, Result, bail, export_plugin, serde_json,
};

struct Failing;

impl Plugin for Failing {
    const NAME: &'static str = "init-fails";
    const VERSION: &'static str = "0.1.0";
    fn init() -> Result<()> {
        bail!("required model file model.onnx is missing")
    }
    fn components() -> Vec<Descriptor> {
        Vec::new()
    }
    fn instantiate(_: ComponentKind, id: &str, _: serde_json::Value) -> Result<Component> {
        bail!("no component `{id}`")
    }
}

export_plugin!(Failing);
