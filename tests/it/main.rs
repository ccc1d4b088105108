//! The integration tests, as one test binary (issue 10, item 6): one module per
//! area, and `support` (the harness: a SoftHSM token, a PostgreSQL cluster and a
//! gateway per test process, the route paths, the software reference) compiled
//! once instead of once per test file.
//!
//! Run them with `cargo nextest run`: nextest runs every test in a process of its
//! own, so the process-wide state of `support` (the token, the logged-in
//! session, the PostgreSQL cluster, a global log subscriber) belongs to one test.
//! A test's name is its module path, e.g. `token_faults::softhsm_after_the_token_directory_is_gone`.

// Tests may unwrap and panic: a failed setup step should abort the test with its
// message. (clippy.toml allows this inside `#[test]` functions only; the helpers
// of this crate need it too.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod audit;
mod card_keys;
mod cli;
mod cli_call;
mod crash;
mod docs_links;
mod emv;
mod emv_http;
mod engine_on_token;
mod hsm_policy;
mod http_api;
mod http_bad_input;
mod http_logs;
mod http_ops;
mod http_signatures;
mod http_slow_clients;
mod json_logs;
mod mtls;
mod multi_instance;
mod no_secrets_in_logs;
mod portal_fields;
mod postgres_faults;
mod property;
mod recovery;
mod reload;
mod rotation;
mod store;
mod token_faults;
mod token_mechanisms;
mod vectors;
mod wrapped_import;
mod wrong_pin;
