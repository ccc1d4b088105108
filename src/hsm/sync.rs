//! The lock helpers of the port: every `Mutex`, `RwLock` and `Condvar` in
//! `hsm` is taken through these, so poisoning is handled one way, here.
//!
//! A poisoned lock is recovered, not propagated. That is right for every lock
//! of this module because of what they guard: plain values replaced in one
//! step (the slot, the anchor session, the PIN, the backoff schedule), a pool
//! and a key cache updated by single push/pop/insert/remove/clear calls, and
//! unit values held only for mutual exclusion (the library lock, key
//! management, the re-initialization attempt). A panic while holding one of
//! them cannot leave a half-updated value behind, whereas propagating the
//! poison would turn that one panic into every later token call failing until
//! the process restarts. These helpers must not be used for a lock whose value
//! is updated in several steps.

use std::sync::{
    Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    TryLockError,
};
use std::time::Duration;

/// Locks `mutex`, recovering it if a holder panicked.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The value of a `mutex` no one can hold any more, recovered if a holder panicked.
pub(super) fn into_inner<T>(mutex: Mutex<T>) -> T {
    mutex.into_inner().unwrap_or_else(PoisonError::into_inner)
}

/// Locks `mutex` if it is free now; `None` when another thread holds it.
pub(super) fn try_lock<T>(mutex: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match mutex.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Takes `lock` shared, recovering it if a holder panicked.
pub(super) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Takes `lock` shared if no writer holds or waits for it now; `None` otherwise.
pub(super) fn try_read<T>(lock: &RwLock<T>) -> Option<RwLockReadGuard<'_, T>> {
    match lock.try_read() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Takes `lock` exclusively, recovering it if a holder panicked.
pub(super) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `condvar` for at most `timeout`, recovering the guard if a holder
/// panicked meanwhile.
pub(super) fn wait_timeout<'a, T>(
    condvar: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    condvar
        .wait_timeout(guard, timeout)
        .unwrap_or_else(PoisonError::into_inner)
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_recovered_with_its_value() {
        let mutex = Mutex::new(7);
        let rw = RwLock::new(8);
        std::thread::scope(|s| {
            let _ = s
                .spawn(|| {
                    let _m = mutex.lock();
                    let _w = rw.write();
                    panic!("poison both locks");
                })
                .join();
        });
        assert!(mutex.is_poisoned() && rw.is_poisoned());
        assert_eq!(*lock(&mutex), 7);
        assert_eq!(try_lock(&mutex).map(|g| *g), Some(7));
        assert_eq!(*read(&rw), 8);
        assert_eq!(try_read(&rw).map(|g| *g), Some(8));
        *write(&rw) = 9;
        assert_eq!(*read(&rw), 9);
    }

    #[test]
    fn try_helpers_do_not_wait_for_a_holder() {
        let mutex = Mutex::new(());
        let held = lock(&mutex);
        assert!(try_lock(&mutex).is_none());
        drop(held);
        let rw = RwLock::new(());
        let writer = write(&rw);
        assert!(try_read(&rw).is_none());
        drop(writer);
        assert!(try_read(&rw).is_some());
    }
}
