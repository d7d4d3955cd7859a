//! Fuzz target `bundle_json`: see `tessera_fuzz::bundle_json`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::bundle_json(data));

#[cfg(not(fuzzing))]
fn main() {
    tessera_fuzz::replay(tessera_fuzz::bundle_json);
}
