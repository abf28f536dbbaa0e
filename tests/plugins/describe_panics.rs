//! A test plugin whose `describe` panics (it initialises fine).

use ferrite_plugin_api::{
    Component, ComponentKind, Descriptor, Plugin, Result, bail, export_plugin, serde_json,
};

struct Panicking;

impl Plugin for Panicking {
    const NAME: &'static str = "describe-panics";
    const VERSION: &'static str = "0.1.0";
    fn components() -> Vec<Descriptor> {
        panic!("describe exploded")
    }
    fn instantiate(_: ComponentKind, id: &str, _: serde_json::Value) -> Result<Component> {
        bail!("no component `{id}`")
    }
}

export_plugin!(Panicking);
