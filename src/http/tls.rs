//! TLS for the server: the rustls configuration built from `[server]`'s PEM
//! files, and, with `client_ca_file` (mutual TLS, issue 12), the client
//! certificate each connection must present and how it reaches the signature
//! layer.
//!
//! - **Loading.** The certificate chain, the private key and the client CAs
//!   are read once, at start; a file that cannot be read or holds nothing
//!   usable stops the start with its key and path named, never its content.
//! - **Client certificates.** With client CAs, rustls's
//!   [`WebPkiClientVerifier`] refuses a handshake without a certificate or with
//!   one that does not chain to them. [`PeerCertificate`] wraps axum-server's
//!   rustls acceptor: after the handshake it reads the end-entity certificate
//!   once ([`ClientCertificate`]) and attaches it to every request of the
//!   connection, where [`super::auth`] holds it against the client's pins.
//!
//! Revocation lists are not read: a compromised client certificate is cut off
//! by its client's pins, or by a CA that no longer vouches for it.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::Request;
use axum_server::accept::Accept;
use axum_server::tls_rustls::RustlsAcceptor;
use rustls::RootCertStore;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;

use super::client_cert::ClientCertificate;
use super::settings::TlsFiles;

/// A TLS file that could not be used; names the key and the file, never
/// the file's content.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read or holds nothing usable.
    #[error("server.{key} {path}: {reason}")]
    File {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: String,
        /// What is wrong, without the file's content.
        reason: String,
    },
    /// rustls refused the combination (e.g. a key that is not the certificate's).
    #[error("server.tls_cert_file / tls_key_file: {0}")]
    Config(#[source] rustls::Error),
}

fn file_error(key: &'static str, path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::File {
        key,
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// What a PEM error says without quoting the file: the key file is secret,
/// so no byte of it may reach a message.
fn pem_reason(e: &pem::Error, wanted: &str) -> String {
    match e {
        pem::Error::Io(io) => format!("cannot be read: {}", io.kind()),
        pem::Error::NoItemsFound => format!("holds no PEM {wanted}"),
        _ => format!("is not valid PEM (expected {wanted})"),
    }
}

/// The rustls server configuration for `files`: HTTP/2 and HTTP/1.1 over
/// TLS 1.2 or 1.3, with ring; with client CAs, a client certificate
/// chaining to one of them is required.
///
/// # Errors
/// [`TlsError`] naming the file (or the pair) that is unusable.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates("tls_cert_file", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| file_error("tls_key_file", &files.key, pem_reason(&e, "private key")))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, provider)?),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Every certificate of a PEM file, at least one.
fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let wanted = "CERTIFICATE";
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| file_error(key, path, pem_reason(&e, wanted)))?;
    if certs.is_empty() {
        return Err(file_error(key, path, format!("holds no PEM {wanted}")));
    }
    Ok(certs)
}

/// Requires a client certificate chaining to one of the CAs in `path`.
fn client_verifier(
    path: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let key = "client_ca_file";
    let mut roots = RootCertStore::empty();
    for (i, cert) in certificates(key, path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            file_error(
                key,
                path,
                format!("certificate {} is not a usable CA: {e}", i + 1),
            )
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| file_error(key, path, format!("no usable CA: {e}")))
}

/// axum-server's rustls acceptor, plus the client certificate of each
/// connection on each of its requests.
#[derive(Debug, Clone)]
pub struct PeerCertificate<A>(RustlsAcceptor<A>);

impl<A> PeerCertificate<A> {
    /// Wraps `acceptor`.
    pub fn new(acceptor: RustlsAcceptor<A>) -> Self {
        PeerCertificate(acceptor)
    }
}

type Accepted<A, S> = (
    TlsStream<<A as Accept<tokio::net::TcpStream, S>>::Stream>,
    WithCertificate<<A as Accept<tokio::net::TcpStream, S>>::Service>,
);

impl<A, S> Accept<tokio::net::TcpStream, S> for PeerCertificate<A>
where
    A: Accept<tokio::net::TcpStream, S> + Clone + Send + Sync + 'static,
    A::Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A::Service: Send + 'static,
    A::Future: Send + 'static,
    S: Send + 'static,
{
    type Stream = TlsStream<A::Stream>;
    type Service = WithCertificate<A::Service>;
    type Future = Pin<Box<dyn Future<Output = io::Result<Accepted<A, S>>> + Send>>;

    fn accept(&self, stream: tokio::net::TcpStream, service: S) -> Self::Future {
        let handshake = self.0.accept(stream, service);
        Box::pin(async move {
            let (tls, service) = handshake.await?;
            // The end-entity certificate comes first (RFC 8446 4.4.2).
            let certificate = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|der| ClientCertificate::from_der(der));
            Ok((
                tls,
                WithCertificate {
                    inner: service,
                    certificate,
                },
            ))
        })
    }
}

/// A connection's service: puts the connection's [`ClientCertificate`], if
/// it presented one, into every request's extensions.
#[derive(Debug, Clone)]
pub struct WithCertificate<S> {
    inner: S,
    certificate: Option<ClientCertificate>,
}

impl<S, B> tower::Service<Request<B>> for WithCertificate<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if let Some(certificate) = &self.certificate {
            request.extensions_mut().insert(certificate.clone());
        }
        self.inner.call(request)
    }
}
