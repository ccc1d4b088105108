//! The token's settings, as `config` assembles them, and the user PIN's source.
//!
//! This module reads the PIN and nothing else: it never logs it, never puts it
//! in an error, and makes no PKCS#11 call.

use std::path::PathBuf;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::hsm::error::{HsmError, HsmResult};

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
    pub(super) fn read(&self) -> HsmResult<Zeroizing<String>> {
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
