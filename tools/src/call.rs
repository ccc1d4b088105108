//! `call`: one HMAC-signed request to a running gateway (DESIGN 5), for people
//! trying the API by hand and for scripts.
//!
//! The request is signed with [`dcvv_gateway::http::signature`], the same code the
//! server verifies with, so client and server cannot drift. The response's
//! signature is checked before the command reports success: the echoed
//! `X-Client-Request-Id` must be ours and the HMAC over the status and body must
//! verify under the same secret.
//!
//! The secret is read from an environment variable and never printed. The
//! response body goes to stdout verbatim (re-indented when it is JSON): it may
//! hold codes and masked PANs because that is what the caller asked for; nothing
//! from a request or response body is logged. `bench http` reuses the pure parts.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use zeroize::Zeroizing;

use dcvv_gateway::cli::CliError;
use dcvv_gateway::http::signature::{
    APIKEY, ClientSecret, HeaderError, MAX_APIKEY_CHARS, REQUEST_ID, RequestId, RequestToSign,
    ResponseToSign, SIGNATURE, SecretError, SignatureHeaders, TIMESTAMP,
};

/// How long `call` waits for the whole exchange.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long any client of this module waits for a TCP (and TLS) connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Arguments of `dcvv-tools call`.
#[derive(Debug, clap::Args)]
pub(crate) struct CallArgs {
    /// Base URL of the gateway, http:// or https:// (e.g. https://127.0.0.1:8443).
    #[arg(long)]
    url: String,
    /// Client id, sent in the `apikey` header.
    #[arg(long)]
    apikey: String,
    /// Name of the environment variable holding the client secret (never the secret itself).
    #[arg(long, value_name = "VAR")]
    secret_env: String,
    /// PEM file of extra trusted root certificate(s), e.g. the development certificate;
    /// added to the system's roots.
    #[arg(long, value_name = "PEM_FILE")]
    cacert: Option<PathBuf>,
    /// PEM file of this client's TLS certificate (and any intermediates), for a gateway
    /// that requires mutual TLS (`server.client_ca_file`); with --client-key.
    #[arg(long, value_name = "PEM_FILE", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM file of the private key of --client-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM_FILE", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Request body (JSON), sent byte for byte. Prefer --data-file for card numbers:
    /// command lines end up in shell history and process listings.
    #[arg(long, value_name = "JSON", conflicts_with = "data_file")]
    data: Option<String>,
    /// File holding the request body, sent byte for byte; `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    data_file: Option<PathBuf>,
    /// HTTP method, e.g. POST or GET.
    method: String,
    /// Path with an optional query string, e.g. /cards/pin/dynamic-values.
    path: String,
}

/// Why `call` (or the HTTP benchmark) could not do its job. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// The secret's environment variable is not set.
    #[error("environment variable {0} (--secret-env) is not set")]
    SecretUnset(String),
    /// The secret's environment variable is not valid Unicode.
    #[error("environment variable {0} (--secret-env) is not valid Unicode")]
    SecretNotUnicode(String),
    /// The secret is not an acceptable client secret.
    #[error("environment variable {var} (--secret-env): {source}")]
    SecretInvalid {
        /// The variable's name.
        var: String,
        /// What is wrong with its value.
        source: SecretError,
    },
    /// The client id cannot be sent as an `apikey` header.
    #[error("--apikey: 1 to {MAX_APIKEY_CHARS} printable ASCII characters without spaces")]
    Apikey,
    /// The HTTP method is not a method.
    #[error("method: not an HTTP method")]
    Method,
    /// The URL or the path cannot make a request target.
    #[error("{0}")]
    Target(&'static str),
    /// A file could not be read.
    #[error("{what} {path}: {kind}")]
    File {
        /// Which file it is.
        what: &'static str,
        /// Its path.
        path: String,
        /// The I/O error kind.
        kind: std::io::ErrorKind,
    },
    /// The `--cacert` file holds no usable certificate.
    #[error("--cacert {0}: no PEM certificate could be read")]
    CaCert(String),
    /// `--client-cert` and `--client-key` do not make a TLS client identity.
    #[error("--client-cert {cert} / --client-key {key}: not a PEM certificate and its private key")]
    ClientIdentity {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
    },
    /// The OS random source failed (request id).
    #[error("cannot draw a random request id: {0}")]
    Random(getrandom::Error),
    /// The clock is before 1970.
    #[error("the system clock is before the Unix epoch")]
    Clock,
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    /// The request could not be sent or the response not read.
    #[error("request failed: {0}")]
    Transport(String),
    /// The response's signature is malformed or wrong.
    #[error("response signature does not verify")]
    BadSignature,
    /// The gateway answered with a status other than 2xx.
    #[error("the gateway answered {0}")]
    Status(StatusCode),
    /// Writing the answer to stdout failed.
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::ErrorKind),
}

impl From<CallError> for CliError {
    fn from(e: CallError) -> Self {
        CliError::Io(e.to_string())
    }
}

/// A reqwest error with its causes, which hold the useful part ("connection
/// refused", "invalid peer certificate: UnknownIssuer"). URLs carry no card data.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// A client's id and secret: what signs requests and checks responses.
/// `Debug` shows the id only.
#[derive(Clone)]
pub(crate) struct Credentials {
    apikey: String,
    secret: ClientSecret,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("apikey", &self.apikey)
            .field("secret", &self.secret)
            .finish()
    }
}

/// The response carried a valid signature, or none at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResponseSignature {
    /// `Signature` verified over our request id, the status and the body.
    Verified,
    /// No `Signature` header (e.g. a 401, or an unsigned endpoint such as /healthz).
    Unsigned,
}

/// Why a signed response was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadResponseSignature {
    /// A signature header is missing or malformed.
    #[error("{0}")]
    Header(HeaderError),
    /// The echoed `X-Client-Request-Id` is not the one we sent.
    #[error("the echoed X-Client-Request-Id is not ours")]
    OtherRequestId,
    /// The HMAC does not verify under our secret.
    #[error("the HMAC does not match the status and body")]
    Mismatch,
}

impl Credentials {
    /// Credentials from a client id and a secret.
    ///
    /// # Errors
    /// `Apikey` when the id cannot be an `apikey` header the gateway reads.
    pub(crate) fn new(apikey: &str, secret: ClientSecret) -> Result<Self, CallError> {
        let valid = !apikey.is_empty()
            && apikey.len() <= MAX_APIKEY_CHARS
            && apikey.bytes().all(|b| b.is_ascii_graphic());
        if !valid {
            return Err(CallError::Apikey);
        }
        Ok(Credentials {
            apikey: apikey.to_owned(),
            secret,
        })
    }

    /// Credentials whose secret is the value of environment variable `var`.
    ///
    /// # Errors
    /// The variable is unset, not Unicode, or not a valid secret (the message
    /// names the variable, never its value); or `Apikey`.
    pub(crate) fn from_env(apikey: &str, var: &str) -> Result<Self, CallError> {
        let value = match std::env::var(var) {
            Ok(value) => Zeroizing::new(value),
            Err(std::env::VarError::NotPresent) => {
                return Err(CallError::SecretUnset(var.to_owned()));
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(CallError::SecretNotUnicode(var.to_owned()));
            }
        };
        let secret = ClientSecret::new(value).map_err(|source| CallError::SecretInvalid {
            var: var.to_owned(),
            source,
        })?;
        Credentials::new(apikey, secret)
    }

    /// The four signature headers of one request (DESIGN 5). `path_and_query`
    /// and `body` must be exactly what is sent.
    ///
    /// # Errors
    /// `Apikey` if a header value cannot be encoded (not reachable for
    /// credentials built by [`Credentials::new`]).
    pub(crate) fn sign_request(
        &self,
        request_id: &RequestId,
        timestamp_ms: u64,
        method: &Method,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<HeaderMap, CallError> {
        let message = RequestToSign {
            apikey: &self.apikey,
            request_id: request_id.as_str(),
            timestamp_ms,
            method: method.as_str(),
            path_and_query,
            body,
        }
        .message();
        let mut headers = HeaderMap::with_capacity(5);
        let value = |text: &str| HeaderValue::from_str(text).map_err(|_| CallError::Apikey);
        headers.insert(APIKEY, value(&self.apikey)?);
        headers.insert(TIMESTAMP, HeaderValue::from(timestamp_ms));
        headers.insert(REQUEST_ID, value(request_id.as_str())?);
        headers.insert(SIGNATURE, value(&self.secret.sign(&message))?);
        Ok(headers)
    }

    /// Checks a response against the request it answers: unsigned when it has
    /// no `Signature` header; otherwise the echoed request id must be ours and
    /// the HMAC over (apikey, request id, Timestamp, status, body) must verify.
    ///
    /// # Errors
    /// The first thing wrong with a signed response.
    pub(crate) fn check_response(
        &self,
        request_id: &RequestId,
        status: u16,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<ResponseSignature, BadResponseSignature> {
        if !headers.contains_key(SIGNATURE) {
            return Ok(ResponseSignature::Unsigned);
        }
        // A response carries no `apikey`; supplying ours lets the request-header
        // parser read Timestamp, X-Client-Request-Id and Signature by the same rules.
        let mut with_apikey = headers.clone();
        let apikey = HeaderValue::from_str(&self.apikey)
            .map_err(|_| BadResponseSignature::Header(HeaderError::Malformed(APIKEY)))?;
        with_apikey.insert(APIKEY, apikey);
        let parsed =
            SignatureHeaders::from_headers(&with_apikey).map_err(BadResponseSignature::Header)?;
        if parsed.request_id != *request_id {
            return Err(BadResponseSignature::OtherRequestId);
        }
        let message = ResponseToSign {
            apikey: &self.apikey,
            request_id: request_id.as_str(),
            timestamp_ms: parsed.timestamp_ms,
            status,
            body,
        }
        .message();
        if self.secret.verify(&message, &parsed.signature) {
            Ok(ResponseSignature::Verified)
        } else {
            Err(BadResponseSignature::Mismatch)
        }
    }
}

/// A fresh request id: `prefix-` and 16 random hex characters.
///
/// # Errors
/// `Random` when the OS random source fails; `Target` when the prefix makes an
/// id longer than 40 characters or uses another character than `[A-Za-z0-9._-]`.
pub(crate) fn random_request_id(prefix: &str) -> Result<RequestId, CallError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(CallError::Random)?;
    RequestId::parse(&format!("{prefix}-{}", hex::encode(bytes))).ok_or(CallError::Target(
        "request id prefix: at most 23 of [A-Za-z0-9._-]",
    ))
}

/// Now, in Unix epoch milliseconds (the `Timestamp` header).
///
/// # Errors
/// `Clock` when the clock is before 1970.
pub(crate) fn now_ms() -> Result<u64, CallError> {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CallError::Clock)?;
    u64::try_from(since.as_millis()).map_err(|_| CallError::Clock)
}

/// Joins the gateway's base URL and a path (with its query) into the URL to
/// request and the path-and-query to sign. The signed text is taken from the
/// parsed URL, so it is exactly what goes on the wire even when the URL parser
/// normalizes (`/a/../b`, percent-encoding).
///
/// # Errors
/// `Target` naming what is wrong.
pub(crate) fn target(base: &str, path: &str) -> Result<(Url, String), CallError> {
    if !path.starts_with('/') {
        return Err(CallError::Target(
            "path: must start with / (e.g. /cards/pin/dynamic-values)",
        ));
    }
    if path.contains('#') {
        return Err(CallError::Target("path: a fragment (#) is never sent"));
    }
    let base_url = Url::parse(base).map_err(|_| CallError::Target("--url: not a URL"))?;
    if !matches!(base_url.scheme(), "http" | "https") {
        return Err(CallError::Target("--url: must be http:// or https://"));
    }
    if base_url.query().is_some() || base_url.fragment().is_some() {
        return Err(CallError::Target(
            "--url: no query or fragment; put the query in the path",
        ));
    }
    if !base_url.username().is_empty() || base_url.password().is_some() {
        return Err(CallError::Target("--url: no user name or password"));
    }
    let url = Url::parse(&format!("{}{path}", base.trim_end_matches('/')))
        .map_err(|_| CallError::Target("path: not a valid URL path"))?;
    let signed = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    Ok((url, signed))
}

/// A client builder with the settings every command of this module wants:
/// `--cacert` roots on top of the system's, no redirects (a redirected request
/// would carry a signature over another path), a connection timeout.
///
/// # Errors
/// `File` or `CaCert` for an unreadable or empty PEM file.
pub(crate) fn client_builder(cacert: Option<&Path>) -> Result<reqwest::ClientBuilder, CallError> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("dcvv-tools/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = cacert {
        let pem = std::fs::read(path).map_err(|e| CallError::File {
            what: "--cacert",
            path: path.display().to_string(),
            kind: e.kind(),
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| CallError::CaCert(path.display().to_string()))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}

/// Adds the TLS client certificate of `--client-cert` and `--client-key`
/// (mutual TLS). The key's bytes live in zeroizing memory here; the message of
/// a failure names the files only.
///
/// # Errors
/// `File` for an unreadable file, `ClientIdentity` when the two do not make
/// an identity.
pub fn with_client_identity(
    builder: reqwest::ClientBuilder,
    cert: &Path,
    key: &Path,
) -> Result<reqwest::ClientBuilder, CallError> {
    let read = |what: &'static str, path: &Path| {
        std::fs::read(path)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| CallError::File {
                what,
                path: path.display().to_string(),
                kind: e.kind(),
            })
    };
    let mut pem = read("--client-cert", cert)?;
    pem.push(b'\n');
    pem.extend_from_slice(&read("--client-key", key)?);
    let identity = reqwest::Identity::from_pem(&pem).map_err(|_| CallError::ClientIdentity {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
    })?;
    Ok(builder.identity(identity))
}

fn read_body(data: Option<&str>, file: Option<&Path>) -> Result<Vec<u8>, CallError> {
    match (data, file) {
        (Some(text), _) => Ok(text.as_bytes().to_vec()),
        (None, Some(path)) if path == Path::new("-") => {
            let mut body = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut body)
                .map_err(|e| CallError::File {
                    what: "--data-file",
                    path: "-".into(),
                    kind: e.kind(),
                })?;
            Ok(body)
        }
        (None, Some(path)) => std::fs::read(path).map_err(|e| CallError::File {
            what: "--data-file",
            path: path.display().to_string(),
            kind: e.kind(),
        }),
        (None, None) => Ok(Vec::new()),
    }
}

/// One signed request and what came back.
#[derive(Debug)]
struct Exchange {
    version: reqwest::Version,
    status: StatusCode,
    body: Vec<u8>,
    signature: Result<ResponseSignature, BadResponseSignature>,
}

/// Sends one signed request and checks the response's signature.
async fn exchange(
    client: &reqwest::Client,
    credentials: &Credentials,
    method: Method,
    (url, path_and_query): (Url, String),
    body: Vec<u8>,
) -> Result<Exchange, CallError> {
    let request_id = random_request_id("call")?;
    let mut headers =
        credentials.sign_request(&request_id, now_ms()?, &method, &path_and_query, &body)?;
    if !body.is_empty() {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let transport = |e: reqwest::Error| CallError::Transport(error_chain(&e));
    let response = client
        .request(method, url)
        .headers(headers)
        .body(body)
        .send()
        .await
        .map_err(transport)?;
    let version = response.version();
    let status = response.status();
    let response_headers = response.headers().clone();
    let body = response.bytes().await.map_err(transport)?.to_vec();
    let signature =
        credentials.check_response(&request_id, status.as_u16(), &response_headers, &body);
    Ok(Exchange {
        version,
        status,
        body,
        signature,
    })
}

/// Re-indents a JSON document two spaces per level, keeping its members in
/// their order and every string and number exactly as sent. `None` when the
/// body is not JSON.
fn pretty_json(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).ok()?;
    let text = std::str::from_utf8(body).ok()?;
    let mut out = String::with_capacity(text.len() * 2);
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    };
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
                let close = if c == '{' { '}' } else { ']' };
                if chars.next_if_eq(&close).is_some() {
                    out.push(close);
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    Some(out)
}

/// Runs `dcvv-tools call`.
///
/// # Errors
/// A bad argument or secret, a transport failure, a response whose signature
/// does not verify, or a status other than 2xx (after printing the body).
pub(crate) fn run(args: CallArgs) -> Result<(), CliError> {
    let credentials = Credentials::from_env(&args.apikey, &args.secret_env)?;
    let method = Method::from_bytes(args.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| CallError::Method)?;
    let target = target(&args.url, &args.path)?;
    let body = read_body(args.data.as_deref(), args.data_file.as_deref())?;
    let mut builder = client_builder(args.cacert.as_deref())?;
    if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
        builder = with_client_identity(builder, cert, key)?;
    }
    let client = builder
        .timeout(CALL_TIMEOUT)
        .build()
        .map_err(|e| CallError::Client(error_chain(&e)))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CallError::Client(e.to_string()))?;
    let exchange = runtime.block_on(exchange(&client, &credentials, method, target, body))?;
    report(
        &exchange,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )?;
    Ok(())
}

/// Prints the status line and body to `out` and the signature verdict to
/// `err`; the outcome is the command's exit status.
fn report(
    exchange: &Exchange,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<(), CallError> {
    let body = match pretty_json(&exchange.body) {
        Some(text) => text,
        None => String::from_utf8_lossy(&exchange.body).into_owned(),
    };
    let written = writeln!(out, "{:?} {}", exchange.version, exchange.status)
        .and_then(|()| {
            if body.is_empty() {
                Ok(())
            } else {
                writeln!(out, "{body}")
            }
        })
        .and_then(|()| out.flush());
    match written {
        // A closed stdout (e.g. `| head`) is not an error worth reporting.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(CallError::Stdout(e.kind()));
        }
        _ => {}
    }
    match exchange.signature {
        Ok(ResponseSignature::Verified) => {
            let _ = writeln!(err, "response signature: verified");
        }
        Ok(ResponseSignature::Unsigned) => {
            let _ = writeln!(err, "response signature: none (unsigned response)");
        }
        Err(why) => {
            let _ = writeln!(err, "response signature: INVALID ({why})");
            return Err(CallError::BadSignature);
        }
    }
    if exchange.status.is_success() {
        Ok(())
    } else {
        Err(CallError::Status(exchange.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::body::Bytes;
    use axum::http::{HeaderMap as AxumHeaders, Method as AxumMethod, Uri};
    use axum::response::{IntoResponse, Response};
    use base64::Engine as _;

    const SECRET: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCD";

    fn credentials() -> Credentials {
        Credentials::new(
            "cms-demo",
            ClientSecret::new(Zeroizing::new(SECRET.into())).unwrap(),
        )
        .unwrap()
    }

    fn id(text: &str) -> RequestId {
        RequestId::parse(text).unwrap()
    }

    /// What a gateway does with a response: sign status and body, echo the id.
    fn sign_response(
        request_id: &str,
        timestamp_ms: u64,
        status: u16,
        body: &[u8],
        secret: &str,
    ) -> HeaderMap {
        let secret = ClientSecret::new(Zeroizing::new(secret.into())).unwrap();
        let tag = secret.sign(
            &ResponseToSign {
                apikey: "cms-demo",
                request_id,
                timestamp_ms,
                status,
                body,
            }
            .message(),
        );
        let mut headers = HeaderMap::new();
        headers.insert(TIMESTAMP, HeaderValue::from(timestamp_ms));
        headers.insert(REQUEST_ID, request_id.parse().unwrap());
        headers.insert(SIGNATURE, tag.parse().unwrap());
        headers
    }

    #[test]
    fn request_headers_carry_a_signature_the_server_side_verifies() {
        let body = br#"{"cardNumber":"4123450000000019","expiryDate":"3012"}"#;
        let headers = credentials()
            .sign_request(
                &id("call-1"),
                1_767_225_600_000,
                &Method::POST,
                "/cards/pin/dynamic-values?x=1",
                body,
            )
            .unwrap();
        // The server's own parser and verifier accept it ...
        let parsed = SignatureHeaders::from_headers(&headers).unwrap();
        assert_eq!(parsed.apikey, "cms-demo");
        assert_eq!(parsed.request_id.as_str(), "call-1");
        assert_eq!(parsed.timestamp_ms, 1_767_225_600_000);
        let secret = ClientSecret::new(Zeroizing::new(SECRET.into())).unwrap();
        let message = |path: &str, body: &[u8]| {
            RequestToSign {
                apikey: "cms-demo",
                request_id: "call-1",
                timestamp_ms: 1_767_225_600_000,
                method: "POST",
                path_and_query: path,
                body,
            }
            .message()
        };
        assert!(secret.verify(
            &message("/cards/pin/dynamic-values?x=1", body),
            &parsed.signature
        ));
        // ... and only for the path, query and body that were signed.
        assert!(!secret.verify(
            &message("/cards/pin/dynamic-values", body),
            &parsed.signature
        ));
        assert!(!secret.verify(
            &message("/cards/pin/dynamic-values?x=1", b"{}"),
            &parsed.signature
        ));
    }

    #[test]
    fn a_signed_response_round_trips() {
        let body = br#"{"result":"approved","reason":"match","method":"dynamic"}"#;
        let headers = sign_response("call-1", 42, 200, body, SECRET);
        assert_eq!(
            credentials().check_response(&id("call-1"), 200, &headers, body),
            Ok(ResponseSignature::Verified)
        );
    }

    #[test]
    fn a_tampered_response_fails() {
        let body = br#"{"dcvv2":"209"}"#;
        let headers = sign_response("call-1", 42, 200, body, SECRET);
        let c = credentials();
        // Body, status.
        assert_eq!(
            c.check_response(&id("call-1"), 200, &headers, br#"{"dcvv2":"210"}"#),
            Err(BadResponseSignature::Mismatch)
        );
        assert_eq!(
            c.check_response(&id("call-1"), 201, &headers, body),
            Err(BadResponseSignature::Mismatch)
        );
        // Timestamp changed after signing.
        let mut later = headers.clone();
        later.insert(TIMESTAMP, HeaderValue::from(43u64));
        assert_eq!(
            c.check_response(&id("call-1"), 200, &later, body),
            Err(BadResponseSignature::Mismatch)
        );
        // Request id changed after signing (and no longer ours).
        let mut other = headers.clone();
        other.insert(REQUEST_ID, HeaderValue::from_static("call-2"));
        assert_eq!(
            c.check_response(&id("call-1"), 200, &other, body),
            Err(BadResponseSignature::OtherRequestId)
        );
        // Another secret.
        let foreign = sign_response("call-1", 42, 200, body, &"z".repeat(32));
        assert_eq!(
            c.check_response(&id("call-1"), 200, &foreign, body),
            Err(BadResponseSignature::Mismatch)
        );
    }

    #[test]
    fn a_correctly_signed_answer_to_another_request_fails() {
        // Validly signed, but for request call-2: a replayed or mixed-up response.
        let body = br#"{"result":"approved","reason":"match","method":"dynamic"}"#;
        let headers = sign_response("call-2", 42, 200, body, SECRET);
        assert_eq!(
            credentials().check_response(&id("call-1"), 200, &headers, body),
            Err(BadResponseSignature::OtherRequestId)
        );
    }

    #[test]
    fn unsigned_and_half_signed_responses() {
        let c = credentials();
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("call-1"));
        assert_eq!(
            c.check_response(&id("call-1"), 401, &headers, b"{}"),
            Ok(ResponseSignature::Unsigned)
        );
        // A Signature without its Timestamp is not "unsigned": it is malformed.
        let mut signed = sign_response("call-1", 42, 200, b"{}", SECRET);
        signed.remove(TIMESTAMP);
        assert!(matches!(
            c.check_response(&id("call-1"), 200, &signed, b"{}"),
            Err(BadResponseSignature::Header(_))
        ));
        let mut garbled = sign_response("call-1", 42, 200, b"{}", SECRET);
        garbled.insert(SIGNATURE, HeaderValue::from_static("AAAA"));
        assert!(matches!(
            c.check_response(&id("call-1"), 200, &garbled, b"{}"),
            Err(BadResponseSignature::Header(_))
        ));
    }

    #[test]
    fn apikeys_and_request_ids_are_checked() {
        let secret = || ClientSecret::new(Zeroizing::new(SECRET.into())).unwrap();
        assert!(Credentials::new("", secret()).is_err());
        assert!(Credentials::new("has space", secret()).is_err());
        assert!(Credentials::new(&"a".repeat(65), secret()).is_err());
        assert!(!format!("{:?}", credentials()).contains(SECRET));
        let a = random_request_id("call").unwrap();
        let b = random_request_id("call").unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 21);
        assert!(random_request_id(&"x".repeat(24)).is_err());
    }

    #[test]
    fn secret_env_errors_name_the_variable_not_the_value() {
        let unset = Credentials::from_env("cms-demo", "DCVV_TEST_SURELY_UNSET_VAR_7F3A")
            .unwrap_err()
            .to_string();
        assert!(unset.contains("DCVV_TEST_SURELY_UNSET_VAR_7F3A"), "{unset}");
        // PATH is set in every test environment and is no valid secret (too
        // long or with `:`/spaces is irrelevant: the point is its value is not shown).
        if let Ok(path) = std::env::var("PATH")
            && let Err(e) = Credentials::from_env("cms-demo", "PATH")
        {
            let text = e.to_string();
            assert!(text.contains("PATH"), "{text}");
            assert!(!text.contains(&path), "{text}");
        }
    }

    #[test]
    fn targets_sign_exactly_what_is_sent() {
        let (url, signed) = target(
            "https://127.0.0.1:8443/",
            "/cards/pin/dynamic-values?a=1&b=2",
        )
        .unwrap();
        assert_eq!(
            url.as_str(),
            "https://127.0.0.1:8443/cards/pin/dynamic-values?a=1&b=2"
        );
        assert_eq!(signed, "/cards/pin/dynamic-values?a=1&b=2");
        // Normalized by the URL parser: we sign the normalized form, which is what goes out.
        let (url, signed) = target("http://localhost:8080", "/keys/../healthz").unwrap();
        assert_eq!(url.path(), "/healthz");
        assert_eq!(signed, "/healthz");
        let (_, signed) = target("http://localhost:8080/gw", "/keys").unwrap();
        assert_eq!(signed, "/gw/keys");
        for (base, path) in [
            ("http://localhost", "keys"),
            ("http://localhost", "/keys#x"),
            ("ftp://localhost", "/keys"),
            ("http://localhost/?q=1", "/keys"),
            ("http://user:pw@localhost", "/keys"),
            ("not a url", "/keys"),
        ] {
            assert!(target(base, path).is_err(), "{base} {path}");
        }
    }

    #[test]
    fn json_is_reindented_without_reordering_or_rewriting() {
        let body = br#"{"z":1,"a":[],"m":{},"s":"a,b:{\"c\"}","n":12345678901234567890123,"v":[{"x":1.50},2]}"#;
        let pretty = pretty_json(body).unwrap();
        assert_eq!(
            pretty,
            "{\n  \"z\": 1,\n  \"a\": [],\n  \"m\": {},\n  \"s\": \"a,b:{\\\"c\\\"}\",\n  \
             \"n\": 12345678901234567890123,\n  \"v\": [\n    {\n      \"x\": 1.50\n    },\n    2\n  ]\n}"
        );
        // Semantically the same document.
        let before: serde_json::Value = serde_json::from_slice(body).unwrap();
        let after: serde_json::Value = serde_json::from_str(&pretty).unwrap();
        assert_eq!(before, after);
        assert_eq!(pretty_json(b"{ }").unwrap(), "{}");
        assert_eq!(pretty_json(b"not json"), None);
        assert_eq!(pretty_json(b""), None);
    }

    // ---- end to end: a stand-in gateway on 127.0.0.1:0 ----

    /// A stand-in for the gateway's signature layer: verifies the request with
    /// `signature.rs` and signs its answer. `/tamper` signs one body and sends
    /// another; `/other-id` echoes another request id; `/unsigned` does not sign;
    /// `/missing` answers 404.
    async fn stand_in(method: AxumMethod, uri: Uri, headers: AxumHeaders, body: Bytes) -> Response {
        let secret = ClientSecret::new(Zeroizing::new(SECRET.into())).unwrap();
        let Ok(sig) = SignatureHeaders::from_headers(&headers) else {
            return (
                axum::http::StatusCode::UNAUTHORIZED,
                "{\"code\":\"unauthenticated\"}",
            )
                .into_response();
        };
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
        let message = RequestToSign {
            apikey: &sig.apikey,
            request_id: sig.request_id.as_str(),
            timestamp_ms: sig.timestamp_ms,
            method: method.as_str(),
            path_and_query,
            body: &body,
        }
        .message();
        let json = headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| v == "application/json");
        if !secret.verify(&message, &sig.signature) || (!body.is_empty() && !json) {
            return (
                axum::http::StatusCode::UNAUTHORIZED,
                "{\"code\":\"unauthenticated\"}",
            )
                .into_response();
        }
        let status = if uri.path() == "/missing" { 404 } else { 200 };
        let answer = format!(
            "{{\"path\":\"{path_and_query}\",\"bodySha256\":\"{}\"}}",
            dcvv_gateway::http::signature::body_digest(&body)
        );
        let signed_body = if uri.path() == "/tamper" {
            answer.replace("path", "PATH")
        } else {
            answer.clone()
        };
        let echoed = if uri.path() == "/other-id" {
            "someone-else"
        } else {
            sig.request_id.as_str()
        };
        let mut response = (
            axum::http::StatusCode::from_u16(status).unwrap(),
            answer.into_bytes(),
        )
            .into_response();
        if uri.path() != "/unsigned" {
            let ts = 1_767_225_600_000u64;
            let tag = secret.sign(
                &ResponseToSign {
                    apikey: &sig.apikey,
                    request_id: echoed,
                    timestamp_ms: ts,
                    status,
                    body: signed_body.as_bytes(),
                }
                .message(),
            );
            let h = response.headers_mut();
            h.insert(TIMESTAMP, HeaderValue::from(ts));
            h.insert(REQUEST_ID, echoed.parse().unwrap());
            h.insert(SIGNATURE, tag.parse().unwrap());
        }
        response
    }

    /// A self-signed certificate for 127.0.0.1 and a PEM file of it.
    fn dev_certificate(dir: &Path) -> (rustls::ServerConfig, PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        let pem = dir.join("dev-cert.pem");
        std::fs::write(&pem, cert.cert.pem()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()),
        );
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        (config, pem)
    }

    /// `report` into buffers: (outcome, stdout, stderr).
    fn reported(exchange: &Exchange) -> (Result<(), CallError>, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let outcome = report(exchange, &mut out, &mut err);
        (
            outcome,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    async fn call_stand_in(
        client: &reqwest::Client,
        base: &str,
        method: Method,
        path: &str,
        body: &[u8],
    ) -> Exchange {
        exchange(
            client,
            &credentials(),
            method,
            target(base, path).unwrap(),
            body.to_vec(),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn end_to_end_over_https_with_a_self_signed_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (tls, pem) = dev_certificate(dir.path());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(stand_in);
        let config = axum_server::tls_rustls::RustlsConfig::from_config(std::sync::Arc::new(tls));
        let server = tokio::spawn(
            axum_server::from_tcp_rustls(listener, config).serve(app.into_make_service()),
        );
        let base = format!("https://127.0.0.1:{}", address.port());

        // Without --cacert the self-signed certificate is refused.
        let strict = client_builder(None).unwrap().build().unwrap();
        let refused = exchange(
            &strict,
            &credentials(),
            Method::GET,
            target(&base, "/keys").unwrap(),
            Vec::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(refused, CallError::Transport(_)), "{refused}");

        let client = client_builder(Some(&pem)).unwrap().build().unwrap();
        let body = br#"{"cardNumber":"4123450000000019","expiryDate":"3012","numberOfValues":2}"#;
        let ok = call_stand_in(
            &client,
            &base,
            Method::POST,
            "/cards/pin/dynamic-values?trace=1",
            body,
        )
        .await;
        assert_eq!(ok.status, StatusCode::OK);
        assert_eq!(ok.signature, Ok(ResponseSignature::Verified));
        let echoed: serde_json::Value = serde_json::from_slice(&ok.body).unwrap();
        assert_eq!(echoed["path"], "/cards/pin/dynamic-values?trace=1");
        assert_eq!(
            echoed["bodySha256"],
            dcvv_gateway::http::signature::body_digest(body)
        );
        let (outcome, _, verdict) = reported(&ok);
        assert!(outcome.is_ok());
        assert_eq!(verdict, "response signature: verified\n");

        let get = call_stand_in(&client, &base, Method::GET, "/keys", b"").await;
        assert_eq!(get.signature, Ok(ResponseSignature::Verified));

        let tampered = call_stand_in(&client, &base, Method::POST, "/tamper", b"{}").await;
        assert_eq!(tampered.signature, Err(BadResponseSignature::Mismatch));
        let (outcome, _, verdict) = reported(&tampered);
        assert!(matches!(outcome, Err(CallError::BadSignature)));
        assert_eq!(
            outcome.unwrap_err().to_string(),
            "response signature does not verify"
        );
        assert!(
            verdict.starts_with("response signature: INVALID"),
            "{verdict}"
        );

        let other = call_stand_in(&client, &base, Method::POST, "/other-id", b"{}").await;
        assert_eq!(other.signature, Err(BadResponseSignature::OtherRequestId));

        let unsigned = call_stand_in(&client, &base, Method::GET, "/unsigned", b"").await;
        assert_eq!(unsigned.signature, Ok(ResponseSignature::Unsigned));
        let (outcome, _, verdict) = reported(&unsigned);
        assert!(outcome.is_ok());
        assert_eq!(verdict, "response signature: none (unsigned response)\n");

        let missing = call_stand_in(&client, &base, Method::GET, "/missing", b"").await;
        assert_eq!(missing.signature, Ok(ResponseSignature::Verified));
        let (outcome, printed, _) = reported(&missing);
        assert!(matches!(
            outcome,
            Err(CallError::Status(StatusCode::NOT_FOUND))
        ));
        assert!(printed.starts_with("HTTP/"), "{printed}");
        assert!(
            printed.contains("404 Not Found\n{\n  \"path\": \"/missing\""),
            "{printed}"
        );

        // A wrong secret: the stand-in answers 401, unsigned.
        let wrong = Credentials::new(
            "cms-demo",
            ClientSecret::new(Zeroizing::new("w".repeat(40))).unwrap(),
        )
        .unwrap();
        let denied = exchange(
            &client,
            &wrong,
            Method::GET,
            target(&base, "/keys").unwrap(),
            Vec::new(),
        )
        .await
        .unwrap();
        assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
        assert_eq!(denied.signature, Ok(ResponseSignature::Unsigned));
        server.abort();
    }

    #[tokio::test]
    async fn end_to_end_over_plain_http() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(stand_in);
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = client_builder(None).unwrap().build().unwrap();
        let base = format!("http://{address}");
        let ok = call_stand_in(
            &client,
            &base,
            Method::POST,
            "/cards/cvv2/verification",
            b"{}",
        )
        .await;
        assert_eq!(ok.status, StatusCode::OK);
        assert_eq!(ok.signature, Ok(ResponseSignature::Verified));
        server.abort();
    }

    #[test]
    fn a_tag_is_base64_of_32_bytes() {
        // The signature header decodes to the 32-byte tag the server compares.
        let headers = credentials()
            .sign_request(&id("call-1"), 1, &Method::GET, "/keys", b"")
            .unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(headers.get(SIGNATURE).unwrap().as_bytes())
            .unwrap();
        assert_eq!(raw.len(), 32);
    }
}
