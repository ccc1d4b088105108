//! Sessions and recovery: the library lock, the session every call runs on,
//! the login, and the two levels of recovery (DESIGN 7.6).
//!
//! A stale session or handle (the token dropped the login, a session was
//! closed) is repaired inside the call: re-open, log in again, re-resolve
//! keys, once. A token that went away (device removed, link down, SoftHSM's
//! token directory gone) cannot be repaired that way: SoftHSM reads its tokens
//! at `C_Initialize` and does not see one come back until the library is
//! finalized and initialized again. So the token is marked down, every call
//! fails at once with `TokenDown` (503), and [`Token::maintain`] — run every
//! second by the gateway's watchdog and by `/readyz` — re-initializes the
//! library on a backoff (see `availability`), under the exclusive side of the
//! `library` lock that every other use of the library holds shared.
//!
//! This module decides when to recover and how; it does not use keys (that is
//! `keys` and `ops`) and keeps the PIN only to log in with.

use std::ops::Deref;
use std::path::Path;
use std::sync::{MutexGuard, RwLockReadGuard};
use std::time::Instant;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::Token;
use crate::hsm::availability::{RecoveryCounts, TokenState};
use crate::hsm::error::{Benign, HsmError, HsmResult, SessionLoss, tolerate};
use crate::hsm::pool::PooledSession;
use crate::hsm::sync::{lock, try_read, write};

/// A read-write session for key management, holding the library lock shared
/// (a re-initialization waits for the command to end).
pub(in crate::hsm) struct AdminSession<'t> {
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

impl Token {
    /// The library lock, shared; fails at once while the token is down or a
    /// re-initialization runs (invariant 6: fail fast, never queue on a dead token).
    pub(super) fn shared(&self) -> HsmResult<RwLockReadGuard<'_, ()>> {
        if !self.availability.is_up() {
            return Err(self.down());
        }
        try_read(&self.library).ok_or_else(|| self.down())
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
    pub(in crate::hsm) fn with_session<R>(
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
            self.availability.refuse_pin(lock(&self.pin).digest());
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
        self.forget_all_keys();
        self.pool.clear();
        let slot = find_token(&self.ctx, &self.label)?;
        *lock(&self.slot) = slot;
        let mut anchor = self.anchor();
        let fresh = self.ctx.open_ro_session(slot)?;
        self.availability.count_login();
        login(&fresh, lock(&self.pin).secret())?;
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
        let digest = pin.digest();
        if self.availability.is_refused(&digest) {
            self.availability.still_refused();
            return;
        }
        self.availability.count_attempt();
        let started = Instant::now();
        let result = {
            let _exclusive = write(&self.library);
            self.reinitialize(pin.secret())
        };
        match result {
            Ok(()) => {
                *lock(&self.pin) = pin;
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
    fn reinitialize(&self, pin: &AuthPin) -> HsmResult<()> {
        self.forget_all_keys();
        self.pool.clear();
        let mut anchor = self.anchor();
        *anchor = None;
        // `C_Finalize` fails only when the library is not initialized; either
        // way the next step starts from a clean library.
        if let Err(e) = self.ctx.clone().finalize() {
            tracing::debug!(error = %HsmError::from(e), "C_Finalize before re-initialization");
        }
        let initialized = self
            .ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
        tolerate(initialized, Benign::AlreadyInitialized)?;
        let slot = find_token(&self.ctx, &self.label)?;
        *lock(&self.slot) = slot;
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

    /// Opens a read-write session for key management (same login).
    pub(in crate::hsm) fn admin_session(&self) -> HsmResult<AdminSession<'_>> {
        let library = self.shared()?;
        Ok(AdminSession {
            session: self.ctx.open_rw_session(self.slot())?,
            _library: library,
        })
    }

    /// Held for the length of a key-management command.
    pub(in crate::hsm) fn admin_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.admin)
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

/// Loads the PKCS#11 library and initializes it for OS locking.
pub(super) fn load_module(path: &Path) -> HsmResult<Pkcs11> {
    let not_found = || HsmError::ModuleNotFound {
        path: path.to_owned(),
    };
    if !path.is_file() {
        return Err(not_found());
    }
    let ctx = Pkcs11::new(path).map_err(|_| not_found())?;
    // Another `Token` of this process initialized the library already; the
    // library state is per process (issue 2), so that is success.
    let initialized = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    tolerate(initialized, Benign::AlreadyInitialized)?;
    Ok(ctx)
}

/// The one slot whose initialized token carries `label`.
pub(super) fn find_token(ctx: &Pkcs11, label: &str) -> HsmResult<Slot> {
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

/// Whether `session` is logged in as the user; a lost login is a session to recover.
pub(super) fn ensure_logged_in(session: &Session) -> HsmResult<()> {
    let state = session.get_session_info()?.session_state();
    if matches!(state, SessionState::RoUser | SessionState::RwUser) {
        Ok(())
    } else {
        Err(HsmError::SessionLost(SessionLoss::LoggedOut))
    }
}

/// Logs the user in; already logged in (by another session) is success (STYLE 3).
pub(super) fn login(session: &Session, pin: &AuthPin) -> HsmResult<()> {
    tolerate(
        session.login(UserType::User, Some(pin)),
        Benign::AlreadyLoggedIn,
    )?;
    Ok(())
}
