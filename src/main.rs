//! Composition root: parse the command line and run it (see `cli`).

fn main() -> std::process::ExitCode {
    dcvv_gateway::cli::main()
}
