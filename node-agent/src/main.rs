//! `tessera-agent`: the node agent. All logic lives in the library.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    tessera_agent::cli::main()
}
