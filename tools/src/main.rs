//! Composition root: parse the command line and run it (see the library).

fn main() -> std::process::ExitCode {
    dcvv_tools::main()
}
