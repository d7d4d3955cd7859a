//! `tessera-server`: the CA server and its admin CLI. All logic lives in the library.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    tessera_server::cli::main()
}
