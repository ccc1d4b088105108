//! Configuration: embedded defaults, then the TOML file named by `--config`, then
//! environment variables `DCVV_GATEWAY__SECTION__KEY` (e.g.
//! `DCVV_GATEWAY__HSM__TOKEN_LABEL`). Unknown keys are errors; values are parsed
//! into real types at load, so a bad file fails at start and names the field.
//!
//! Secrets never live here: the HSM PIN is read from the environment variable
//! or file the config names, by the HSM layer, when it logs in.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::hsm::{HsmSettings, PinSource};

const DEFAULTS: &str = r#"
[hsm]
max_sessions = 4
checkout_timeout_ms = 2000

[server]
listen = "127.0.0.1:8080"
"#;

/// A configuration that could not be loaded; the message names the file or field.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hsm: RawHsm,
    server: RawServer,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsm {
    module: PathBuf,
    token_label: String,
    pin_env: Option<String>,
    pin_file: Option<PathBuf>,
    max_sessions: usize,
    checkout_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: SocketAddr,
}

/// The HTTP server's settings.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
}

/// Everything the gateway needs to start, each layer's part in its own type.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The HSM layer.
    pub hsm: HsmSettings,
    /// The HTTP server.
    pub server: ServerSettings,
}

impl Settings {
    /// Loads defaults, the file at `path`, then the environment.
    ///
    /// # Errors
    /// `ConfigError` naming the file or the offending field.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError(format!("no config file at {}", path.display())));
        }
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("DCVV_GATEWAY")
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Settings::from_raw(raw, base)
    }

    fn from_raw(raw: RawConfig, base: &Path) -> Result<Settings, ConfigError> {
        let h = raw.hsm;
        let pin = match (h.pin_env, h.pin_file) {
            (Some(var), None) if !var.is_empty() => PinSource::Env(var),
            (None, Some(file)) => PinSource::File(if file.is_relative() {
                base.join(file)
            } else {
                file
            }),
            _ => {
                return Err(ConfigError(
                    "hsm: set exactly one of pin_env (an environment variable name) or pin_file"
                        .into(),
                ));
            }
        };
        if h.token_label.is_empty() || h.token_label.len() > 32 {
            return Err(ConfigError("hsm.token_label: 1 to 32 characters".into()));
        }
        if !(1..=256).contains(&h.max_sessions) {
            return Err(ConfigError("hsm.max_sessions: 1 to 256".into()));
        }
        if !(1..=60_000).contains(&h.checkout_timeout_ms) {
            return Err(ConfigError("hsm.checkout_timeout_ms: 1 to 60000".into()));
        }
        Ok(Settings {
            hsm: HsmSettings {
                module: h.module,
                token_label: h.token_label,
                pin,
                max_sessions: h.max_sessions,
                checkout_timeout: Duration::from_millis(h.checkout_timeout_ms),
            },
            server: ServerSettings {
                listen: raw.server.listen,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        Settings::load(&path)
    }

    const MINIMAL: &str = r#"
        [hsm]
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "dcvv-dev"
        pin_file = "pin"
    "#;

    #[test]
    fn defaults_fill_in_and_relative_pin_files_follow_the_config() {
        let s = load(MINIMAL).unwrap();
        assert_eq!(s.hsm.max_sessions, 4);
        assert_eq!(s.hsm.checkout_timeout, Duration::from_millis(2000));
        assert_eq!(s.server.listen, "127.0.0.1:8080".parse().unwrap());
        let PinSource::File(pin) = s.hsm.pin else {
            panic!("pin file expected")
        };
        assert!(
            pin.is_absolute() && pin.ends_with("pin"),
            "{}",
            pin.display()
        );
    }

    #[test]
    fn unknown_fields_fail_and_name_the_field() {
        let err = load(&format!("{MINIMAL}\nslot = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("slot"), "{err}");
    }

    #[test]
    fn exactly_one_pin_source() {
        let both = MINIMAL.replace("pin_file = \"pin\"", "pin_file = \"pin\"\npin_env = \"X\"");
        assert!(load(&both).unwrap_err().to_string().contains("exactly one"));
        let none = MINIMAL.replace("pin_file = \"pin\"", "");
        assert!(load(&none).unwrap_err().to_string().contains("exactly one"));
    }

    #[test]
    fn bad_values_are_refused() {
        let bad = MINIMAL.replace("[hsm]", "[server]\nlisten = \"nowhere\"\n[hsm]");
        assert!(load(&bad).is_err());
        let bad = format!("{MINIMAL}\nmax_sessions = 0\n");
        assert!(load(&bad).unwrap_err().to_string().contains("max_sessions"));
        assert!(Settings::load(Path::new("/nonexistent/gateway.toml")).is_err());
    }
}
