//! A test plugin whose initialisation panics.

use ferrite_plugin_api::{
    Component, ComponentKind, Descriptor, Plugin, Result, bail, export_plugin, serde_json,
};

struct Panicking;

impl Plugin for Panicking {
    const NAME: &'static str = "init-panics";
    const VERSION: &'static str = "0.1.0";
    fn init() -> Result<()> {
        panic!("plugin init exploded")
    }
    fn components() -> Vec<Descriptor> {
        Vec::new()
    }
    fn instantiate(_: ComponentKind, id: &str, _: serde_json::Value) -> Result<Component> {
        bail!("no component `{id}`")
    }
}

export_plugin!(Panicking);
