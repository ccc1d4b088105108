//! What the token must be able to do (issue 11, item 4): the mechanisms, each
//! with the `CKF_` flag of its use, that the configured key kinds need, and how
//! a token's mechanism table falls short of them.
//!
//! A need is worked out from the kinds in use, not from `CKA_ALLOWED_MECHANISMS`
//! ([`KeyKind::mechanisms`]): a kind also needs what the keys derived from it
//! are used with (the card keys of an IMK encrypt with `CKM_DES3_ECB`), what
//! generating its keys takes, and wrapped key import needs RSA whatever the
//! kinds. Only [`Purpose::Serve`] needs stop the gateway from starting; the
//! others are reported by `hsm check` for the commands that use them.
//!
//! Pure: the table is read by [`Token::mechanism_table`](super::Token::mechanism_table)
//! and handed in; nothing here calls the token.

use std::fmt;

use cryptoki::mechanism::MechanismInfo;

use super::policy::KeyKind;
use super::types::Mechanism;

/// A `CKF_` flag of `CK_MECHANISM_INFO`: one use the token allows a mechanism for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MechanismFlag {
    /// `CKF_ENCRYPT`
    Encrypt,
    /// `CKF_DECRYPT`
    Decrypt,
    /// `CKF_SIGN`
    Sign,
    /// `CKF_VERIFY`
    Verify,
    /// `CKF_GENERATE`
    Generate,
    /// `CKF_GENERATE_KEY_PAIR`
    GenerateKeyPair,
    /// `CKF_WRAP`
    Wrap,
    /// `CKF_UNWRAP`
    Unwrap,
    /// `CKF_DERIVE`
    Derive,
}

impl MechanismFlag {
    /// Every flag the gateway may need, in `CK_MECHANISM_INFO` bit order.
    pub const ALL: [MechanismFlag; 9] = [
        MechanismFlag::Encrypt,
        MechanismFlag::Decrypt,
        MechanismFlag::Sign,
        MechanismFlag::Verify,
        MechanismFlag::Generate,
        MechanismFlag::GenerateKeyPair,
        MechanismFlag::Wrap,
        MechanismFlag::Unwrap,
        MechanismFlag::Derive,
    ];

    /// The use in words: `encrypt`, `derive`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            MechanismFlag::Encrypt => "encrypt",
            MechanismFlag::Decrypt => "decrypt",
            MechanismFlag::Sign => "sign",
            MechanismFlag::Verify => "verify",
            MechanismFlag::Generate => "generate",
            MechanismFlag::GenerateKeyPair => "generate key pair",
            MechanismFlag::Wrap => "wrap",
            MechanismFlag::Unwrap => "unwrap",
            MechanismFlag::Derive => "derive",
        }
    }

    /// The PKCS#11 name: `CKF_ENCRYPT`, `CKF_DERIVE`, ...
    pub fn ckf_name(self) -> &'static str {
        match self {
            MechanismFlag::Encrypt => "CKF_ENCRYPT",
            MechanismFlag::Decrypt => "CKF_DECRYPT",
            MechanismFlag::Sign => "CKF_SIGN",
            MechanismFlag::Verify => "CKF_VERIFY",
            MechanismFlag::Generate => "CKF_GENERATE",
            MechanismFlag::GenerateKeyPair => "CKF_GENERATE_KEY_PAIR",
            MechanismFlag::Wrap => "CKF_WRAP",
            MechanismFlag::Unwrap => "CKF_UNWRAP",
            MechanismFlag::Derive => "CKF_DERIVE",
        }
    }

    fn is_set(self, info: &MechanismInfo) -> bool {
        match self {
            MechanismFlag::Encrypt => info.encrypt(),
            MechanismFlag::Decrypt => info.decrypt(),
            MechanismFlag::Sign => info.sign(),
            MechanismFlag::Verify => info.verify(),
            MechanismFlag::Generate => info.generate(),
            MechanismFlag::GenerateKeyPair => info.generate_key_pair(),
            MechanismFlag::Wrap => info.wrap(),
            MechanismFlag::Unwrap => info.unwrap(),
            MechanismFlag::Derive => info.derive(),
        }
    }
}

impl fmt::Display for MechanismFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a needed mechanism is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Serving requests (and loading keys at start): `serve` refuses a token without it.
    Serve,
    /// `keys generate` of the kinds in use.
    Generate,
    /// `keys import-wrapped` and its RSA wrapping key.
    WrappedImport,
}

/// What a kind needs of the token to serve: its own operation and those of the
/// keys derived from it. No kind needs `CKM_DES_ECB`: a CVK's single-DES step runs
/// `CKM_DES3_ECB` under its KA‖KA twin (DESIGN 2.1), and the ISO 9797-1 chain of the
/// EMV kinds runs `CKM_DES3_CBC` under a KL‖KL twin.
fn serving(kind: KeyKind) -> &'static [(Mechanism, MechanismFlag)] {
    use Mechanism::{Des3Cbc, Des3Ecb, Des3EcbEncryptData, Sha256Hmac};
    use MechanismFlag::{Derive, Encrypt, Sign, Verify};
    match kind {
        KeyKind::Cvk => &[(Des3Ecb, Encrypt)],
        // Card keys derived in the token, then CVV blocks under them.
        KeyKind::ImkDcvv | KeyKind::ImkTdcvv2 => {
            &[(Des3EcbEncryptData, Derive), (Des3Ecb, Encrypt)]
        }
        // Card and session keys derived, the MAC chain in CBC, its last step and ARPC in ECB.
        KeyKind::ImkAc | KeyKind::ImkCvc3 => &[
            (Des3EcbEncryptData, Derive),
            (Des3Ecb, Encrypt),
            (Des3Cbc, Encrypt),
        ],
        KeyKind::PanIndex => &[(Sha256Hmac, Sign)],
        KeyKind::AuditSeal => &[(Sha256Hmac, Sign), (Sha256Hmac, Verify)],
    }
}

/// What `keys generate` of a kind needs: the key generation mechanism, and for a
/// CVK the derivation of KA‖KB and KA‖KA from a generated seed (`admin.rs`).
/// Import from components needs nothing more than serving does: the KCVs are
/// `CKM_DES3_ECB` and `CKM_SHA256_HMAC` (sign), and an IMK's is the token's `CKA_CHECK_VALUE`.
fn generation(kind: KeyKind) -> &'static [(Mechanism, MechanismFlag)] {
    use Mechanism::{Des2KeyGen, Des3EcbEncryptData, GenericSecretKeyGen};
    use MechanismFlag::{Derive, Generate};
    match kind {
        KeyKind::Cvk => &[(Des2KeyGen, Generate), (Des3EcbEncryptData, Derive)],
        KeyKind::ImkDcvv | KeyKind::ImkTdcvv2 | KeyKind::ImkAc | KeyKind::ImkCvc3 => {
            &[(Des2KeyGen, Generate)]
        }
        KeyKind::PanIndex | KeyKind::AuditSeal => &[(GenericSecretKeyGen, Generate)],
    }
}

/// Wrapped key import: the token's RSA key pair, and keys unwrapped under it.
const WRAPPED_IMPORT: [(Mechanism, MechanismFlag); 2] = [
    (Mechanism::RsaPkcsKeyPairGen, MechanismFlag::GenerateKeyPair),
    (Mechanism::RsaPkcsOaep, MechanismFlag::Unwrap),
];

/// A configured key: its kind and who uses it, as an operator should read it
/// (`programme visa-credit`, `audit.seal_key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyUse {
    /// The key's kind.
    pub kind: KeyKind,
    /// Who uses it.
    pub used_by: String,
}

/// One mechanism with one flag, and why it is needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    /// The mechanism.
    pub mechanism: Mechanism,
    /// The flag it must have.
    pub flag: MechanismFlag,
    /// What for.
    pub purpose: Purpose,
    /// The configured keys that need it, in configuration order (none for wrapped import).
    pub users: Vec<KeyUse>,
}

impl Need {
    /// How `table` falls short of this need; `None` when the token can do it.
    pub fn lack(&self, table: &MechanismTable) -> Option<Lack> {
        match table.flags(self.mechanism) {
            Some(flags) if flags.contains(&self.flag) => None,
            listed => Some(Lack {
                need: self.clone(),
                listed: listed.is_some(),
            }),
        }
    }

    fn needed_by(&self) -> String {
        // `imk-dcvv (programme a, programme b), imk-tdcvv2 (programme a)`
        let mut kinds: Vec<(KeyKind, Vec<&str>)> = Vec::new();
        for u in &self.users {
            match kinds.iter_mut().find(|(k, _)| *k == u.kind) {
                Some((_, by)) => by.push(&u.used_by),
                None => kinds.push((u.kind, vec![&u.used_by])),
            }
        }
        kinds
            .iter()
            .map(|(kind, by)| format!("{kind} ({})", by.join(", ")))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn why(&self) -> String {
        match self.purpose {
            Purpose::Serve => format!("needed by {}", self.needed_by()),
            Purpose::Generate => format!("needed by keys generate of {}", self.needed_by()),
            Purpose::WrappedImport => "needed for wrapped key import".to_owned(),
        }
    }
}

/// `CKM_DES3_ECB (encrypt), needed by cvk (programme demo)`
impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}), {}", self.mechanism, self.flag, self.why())
    }
}

/// Everything the configured keys need of the token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Needs(Vec<Need>);

impl Needs {
    /// The needs of `uses` (every configured key): first what serving takes,
    /// then key generation, then wrapped key import; within each, in the order
    /// the keys are given. A key named twice by the same user counts once.
    pub fn of(uses: impl IntoIterator<Item = KeyUse>) -> Needs {
        let uses: Vec<KeyUse> = uses.into_iter().collect();
        let mut needs: Vec<Need> = Vec::new();
        for (purpose, of_kind) in [
            (Purpose::Serve, serving as fn(KeyKind) -> _),
            (Purpose::Generate, generation),
        ] {
            for u in &uses {
                for &(mechanism, flag) in of_kind(u.kind) {
                    let at = needs.iter().position(|n| {
                        n.purpose == purpose && n.mechanism == mechanism && n.flag == flag
                    });
                    let need = match at {
                        Some(i) => &mut needs[i],
                        None => {
                            needs.push(Need {
                                mechanism,
                                flag,
                                purpose,
                                users: Vec::new(),
                            });
                            let last = needs.len() - 1;
                            &mut needs[last]
                        }
                    };
                    if !need.users.contains(u) {
                        need.users.push(u.clone());
                    }
                }
            }
        }
        needs.extend(WRAPPED_IMPORT.map(|(mechanism, flag)| Need {
            mechanism,
            flag,
            purpose: Purpose::WrappedImport,
            users: Vec::new(),
        }));
        Needs(needs)
    }

    /// Every need.
    pub fn iter(&self) -> impl Iterator<Item = &Need> {
        self.0.iter()
    }

    /// The mechanisms needed, each once: what to ask the token about.
    pub fn mechanisms(&self) -> Vec<Mechanism> {
        let mut out = Vec::new();
        for n in &self.0 {
            if !out.contains(&n.mechanism) {
                out.push(n.mechanism);
            }
        }
        out
    }

    /// Every way `table` falls short, in the order of the needs.
    pub fn lacks(&self, table: &MechanismTable) -> Vec<Lack> {
        self.0.iter().filter_map(|n| n.lack(table)).collect()
    }
}

/// A need the token does not meet: the mechanism is missing, or listed without the flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lack {
    /// What is needed.
    pub need: Need,
    /// The token lists the mechanism, but without the flag.
    pub listed: bool,
}

impl Lack {
    /// Whether `serve` refuses a token with this lack.
    pub fn stops_serving(&self) -> bool {
        self.need.purpose == Purpose::Serve
    }
}

/// One line: `token lacks CKM_DES3_ECB_ENCRYPT_DATA (derive), needed by imk-dcvv
/// (programme visa-credit)`; for a mechanism listed without the flag,
/// `(derive; listed without CKF_DERIVE)`.
impl fmt::Display for Lack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Need {
            mechanism, flag, ..
        } = &self.need;
        if self.listed {
            write!(
                f,
                "token lacks {mechanism} ({flag}; listed without {}), {}",
                flag.ckf_name(),
                self.need.why()
            )
        } else {
            write!(f, "token lacks {mechanism} ({flag}), {}", self.need.why())
        }
    }
}

/// What a token says about the mechanisms it was asked about: for each, the
/// flags it reports, or nothing when it does not have the mechanism.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MechanismTable(Vec<(Mechanism, Option<Vec<MechanismFlag>>)>);

impl MechanismTable {
    /// A table of `(mechanism, flags)`, `None` for a mechanism the token lacks
    /// (what [`Token::mechanism_table`](super::Token::mechanism_table) reads; by hand, a fake).
    pub fn new(entries: impl IntoIterator<Item = (Mechanism, Option<Vec<MechanismFlag>>)>) -> Self {
        MechanismTable(entries.into_iter().collect())
    }

    /// The flags the token reports for `mechanism`; `None` when it lacks it (or
    /// the table does not say).
    pub fn flags(&self, mechanism: Mechanism) -> Option<&[MechanismFlag]> {
        self.0
            .iter()
            .find(|(m, _)| *m == mechanism)
            .and_then(|(_, flags)| flags.as_deref())
    }

    /// The flags of a `CK_MECHANISM_INFO`.
    pub(in crate::hsm) fn flags_of(info: &MechanismInfo) -> Vec<MechanismFlag> {
        MechanismFlag::ALL
            .into_iter()
            .filter(|f| f.is_set(info))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MechanismFlag::{Derive, Encrypt, Generate, GenerateKeyPair, Sign, Unwrap, Verify};

    fn uses(list: &[(KeyKind, &str)]) -> Vec<KeyUse> {
        list.iter()
            .map(|(kind, by)| KeyUse {
                kind: *kind,
                used_by: (*by).to_owned(),
            })
            .collect()
    }

    /// The demo configuration: one programme, the PAN index and the audit seal.
    fn demo() -> Needs {
        Needs::of(uses(&[
            (KeyKind::Cvk, "programme demo"),
            (KeyKind::ImkDcvv, "programme demo"),
            (KeyKind::ImkTdcvv2, "programme demo"),
            (KeyKind::PanIndex, "keys.pan_index"),
            (KeyKind::AuditSeal, "audit.seal_key"),
        ]))
    }

    /// What SoftHSM 2.6 reports for the mechanisms the gateway asks about.
    fn softhsm_like() -> MechanismTable {
        MechanismTable::new([
            (
                Mechanism::Des3Ecb,
                Some(vec![Encrypt, MechanismFlag::Decrypt]),
            ),
            (
                Mechanism::Des3Cbc,
                Some(vec![Encrypt, MechanismFlag::Decrypt]),
            ),
            (Mechanism::Des3EcbEncryptData, Some(vec![Derive])),
            (Mechanism::Sha256Hmac, Some(vec![Sign, Verify])),
            (Mechanism::Des2KeyGen, Some(vec![Generate])),
            (Mechanism::GenericSecretKeyGen, Some(vec![Generate])),
            (Mechanism::RsaPkcsKeyPairGen, Some(vec![GenerateKeyPair])),
            (
                Mechanism::RsaPkcsOaep,
                Some(vec![
                    Encrypt,
                    MechanismFlag::Decrypt,
                    MechanismFlag::Wrap,
                    Unwrap,
                ]),
            ),
        ])
    }

    fn lines(needs: &Needs) -> Vec<String> {
        needs.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn the_demo_configuration_needs_these_mechanisms() {
        assert_eq!(
            lines(&demo()),
            [
                "CKM_DES3_ECB (encrypt), needed by cvk (programme demo), imk-dcvv (programme demo), \
                 imk-tdcvv2 (programme demo)",
                "CKM_DES3_ECB_ENCRYPT_DATA (derive), needed by imk-dcvv (programme demo), \
                 imk-tdcvv2 (programme demo)",
                "CKM_SHA256_HMAC (sign), needed by pan-index (keys.pan_index), \
                 audit-seal (audit.seal_key)",
                "CKM_SHA256_HMAC (verify), needed by audit-seal (audit.seal_key)",
                "CKM_DES2_KEY_GEN (generate), needed by keys generate of cvk (programme demo), \
                 imk-dcvv (programme demo), imk-tdcvv2 (programme demo)",
                "CKM_DES3_ECB_ENCRYPT_DATA (derive), needed by keys generate of cvk (programme demo)",
                "CKM_GENERIC_SECRET_KEY_GEN (generate), needed by keys generate of \
                 pan-index (keys.pan_index), audit-seal (audit.seal_key)",
                "CKM_RSA_PKCS_KEY_PAIR_GEN (generate key pair), needed for wrapped key import",
                "CKM_RSA_PKCS_OAEP (unwrap), needed for wrapped key import",
            ]
        );
        assert_eq!(
            demo().mechanisms(),
            [
                Mechanism::Des3Ecb,
                Mechanism::Des3EcbEncryptData,
                Mechanism::Sha256Hmac,
                Mechanism::Des2KeyGen,
                Mechanism::GenericSecretKeyGen,
                Mechanism::RsaPkcsKeyPairGen,
                Mechanism::RsaPkcsOaep,
            ]
        );
    }

    #[test]
    fn emv_kinds_also_need_cbc_and_users_are_grouped_by_kind() {
        let needs = Needs::of(uses(&[
            (KeyKind::ImkAc, "programme a"),
            (KeyKind::ImkAc, "programme b"),
            (KeyKind::ImkCvc3, "programme b"),
            // Named twice by one programme (a previous key of the same kind): once.
            (KeyKind::ImkCvc3, "programme b"),
        ]));
        let cbc = needs
            .iter()
            .find(|n| n.mechanism == Mechanism::Des3Cbc)
            .unwrap();
        assert_eq!((cbc.flag, cbc.purpose), (Encrypt, Purpose::Serve));
        assert_eq!(
            cbc.to_string(),
            "CKM_DES3_CBC (encrypt), needed by imk-ac (programme a, programme b), \
             imk-cvc3 (programme b)"
        );
        // Nothing of the HMAC kinds when none is configured; never single DES.
        assert!(!needs.mechanisms().contains(&Mechanism::Sha256Hmac));
        assert!(
            needs
                .mechanisms()
                .iter()
                .all(|m| !matches!(m, Mechanism::Other(_)))
        );
    }

    #[test]
    fn every_kind_needs_its_own_allowed_mechanisms_to_serve() {
        for kind in KeyKind::ALL {
            let flags = match kind.usage() {
                u if u.derive => Derive,
                u if u.encrypt => Encrypt,
                _ => Sign,
            };
            for m in kind.mechanisms() {
                assert!(serving(kind).contains(&(*m, flags)), "{kind} {m}");
            }
        }
    }

    #[test]
    fn a_token_with_everything_lacks_nothing() {
        assert_eq!(demo().lacks(&softhsm_like()), []);
    }

    #[test]
    fn each_missing_mechanism_or_flag_is_one_line() {
        // An openCryptoki-like software token: no CKM_DES3_ECB_ENCRYPT_DATA, no
        // CKM_DES2_KEY_GEN, and (made up) CKM_SHA256_HMAC that can sign only.
        let table = MechanismTable::new([
            (
                Mechanism::Des3Ecb,
                Some(vec![Encrypt, MechanismFlag::Decrypt]),
            ),
            (Mechanism::Des3EcbEncryptData, None),
            (Mechanism::Sha256Hmac, Some(vec![Sign])),
            (Mechanism::GenericSecretKeyGen, Some(vec![Generate])),
            (Mechanism::RsaPkcsKeyPairGen, Some(vec![GenerateKeyPair])),
            (Mechanism::RsaPkcsOaep, Some(vec![Encrypt, Unwrap])),
        ]);
        let lacks = demo().lacks(&table);
        let text: Vec<String> = lacks.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "token lacks CKM_DES3_ECB_ENCRYPT_DATA (derive), needed by imk-dcvv \
                 (programme demo), imk-tdcvv2 (programme demo)",
                "token lacks CKM_SHA256_HMAC (verify; listed without CKF_VERIFY), needed by \
                 audit-seal (audit.seal_key)",
                "token lacks CKM_DES2_KEY_GEN (generate), needed by keys generate of cvk \
                 (programme demo), imk-dcvv (programme demo), imk-tdcvv2 (programme demo)",
                "token lacks CKM_DES3_ECB_ENCRYPT_DATA (derive), needed by keys generate of \
                 cvk (programme demo)",
            ]
        );
        assert_eq!(
            lacks.iter().map(Lack::stops_serving).collect::<Vec<_>>(),
            [true, true, false, false]
        );
    }

    #[test]
    fn wrapped_import_lacks_never_stop_serving() {
        let mut table = softhsm_like();
        table
            .0
            .retain(|(m, _)| !matches!(m, Mechanism::RsaPkcsOaep | Mechanism::RsaPkcsKeyPairGen));
        let lacks = demo().lacks(&table);
        assert_eq!(lacks.len(), 2);
        assert!(lacks.iter().all(|l| !l.stops_serving()));
        assert_eq!(
            lacks[1].to_string(),
            "token lacks CKM_RSA_PKCS_OAEP (unwrap), needed for wrapped key import"
        );
    }

    #[test]
    fn flags_are_read_from_the_mechanism_info_bits() {
        let info = MechanismInfo::from(cryptoki_sys::CK_MECHANISM_INFO {
            ulMinKeySize: 16,
            ulMaxKeySize: 24,
            flags: cryptoki_sys::CKF_DERIVE | cryptoki_sys::CKF_ENCRYPT | cryptoki_sys::CKF_HW,
        });
        assert_eq!(MechanismTable::flags_of(&info), [Encrypt, Derive]);
    }

    #[test]
    fn flags_have_their_pkcs11_names() {
        let names: Vec<&str> = MechanismFlag::ALL.iter().map(|f| f.ckf_name()).collect();
        assert_eq!(
            names,
            [
                "CKF_ENCRYPT",
                "CKF_DECRYPT",
                "CKF_SIGN",
                "CKF_VERIFY",
                "CKF_GENERATE",
                "CKF_GENERATE_KEY_PAIR",
                "CKF_WRAP",
                "CKF_UNWRAP",
                "CKF_DERIVE",
            ]
        );
    }
}
