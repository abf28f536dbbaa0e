//! A test library exporting a root module under Ferrite's name but with a different layout,
//! as a plugin built against an incompatible `plugin-api` would.

use abi_stable::{
    StableAbi, declare_root_module_statics, export_root_module, library::RootModule,
    package_version_strings, prefix_type::PrefixTypeTrait, sabi_types::VersionStrings,
    std_types::RStr,
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
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

#[export_root_module]
pub fn root() -> OtherLibRef {
    OtherLib {
        abi_version: 1,
        name: RStr::from_str("bad-layout"),
    }
    .leak_into_prefix()
}
