//! Fuzz target `k8s_input`: see `tessera_fuzz::k8s_input`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::k8s_input(data));

#[cfg(not(fuzzing))]
fn main() {
    tessera_fuzz::replay(tessera_fuzz::k8s_input);
}
