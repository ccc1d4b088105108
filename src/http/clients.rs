//! API clients (DESIGN 5): who may call, with which secrets (one, or two
//! during a rotation), which endpoints (scopes) and which card programmes.
//!
//! Secrets are read once at start-up from the environment variable or file the
//! config names — never from the TOML itself — and live only as
//! [`ClientSecret`]s. Nothing here logs or prints a secret.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::domain::service::ProgrammeAccess;

use super::signature::ClientSecret;

/// What a client may do: one scope per group of endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// `POST /cards/pin/dynamic-values`.
    DynamicValues,
    /// Enrolment, unenrolment and enquiry.
    Enrollment,
    /// `POST /cards/cvv2/verification`.
    Cvv2Verification,
    /// `POST /cards/security-codes`.
    SecurityCodes,
    /// `POST /cards/dcvv/verification`.
    DcvvVerification,
    /// `POST /cards/cvc3/verification`.
    Cvc3Verification,
    /// `POST /cards/arqc/verification`.
    ArqcVerification,
    /// `GET /keys` (admin).
    Keys,
}

impl Scope {
    /// The name used in the config and in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::DynamicValues => "dynamic_values",
            Scope::Enrollment => "enrollment",
            Scope::Cvv2Verification => "cvv2_verification",
            Scope::SecurityCodes => "security_codes",
            Scope::DcvvVerification => "dcvv_verification",
            Scope::Cvc3Verification => "cvc3_verification",
            Scope::ArqcVerification => "arqc_verification",
            Scope::Keys => "keys",
        }
    }
}

/// An issuer organisation number as the portal's `organizationNumber` carries
/// it: 1 to 3 decimal digits; `1`, `01` and `001` are the same organisation,
/// written `001` in the audit trail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Organization(u16);

impl Organization {
    /// Parses 1 to 3 decimal digits.
    pub fn parse(text: &str) -> Option<Organization> {
        ((1..=3).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse().ok().map(Organization))
            .flatten()
    }
}

impl std::fmt::Display for Organization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:03}", self.0)
    }
}

/// The organisations a client may name in `organizationNumber`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum OrganizationAccess {
    /// Any, or none named (no `organizations` key in its config).
    #[default]
    Any,
    /// Only these; a request must name one of them.
    Only(std::collections::BTreeSet<Organization>),
}

impl OrganizationAccess {
    /// Whether a request naming `organization` (or none) may go on.
    pub fn allows(&self, organization: Option<Organization>) -> bool {
        match (self, organization) {
            (OrganizationAccess::Any, _) => true,
            (OrganizationAccess::Only(allowed), Some(o)) => allowed.contains(&o),
            (OrganizationAccess::Only(_), None) => false,
        }
    }
}

/// Where one client secret comes from.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretSource {
    /// An environment variable holding the secret.
    Env(String),
    /// A file holding the secret (relative paths follow the config file).
    File(PathBuf),
}

/// One client as configured (no secret in it, only where to find them).
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// The `apikey` it sends.
    pub apikey: String,
    /// One or two secret sources; the first signs responses when both verify.
    pub secrets: Vec<SecretSource>,
    /// Endpoints it may call.
    pub scopes: HashSet<Scope>,
    /// Programmes it may touch.
    pub access: ProgrammeAccess,
    /// Organisations it may name on dynamic-values requests.
    pub organizations: OrganizationAccess,
}

/// A client, with its secrets loaded.
#[derive(Debug)]
pub struct Client {
    /// Its `apikey`.
    pub apikey: String,
    /// Its current secrets.
    pub secrets: Vec<ClientSecret>,
    /// Its scopes.
    pub scopes: HashSet<Scope>,
    /// Its programmes.
    pub access: ProgrammeAccess,
    /// Its organisations.
    pub organizations: OrganizationAccess,
}

/// A client secret that could not be loaded; names the source, never the value.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The variable is unset or not UTF-8.
    #[error("client {client}: environment variable {var} is not set")]
    EnvUnset {
        /// The client.
        client: String,
        /// The variable's name.
        var: String,
    },
    /// The file cannot be read.
    #[error("client {client}: cannot read secret file {path}: {kind}")]
    File {
        /// The client.
        client: String,
        /// The file.
        path: String,
        /// The I/O error kind.
        kind: std::io::ErrorKind,
    },
    /// The secret does not meet the rules.
    #[error("client {client}: {reason}")]
    Invalid {
        /// The client.
        client: String,
        /// What is wrong.
        reason: super::signature::SecretError,
    },
    /// Two clients share an apikey.
    #[error("client {0} is configured twice")]
    Duplicate(String),
}

/// The clients the gateway knows, by `apikey`.
#[derive(Debug, Default)]
pub struct Clients(HashMap<String, Arc<Client>>);

impl Clients {
    /// Loads every client's secrets.
    ///
    /// # Errors
    /// The first secret that cannot be read or is invalid, or a repeated apikey.
    pub fn load(settings: &[ClientSettings]) -> Result<Clients, ClientError> {
        let mut clients = HashMap::new();
        for c in settings {
            let secrets = c
                .secrets
                .iter()
                .map(|source| read_secret(&c.apikey, source))
                .collect::<Result<Vec<_>, _>>()?;
            let client = Client {
                apikey: c.apikey.clone(),
                secrets,
                scopes: c.scopes.clone(),
                access: c.access.clone(),
                organizations: c.organizations.clone(),
            };
            if clients.insert(c.apikey.clone(), Arc::new(client)).is_some() {
                return Err(ClientError::Duplicate(c.apikey.clone()));
            }
        }
        Ok(Clients(clients))
    }

    /// The client with this apikey.
    pub fn get(&self, apikey: &str) -> Option<&Arc<Client>> {
        self.0.get(apikey)
    }

    /// How many clients are configured.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn read_secret(client: &str, source: &SecretSource) -> Result<ClientSecret, ClientError> {
    let raw = Zeroizing::new(match source {
        SecretSource::Env(var) => std::env::var(var).map_err(|_| ClientError::EnvUnset {
            client: client.to_owned(),
            var: var.clone(),
        })?,
        SecretSource::File(path) => {
            std::fs::read_to_string(path).map_err(|e| ClientError::File {
                client: client.to_owned(),
                path: path.display().to_string(),
                kind: e.kind(),
            })?
        }
    });
    ClientSecret::new(raw).map_err(|reason| ClientError::Invalid {
        client: client.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_load_from_files_and_errors_name_the_source_only() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, format!("{}\n", "k".repeat(40))).unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "too-short-secret-value").unwrap();
        let settings = |path: PathBuf| ClientSettings {
            apikey: "cms".into(),
            secrets: vec![SecretSource::File(path)],
            scopes: HashSet::from([Scope::Keys]),
            access: ProgrammeAccess::All,
            organizations: OrganizationAccess::Any,
        };
        let clients = Clients::load(&[settings(good.clone())]).unwrap();
        assert_eq!(clients.get("cms").unwrap().secrets.len(), 1);
        assert!(clients.get("other").is_none());

        let err = Clients::load(&[settings(short)]).unwrap_err().to_string();
        assert!(err.contains("32"), "{err}");
        assert!(!err.contains("too-short"), "{err}");
        let err = Clients::load(&[settings(dir.path().join("missing"))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
        let twice = Clients::load(&[settings(good.clone()), settings(good)]);
        assert!(matches!(twice, Err(ClientError::Duplicate(_))));
        let unset = ClientSettings {
            secrets: vec![SecretSource::Env("DCVV_TEST_UNSET_SECRET_VAR".into())],
            ..settings(PathBuf::new())
        };
        let err = Clients::load(&[unset]).unwrap_err().to_string();
        assert!(err.contains("DCVV_TEST_UNSET_SECRET_VAR"), "{err}");
    }
}
