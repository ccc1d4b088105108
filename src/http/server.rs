//! Serving: HTTPS (rustls) or, only when the config says
//! `allow_insecure_http = true`, plain HTTP with a loud warning, until the
//! shutdown future completes; then in-flight requests drain within the
//! configured grace. Every connection passes [`connections`] first: the caps
//! at accept, the header-read deadline, hyper's HTTP/1.1 and HTTP/2 bounds.
//! What runs beside the server and what it opens is [`crate::gateway`]'s.

use std::future::Future;
use std::net::SocketAddr;

use super::connections::{self, Admission};
use super::settings::Transport;
use super::{AppState, app};

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Neither TLS nor plain HTTP is configured.
    #[error(
        "refusing to start: [server] needs tls_cert_file and tls_key_file (HTTPS), or \
         allow_insecure_http = true for plain HTTP in development"
    )]
    Unconfigured,
    /// The certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[source] std::io::Error),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Serves `state`'s router on `listener` until `shutdown` completes, then drains.
///
/// # Errors
/// `Unconfigured` before anything is served; `Tls` when the certificate or
/// key cannot be loaded; `Io` from the socket.
pub async fn serve(
    state: AppState,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let settings = state.settings();
    let transport = settings.transport.clone();
    if transport == Transport::Unconfigured {
        return Err(ServeError::Unconfigured);
    }
    let grace = settings.shutdown_grace;
    let admission = Admission::new(settings, state.shared_metrics());
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;
    let handle = axum_server::Handle::new();
    tokio::spawn({
        let handle = handle.clone();
        async move {
            shutdown.await;
            tracing::info!("shutdown requested; draining in-flight requests");
            handle.graceful_shutdown(Some(grace));
        }
    });
    let service = app(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let served = match &transport {
        Transport::Tls { cert, key } => {
            // The process-wide rustls provider is ring; a second install is a no-op.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .map_err(ServeError::Tls)?;
            tracing::info!(%address, "dcvv-gateway listening (HTTPS)");
            let mut server = axum_server::from_tcp_rustls(listener, config)
                .map(|tls| tls.acceptor(admission.clone()))
                .handle(handle);
            connections::configure(server.http_builder(), state.settings());
            server.serve(service).await
        }
        Transport::InsecureHttp | Transport::Unconfigured => {
            tracing::warn!(
                %address,
                "INSECURE: serving plain HTTP because allow_insecure_http = true; \
                 card data and signatures cross the network in clear. Development only."
            );
            let mut server = axum_server::from_tcp(listener)
                .acceptor(admission.clone())
                .handle(handle);
            connections::configure(server.http_builder(), state.settings());
            server.serve(service).await
        }
    };
    served?;
    Ok(())
}
