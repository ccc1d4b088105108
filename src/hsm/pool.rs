//! A bounded pool of PKCS#11 sessions.
//!
//! A `Session` is `Send` but not `Sync`: each call checks one out, uses it on its
//! own thread and gives it back (STYLE 3). Sessions are opened lazily up to the
//! configured maximum; a caller that finds none free waits at most the checkout
//! timeout and then gets `HsmError::Busy`, so overload turns into a fast error
//! instead of a queue. A session that failed with a stale-handle error is
//! discarded rather than returned.

use std::ops::Deref;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::error::{HsmError, HsmResult};
use super::sync::{lock, wait_timeout};

#[derive(Debug, Default)]
struct PoolState {
    idle: Vec<Session>,
    open: usize,
}

/// Sessions of one token, at most `max` open at once.
#[derive(Debug)]
pub(super) struct SessionPool {
    state: Mutex<PoolState>,
    freed: Condvar,
    max: usize,
    timeout: Duration,
}

impl SessionPool {
    pub(super) fn new(max: usize, timeout: Duration) -> Self {
        SessionPool {
            state: Mutex::new(PoolState::default()),
            freed: Condvar::new(),
            max: max.max(1),
            timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Every update is a single push/pop/counter change (see `sync`).
        lock(&self.state)
    }

    /// Sessions checked out now, and the most that may be.
    pub(super) fn usage(&self) -> (usize, usize) {
        let state = self.lock();
        (state.open.saturating_sub(state.idle.len()), self.max)
    }

    /// Checks a session out, opening one if fewer than `max` are open.
    ///
    /// # Errors
    /// `Busy` when none is free within the timeout; the token's error when a new
    /// session cannot be opened.
    pub(super) fn checkout(&self, ctx: &Pkcs11, slot: Slot) -> HsmResult<PooledSession<'_>> {
        let deadline = Instant::now() + self.timeout;
        let mut state = self.lock();
        loop {
            if let Some(session) = state.idle.pop() {
                return Ok(PooledSession::new(self, session));
            }
            if state.open < self.max {
                state.open += 1;
                drop(state);
                return match ctx.open_ro_session(slot) {
                    Ok(session) => Ok(PooledSession::new(self, session)),
                    Err(e) => {
                        self.forget_one();
                        Err(e.into())
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(HsmError::Busy {
                    millis: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
                });
            }
            state = wait_timeout(&self.freed, state, deadline - now);
        }
    }

    fn give_back(&self, session: Session) {
        self.lock().idle.push(session);
        self.freed.notify_one();
    }

    fn forget_one(&self) {
        let mut state = self.lock();
        state.open = state.open.saturating_sub(1);
        drop(state);
        self.freed.notify_one();
    }

    /// Closes every idle session (after the token came back, for instance).
    pub(super) fn clear(&self) {
        let mut state = self.lock();
        let closed = state.idle.len();
        state.idle.clear();
        state.open = state.open.saturating_sub(closed);
    }
}

/// A checked-out session; returns to the pool on drop unless discarded.
#[derive(Debug)]
pub(super) struct PooledSession<'p> {
    pool: &'p SessionPool,
    session: Option<Session>,
}

impl<'p> PooledSession<'p> {
    fn new(pool: &'p SessionPool, session: Session) -> Self {
        PooledSession {
            pool,
            session: Some(session),
        }
    }

    /// Drops the session instead of returning it: it failed in a way that says
    /// it is no longer usable.
    pub(super) fn discard(mut self) {
        if let Some(session) = self.session.take() {
            drop(session);
            self.pool.forget_one();
        }
    }
}

impl Deref for PooledSession<'_> {
    type Target = Session;

    fn deref(&self) -> &Session {
        match &self.session {
            Some(s) => s,
            // `session` is only taken by `discard`, which consumes `self`.
            None => unreachable!("pooled session used after discard"),
        }
    }
}

impl Drop for PooledSession<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.pool.give_back(session);
        }
    }
}
