//! dcvv-gateway: card security codes (TDCVV2-v1 dynamic CVV2, CVV, CVV2, iCVV,
//! contactless dCVV) computed inside a PKCS#11 token.
//!
//! Layers, one way: `http -> domain -> hsm`; `config` assembles each layer's
//! settings; `cli` holds the key ceremony and the benchmark.

pub mod audit;
pub mod cli;
pub mod config;
pub mod domain;
pub mod hsm;
pub mod http;
pub mod store;
