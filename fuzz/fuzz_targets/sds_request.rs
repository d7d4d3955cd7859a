//! Fuzz target `sds_request`: see `tessera_fuzz::sds_request`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::sds_request(data));

#[cfg(not(fuzzing))]
fn main() {
    tessera_fuzz::replay(tessera_fuzz::sds_request);
}
