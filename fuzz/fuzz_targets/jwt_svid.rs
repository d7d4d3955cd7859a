//! Fuzz target `jwt_svid`: see `tessera_fuzz::jwt_svid`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::jwt_svid(data));

#[cfg(not(fuzzing))]
fn main() {
    tessera_fuzz::replay(tessera_fuzz::jwt_svid);
}
