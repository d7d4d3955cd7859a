//! Fuzz target `config`: see `tessera_fuzz::config`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::config(data));

#[cfg(not(fuzzing))]
fn main() {
    tessera_fuzz::replay(tessera_fuzz::config);
}
