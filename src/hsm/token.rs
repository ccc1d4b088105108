//! The token: one PKCS#11 context per process, the login, the session pool, the
//! key cache, and the keyed primitives the domain uses.
//!
//! A long-lived "anchor" session keeps the user logged in (closing the last
//! session of a process logs every session out) and owns the working copies of
//! the keys: session objects made with `C_CopyObject`, still sensitive and
//! non-extractable, because SoftHSM re-reads token objects from its file store on
//! every use (issue 2: about twice the throughput). Per-card keys are derived
//! into the session of the call and destroyed before it returns, on every path.
//!
//! Recovery has two levels (DESIGN 7.6). A stale session or handle (the token
//! dropped the login, a session was closed) is repaired inside the call: re-open,
//! log in again, re-resolve keys, once. A token that went away (device removed,
//! link down, SoftHSM's token directory gone) cannot be repaired that way: SoftHSM
//! reads its tokens at `C_Initialize` and does not see one come back until the
//! library is finalized and initialized again. So the token is marked down,
//! every call fails at once with `TokenDown` (503), and [`Token::maintain`] —
//! run every second by the gateway's watchdog and by `/readyz` — re-initializes
//! the library on a backoff (see `availability`), under the exclusive side of
//! the `library` lock that every other use of the library holds shared.
//!
//! Nothing here knows about cards: callers pass labels, blocks and derivation data.

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, TryLockError};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::misc::KeyDerivationStringData;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::availability::{Availability, RecoveryCounts, TokenState, pin_digest};
use super::error::{HsmError, HsmResult};
use super::mechanism::{
    AllowedMechanisms, allowed_mechanisms, des3_ecb_encrypt_data, read_allowed_mechanisms,
};
use super::policy::{Kcv, KeyAttributes, KeyKind, KeyLabel, Usage};
use super::pool::{PooledSession, SessionPool};
use super::{BlockCipher, CardCrypto};

/// Where the user PIN comes from (DESIGN 3: never from a committed file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    /// Name of an environment variable holding the PIN.
    Env(String),
    /// Path of a file holding the PIN (trailing newline ignored).
    File(PathBuf),
}

impl PinSource {
    /// Reads the PIN now (again at every re-initialization: an operator may fix
    /// a refused PIN while the gateway runs).
    fn read(&self) -> HsmResult<Zeroizing<String>> {
        let raw = Zeroizing::new(match self {
            PinSource::Env(name) => std::env::var(name).map_err(|_| {
                HsmError::PinUnavailable(format!("environment variable {name} is not set"))
            })?,
            PinSource::File(path) => std::fs::read_to_string(path).map_err(|e| {
                HsmError::PinUnavailable(format!("{}: {}", path.display(), e.kind()))
            })?,
        });
        let pin = raw.trim_end_matches(['\r', '\n']);
        if pin.is_empty() {
            return Err(HsmError::PinUnavailable("the PIN is empty".into()));
        }
        Ok(Zeroizing::new(pin.to_owned()))
    }
}

/// The HSM layer's own settings (assembled by `config`).
#[derive(Clone, Debug)]
pub struct HsmSettings {
    /// Path of the PKCS#11 library.
    pub module: PathBuf,
    /// Label of the token to use (never a slot number).
    pub token_label: String,
    /// Where the user PIN comes from.
    pub pin: PinSource,
    /// Most sessions open at once; size it near the token's useful parallelism.
    pub max_sessions: usize,
    /// How long a call waits for a free session before failing with `Busy`.
    pub checkout_timeout: Duration,
}

/// Counts of token operations, for the benchmark and metrics.
#[derive(Debug, Default)]
pub struct OpCounters {
    derive: AtomicU64,
    encrypt: AtomicU64,
    destroy: AtomicU64,
    sign: AtomicU64,
}

/// A snapshot of [`OpCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct OpCounts {
    /// `C_DeriveKey` calls.
    pub derive: u64,
    /// Encryptions (`C_EncryptInit` + `C_Encrypt`).
    pub encrypt: u64,
    /// `C_DestroyObject` calls.
    pub destroy: u64,
    /// Signatures (`C_SignInit` + `C_Sign`).
    pub sign: u64,
}

impl OpCounts {
    /// Token operations in all.
    pub fn operations(&self) -> u64 {
        self.derive + self.encrypt + self.destroy + self.sign
    }

    /// PKCS#11 function calls behind them: cryptoki's `encrypt` and `sign` are an
    /// init call plus two calls (the first asks for the output length).
    pub fn pkcs11_calls(&self) -> u64 {
        self.derive + self.destroy + 3 * (self.encrypt + self.sign)
    }

    /// Difference since an earlier snapshot.
    pub fn since(&self, earlier: &OpCounts) -> OpCounts {
        OpCounts {
            derive: self.derive - earlier.derive,
            encrypt: self.encrypt - earlier.encrypt,
            destroy: self.destroy - earlier.destroy,
            sign: self.sign - earlier.sign,
        }
    }
}

impl OpCounters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Current counts.
    pub fn snapshot(&self) -> OpCounts {
        OpCounts {
            derive: self.derive.load(Ordering::Relaxed),
            encrypt: self.encrypt.load(Ordering::Relaxed),
            destroy: self.destroy.load(Ordering::Relaxed),
            sign: self.sign.load(Ordering::Relaxed),
        }
    }
}

/// A key resolved, checked against its policy, and copied into a working session object.
#[derive(Debug)]
struct LoadedKey {
    kind: KeyKind,
    kcv: Kcv,
    /// The key (KA‖KB for a CVK): its working copy, or the token object.
    main: ObjectHandle,
    /// A CVK's KA‖KA twin: its working copy, or the token object.
    twin: Option<ObjectHandle>,
    /// The working copies among them, destroyed when the key is forgotten.
    copies: Vec<ObjectHandle>,
}

/// Where the two keys of the CVV construction (DESIGN 2.1) come from.
#[derive(Clone, Copy)]
pub enum CvvKeySource<'a> {
    /// A CVK: KA‖KA and KA‖KB token objects.
    Cvk(&'a KeyLabel),
    /// A per-card master key derived in the token from an IMK with
    /// `CKM_DES3_ECB_ENCRYPT_DATA`: `mk_data` gives MK, `twin_data` its MKA‖MKA.
    CardKey {
        /// The issuer master key.
        imk: &'a KeyLabel,
        /// Its kind (`ImkDcvv` or `ImkTdcvv2`): a key is only used as its kind.
        kind: KeyKind,
        /// Derivation data of the card key (16 bytes).
        mk_data: &'a [u8; 16],
        /// Derivation data of the card key's single-DES twin (16 bytes).
        twin_data: &'a [u8; 16],
    },
}

/// Shows labels only: the derivation data carries PAN digits (Option A).
impl std::fmt::Debug for CvvKeySource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CvvKeySource::Cvk(label) => f.debug_tuple("Cvk").field(label).finish(),
            CvvKeySource::CardKey { imk, kind, .. } => f
                .debug_struct("CardKey")
                .field("imk", imk)
                .field("kind", kind)
                .finish_non_exhaustive(),
        }
    }
}

/// The two keys of one CVV computation, usable for the duration of a call.
#[derive(Debug)]
pub struct CvvCipher<'s> {
    session: &'s Session,
    single: ObjectHandle,
    double: ObjectHandle,
    counters: &'s OpCounters,
}

impl BlockCipher for CvvCipher<'_> {
    fn encrypt_single(&self, blocks: &[u8]) -> HsmResult<Zeroizing<Vec<u8>>> {
        encrypt(self.session, self.single, blocks, self.counters)
    }

    fn encrypt_double(&self, blocks: &[u8]) -> HsmResult<Zeroizing<Vec<u8>>> {
        encrypt(self.session, self.double, blocks, self.counters)
    }

    fn kcv(&self) -> HsmResult<Kcv> {
        kcv_by_encryption(self.session, self.double, self.counters)
    }
}

fn encrypt(
    session: &Session,
    key: ObjectHandle,
    blocks: &[u8],
    counters: &OpCounters,
) -> HsmResult<Zeroizing<Vec<u8>>> {
    OpCounters::bump(&counters.encrypt);
    Ok(Zeroizing::new(session.encrypt(
        &Mechanism::Des3Ecb,
        key,
        blocks,
    )?))
}

fn kcv_by_encryption(
    session: &Session,
    key: ObjectHandle,
    counters: &OpCounters,
) -> HsmResult<Kcv> {
    let out = encrypt(session, key, &[0u8; 8], counters)?;
    Kcv::from_prefix(&out).ok_or_else(|| HsmError::Wrapper("short DES3 output".into()))
}

/// HMAC-SHA256 of `data` under `key`.
pub(crate) fn hmac(
    session: &Session,
    key: ObjectHandle,
    data: &[u8],
    counters: &OpCounters,
) -> HsmResult<Zeroizing<Vec<u8>>> {
    OpCounters::bump(&counters.sign);
    Ok(Zeroizing::new(session.sign(
        &Mechanism::Sha256Hmac,
        key,
        data,
    )?))
}

/// A key object that is destroyed when dropped: per-card keys and temporary
/// component keys never outlive the call that made them.
#[derive(Debug)]
pub(crate) struct EphemeralKey<'s> {
    session: &'s Session,
    pub(crate) handle: ObjectHandle,
    counters: &'s OpCounters,
}

impl<'s> EphemeralKey<'s> {
    pub(crate) fn new(
        session: &'s Session,
        handle: ObjectHandle,
        counters: &'s OpCounters,
    ) -> Self {
        EphemeralKey {
            session,
            handle,
            counters,
        }
    }
}

impl Drop for EphemeralKey<'_> {
    fn drop(&mut self) {
        OpCounters::bump(&self.counters.destroy);
        if let Err(e) = self.session.destroy_object(self.handle) {
            // The object is a session object: it dies with the session at the latest.
            tracing::warn!(error = %HsmError::from(e), "could not destroy a session key");
        }
    }
}

/// Template of a session key that can only encrypt with `CKM_DES3_ECB`.
pub(crate) fn session_des_encrypt_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::DES2),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        allowed_mechanisms(KeyKind::Cvk.mechanisms()),
    ]
}

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
    pin: Mutex<Zeroizing<String>>,
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

/// A read-write session for key management, holding the library lock shared
/// (a re-initialization waits for the command to end).
pub(crate) struct AdminSession<'t> {
    // Field order is drop order: the session closes before the lock is released.
    session: Session,
    _library: RwLockReadGuard<'t, ()>,
}

impl Deref for AdminSession<'_> {
    type Target = Session;

    fn deref(&self) -> &Session {
        &self.session
    }
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
        login(&anchor, &pin)?;
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
        if let Some(anchor) = anchor.into_inner().unwrap_or_else(|p| p.into_inner()) {
            // Logging out fails only if the login is already gone.
            let _ = anchor.logout();
        }
        Ok(ctx.finalize()?)
    }

    /// Token operation counts so far.
    pub fn counters(&self) -> OpCounts {
        self.counters.snapshot()
    }

    pub(crate) fn op_counters(&self) -> &OpCounters {
        &self.counters
    }

    fn slot(&self) -> Slot {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn anchor(&self) -> MutexGuard<'_, Option<Session>> {
        self.anchor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The library lock, shared; fails at once while the token is down or a
    /// re-initialization runs (invariant 6: fail fast, never queue on a dead token).
    fn shared(&self) -> HsmResult<RwLockReadGuard<'_, ()>> {
        if !self.availability.is_up() {
            return Err(self.down());
        }
        match self.library.try_read() {
            Ok(guard) => Ok(guard),
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => Err(self.down()),
        }
    }

    fn down(&self) -> HsmError {
        HsmError::TokenDown {
            state: match self.availability.state() {
                // Up, but a re-initialization holds the library.
                TokenState::Ready => TokenState::Failed,
                state => state,
            },
        }
    }

    /// Marks the token down (level 2 of recovery) and returns the error callers get.
    fn lost(&self, state: TokenState) -> HsmError {
        if self.availability.went_down(state, Instant::now()) {
            tracing::error!(
                token = %self.label,
                state = %state,
                "token lost; requests fail with 503 until it is back (re-initialization \
                 is retried in the background)"
            );
        }
        HsmError::TokenDown { state }
    }

    /// Whether the token still answers `C_GetTokenInfo` on its slot with its
    /// label. Open sessions do not tell: SoftHSM keeps reporting them logged in
    /// after the token's directory is gone.
    fn present(&self) -> bool {
        self.ctx
            .get_token_info(self.slot())
            .is_ok_and(|info| info.token_initialized() && info.label().trim_end() == self.label)
    }

    /// Runs `f` on a pooled session; on a stale session or handle, recovers once
    /// (re-open, re-login, re-resolve keys) and runs `f` again. A failure that
    /// comes from the token having gone away marks it down.
    pub(crate) fn with_session<R>(
        &self,
        mut f: impl FnMut(&Session) -> HsmResult<R>,
    ) -> HsmResult<R> {
        let _library = self.shared()?;
        match self.attempt(&mut f) {
            Err(e) if e.may_mean_token_lost() && !self.present() => {
                tracing::warn!(error = %e, "token call failed and the token is gone");
                Err(self.lost(TokenState::Missing))
            }
            Err(e) if e.is_stale_handle() => {
                tracing::warn!(error = %e, "token session or handle went stale; recovering once");
                if let Err(e) = self.recover() {
                    return Err(self.recovery_failed(e));
                }
                match self.attempt(&mut f) {
                    Err(e) if e.may_mean_token_lost() && !self.present() => {
                        Err(self.lost(TokenState::Missing))
                    }
                    other => other,
                }
            }
            other => other,
        }
    }

    /// The first level of recovery failed: the second level takes over.
    fn recovery_failed(&self, e: HsmError) -> HsmError {
        tracing::warn!(error = %e, "re-opening and logging in again failed");
        let state = e.token_state();
        if state == TokenState::PinRefused {
            let digest = pin_digest(&self.pin.lock().unwrap_or_else(|p| p.into_inner()));
            self.availability.refuse_pin(digest);
        }
        self.lost(state)
    }

    fn attempt<R>(&self, f: &mut impl FnMut(&Session) -> HsmResult<R>) -> HsmResult<R> {
        let session = self.pool.checkout(&self.ctx, self.slot())?;
        let result = f(&session);
        if matches!(&result, Err(e) if e.is_stale_handle()) {
            PooledSession::discard(session);
        }
        result
    }

    /// Forgets every session and cached key, finds the token by label again,
    /// re-opens the anchor and logs in again.
    fn recover(&self) -> HsmResult<()> {
        self.keys.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.pool.clear();
        let slot = find_token(&self.ctx, &self.label)?;
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = slot;
        let mut anchor = self.anchor();
        let fresh = self.ctx.open_ro_session(slot)?;
        let pin = self.pin.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.availability.count_login();
        login(&fresh, &pin)?;
        *anchor = Some(fresh);
        Ok(())
    }

    /// Checks the token and brings it back when it is down: the second level of
    /// recovery. While ready, asks the token for its info (a real call) and
    /// repairs a lost login; while down, runs a re-initialization when the
    /// backoff allows. Blocking; the gateway's watchdog calls it every second
    /// and `/readyz` on every probe. Returns the state after the check.
    pub fn maintain(&self) -> TokenState {
        if self.availability.is_up() {
            match self.check() {
                Ok(()) => return TokenState::Ready,
                // Still up: the check could not run (a re-initialization holds
                // the library). Otherwise `check` marked the token down.
                Err(e) if self.availability.is_up() => return e.token_state(),
                Err(_) => {}
            }
        }
        self.reinitialize_if_due();
        self.availability.state()
    }

    /// One health check while ready: the token answers on its slot and the
    /// anchor session is logged in (a lost login is repaired, as in a call).
    fn check(&self) -> HsmResult<()> {
        let _library = self.shared()?;
        if !self.present() {
            return Err(self.lost(TokenState::Missing));
        }
        let logged_in = self
            .anchor()
            .as_ref()
            .is_some_and(|anchor| ensure_logged_in(anchor).is_ok());
        if !logged_in {
            tracing::warn!("the token dropped the login; logging in again");
            if let Err(e) = self.recover() {
                return Err(self.recovery_failed(e));
            }
        }
        Ok(())
    }

    fn reinitialize_if_due(&self) {
        let Some(_attempt) = self.availability.try_attempt() else {
            return;
        };
        if !self.availability.attempt_due(Instant::now()) {
            return;
        }
        // The PIN first, without touching the token: a PIN the token refused
        // is never offered again (retrying would lock the token).
        let pin = match self.pin_source.read() {
            Ok(pin) => pin,
            Err(e) => {
                tracing::warn!(error = %e, "token re-initialization waits for the PIN");
                self.availability
                    .attempt_failed(TokenState::PinUnavailable, Instant::now());
                return;
            }
        };
        let digest = pin_digest(&pin);
        if self.availability.is_refused(&digest) {
            self.availability.still_refused();
            return;
        }
        self.availability.count_attempt();
        let started = Instant::now();
        let result = {
            let _exclusive = self.library.write().unwrap_or_else(|p| p.into_inner());
            self.reinitialize(&pin)
        };
        match result {
            Ok(()) => {
                *self.pin.lock().unwrap_or_else(|p| p.into_inner()) = pin;
                self.availability.recovered();
                tracing::info!(
                    token = %self.label,
                    elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "token back: library re-initialized and logged in"
                );
            }
            Err(e) => {
                let state = e.token_state();
                if state == TokenState::PinRefused {
                    self.availability.refuse_pin(digest);
                    tracing::error!(
                        token = %self.label,
                        "the token refused the PIN; it will not be tried again until \
                         the PIN source changes"
                    );
                } else {
                    tracing::warn!(token = %self.label, state = %state, error = %e, "token re-initialization failed; retrying later");
                }
                self.availability.attempt_failed(state, Instant::now());
            }
        }
    }

    /// Closes every session, finalizes and initializes the library, finds the
    /// token by label and logs in. Runs under the exclusive library lock.
    fn reinitialize(&self, pin: &Zeroizing<String>) -> HsmResult<()> {
        self.keys.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.pool.clear();
        let mut anchor = self.anchor();
        *anchor = None;
        // `C_Finalize` fails only when the library is not initialized; either
        // way the next step starts from a clean library.
        if let Err(e) = self.ctx.clone().finalize() {
            tracing::debug!(error = %HsmError::from(e), "C_Finalize before re-initialization");
        }
        match self
            .ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(e.into()),
        }
        let slot = find_token(&self.ctx, &self.label)?;
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = slot;
        if self.ctx.get_token_info(slot)?.user_pin_locked() {
            return Err(HsmError::PinLocked);
        }
        let fresh = self.ctx.open_ro_session(slot)?;
        self.availability.count_login();
        login(&fresh, pin)?;
        *anchor = Some(fresh);
        Ok(())
    }

    /// What the gateway knows about the token now, without calling it.
    pub fn state(&self) -> TokenState {
        self.availability.state()
    }

    /// What recovery has done so far (metrics).
    pub fn recovery_counts(&self) -> RecoveryCounts {
        self.availability.counts()
    }

    fn cvv_keys<R>(
        &self,
        source: CvvKeySource<'_>,
        mut f: impl FnMut(&dyn BlockCipher) -> HsmResult<R>,
    ) -> HsmResult<R> {
        self.with_session(|session| match source {
            CvvKeySource::Cvk(label) => {
                let key = self.key(label, KeyKind::Cvk)?;
                let twin = key.twin.ok_or_else(|| HsmError::KeyNotFound {
                    label: label.single_des_twin(),
                })?;
                f(&CvvCipher {
                    session,
                    single: twin,
                    double: key.main,
                    counters: &self.counters,
                })
            }
            CvvKeySource::CardKey {
                imk,
                kind,
                mk_data,
                twin_data,
            } => {
                let key = self.key(imk, kind)?;
                let double = self.derive_session_key(session, key.main, mk_data)?;
                let single = self.derive_session_key(session, key.main, twin_data)?;
                f(&CvvCipher {
                    session,
                    single: single.handle,
                    double: double.handle,
                    counters: &self.counters,
                })
            }
        })
    }

    fn derive_session_key<'s>(
        &'s self,
        session: &'s Session,
        base: ObjectHandle,
        data: &[u8; 16],
    ) -> HsmResult<EphemeralKey<'s>> {
        let params = KeyDerivationStringData::new(data);
        OpCounters::bump(&self.counters.derive);
        let handle = session.derive_key(
            &des3_ecb_encrypt_data(&params),
            base,
            &session_des_encrypt_template(),
        )?;
        Ok(EphemeralKey::new(session, handle, &self.counters))
    }

    /// HMAC-SHA256 under a PAN-index or audit-seal key.
    ///
    /// # Errors
    /// `KeyNotFound`, `WrongKeyKind`, `KeyPolicy`, `Busy`, or the token's error.
    pub fn hmac(
        &self,
        label: &KeyLabel,
        kind: KeyKind,
        data: &[u8],
    ) -> HsmResult<Zeroizing<Vec<u8>>> {
        self.with_session(|session| {
            let key = self.key(label, kind)?;
            hmac(session, key.main, data, &self.counters)
        })
    }

    /// Checks an HMAC-SHA256 under an audit-seal key, in the token (`C_Verify`):
    /// `Ok(false)` when the token says the MAC does not match (audit seals, issue 4).
    ///
    /// # Errors
    /// `KeyNotFound`, `WrongKeyKind`, `KeyPolicy`, `Busy`, or the token's error.
    pub fn hmac_verify(
        &self,
        label: &KeyLabel,
        kind: KeyKind,
        data: &[u8],
        mac: &[u8],
    ) -> HsmResult<bool> {
        self.with_session(|session| {
            let key = self.key(label, kind)?;
            match session.verify(&Mechanism::Sha256Hmac, key.main, data, mac) {
                Ok(()) => Ok(true),
                Err(CkError::Pkcs11(RvError::SignatureInvalid | RvError::SignatureLenRange, _)) => {
                    Ok(false)
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    /// Resolves, checks against its policy, copies and caches a key; returns its
    /// KCV (DESIGN 2.5). The check runs once per process and again after a recovery.
    ///
    /// # Errors
    /// `KeyNotFound`, `DuplicateLabel`, `WrongKeyKind`, `KeyPolicy`, or the token's error.
    pub fn load_key(&self, label: &KeyLabel, kind: KeyKind) -> HsmResult<Kcv> {
        // A cached key needs no session; resolving one goes through the recovery path.
        if let Some(key) = self.cached(label) {
            return check_kind(label, &key, kind).map(|()| key.kcv);
        }
        self.with_session(|_| Ok(self.key(label, kind)?.kcv))
    }

    fn cached(&self, label: &KeyLabel) -> Option<Arc<LoadedKey>> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(label)
            .cloned()
    }

    /// Drops a key from the cache (its working copies die with the anchor session).
    pub(crate) fn forget_key(&self, label: &KeyLabel) {
        let removed = self
            .keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(label);
        if let Some(key) = removed
            && let Some(anchor) = self.anchor().as_ref()
        {
            for &handle in &key.copies {
                // Best effort: a copy left behind dies with the anchor session.
                let _ = anchor.destroy_object(handle);
            }
        }
    }

    fn key(&self, label: &KeyLabel, kind: KeyKind) -> HsmResult<Arc<LoadedKey>> {
        let key = match self.cached(label) {
            Some(k) => k,
            None => {
                let loaded = Arc::new(self.resolve(label)?);
                self.keys
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(label.clone(), Arc::clone(&loaded));
                tracing::info!(key = %label, kind = %loaded.kind, kcv = %loaded.kcv, "key loaded");
                loaded
            }
        };
        check_kind(label, &key, kind)?;
        Ok(key)
    }

    fn resolve(&self, label: &KeyLabel) -> HsmResult<LoadedKey> {
        let guard = self.anchor();
        let anchor = guard.as_ref().ok_or(HsmError::Unavailable {
            function: cryptoki::context::Function::GetSessionInfo,
            rv: RvError::SessionHandleInvalid,
        })?;
        // Logged out, private keys are invisible: that is a lost login to
        // recover from, not a missing key.
        ensure_logged_in(anchor)?;
        let (handle, kind, info) = inspect_checked(anchor, label.as_str())?;
        let mut copies = Vec::new();
        let mut use_copy = |original: ObjectHandle| -> HsmResult<ObjectHandle> {
            Ok(match working_copy(anchor, original)? {
                Some(copy) => {
                    copies.push(copy);
                    copy
                }
                None => original,
            })
        };
        let twin = if kind == KeyKind::Cvk {
            let (twin, twin_kind, _) = inspect_checked(anchor, &label.single_des_twin())?;
            if twin_kind != KeyKind::Cvk {
                return Err(HsmError::KeyPolicy {
                    label: label.single_des_twin(),
                    violations: vec!["CKA_ID does not mark it as a CVK's KA||KA object".into()],
                });
            }
            Some(use_copy(twin)?)
        } else {
            None
        };
        let main = use_copy(handle)?;
        let kcv = match kind {
            KeyKind::Cvk => kcv_by_encryption(anchor, main, &self.counters)?,
            KeyKind::ImkDcvv | KeyKind::ImkTdcvv2 => {
                info.check_value.ok_or_else(|| HsmError::KeyPolicy {
                    label: label.to_string(),
                    violations: vec![
                        "the token gives no CKA_CHECK_VALUE for this derive-only key".into(),
                    ],
                })?
            }
            KeyKind::PanIndex | KeyKind::AuditSeal => hmac_kcv(anchor, main, &self.counters)?,
        };
        Ok(LoadedKey {
            kind,
            kcv,
            main,
            twin,
            copies,
        })
    }

    /// Opens a read-write session for key management (same login).
    pub(crate) fn admin_session(&self) -> HsmResult<AdminSession<'_>> {
        let library = self.shared()?;
        Ok(AdminSession {
            session: self.ctx.open_rw_session(self.slot())?,
            _library: library,
        })
    }

    /// Held for the length of a key-management command.
    pub(crate) fn admin_lock(&self) -> MutexGuard<'_, ()> {
        self.admin.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sessions checked out now and the pool's size (metrics).
    pub fn session_usage(&self) -> (usize, usize) {
        self.pool.usage()
    }

    /// Label of the token.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether the token still answers (`C_GetTokenInfo` on its slot) and the
    /// user is logged in; repairs what [`Token::maintain`] can.
    ///
    /// # Errors
    /// `TokenDown` naming the state when the token is not usable.
    pub fn probe(&self) -> HsmResult<()> {
        match self.maintain() {
            TokenState::Ready => Ok(()),
            state => Err(HsmError::TokenDown { state }),
        }
    }
}

impl CardCrypto for Token {
    /// For a card key, both keys are derived in the token as session objects of the
    /// call's session and destroyed before this returns, also on error.
    fn with_cvv_keys<R>(
        &self,
        source: CvvKeySource<'_>,
        f: impl FnMut(&dyn BlockCipher) -> HsmResult<R>,
    ) -> HsmResult<R> {
        self.cvv_keys(source, f)
    }

    fn key_check_value(&self, label: &KeyLabel, kind: KeyKind) -> HsmResult<Kcv> {
        self.load_key(label, kind)
    }

    fn hmac(&self, label: &KeyLabel, kind: KeyKind, data: &[u8]) -> HsmResult<Zeroizing<Vec<u8>>> {
        Token::hmac(self, label, kind, data)
    }
}

/// A key is only ever used as the kind it was created as.
fn check_kind(label: &KeyLabel, key: &LoadedKey, wanted: KeyKind) -> HsmResult<()> {
    if key.kind == wanted {
        Ok(())
    } else {
        Err(HsmError::WrongKeyKind {
            label: label.to_string(),
            found: key.kind.as_str(),
            wanted: wanted.as_str(),
        })
    }
}

/// KCV convention for HMAC keys: the first 3 bytes of HMAC-SHA256(K, 00×8).
pub(crate) fn hmac_kcv(
    session: &Session,
    key: ObjectHandle,
    counters: &OpCounters,
) -> HsmResult<Kcv> {
    let mac = hmac(session, key, &[0u8; 8], counters)?;
    Kcv::from_prefix(&mac).ok_or_else(|| HsmError::Wrapper("short HMAC output".into()))
}

pub(crate) fn kcv_des(
    session: &Session,
    key: ObjectHandle,
    counters: &OpCounters,
) -> HsmResult<Kcv> {
    kcv_by_encryption(session, key, counters)
}

/// A working copy of a token key as a session object, still sensitive and
/// non-extractable (issue 2: SoftHSM re-reads token objects from its file store
/// on every use). Tokens that refuse to copy a non-modifiable key (SoftHSM 2.6
/// does) keep using the token object: `None`.
fn working_copy(session: &Session, handle: ObjectHandle) -> HsmResult<Option<ObjectHandle>> {
    match session.copy_object(handle, &[Attribute::Token(false)]) {
        Ok(copy) => Ok(Some(copy)),
        Err(CkError::Pkcs11(RvError::AttributeReadOnly | RvError::ActionProhibited, _)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn load_module(path: &Path) -> HsmResult<Pkcs11> {
    let not_found = || HsmError::ModuleNotFound {
        path: path.to_owned(),
    };
    if !path.is_file() {
        return Err(not_found());
    }
    let ctx = Pkcs11::new(path).map_err(|_| not_found())?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Another `Token` of this process initialized the library already; the
        // library state is per process (issue 2), so that is success.
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(ctx),
        Err(e) => Err(e.into()),
    }
}

fn find_token(ctx: &Pkcs11, label: &str) -> HsmResult<Slot> {
    let mut found = Vec::new();
    // Slot by slot: `get_slots_with_initialized_token` fails as a whole when one
    // slot cannot describe its token (SoftHSM while another process creates or
    // deletes a token), and a slot that cannot describe its token is not ours.
    for slot in ctx.get_slots_with_token()? {
        match ctx.get_token_info(slot) {
            Ok(info) if info.token_initialized() && info.label().trim_end() == label => {
                found.push(slot)
            }
            Ok(_) => {}
            Err(e) => {
                // Routine while another process creates or deletes a token: not a warning.
                tracing::debug!(error = %HsmError::from(e), "skipping a slot whose token cannot be read")
            }
        }
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(HsmError::TokenNotFound {
            label: label.to_owned(),
        }),
        _ => Err(HsmError::DuplicateLabel {
            label: format!("token {label}"),
        }),
    }
}

fn ensure_logged_in(session: &Session) -> HsmResult<()> {
    let state = session.get_session_info()?.session_state();
    if matches!(state, SessionState::RoUser | SessionState::RwUser) {
        Ok(())
    } else {
        Err(HsmError::Unavailable {
            function: cryptoki::context::Function::GetSessionInfo,
            rv: RvError::UserNotLoggedIn,
        })
    }
}

fn login(session: &Session, pin: &Zeroizing<String>) -> HsmResult<()> {
    let pin = AuthPin::from(pin.as_str().to_owned());
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What the token says about one key object.
#[derive(Debug)]
pub(crate) struct Inspected {
    pub(crate) label: String,
    pub(crate) kind: Option<(KeyKind, bool)>,
    pub(crate) attrs: KeyAttributes,
    pub(crate) check_value: Option<Kcv>,
}

/// Finds the one token secret key with `label`.
pub(crate) fn find_key(session: &Session, label: &str) -> HsmResult<Option<ObjectHandle>> {
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(HsmError::DuplicateLabel {
            label: label.to_owned(),
        }),
    }
}

fn inspect_checked(
    session: &Session,
    label: &str,
) -> HsmResult<(ObjectHandle, KeyKind, Inspected)> {
    let handle = find_key(session, label)?.ok_or_else(|| HsmError::KeyNotFound {
        label: label.to_owned(),
    })?;
    let info = inspect(session, handle)?;
    let Some((kind, _)) = info.kind else {
        return Err(HsmError::KeyPolicy {
            label: label.to_owned(),
            violations: vec!["CKA_ID does not name a gateway key kind".into()],
        });
    };
    let violations = info.attrs.violations(kind);
    if !violations.is_empty() {
        return Err(HsmError::KeyPolicy {
            label: label.to_owned(),
            violations,
        });
    }
    Ok((handle, kind, info))
}

/// Reads the attributes the policy needs.
pub(crate) fn inspect(session: &Session, handle: ObjectHandle) -> HsmResult<Inspected> {
    let wanted = [
        AttributeType::Label,
        AttributeType::Id,
        AttributeType::KeyType,
        AttributeType::Token,
        AttributeType::Private,
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::Modifiable,
        AttributeType::Encrypt,
        AttributeType::Decrypt,
        AttributeType::Sign,
        AttributeType::Verify,
        AttributeType::Wrap,
        AttributeType::Unwrap,
        AttributeType::Derive,
        AttributeType::CheckValue,
    ];
    let mut label = String::new();
    let mut kind = None;
    let mut check_value = None;
    // Unknown or absent attributes stay at their widest reading, so a token that
    // hides one cannot make a key look narrower than it is.
    let mut attrs = KeyAttributes {
        key_type: KeyType::GENERIC_SECRET,
        token: false,
        private: false,
        sensitive: false,
        extractable: true,
        modifiable: true,
        usage: Usage {
            encrypt: true,
            decrypt: true,
            sign: true,
            verify: true,
            wrap: true,
            unwrap: true,
            derive: true,
        },
        allowed_mechanisms: Vec::new(),
        allowed_mechanisms_unreadable: false,
    };
    match read_allowed_mechanisms(session, handle)? {
        AllowedMechanisms::Listed(list) => attrs.allowed_mechanisms = list,
        AllowedMechanisms::Unreadable => attrs.allowed_mechanisms_unreadable = true,
    }
    for attribute in session.get_attributes(handle, &wanted)? {
        match attribute {
            Attribute::Label(v) => label = String::from_utf8_lossy(&v).into_owned(),
            Attribute::Id(v) => kind = KeyKind::from_object_id(&v),
            Attribute::KeyType(t) => attrs.key_type = t,
            Attribute::Token(b) => attrs.token = b,
            Attribute::Private(b) => attrs.private = b,
            Attribute::Sensitive(b) => attrs.sensitive = b,
            Attribute::Extractable(b) => attrs.extractable = b,
            Attribute::Modifiable(b) => attrs.modifiable = b,
            Attribute::Encrypt(b) => attrs.usage.encrypt = b,
            Attribute::Decrypt(b) => attrs.usage.decrypt = b,
            Attribute::Sign(b) => attrs.usage.sign = b,
            Attribute::Verify(b) => attrs.usage.verify = b,
            Attribute::Wrap(b) => attrs.usage.wrap = b,
            Attribute::Unwrap(b) => attrs.usage.unwrap = b,
            Attribute::Derive(b) => attrs.usage.derive = b,
            Attribute::CheckValue(v) => check_value = Kcv::from_prefix(&v),
            _ => {}
        }
    }
    Ok(Inspected {
        label,
        kind,
        attrs,
        check_value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_key_source_debug_hides_the_derivation_data() {
        let imk: KeyLabel = "imk-v1".parse().unwrap();
        let data = [0x41u8; 16];
        let source = CvvKeySource::CardKey {
            imk: &imk,
            kind: KeyKind::ImkTdcvv2,
            mk_data: &data,
            twin_data: &data,
        };
        let shown = format!("{source:?}");
        assert_eq!(
            shown,
            "CardKey { imk: KeyLabel(\"imk-v1\"), kind: ImkTdcvv2, .. }"
        );
        assert!(!shown.contains("65"));
    }

    #[test]
    fn op_counts_translate_to_pkcs11_calls() {
        let counts = OpCounts {
            derive: 2,
            encrypt: 2,
            destroy: 2,
            sign: 0,
        };
        assert_eq!(counts.operations(), 6);
        assert_eq!(counts.pkcs11_calls(), 10);
        assert_eq!(counts.since(&counts), OpCounts::default());
    }
}
