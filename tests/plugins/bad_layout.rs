//! A test library exporting a root module under Ferrite's name and ABI major version but with a
//! different layout, as a plugin built against a broken `plugin-api` would.

use abi_stable::{
    StableAbi, declare_root_module_statics, export_root_module, library::RootModule,
    prefix_type::PrefixTypeTrait, sabi_types::VersionStrings, std_types::RStr,
};

#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = OtherLibRef)))]
#[sabi(missing_field(panic))]
pub struct OtherLib {
    pub abi_version: u64,
    #[sabi(last_prefix_field)]
    pub name: RStr<'static>,
}

impl RootModule for OtherLibRef {
    declare_root_module_statics! {OtherLibRef}
    const BASE_NAME: &'static str = "ferrite_plugin";
    const NAME: &'static str = "ferrite_plugin";
    // The host's own ABI version: the refusal comes from the layout check.
    const VERSION_STRINGS: VersionStrings =
        VersionStrings::new(ferrite_plugin_api::abi::ABI_VERSION);
}

#[export_root_module]
pub fn root() -> OtherLibRef {
    OtherLib {
        abi_version: 1,
        name: RStr::from_str("bad-layout"),
    }
    .leak_into_prefix()
}
