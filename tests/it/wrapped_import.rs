//! Keys imported wrapped under the token's RSA key (issue 11), on a real SoftHSM
//! token. The test plays the sending party with RustCrypto's `rsa`: it parses the
//! exported PEM, wraps a random double-length DES key with RSA-OAEP and states its
//! KCV, computed with `des` (`support::reference`). What SoftHSM 2.6 accepts of
//! OAEP is pinned here too (docs/operations/wrapped-key-import.md).

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::{Mechanism as CkMechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use dcvv_gateway::domain::{Engine, Pan, Tdcvv2Profile};
use dcvv_gateway::hsm::{HsmError, Kcv, KeyInputError, KeyKind, KeyLabel, OaepHash, WrappingKey};
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPublicKey};

use crate::support::{self, HSM, reference};

/// A random double-length DES key, as the sender's HSM would hold it.
fn random_key() -> [u8; 16] {
    hex::decode(support::random_hex(16))
        .unwrap()
        .try_into()
        .unwrap()
}

fn kcv(key: &[u8; 16]) -> Kcv {
    Kcv(reference::kcv(key))
}

/// The sender: parses the PEM it was sent and wraps `key` with RSA-OAEP.
fn wrap(pem: &str, key: &[u8; 16], hash: OaepHash) -> Vec<u8> {
    oaep_encrypt(pem, key, hash)
}

/// RSA-OAEP encryption of any `value` under the PEM public key.
fn oaep_encrypt(pem: &str, value: &[u8], hash: OaepHash) -> Vec<u8> {
    let public = RsaPublicKey::from_public_key_pem(pem).unwrap();
    let padding = match hash {
        OaepHash::Sha256 => Oaep::new::<sha2::Sha256>(),
        OaepHash::Sha1 => Oaep::new::<sha1::Sha1>(),
    };
    public
        .encrypt(&mut rsa::rand_core::OsRng, padding, value)
        .unwrap()
}

/// The SoftHSM library's version, from a second context in this process.
fn library_version() -> (u8, u8) {
    let _ = &*support::TOKEN;
    let ctx = Pkcs11::new(support::module()).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("{e}"),
    }
    let version = ctx.get_library_info().unwrap().library_version();
    (version.major(), version.minor())
}

/// The OAEP hash this token accepts: SHA-1 on SoftHSM 2.6 (see
/// `softhsm_2_6_accepts_oaep_with_sha1_only`), SHA-256 on a later one.
fn accepted_hash() -> OaepHash {
    if library_version() <= (2, 6) {
        OaepHash::Sha1
    } else {
        OaepHash::Sha256
    }
}

fn wrapping_key(prefix: &str) -> WrappingKey {
    HSM.generate_wrapping_key(&support::unique_label(prefix))
        .unwrap()
}

/// Every token object (of any class) with `label`, seen from a session of our own.
fn objects_labelled(label: &str) -> usize {
    support::raw_session()
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap()
        .len()
}

fn listed(label: &KeyLabel) -> bool {
    HSM.list_keys()
        .unwrap()
        .iter()
        .any(|k| k.label == label.as_str())
}

#[test]
fn a_wrapped_imk_is_imported_within_policy_and_computes_like_its_clear_value() {
    let wrapping = wrapping_key("wrap");
    let public = RsaPublicKey::from_public_key_pem(&wrapping.public_key_pem).unwrap();
    assert_eq!(public.n().bits(), 3072);
    assert_eq!(public.e().to_bytes_be(), [0x01, 0x00, 0x01]);
    assert_eq!(wrapping.modulus_bits, 3072);
    // Exported again, the public key is the same.
    assert_eq!(
        HSM.wrapping_key(&wrapping.label).unwrap().public_key_pem,
        wrapping.public_key_pem
    );

    let key = random_key();
    let hash = accepted_hash();
    let label = support::unique_label("imk-tdcvv2-wrapped");
    let created = HSM
        .import_wrapped_key(
            KeyKind::ImkTdcvv2,
            &label,
            &wrapping.label,
            &wrap(&wrapping.public_key_pem, &key, hash),
            kcv(&key),
            hash,
        )
        .unwrap();
    assert_eq!(created.kcv, kcv(&key));
    assert_eq!(created.kind, KeyKind::ImkTdcvv2);

    let keys = HSM.list_keys().unwrap();
    let listing = keys.iter().find(|k| k.label == label.as_str()).unwrap();
    assert_eq!(listing.kind, KeyKind::ImkTdcvv2);
    assert_eq!(listing.kcv, Some(kcv(&key)));
    assert_eq!(listing.violations, Vec::<String>::new());
    assert!(listing.attributes.sensitive && !listing.attributes.extractable);
    assert!(!listing.attributes.modifiable && listing.attributes.usage.derive);
    assert_eq!(HSM.load_key(&label, KeyKind::ImkTdcvv2).unwrap(), kcv(&key));

    // The engine's codes under the imported key are the reference's under the clear key.
    let engine = Engine::new(&**HSM);
    let pan: Pan = "4123456789012345".parse().unwrap();
    let profile = Tdcvv2Profile::new(300, 1, 0).unwrap();
    let now = 1_767_225_600;
    let (values, used) = engine
        .tdcvv2_generate(&label, &pan, "2812".parse().unwrap(), profile, now, 3)
        .unwrap();
    assert_eq!(used, kcv(&key));
    for value in &values {
        assert_eq!(
            value.code.expose(),
            reference::tdcvv2(&key, "4123456789012345", "2812", value.window).1
        );
    }
}

#[test]
fn softhsm_2_6_accepts_oaep_with_sha1_only() {
    let wrapping = wrapping_key("wrap");
    let key = random_key();
    let label = support::unique_label("imk-ac-sha256");
    let outcome = HSM.import_wrapped_key(
        KeyKind::ImkAc,
        &label,
        &wrapping.label,
        &wrap(&wrapping.public_key_pem, &key, OaepHash::Sha256),
        kcv(&key),
        OaepHash::Sha256,
    );
    if library_version() <= (2, 6) {
        let err = outcome.unwrap_err();
        assert!(
            matches!(
                err,
                HsmError::InvalidInput(KeyInputError::OaepRefused(OaepHash::Sha256))
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "the token does not accept RSA-OAEP with sha256 (SoftHSM 2.6 accepts only sha1, \
             --oaep-hash sha1); nothing created"
        );
        assert_eq!(objects_labelled(label.as_str()), 0);
    } else {
        assert_eq!(outcome.unwrap().kcv, kcv(&key));
    }
    // SHA-1 is accepted (also by later SoftHSM versions).
    let label = support::unique_label("imk-ac-sha1");
    let created = HSM
        .import_wrapped_key(
            KeyKind::ImkAc,
            &label,
            &wrapping.label,
            &wrap(&wrapping.public_key_pem, &key, OaepHash::Sha1),
            kcv(&key),
            OaepHash::Sha1,
        )
        .unwrap();
    assert_eq!(created.kcv, kcv(&key));
}

/// A limitation of SoftHSM 2.6, pinned so the docs stay true: it takes a 24-byte
/// value for a DES2 key, uses it as three-key TDES and reports no length, so a
/// three-key key stated with its own KCV is imported. (A 24-byte K1‖K2‖K1 is the
/// DES2 key K1‖K2 and is right to accept.) Hardware tokens refuse the length.
#[test]
fn softhsm_2_6_takes_a_three_key_value_for_a_des2_key() {
    let wrapping = wrapping_key("wrap");
    let hash = accepted_hash();
    let three_key: [u8; 24] = hex::decode(support::random_hex(24))
        .unwrap()
        .try_into()
        .unwrap();
    let three_key_kcv = {
        use des::cipher::{BlockEncrypt, KeyInit};
        let mut block = [0u8; 8].into();
        des::TdesEde3::new_from_slice(&three_key)
            .unwrap()
            .encrypt_block(&mut block);
        Kcv([block[0], block[1], block[2]])
    };
    let label = support::unique_label("imk-dcvv-three-key");
    let outcome = HSM.import_wrapped_key(
        KeyKind::ImkDcvv,
        &label,
        &wrapping.label,
        &oaep_encrypt(&wrapping.public_key_pem, &three_key, hash),
        three_key_kcv,
        hash,
    );
    if library_version() <= (2, 6) {
        assert_eq!(outcome.unwrap().kcv, three_key_kcv);
    } else {
        assert!(outcome.is_err() || outcome.is_ok_and(|k| k.kcv == three_key_kcv));
    }

    // K1‖K2‖K1 is the DES2 key K1‖K2, with its KCV.
    let key = random_key();
    let expanded = [&key[..], &key[..8]].concat();
    let label = support::unique_label("imk-dcvv-expanded");
    let created = HSM
        .import_wrapped_key(
            KeyKind::ImkDcvv,
            &label,
            &wrapping.label,
            &oaep_encrypt(&wrapping.public_key_pem, &expanded, hash),
            kcv(&key),
            hash,
        )
        .unwrap();
    assert_eq!(created.kcv, kcv(&key));
}

#[test]
fn a_wrong_kcv_creates_nothing() {
    let wrapping = wrapping_key("wrap");
    let key = random_key();
    let hash = accepted_hash();
    let label = support::unique_label("imk-dcvv-wrong-kcv");
    let mut stated = kcv(&key);
    stated.0[2] ^= 0x01;
    let session_objects = || {
        support::raw_session()
            .find_objects(&[Attribute::Token(false)])
            .unwrap()
            .len()
    };
    let before = session_objects();
    let err = HSM
        .import_wrapped_key(
            KeyKind::ImkDcvv,
            &label,
            &wrapping.label,
            &wrap(&wrapping.public_key_pem, &key, hash),
            stated,
            hash,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            HsmError::InvalidInput(KeyInputError::WrappedKcvMismatch { stated: s }) if s == stated
        ),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.ends_with("nothing kept"), "{message}");
    // The message names the stated KCV only: not the token's, not the key.
    assert!(!message.contains(&kcv(&key).to_string()), "{message}");
    assert!(!message.contains(&hex::encode_upper(key)), "{message}");
    assert!(!listed(&label));
    assert_eq!(objects_labelled(label.as_str()), 0);
    // The temporary session object that computed the KCV is gone too.
    assert_eq!(session_objects(), before);

    // The label is still free: the right KCV imports under it.
    let created = HSM
        .import_wrapped_key(
            KeyKind::ImkDcvv,
            &label,
            &wrapping.label,
            &wrap(&wrapping.public_key_pem, &key, hash),
            kcv(&key),
            hash,
        )
        .unwrap();
    assert_eq!(created.kcv, kcv(&key));
    assert_eq!(objects_labelled(label.as_str()), 1);
}

#[test]
fn a_damaged_or_misdirected_cryptogram_creates_nothing() {
    let wrapping = wrapping_key("wrap");
    let other = wrapping_key("wrap-other");
    let key = random_key();
    let hash = accepted_hash();
    let label = support::unique_label("imk-cvc3-damaged");
    let import = |cryptogram: &[u8], wrapping: &KeyLabel, hash| {
        HSM.import_wrapped_key(
            KeyKind::ImkCvc3,
            &label,
            wrapping,
            cryptogram,
            kcv(&key),
            hash,
        )
        .unwrap_err()
    };
    let good = wrap(&wrapping.public_key_pem, &key, hash);
    for i in [0, 100, good.len() - 1] {
        let mut damaged = good.clone();
        damaged[i] ^= 0x40;
        let err = import(&damaged, &wrapping.label, hash);
        assert!(
            matches!(err, HsmError::InvalidInput(KeyInputError::UnwrapFailed)),
            "byte {i}: {err}"
        );
        assert_eq!(
            err.to_string(),
            "the token could not unwrap the key (another wrapping key or OAEP hash, \
             or a damaged file); nothing created"
        );
    }
    // Wrapped under another wrapping key.
    let err = import(&good, &other.label, hash);
    assert!(
        matches!(err, HsmError::InvalidInput(KeyInputError::UnwrapFailed)),
        "{err}"
    );
    // Truncated: refused before the token is asked.
    let err = import(&good[..good.len() - 1], &wrapping.label, hash);
    assert_eq!(
        err.to_string(),
        "the wrapped key is 383 bytes; under this wrapping key it must be 384"
    );
    // 24 bytes stated with the KCV of their first 16 as a DES2 key: SoftHSM 2.6
    // uses a 24-byte value as a three-key TDES key, so the KCV check refuses it.
    let long: [u8; 24] = hex::decode(support::random_hex(24))
        .unwrap()
        .try_into()
        .unwrap();
    let first_16: [u8; 16] = long[..16].try_into().unwrap();
    let err = HSM
        .import_wrapped_key(
            KeyKind::ImkCvc3,
            &label,
            &wrapping.label,
            &oaep_encrypt(&wrapping.public_key_pem, &long, hash),
            kcv(&first_16),
            hash,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            HsmError::InvalidInput(KeyInputError::WrappedKcvMismatch { .. })
        ),
        "{err}"
    );
    assert!(!listed(&label));
    assert_eq!(objects_labelled(label.as_str()), 0);
}

#[test]
fn the_wrapping_key_can_only_unwrap() {
    let wrapping = wrapping_key("wrap");
    let session = support::raw_session();
    let half = |class| {
        let found = session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::Label(wrapping.label.as_str().as_bytes().to_vec()),
            ])
            .unwrap();
        assert_eq!(found.len(), 1, "{class:?}");
        found[0]
    };
    let private = half(ObjectClass::PRIVATE_KEY);
    let public = half(ObjectClass::PUBLIC_KEY);
    let read = |handle, types: &[AttributeType]| session.get_attributes(handle, types).unwrap();

    let attrs = read(
        private,
        &[
            AttributeType::Token,
            AttributeType::Private,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::Modifiable,
            AttributeType::Unwrap,
            AttributeType::Decrypt,
            AttributeType::Sign,
            AttributeType::SignRecover,
            AttributeType::Derive,
            AttributeType::AllowedMechanisms,
            AttributeType::Id,
        ],
    );
    for expected in [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Unwrap(true),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::SignRecover(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::RSA_PKCS_OAEP]),
        Attribute::Id(b"dcvvgw:wrapping-key".to_vec()),
    ] {
        assert!(
            attrs.contains(&expected),
            "private key: {expected:?} in {attrs:?}"
        );
    }
    let attrs = read(
        public,
        &[
            AttributeType::Token,
            AttributeType::Encrypt,
            AttributeType::Wrap,
            AttributeType::Verify,
            AttributeType::Derive,
            AttributeType::AllowedMechanisms,
        ],
    );
    for expected in [
        Attribute::Token(true),
        Attribute::Encrypt(true),
        Attribute::Wrap(true),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::RSA_PKCS_OAEP]),
    ] {
        assert!(
            attrs.contains(&expected),
            "public key: {expected:?} in {attrs:?}"
        );
    }

    // Even the PIN holder cannot decrypt a cryptogram with it, nor read it.
    let key = random_key();
    let cryptogram = wrap(&wrapping.public_key_pem, &key, OaepHash::Sha1);
    let oaep = CkMechanism::RsaPkcsOaep(cryptoki::mechanism::rsa::PkcsOaepParams::new(
        MechanismType::SHA1,
        cryptoki::mechanism::rsa::PkcsMgfType::MGF1_SHA1,
        cryptoki::mechanism::rsa::PkcsOaepSource::empty(),
    ));
    let decrypted = session.decrypt(&oaep, private, &cryptogram);
    assert!(
        matches!(
            decrypted,
            Err(Error::Pkcs11(RvError::KeyFunctionNotPermitted, _))
        ),
        "{decrypted:?}"
    );
    let exponent = session.get_attributes(private, &[AttributeType::PrivateExponent]);
    assert!(
        !matches!(&exponent, Ok(a) if !a.is_empty()),
        "the private exponent is readable: {exponent:?}"
    );
}

#[test]
fn what_cannot_be_imported_wrapped_is_refused_before_the_token_is_asked() {
    let wrapping = wrapping_key("wrap");
    let key = random_key();
    let hash = accepted_hash();
    let cryptogram = wrap(&wrapping.public_key_pem, &key, hash);
    let import = |kind, label: &KeyLabel, wrapping: &KeyLabel| {
        HSM.import_wrapped_key(kind, label, wrapping, &cryptogram, kcv(&key), hash)
    };
    // A CVK needs a KA||KA twin that cannot be made without the clear key.
    let cvk = support::unique_label("cvk-wrapped");
    let err = import(KeyKind::Cvk, &cvk, &wrapping.label).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("a cvk key cannot be imported wrapped: its KA||KA object"),
        "{err}"
    );
    for kind in [KeyKind::PanIndex, KeyKind::AuditSeal] {
        let err = import(kind, &support::unique_label("hmac"), &wrapping.label).unwrap_err();
        assert!(
            matches!(
                err,
                HsmError::InvalidInput(KeyInputError::NotWrappable { .. })
            ),
            "{err}"
        );
    }
    assert_eq!(objects_labelled(cvk.as_str()), 0);
    assert_eq!(objects_labelled(&cvk.single_des_twin()), 0);

    // A taken label, and a wrapping key that does not exist.
    let taken = support::import(
        "0123456789ABCDEFFEDCBA9876543210",
        KeyKind::ImkDcvv,
        "imk-taken",
    );
    let err = import(KeyKind::ImkDcvv, &taken, &wrapping.label).unwrap_err();
    assert!(matches!(err, HsmError::LabelExists { .. }), "{err}");
    assert_eq!(objects_labelled(taken.as_str()), 1);
    let label = support::unique_label("imk-no-wrapping-key");
    let missing: KeyLabel = "no-such-wrapping-key".parse().unwrap();
    let err = import(KeyKind::ImkDcvv, &label, &missing).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no wrapping key with label no-such-wrapping-key"
    );
    // A secret key's label does not name a wrapping key.
    let err = import(KeyKind::ImkDcvv, &label, &taken).unwrap_err();
    assert!(
        matches!(err, HsmError::InvalidInput(KeyInputError::NoWrappingKey(_))),
        "{err}"
    );
    assert_eq!(objects_labelled(label.as_str()), 0);

    // A wrapping key's label is taken once.
    let err = HSM.generate_wrapping_key(&wrapping.label).unwrap_err();
    assert!(matches!(err, HsmError::LabelExists { .. }), "{err}");
    assert_eq!(objects_labelled(wrapping.label.as_str()), 2);
}

#[test]
fn the_cli_exports_a_pem_and_imports_a_hex_cryptogram() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::config_file(dir.path());
    let pem_path = dir.path().join("wrapping.pem");
    let wrapping = support::unique_label("wrap-cli");
    let (ok, stdout, stderr) = support::gateway(
        &config,
        &[
            "keys",
            "wrapping-key",
            "--label",
            wrapping.as_str(),
            "--out",
            pem_path.to_str().unwrap(),
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout,
        format!(
            "wrapping key {wrapping} (RSA-3072) created; public key written to {}\n",
            pem_path.display()
        )
    );
    let pem = std::fs::read_to_string(&pem_path).unwrap();
    // The file is never overwritten, and the label is not generated twice.
    let (ok, _, stderr) = support::gateway(
        &config,
        &[
            "keys",
            "wrapping-key",
            "--label",
            "another-wrap",
            "--out",
            pem_path.to_str().unwrap(),
        ],
    );
    assert!(!ok && stderr.contains("already exists"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&pem_path).unwrap(), pem);
    // Exported again to stdout, it is the same key.
    let (ok, stdout, stderr) = support::gateway(
        &config,
        &[
            "keys",
            "wrapping-key",
            "--label",
            wrapping.as_str(),
            "--export",
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(stdout, pem);

    let key = random_key();
    let hash = accepted_hash();
    let wrapped_path = dir.path().join("wrapped.hex");
    let cryptogram = hex::encode_upper(wrap(&pem, &key, hash));
    std::fs::write(
        &wrapped_path,
        format!("{}\n{}\n", &cryptogram[..300], &cryptogram[300..]),
    )
    .unwrap();
    let label = support::unique_label("imk-dcvv-cli");
    let stated = kcv(&key).to_string();
    let run = |kcv: &str| {
        support::gateway(
            &config,
            &[
                "keys",
                "import-wrapped",
                "--kind",
                "imk-dcvv",
                "--label",
                label.as_str(),
                "--wrapping-key",
                wrapping.as_str(),
                "--wrapped-file",
                wrapped_path.to_str().unwrap(),
                "--kcv",
                kcv,
                "--oaep-hash",
                hash.as_str(),
            ],
        )
    };
    let (ok, stdout, stderr) = run("ZZZZZZ");
    assert!(!ok);
    assert_eq!(stderr.trim_end(), "error: a KCV is 6 hex digits");
    assert!(stdout.is_empty(), "{stdout}");

    let (ok, stdout, stderr) = run(&stated.to_lowercase());
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout,
        format!("imk-dcvv key {label} (version 1) created, KCV {stated} (computed in the token)\n")
    );
    for text in [&stdout, &stderr] {
        assert!(!text.contains(&hex::encode_upper(key)) && !text.contains(&hex::encode(key)));
    }
    let (ok, stdout, _) = support::gateway(&config, &["keys", "list", "--json"]);
    assert!(ok);
    let keys: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let listed = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["label"] == label.as_str())
        .unwrap();
    assert_eq!(listed["kind"], "imk-dcvv");
    assert_eq!(listed["kcv"], stated);
    assert_eq!(listed["violations"], serde_json::json!([]));
    // The wrapping key is no gateway secret key: it is not listed.
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .all(|k| k["label"] != wrapping.as_str())
    );
    let (ok, _, stderr) = run(&stated);
    assert!(!ok);
    assert_eq!(
        stderr.trim_end(),
        format!("error: a key with label {label} already exists")
    );
}
