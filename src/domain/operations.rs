//! What operators ask of the service rather than of a card: the key
//! inventory (`GET /keys`), readiness (`GET /readyz`) and the token's status
//! for the metrics. The HTTP layer reaches the token only through these, so it
//! needs no PKCS#11 or store type; the token work runs on the blocking pool.

use std::sync::Arc;

use crate::hsm::{self, KeyListing, Token};

pub use crate::hsm::{RecoveryCounts, TokenState};

use super::DomainError;
use super::programme::Programmes;
use super::rotation::KeyUsage;
use super::service::{Caller, CardService};

/// One key of the token, with what the configuration does with it.
#[derive(Debug)]
pub struct InventoryEntry {
    /// The key as the token describes it (label, kind, KCV, attributes).
    pub key: KeyListing,
    /// Whether a configured programme (or the PAN index) uses it now.
    pub in_use: bool,
    /// Which programmes use it, and as what (current or previous version).
    pub used_by: Vec<KeyUsage>,
}

/// The token's gateway keys.
#[derive(Debug)]
pub struct KeyInventory {
    /// The token's label.
    pub token: String,
    /// Its keys.
    pub keys: Vec<InventoryEntry>,
}

/// What each readiness check found: `ok`, or a stable word for why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// Token: `ok`, `missing`, `pin_refused`, `pin_locked`, `pin_unavailable`, `unavailable`.
    pub hsm: &'static str,
    /// Keys: `ok`, `missing_or_refused`, `unavailable`, or `unknown` while the token is down.
    pub keys: &'static str,
    /// Store: `ok` or `unavailable`.
    pub store: &'static str,
}

impl Readiness {
    /// Whether every check passed.
    pub fn ready(&self) -> bool {
        self.hsm == "ok" && self.keys == "ok" && self.store == "ok"
    }
}

/// The token's sessions and recovery, for the metrics.
#[derive(Debug, Clone, Copy)]
pub struct HsmStatus {
    /// Sessions checked out now.
    pub sessions_in_use: usize,
    /// Size of the session pool.
    pub sessions_max: usize,
    /// Ready or down, and why.
    pub state: TokenState,
    /// Losses, re-initializations and logins so far.
    pub recovery: RecoveryCounts,
}

impl CardService<Arc<Token>> {
    fn token(&self) -> &Arc<Token> {
        self.engine().hsm()
    }

    /// The token's gateway keys, each with its use by the configuration; the
    /// request id is claimed after the token work, so a request refused
    /// because the token is down spends nothing (DESIGN 7.3, 7.6).
    ///
    /// # Errors
    /// `Unavailable` when the token or the store fails; `DuplicateRequest`.
    pub async fn key_inventory(&self, caller: &Caller<'_>) -> Result<KeyInventory, DomainError> {
        let announced = self.announce(caller, "key_inventory", None);
        let token = Arc::clone(self.token());
        let listing = hsm::blocking(move || token.list_keys()).await?;
        self.record_request(caller, announced).await?;
        let in_use = self.keys_in_use(caller.programmes);
        let usages = caller.programmes.key_usages();
        let keys = listing
            .into_iter()
            .map(|key| {
                // A CVK's KA‖KA twin is used with its CVK.
                let main = key
                    .label
                    .strip_suffix(":ka")
                    .filter(|_| key.role == "single-des")
                    .unwrap_or(&key.label);
                InventoryEntry {
                    in_use: in_use.contains(main),
                    used_by: usages.get(main).cloned().unwrap_or_default(),
                    key,
                }
            })
            .collect();
        Ok(KeyInventory {
            token: self.token().label().to_owned(),
            keys,
        })
    }

    /// Readiness: a real token call while ready (while down, the recovery
    /// step if due), then every configured key, then a store write.
    pub async fn readiness(&self, programmes: &Programmes) -> Readiness {
        let token = Arc::clone(self.token());
        let hsm = match hsm::blocking(move || Ok(token.maintain())).await {
            Ok(TokenState::Ready) => "ok",
            Ok(down) => {
                tracing::warn!(state = %down, "readiness: token unavailable");
                down.as_str()
            }
            Err(e) => {
                tracing::warn!(error = %e, "readiness: token probe failed");
                "unavailable"
            }
        };
        let keys = if hsm == "ok" {
            match self.check_keys(programmes).await {
                Ok(()) => "ok",
                Err(DomainError::Unavailable(..) | DomainError::Internal(..)) => "unavailable",
                Err(e) => {
                    tracing::warn!(error = %e, "readiness: a configured key is missing or refused");
                    "missing_or_refused"
                }
            }
        } else {
            "unknown"
        };
        let now = i64::try_from(self.clock().now_ms() / 1000).unwrap_or(i64::MAX);
        let store = match self.store().probe(now).await {
            Ok(()) => "ok",
            Err(e) => {
                tracing::warn!(error = %e, "readiness: store probe failed");
                "unavailable"
            }
        };
        Readiness { hsm, keys, store }
    }

    /// The token's sessions, state and recovery counts (no token call).
    pub fn hsm_status(&self) -> HsmStatus {
        let token = self.token();
        let (sessions_in_use, sessions_max) = token.session_usage();
        HsmStatus {
            sessions_in_use,
            sessions_max,
            state: token.state(),
            recovery: token.recovery_counts(),
        }
    }
}
