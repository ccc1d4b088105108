//! What the token can do (issue 11, item 4) against a real SoftHSM token: the
//! mechanism table read from it has every mechanism the gateway uses with the
//! flags it needs, a flag SoftHSM does not set is named as lacking, and `hsm
//! check` on the demo configuration prints what the token has and exits 0.
//!
//! No test token lacks a mechanism the gateway needs (SoftHSM 2.6 has them all),
//! so the refusal of `serve` is tested on fake tables beside the code
//! (`gateway::tests`, `hsm::capability::tests`).

use dcvv_gateway::hsm::{
    KeyKind, KeyUse, Mechanism, MechanismFlag, MechanismTable, Need, Needs, Purpose,
};

use crate::support;

const ALL: [Mechanism; 8] = [
    Mechanism::Des3Ecb,
    Mechanism::Des3EcbEncryptData,
    Mechanism::Sha256Hmac,
    Mechanism::Des3Cbc,
    Mechanism::Des2KeyGen,
    Mechanism::GenericSecretKeyGen,
    Mechanism::RsaPkcsKeyPairGen,
    Mechanism::RsaPkcsOaep,
];

fn softhsm_table() -> MechanismTable {
    support::HSM.mechanism_table(&ALL).unwrap()
}

#[test]
fn softhsm_reports_every_mechanism_the_gateway_uses_with_its_flags() {
    use MechanismFlag::{Derive, Encrypt, Generate, GenerateKeyPair, Sign, Unwrap, Verify};
    let table = softhsm_table();
    for (mechanism, needed, absent) in [
        (Mechanism::Des3Ecb, &[Encrypt][..], &[Derive, Sign][..]),
        (Mechanism::Des3EcbEncryptData, &[Derive], &[Encrypt, Sign]),
        (Mechanism::Sha256Hmac, &[Sign, Verify], &[Encrypt, Derive]),
        (Mechanism::Des3Cbc, &[Encrypt], &[Derive, Sign]),
        (Mechanism::Des2KeyGen, &[Generate], &[Encrypt, Derive]),
        (
            Mechanism::GenericSecretKeyGen,
            &[Generate],
            &[Encrypt, Sign],
        ),
        (
            Mechanism::RsaPkcsKeyPairGen,
            &[GenerateKeyPair],
            &[Generate, Unwrap],
        ),
        (Mechanism::RsaPkcsOaep, &[Unwrap], &[Derive, Sign]),
    ] {
        let flags = table
            .flags(mechanism)
            .unwrap_or_else(|| panic!("SoftHSM lacks {mechanism}"));
        for f in needed {
            assert!(flags.contains(f), "{mechanism} without {}", f.ckf_name());
        }
        for f in absent {
            assert!(!flags.contains(f), "{mechanism} with {}", f.ckf_name());
        }
    }
    // Every kind at once: SoftHSM lacks nothing any of them needs.
    let every_kind = Needs::of(KeyKind::ALL.map(|kind| KeyUse {
        kind,
        used_by: "test".into(),
    }));
    let table = support::HSM
        .mechanism_table(&every_kind.mechanisms())
        .unwrap();
    assert_eq!(every_kind.lacks(&table), []);
}

#[test]
fn a_flag_the_token_does_not_set_is_named_as_lacking() {
    let table = softhsm_table();
    let need = |mechanism, flag| Need {
        mechanism,
        flag,
        purpose: Purpose::Serve,
        users: vec![KeyUse {
            kind: KeyKind::ImkDcvv,
            used_by: "programme visa-credit".into(),
        }],
    };
    let lack = need(Mechanism::Sha256Hmac, MechanismFlag::Derive)
        .lack(&table)
        .expect("SoftHSM cannot derive with CKM_SHA256_HMAC");
    assert!(lack.listed && lack.stops_serving());
    assert_eq!(
        lack.to_string(),
        "token lacks CKM_SHA256_HMAC (derive; listed without CKF_DERIVE), needed by \
         imk-dcvv (programme visa-credit)"
    );
    assert_eq!(
        need(Mechanism::Des3EcbEncryptData, MechanismFlag::Derive).lack(&table),
        None
    );
}

/// The demo configuration's lines, in order (hsm-config/gateway.toml's programme).
const DEMO_LINES: [&str; 9] = [
    "token has CKM_DES3_ECB (encrypt), needed by cvk (programme demo), imk-dcvv (programme demo), imk-tdcvv2 (programme demo)",
    "token has CKM_DES3_ECB_ENCRYPT_DATA (derive), needed by imk-dcvv (programme demo), imk-tdcvv2 (programme demo)",
    "token has CKM_SHA256_HMAC (sign), needed by pan-index (keys.pan_index), audit-seal (audit.seal_key)",
    "token has CKM_SHA256_HMAC (verify), needed by audit-seal (audit.seal_key)",
    "token has CKM_DES2_KEY_GEN (generate), needed by keys generate of cvk (programme demo), imk-dcvv (programme demo), imk-tdcvv2 (programme demo)",
    "token has CKM_DES3_ECB_ENCRYPT_DATA (derive), needed by keys generate of cvk (programme demo)",
    "token has CKM_GENERIC_SECRET_KEY_GEN (generate), needed by keys generate of pan-index (keys.pan_index), audit-seal (audit.seal_key)",
    "token has CKM_RSA_PKCS_KEY_PAIR_GEN (generate key pair), needed for wrapped key import",
    "token has CKM_RSA_PKCS_OAEP (unwrap), needed for wrapped key import",
];

#[test]
fn hsm_check_passes_on_softhsm_for_the_demo_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::config_file(dir.path());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "[[programmes]]\nname = \"demo\"\nbin_prefixes = [\"412345\"]\n\
         key_association = \"DEMO\"\ncvk = \"cvk-demo-v1\"\n\
         imk_dcvv = \"imk-dcvv-demo-v1\"\nimk_tdcvv2 = \"imk-tdcvv2-demo-v1\"\n\
         window_seconds = 300\n",
    );
    std::fs::write(&config, text).unwrap();
    let (ok, stdout, stderr) = support::gateway(&config, &["hsm", "check"]);
    assert!(ok, "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().take(DEMO_LINES.len()).collect();
    assert_eq!(lines, DEMO_LINES, "{stdout}");
    assert!(!stdout.contains("token lacks"), "{stdout}");
    assert!(stdout.trim_end().ends_with("all within policy"), "{stdout}");
}
