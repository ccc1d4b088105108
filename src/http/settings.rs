//! The HTTP server's own settings: where it listens, how it speaks (TLS or,
//! explicitly, plain HTTP) and every bound of the front (deadlines, limits,
//! connection caps). `config` parses the file into these; nothing here reads
//! a file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How the server speaks: TLS with a certificate, or (only when the config
/// says `allow_insecure_http = true`) plain HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// HTTPS with these PEM files.
    Tls(TlsFiles),
    /// Plain HTTP: development only.
    InsecureHttp,
    /// Neither: key commands work, `serve` refuses to start and says what to set.
    Unconfigured,
}

/// The PEM files of HTTPS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, server certificate first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CAs a client certificate must chain to (mutual TLS); without it,
    /// no client certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

/// The HTTP server's settings.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// TLS or plain HTTP.
    pub transport: Transport,
    /// Whole-request deadline; past it the client gets 503.
    pub request_timeout: Duration,
    /// Largest request body read (413 beyond).
    pub body_limit: usize,
    /// Requests served at once; more are shed with 429 (sized to the HSM pool).
    pub max_in_flight: usize,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Signature timestamp tolerance either side of the server clock.
    pub max_skew: Duration,
    /// How often expired store rows are deleted.
    pub cleanup_interval: Duration,
    /// From accept (TLS handshake included) to the first complete request
    /// head, and from a later request's first byte to its complete head; past
    /// it the connection is closed.
    pub header_read_timeout: Duration,
    /// How long a connection may stay idle after a response; then it is closed.
    pub keep_alive_timeout: Duration,
    /// Reading a signed request's body; past it 408 `body_timeout`, before
    /// the request takes an in-flight slot.
    pub body_read_timeout: Duration,
    /// Open connections at most; more are closed at accept.
    pub max_connections: usize,
    /// Open connections from one peer IP address at most; more are closed at accept.
    pub max_connections_per_peer: usize,
    /// Async runtime worker threads (HTTP, TLS, signatures, JSON). Token calls
    /// run on blocking threads and the store and audit trail on threads of their
    /// own, so the default leaves them half the cores: measured on 2 cores, one
    /// worker instead of two cut the verification p99 at peak from about 45 ms
    /// to 15 ms and raised throughput by about a tenth (docs/benchmarks.md, HTTP benchmark).
    pub worker_threads: usize,
}
