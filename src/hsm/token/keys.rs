//! The key cache: gateway keys resolved by label, checked against their
//! policy, copied into working session objects and kept by label.
//!
//! A key is resolved once per process and again after a recovery, and is
//! only ever used as the kind it was created as. The working copies are
//! session objects of the anchor session, still sensitive and non-extractable,
//! because SoftHSM re-reads token objects from its file store on every use
//! (issue 2: about twice the throughput). This module never reads key values
//! and never creates or destroys token objects (that is `admin`).

use std::sync::Arc;

use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;

use super::Token;
use super::inspect::inspect_checked;
use super::ops::{hmac_kcv, kcv_des};
use super::recovery::ensure_logged_in;
use crate::hsm::error::{Benign, HsmError, HsmResult, SessionLoss, tolerate};
use crate::hsm::policy::{Kcv, KeyKind, KeyLabel};
use crate::hsm::sync::{read, write};

/// A key resolved, checked against its policy, and copied into a working session object.
#[derive(Debug)]
pub(super) struct LoadedKey {
    pub(super) kind: KeyKind,
    pub(super) kcv: Kcv,
    /// The key (KA‖KB for a CVK): its working copy, or the token object.
    pub(super) main: ObjectHandle,
    /// A CVK's KA‖KA twin: its working copy, or the token object.
    pub(super) twin: Option<ObjectHandle>,
    /// The working copies among them, destroyed when the key is forgotten.
    copies: Vec<ObjectHandle>,
}

impl Token {
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
        read(&self.keys).get(label).cloned()
    }

    /// Drops a key from the cache (its working copies die with the anchor session).
    pub(in crate::hsm) fn forget_key(&self, label: &KeyLabel) {
        let removed = write(&self.keys).remove(label);
        if let Some(key) = removed
            && let Some(anchor) = self.anchor().as_ref()
        {
            for &handle in &key.copies {
                // Best effort: a copy left behind dies with the anchor session.
                let _ = anchor.destroy_object(handle);
            }
        }
    }

    /// Forgets every cached key: their handles belong to sessions being closed.
    pub(super) fn forget_all_keys(&self) {
        write(&self.keys).clear();
    }

    /// The key with `label`, from the cache or resolved now, if it is of `kind`.
    pub(super) fn key(&self, label: &KeyLabel, kind: KeyKind) -> HsmResult<Arc<LoadedKey>> {
        let key = match self.cached(label) {
            Some(k) => k,
            None => {
                let loaded = Arc::new(self.resolve(label)?);
                write(&self.keys).insert(label.clone(), Arc::clone(&loaded));
                tracing::info!(key = %label, kind = %loaded.kind, kcv = %loaded.kcv, "key loaded");
                loaded
            }
        };
        check_kind(label, &key, kind)?;
        Ok(key)
    }

    fn resolve(&self, label: &KeyLabel) -> HsmResult<LoadedKey> {
        let guard = self.anchor();
        let anchor = guard
            .as_ref()
            .ok_or(HsmError::SessionLost(SessionLoss::NoAnchor))?;
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
            KeyKind::Cvk => kcv_des(anchor, main, &self.counters)?,
            KeyKind::ImkDcvv | KeyKind::ImkTdcvv2 | KeyKind::ImkAc | KeyKind::ImkCvc3 => {
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
}

/// A key is only ever used as the kind it was created as.
fn check_kind(label: &KeyLabel, key: &LoadedKey, wanted: KeyKind) -> HsmResult<()> {
    if key.kind == wanted {
        Ok(())
    } else {
        Err(HsmError::WrongKeyKind {
            label: label.to_string(),
            found: key.kind,
            wanted,
        })
    }
}

/// A working copy of a token key as a session object, still sensitive and
/// non-extractable (issue 2: SoftHSM re-reads token objects from its file store
/// on every use). Tokens that refuse to copy a non-modifiable key (SoftHSM 2.6
/// does) keep using the token object: `None`.
fn working_copy(session: &Session, handle: ObjectHandle) -> HsmResult<Option<ObjectHandle>> {
    tolerate(
        session.copy_object(handle, &[Attribute::Token(false)]),
        Benign::CopyRefused,
    )
}
