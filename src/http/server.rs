//! Serving: HTTPS (rustls, [`tls`]; with mutual TLS when the config names
//! client CAs) or, only when the config says `allow_insecure_http = true`,
//! plain HTTP with a loud warning, until the shutdown future completes; then
//! in-flight requests drain within the configured grace. Every connection
//! passes [`connections`] first: the caps at accept, the header-read deadline,
//! hyper's HTTP/1.1 and HTTP/2 bounds. What runs beside the server and what
//! it opens is [`crate::gateway`]'s.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use super::connections::{self, Admission};
use super::settings::Transport;
use super::tls::{self, PeerCertificate, TlsError};
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
    /// The certificate, the key or the client CAs could not be loaded.
    #[error("refusing to start: TLS: {0}")]
    Tls(#[from] TlsError),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How the server speaks, with its files read: what [`serve`] needs, made
/// at start-up before the store is opened, so that a bad file stops the start.
#[derive(Clone, Debug)]
pub enum Front {
    /// HTTPS with this configuration.
    Tls(Arc<rustls::ServerConfig>),
    /// Plain HTTP (`allow_insecure_http = true`).
    InsecureHttp,
}

impl Front {
    /// Reads the TLS files of `transport`.
    ///
    /// # Errors
    /// `Unconfigured` when neither TLS nor plain HTTP is configured; `Tls`
    /// naming the file that cannot be used.
    pub fn load(transport: &Transport) -> Result<Front, ServeError> {
        match transport {
            Transport::Tls(files) => Ok(Front::Tls(tls::server_config(files)?)),
            Transport::InsecureHttp => Ok(Front::InsecureHttp),
            Transport::Unconfigured => Err(ServeError::Unconfigured),
        }
    }
}

/// Serves `state`'s router on `listener` as `front` says until `shutdown`
/// completes, then drains.
///
/// # Errors
/// `Io` from the socket.
pub async fn serve(
    state: AppState,
    front: Front,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let settings = state.settings();
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
    let served = match front {
        Front::Tls(config) => {
            let mutual = matches!(&settings.transport, Transport::Tls(f) if f.client_ca.is_some());
            let config = axum_server::tls_rustls::RustlsConfig::from_config(config);
            tracing::info!(
                %address,
                client_certificates = if mutual { "required" } else { "not asked" },
                "dcvv-gateway listening (HTTPS)"
            );
            let mut server = axum_server::from_tcp_rustls(listener, config)
                .map(|tls| PeerCertificate::new(tls.acceptor(admission.clone())))
                .handle(handle);
            connections::configure(server.http_builder(), state.settings());
            server.serve(service).await
        }
        Front::InsecureHttp => {
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
