//! The token: one PKCS#11 context per process, its login, and the state every
//! part of the port shares (session pool, key cache, counters, availability).
//!
//! A long-lived "anchor" session keeps the user logged in (closing the last
//! session of a process logs every session out) and owns the working copies of
//! the keys. The jobs are split by file:
//!
//! - `settings`: the settings `config` assembles and the PIN's source;
//! - `recovery`: the library lock, sessions, login and the two levels of
//!   recovery (DESIGN 7.6);
//! - `keys`: the key cache (resolve by label, policy check, working copies);
//! - `ops`: the keyed primitives the domain uses (encrypt, derive, HMAC);
//! - `inspect`: finding key objects and reading their attributes;
//! - `mechanisms`: the token's mechanism table;
//! - `counters`: counts of token operations.
//!
//! Nothing here knows about cards: callers pass labels, blocks and derivation data.

mod counters;
mod inspect;
mod keys;
mod mechanisms;
mod ops;
mod recovery;
mod settings;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use cryptoki::context::Pkcs11;
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::availability::Availability;
use super::error::HsmResult;
use super::policy::KeyLabel;
use super::pool::SessionPool;
use super::sync::{into_inner, lock};
use keys::LoadedKey;
use recovery::{find_token, load_module, login};

pub(in crate::hsm) use counters::OpCounters;
pub use counters::OpCounts;
pub(in crate::hsm) use inspect::{find_key, inspect};
pub use ops::{CvvCipher, CvvKeySource, EmvKeySource, KeyDerivation};
pub(in crate::hsm) use ops::{EphemeralKey, hmac_kcv, kcv_des, session_des_encrypt_template};
use settings::UserPin;
pub use settings::{HsmSettings, PinSource};

/// An open, logged-in token.
pub struct Token {
    ctx: Pkcs11,
    /// Held shared by every use of the library (a call, a key command), and
    /// exclusively by a re-initialization, which finalizes the library under
    /// everyone's sessions. Shared holders only ever `try_read`: while a
    /// re-initialization runs or waits they fail at once instead of queueing.
    library: RwLock<()>,
    /// Found by label at open and again at every recovery: a restarted token
    /// may come back in another slot.
    slot: Mutex<Slot>,
    label: String,
    pin_source: PinSource,
    /// The PIN the token last accepted: logged in with again by recovery.
    pin: Mutex<UserPin>,
    /// `None` only between the teardown and the end of a re-initialization.
    anchor: Mutex<Option<Session>>,
    pool: SessionPool,
    keys: RwLock<HashMap<KeyLabel, Arc<LoadedKey>>>,
    counters: OpCounters,
    /// Serializes key management: SoftHSM fails token-object creation
    /// (`CKR_GENERAL_ERROR`) when two threads write its file store at once, and a
    /// key ceremony gains nothing from parallelism.
    admin: Mutex<()>,
    availability: Availability,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("label", &self.label)
            .field("slot", &self.slot())
            .finish_non_exhaustive()
    }
}

impl Token {
    /// Loads the module, finds the token by label and logs in.
    ///
    /// # Errors
    /// `ModuleNotFound`, `TokenNotFound`, `PinUnavailable`, `WrongPin`, `PinLocked`,
    /// or the token's error.
    pub fn open(settings: &HsmSettings) -> HsmResult<Token> {
        let ctx = load_module(&settings.module)?;
        let slot = find_token(&ctx, &settings.token_label)?;
        let pin = settings.pin.read()?;
        let anchor = ctx.open_ro_session(slot)?;
        login(&anchor, pin.secret())?;
        tracing::info!(token = %settings.token_label, "logged in to the token");
        Ok(Token {
            ctx,
            library: RwLock::new(()),
            slot: Mutex::new(slot),
            label: settings.token_label.clone(),
            pin_source: settings.pin.clone(),
            pin: Mutex::new(pin),
            anchor: Mutex::new(Some(anchor)),
            pool: SessionPool::new(settings.max_sessions, settings.checkout_timeout),
            keys: RwLock::new(HashMap::new()),
            counters: OpCounters::default(),
            admin: Mutex::new(()),
            availability: Availability::new(),
        })
    }

    /// Logs out, closes every session and finalizes the library: the last thing
    /// a process does with its token (some vendor libraries flush state in
    /// `C_Finalize`; SoftHSM is happier shutting down finalized).
    ///
    /// # Errors
    /// The library's error from `C_Finalize`.
    pub fn finalize(self) -> HsmResult<()> {
        let Token {
            ctx,
            anchor,
            pool,
            keys,
            ..
        } = self;
        drop(keys);
        drop(pool);
        if let Some(anchor) = into_inner(anchor) {
            // Logging out fails only if the login is already gone.
            let _ = anchor.logout();
        }
        Ok(ctx.finalize()?)
    }

    /// Token operation counts so far.
    pub fn counters(&self) -> OpCounts {
        self.counters.snapshot()
    }

    pub(in crate::hsm) fn op_counters(&self) -> &OpCounters {
        &self.counters
    }

    /// Sessions checked out now and the pool's size (metrics).
    pub fn session_usage(&self) -> (usize, usize) {
        self.pool.usage()
    }

    /// Label of the token.
    pub fn label(&self) -> &str {
        &self.label
    }

    fn slot(&self) -> Slot {
        *lock(&self.slot)
    }

    fn anchor(&self) -> MutexGuard<'_, Option<Session>> {
        lock(&self.anchor)
    }
}
