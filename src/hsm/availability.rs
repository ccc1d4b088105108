//! Whether the token can be used now, and when to try bringing it back
//! (DESIGN 7.6: when the HSM fails, requests fail fast with 503 and the gateway
//! recovers by itself).
//!
//! This module owns the state and the schedule only; it makes no PKCS#11 call.
//! While the token is down, callers learn it from one atomic load and fail at
//! once. Re-initialization attempts are spaced by a backoff (1 s doubling to
//! 8 s) so a missing token costs the process one attempt per interval, not one
//! per request. A PIN the token refused is remembered by its SHA-256 digest
//! (never the PIN) and is not offered again: retrying a wrong PIN would lock the
//! token. A changed PIN (a new value in its file or variable) is tried once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::sync::{lock, try_lock};

/// First delay between two re-initialization attempts.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest delay between two re-initialization attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// What the gateway knows about its token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenState {
    /// Present, logged in, usable.
    Ready,
    /// The token is not there (device removed, link down, token directory
    /// gone, no token with the label).
    Missing,
    /// The token refused the PIN; that PIN is not tried again.
    PinRefused,
    /// The token's user PIN is locked (the security officer must unlock it).
    PinLocked,
    /// The PIN source (file or environment variable) cannot be read.
    PinUnavailable,
    /// The library or token failed otherwise (initialization, sessions).
    Failed,
}

impl TokenState {
    /// The word `/readyz` and the logs use: `ok`, `missing`, `pin_refused`,
    /// `pin_locked`, `pin_unavailable`, `unavailable`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Ready => "ok",
            TokenState::Missing => "missing",
            TokenState::PinRefused => "pin_refused",
            TokenState::PinLocked => "pin_locked",
            TokenState::PinUnavailable => "pin_unavailable",
            TokenState::Failed => "unavailable",
        }
    }
}

impl std::fmt::Display for TokenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts of what recovery did, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryCounts {
    /// Re-initializations tried (`C_Finalize` + `C_Initialize` + find + login).
    pub reinit_attempts: u64,
    /// Re-initializations that brought the token back.
    pub reinit_successes: u64,
    /// `C_Login` calls made by recovery (re-login and re-initialization).
    pub logins: u64,
    /// Times the token went from ready to down.
    pub losses: u64,
}

#[derive(Debug)]
struct Schedule {
    state: TokenState,
    next_attempt: Instant,
    backoff: Duration,
    refused_pin: Option<[u8; 32]>,
}

/// The token's availability and the re-initialization schedule.
#[derive(Debug)]
pub(crate) struct Availability {
    up: AtomicBool,
    schedule: Mutex<Schedule>,
    /// Held by the one thread running a re-initialization attempt.
    attempting: Mutex<()>,
    reinit_attempts: AtomicU64,
    reinit_successes: AtomicU64,
    logins: AtomicU64,
    losses: AtomicU64,
}

/// SHA-256 of a PIN: enough to recognize a refused PIN, not to use it.
pub(crate) fn pin_digest(pin: &str) -> [u8; 32] {
    Sha256::digest(pin.as_bytes()).into()
}

impl Availability {
    pub(crate) fn new() -> Self {
        Availability {
            up: AtomicBool::new(true),
            schedule: Mutex::new(Schedule {
                state: TokenState::Ready,
                next_attempt: Instant::now(),
                backoff: FIRST_BACKOFF,
                refused_pin: None,
            }),
            attempting: Mutex::new(()),
            reinit_attempts: AtomicU64::new(0),
            reinit_successes: AtomicU64::new(0),
            logins: AtomicU64::new(0),
            losses: AtomicU64::new(0),
        }
    }

    fn schedule(&self) -> MutexGuard<'_, Schedule> {
        // Every update is a few plain assignments: a panic cannot leave it torn (see `sync`).
        lock(&self.schedule)
    }

    /// One atomic load: the fast path of every token call.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub(crate) fn state(&self) -> TokenState {
        if self.is_up() {
            TokenState::Ready
        } else {
            self.schedule().state
        }
    }

    /// The token is down for `state`. Returns whether it was up until now (the
    /// caller logs the transition once). A first attempt is due at once.
    pub(crate) fn went_down(&self, state: TokenState, now: Instant) -> bool {
        let mut schedule = self.schedule();
        let was_up = self.up.swap(false, Ordering::AcqRel);
        if was_up {
            self.losses.fetch_add(1, Ordering::Relaxed);
            schedule.next_attempt = now;
            schedule.backoff = FIRST_BACKOFF;
        }
        schedule.state = state;
        was_up
    }

    /// Whether a re-initialization attempt may run now.
    pub(crate) fn attempt_due(&self, now: Instant) -> bool {
        !self.is_up() && now >= self.schedule().next_attempt
    }

    /// The single-attempt guard; `None` when another thread is attempting.
    pub(crate) fn try_attempt(&self) -> Option<MutexGuard<'_, ()>> {
        try_lock(&self.attempting)
    }

    pub(crate) fn count_attempt(&self) {
        self.reinit_attempts.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_login(&self) {
        self.logins.fetch_add(1, Ordering::Relaxed);
    }

    /// An attempt failed with `state`: the next one waits the backoff, which
    /// then doubles up to [`MAX_BACKOFF`].
    pub(crate) fn attempt_failed(&self, state: TokenState, now: Instant) {
        let mut schedule = self.schedule();
        schedule.state = state;
        schedule.next_attempt = now + schedule.backoff;
        schedule.backoff = (schedule.backoff * 2).min(MAX_BACKOFF);
    }

    /// The token refused the PIN with this digest: never offer it again.
    pub(crate) fn refuse_pin(&self, digest: [u8; 32]) {
        self.schedule().refused_pin = Some(digest);
    }

    /// Whether this PIN is the one the token refused.
    pub(crate) fn is_refused(&self, digest: &[u8; 32]) -> bool {
        self.schedule()
            .refused_pin
            .is_some_and(|refused| bool::from(refused.ct_eq(digest)))
    }

    /// The PIN is the refused one: stay down without touching the token, and
    /// look at the PIN source again at the next check (reading it costs nothing).
    pub(crate) fn still_refused(&self) {
        self.schedule().state = TokenState::PinRefused;
    }

    /// The token is back.
    pub(crate) fn recovered(&self) {
        let mut schedule = self.schedule();
        schedule.state = TokenState::Ready;
        schedule.backoff = FIRST_BACKOFF;
        schedule.refused_pin = None;
        self.reinit_successes.fetch_add(1, Ordering::Relaxed);
        self.up.store(true, Ordering::Release);
    }

    pub(crate) fn counts(&self) -> RecoveryCounts {
        RecoveryCounts {
            reinit_attempts: self.reinit_attempts.load(Ordering::Relaxed),
            reinit_successes: self.reinit_successes.load(Ordering::Relaxed),
            logins: self.logins.load(Ordering::Relaxed),
            losses: self.losses.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_once_doubles_and_caps() {
        let a = Availability::new();
        let t0 = Instant::now();
        assert!(a.is_up());
        assert!(!a.attempt_due(t0), "nothing to attempt while up");
        assert!(a.went_down(TokenState::Missing, t0));
        assert!(
            !a.went_down(TokenState::Missing, t0),
            "the loss is counted once"
        );
        assert!(a.attempt_due(t0), "the first attempt is due at once");
        let mut now = t0;
        for expected in [1, 2, 4, 8, 8, 8] {
            a.attempt_failed(TokenState::Missing, now);
            assert!(!a.attempt_due(now + Duration::from_millis(expected * 1000 - 1)));
            now += Duration::from_secs(expected);
            assert!(a.attempt_due(now), "due after {expected} s");
        }
        assert_eq!(a.state(), TokenState::Missing);
        a.recovered();
        assert!(a.is_up());
        assert_eq!(a.state(), TokenState::Ready);
        assert_eq!(a.counts().losses, 1);
        assert_eq!(a.counts().reinit_successes, 1);
        // A new loss starts the backoff again from the first delay.
        a.went_down(TokenState::Missing, now);
        a.attempt_failed(TokenState::Missing, now);
        assert!(a.attempt_due(now + FIRST_BACKOFF));
    }

    #[test]
    fn a_refused_pin_is_recognized_until_the_token_is_back() {
        let a = Availability::new();
        a.went_down(TokenState::PinRefused, Instant::now());
        a.refuse_pin(pin_digest("1234"));
        assert!(a.is_refused(&pin_digest("1234")));
        assert!(!a.is_refused(&pin_digest("12345")));
        a.recovered();
        assert!(!a.is_refused(&pin_digest("1234")));
    }

    #[test]
    fn one_attempt_at_a_time() {
        let a = Availability::new();
        let first = a.try_attempt();
        assert!(first.is_some());
        assert!(a.try_attempt().is_none());
        drop(first);
        assert!(a.try_attempt().is_some());
    }
}
