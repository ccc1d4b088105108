//! Composition root: parse the command line and run it (see `cli`).

/// mimalloc instead of the system allocator: the request path allocates many
/// small, short-lived buffers on several threads (HTTP/2, TLS, JSON, the audit
/// record), where glibc's malloc took about a tenth of the gateway's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    dcvv_gateway::cli::main()
}
