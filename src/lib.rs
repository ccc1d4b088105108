//! dcvv-gateway: card security codes (TDCVV2-v1 dynamic CVV2, CVV, CVV2, iCVV,
//! contactless dCVV) computed inside a PKCS#11 token.
//!
//! Layers, one way: `gateway` (start-up and shutdown) -> `http` -> `domain`
//! -> {`hsm`, `store`, `audit`}; `config` assembles each layer's settings;
//! `cli` holds the commands (key ceremony, `serve`, `bench engine`); `telemetry`
//! installs the log (text or JSON lines on stderr); the client and the HTTP
//! benchmark are the `dcvv-tools` crate's (`tools/`).
//!
//! What a test or an embedder drives: [`app`] (the router over an assembled
//! state) and [`run`] (everything, on a listener of the caller's).

pub mod audit;
pub mod cli;
pub mod config;
pub mod domain;
pub mod gateway;
pub mod hsm;
pub mod http;
pub mod store;
pub mod telemetry;

pub use gateway::{Gateway, StartError, run};

/// The router with its whole tower stack over an assembled state
/// ([`Gateway::state`]).
pub fn app(state: http::AppState) -> axum::Router {
    http::app(state)
}
