//! The token's settings, as `config` assembles them, and the user PIN's source.
//!
//! This module reads the PIN and nothing else: it never logs it, never puts it
//! in an error, and makes no PKCS#11 call.

use std::path::PathBuf;
use std::time::Duration;

use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::hsm::availability::pin_digest;
use crate::hsm::error::{HsmError, HsmResult, PinSourceError};

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
    /// a refused PIN while the gateway runs). The value is read once into a
    /// zeroizing buffer and copied once, trimmed, into the `AuthPin`.
    pub(super) fn read(&self) -> HsmResult<UserPin> {
        let raw = Zeroizing::new(match self {
            PinSource::Env(name) => std::env::var(name)
                .map_err(|_| HsmError::PinUnavailable(PinSourceError::EnvNotSet(name.clone())))?,
            PinSource::File(path) => std::fs::read_to_string(path).map_err(|e| {
                HsmError::PinUnavailable(PinSourceError::File {
                    path: path.clone(),
                    kind: e.kind(),
                })
            })?,
        });
        let pin = raw.trim_end_matches(['\r', '\n']);
        if pin.is_empty() {
            return Err(HsmError::PinUnavailable(PinSourceError::Empty));
        }
        Ok(UserPin {
            digest: pin_digest(pin),
            secret: AuthPin::from(pin),
        })
    }
}

/// The user PIN as read from its source: the secret `C_Login` takes, and its
/// digest, to recognize a PIN the token refused without keeping a second copy.
pub(super) struct UserPin {
    secret: AuthPin,
    digest: [u8; 32],
}

impl UserPin {
    /// The PIN, for `C_Login` only.
    pub(super) fn secret(&self) -> &AuthPin {
        &self.secret
    }

    /// SHA-256 of the PIN (see `availability`).
    pub(super) fn digest(&self) -> [u8; 32] {
        self.digest
    }
}

/// Never shows the PIN or its digest.
impl std::fmt::Debug for UserPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserPin(***)")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_is_read_trimmed_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "1234\r\n").unwrap();
        let pin = PinSource::File(path.clone()).read().unwrap();
        assert_eq!(pin.digest(), pin_digest("1234"));
        assert_eq!(format!("{pin:?}"), "UserPin(***)");
        std::fs::write(&path, "\n").unwrap();
        let err = PinSource::File(path).read().unwrap_err();
        assert!(
            matches!(err, HsmError::PinUnavailable(PinSourceError::Empty)),
            "{err:?}"
        );
    }
}
