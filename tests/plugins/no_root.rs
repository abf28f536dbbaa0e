//! A test library that is a valid shared object but not a Ferrite plugin (no root module).

#[unsafe(no_mangle)]
pub extern "C" fn some_other_entry_point() -> i32 {
    7
}
