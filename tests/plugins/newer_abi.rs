//! A test library declaring a newer ABI major version than the host's (plugin-api 2.0.0), as a
//! plugin built for a later Ferrite would.

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
    const VERSION_STRINGS: VersionStrings = VersionStrings::new("2.0.0");
}

#[export_root_module]
pub fn root() -> OtherLibRef {
    OtherLib {
        abi_version: 1,
        name: RStr::from_str("newer-abi"),
    }
    .leak_into_prefix()
}
