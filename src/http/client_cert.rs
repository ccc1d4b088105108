//! The TLS client certificate as the signature layer sees it (mutual TLS,
//! issue 12): what a connection's client presented, reduced once per
//! connection to the two things a client may be pinned to, and the pins a
//! `[[clients]]` entry carries.
//!
//! - **Subject.** Compared in one canonical form: the RFC 4514 string of the
//!   certificate's subject, most specific attribute first, attribute names in
//!   upper case (`CN=cms-demo,O=Example Issuer,C=ES`), the form
//!   `openssl x509 -noout -subject -nameopt RFC2253` prints. A configured
//!   subject is parsed and rendered the same way at load, so `cn=` and `CN=`
//!   are one name; values compare exactly (case and spaces count).
//! - **SPKI hash.** SHA-256 of the certificate's DER `SubjectPublicKeyInfo`,
//!   the HPKP-style pin, written as Base64 (44 characters) or hex (64 digits).
//!
//! Whether the certificate chains to the configured CA is rustls's
//! ([`super::tls`]); this module only reads a certificate rustls has already
//! accepted. Nothing here is secret, but nothing here logs either: the
//! signature layer says only that a client's certificate did not match.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};
use x509_cert::der::{Decode, Encode};

/// A subject distinguished name in the canonical form of the module
/// documentation.
#[derive(Clone, PartialEq, Eq)]
pub struct Subject(String);

impl Subject {
    /// Parses an RFC 4514 string (`CN=cms-demo,O=Example Issuer`) into the
    /// canonical form.
    ///
    /// # Errors
    /// [`PinError::Subject`] when the text is empty or not an RFC 4514 name.
    pub fn parse(text: &str) -> Result<Subject, PinError> {
        let name = x509_cert::name::Name::from_str(text).map_err(|_| PinError::Subject)?;
        if name.is_empty() {
            return Err(PinError::Subject);
        }
        Ok(Subject(name.to_string()))
    }

    /// The canonical string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Subject({})", self.0)
    }
}

/// SHA-256 of a DER `SubjectPublicKeyInfo`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SpkiSha256([u8; 32]);

impl SpkiSha256 {
    /// The hash of `spki_der`.
    pub fn of(spki_der: &[u8]) -> SpkiSha256 {
        SpkiSha256(Sha256::digest(spki_der).into())
    }

    /// Parses a pin: 64 hex digits, or the Base64 of the 32 bytes (44
    /// characters, padded, as `openssl ... | base64` prints it).
    ///
    /// # Errors
    /// [`PinError::Spki`] for anything else.
    pub fn parse(text: &str) -> Result<SpkiSha256, PinError> {
        let bytes = if text.len() == 64 {
            hex::decode(text).map_err(|_| PinError::Spki)?
        } else {
            BASE64.decode(text).map_err(|_| PinError::Spki)?
        };
        <[u8; 32]>::try_from(bytes.as_slice())
            .map(SpkiSha256)
            .map_err(|_| PinError::Spki)
    }
}

impl fmt::Debug for SpkiSha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpkiSha256({})", BASE64.encode(self.0))
    }
}

/// Why a configured pin was refused; never carries more than its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// Not an RFC 4514 distinguished name.
    #[error(
        "not an RFC 4514 distinguished name, most specific attribute first and no spaces \
         around ',' or '=' (e.g. \"CN=cms-demo,O=Example Issuer\"; \
         openssl x509 -noout -subject -nameopt RFC2253 prints it)"
    )]
    Subject,
    /// Not a SHA-256 in Base64 or hex.
    #[error(
        "not a SHA-256 of a SubjectPublicKeyInfo: 44 Base64 characters or 64 hex digits \
         (docs/operations/configuration.md shows the openssl command)"
    )]
    Spki,
}

/// The certificate a connection's client presented, read once per
/// connection and attached to each of its requests.
#[derive(Clone, Debug)]
pub struct ClientCertificate(Arc<Presented>);

#[derive(Debug)]
struct Presented {
    subject: Subject,
    spki: SpkiSha256,
}

impl ClientCertificate {
    /// Reads the end-entity certificate (DER) rustls accepted; `None` if it
    /// cannot be parsed as X.509 (then no pinned client can use the connection).
    pub fn from_der(der: &[u8]) -> Option<ClientCertificate> {
        let cert = x509_cert::Certificate::from_der(der).ok()?;
        let tbs = &cert.tbs_certificate;
        let spki = tbs.subject_public_key_info.to_der().ok()?;
        Some(ClientCertificate(Arc::new(Presented {
            subject: Subject(tbs.subject.to_string()),
            spki: SpkiSha256::of(&spki),
        })))
    }

    /// Its subject, canonical.
    pub fn subject(&self) -> &Subject {
        &self.0.subject
    }

    /// The SHA-256 of its `SubjectPublicKeyInfo`.
    pub fn spki_sha256(&self) -> SpkiSha256 {
        self.0.spki
    }
}

/// What a client's certificate must be, beyond chaining to the CA: its
/// subject, one of its SPKI hashes (two during a key rotation), or both.
/// Empty: any certificate the CA vouches for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertificatePins {
    /// The subject it must have.
    pub subject: Option<Subject>,
    /// SPKI hashes of which it must have one.
    pub spki_sha256: Vec<SpkiSha256>,
}

impl CertificatePins {
    /// Whether no pin is set.
    pub fn is_empty(&self) -> bool {
        self.subject.is_none() && self.spki_sha256.is_empty()
    }

    /// Whether a request on a connection that presented `presented` may be
    /// this client's: always without pins; otherwise a certificate that meets
    /// every pin set.
    pub fn accept(&self, presented: Option<&ClientCertificate>) -> bool {
        if self.is_empty() {
            return true;
        }
        let Some(cert) = presented else {
            return false;
        };
        let subject = self.subject.as_ref().is_none_or(|s| s == cert.subject());
        let spki = self.spki_sha256.is_empty() || self.spki_sha256.contains(&cert.spki_sha256());
        subject && spki
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(subject: &[(rcgen::DnType, &str)], key: &rcgen::KeyPair) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["client.example".into()]).unwrap();
        let mut name = rcgen::DistinguishedName::new();
        for (kind, value) in subject {
            name.push(kind.clone(), *value);
        }
        params.distinguished_name = name;
        params.self_signed(key).unwrap().der().to_vec()
    }

    #[test]
    fn the_subject_is_rendered_most_specific_first_and_parsed_alike() {
        let key = rcgen::KeyPair::generate().unwrap();
        let der = certificate(
            &[
                (rcgen::DnType::CountryName, "ES"),
                (rcgen::DnType::OrganizationName, "Example Issuer"),
                (rcgen::DnType::CommonName, "cms-demo"),
            ],
            &key,
        );
        let cert = ClientCertificate::from_der(&der).unwrap();
        assert_eq!(cert.subject().as_str(), "CN=cms-demo,O=Example Issuer,C=ES");
        for written in [
            "CN=cms-demo,O=Example Issuer,C=ES",
            "cn=cms-demo,o=Example Issuer,c=ES",
            "commonName=cms-demo,organizationName=Example Issuer,countryName=ES",
            "2.5.4.3=cms-demo,O=Example Issuer,C=ES",
        ] {
            assert_eq!(
                &Subject::parse(written).unwrap(),
                cert.subject(),
                "{written}"
            );
        }
        for other in [
            "CN=cms-demo,O=Example Issuer",
            "O=Example Issuer,CN=cms-demo,C=ES",
            "CN=CMS-demo,O=Example Issuer,C=ES",
        ] {
            assert_ne!(&Subject::parse(other).unwrap(), cert.subject(), "{other}");
        }
        // Escaped separators survive the round trip.
        let der = certificate(&[(rcgen::DnType::CommonName, "Doe, John")], &key);
        let cert = ClientCertificate::from_der(&der).unwrap();
        assert_eq!(cert.subject().as_str(), "CN=Doe\\, John");
        assert_eq!(&Subject::parse("CN=Doe\\, John").unwrap(), cert.subject());
    }

    #[test]
    fn bad_subjects_are_refused() {
        for bad in ["", "cms-demo", "CN=cms-demo, O=Example Issuer", "XX=1"] {
            assert_eq!(Subject::parse(bad), Err(PinError::Subject), "{bad:?}");
        }
    }

    #[test]
    fn the_spki_hash_is_that_of_the_public_key_info_in_base64_or_hex() {
        let key = rcgen::KeyPair::generate().unwrap();
        let der = certificate(&[(rcgen::DnType::CommonName, "cms-demo")], &key);
        let cert = ClientCertificate::from_der(&der).unwrap();
        let expected: [u8; 32] = Sha256::digest(key.public_key_der()).into();
        assert_eq!(cert.spki_sha256(), SpkiSha256(expected));
        assert_eq!(
            SpkiSha256::parse(&BASE64.encode(expected)),
            Ok(SpkiSha256(expected))
        );
        assert_eq!(
            SpkiSha256::parse(&hex::encode(expected)),
            Ok(SpkiSha256(expected))
        );
        assert_eq!(
            SpkiSha256::parse(&hex::encode_upper(expected)),
            Ok(SpkiSha256(expected))
        );
        for bad in [
            "",
            "not base64!",
            &BASE64.encode([0u8; 20]),
            &hex::encode([0u8; 31]),
            &"g".repeat(64),
        ] {
            assert_eq!(SpkiSha256::parse(bad), Err(PinError::Spki), "{bad:?}");
        }
    }

    #[test]
    fn pins_accept_only_a_certificate_that_meets_each_of_them() {
        let key = rcgen::KeyPair::generate().unwrap();
        let renewed_key = rcgen::KeyPair::generate().unwrap();
        let subject = [(rcgen::DnType::CommonName, "cms-demo")];
        let cert = ClientCertificate::from_der(&certificate(&subject, &key)).unwrap();
        let renewed = ClientCertificate::from_der(&certificate(&subject, &renewed_key)).unwrap();
        let other = ClientCertificate::from_der(&certificate(
            &[(rcgen::DnType::CommonName, "other")],
            &key,
        ))
        .unwrap();

        let none = CertificatePins::default();
        assert!(none.accept(None) && none.accept(Some(&other)));

        let by_subject = CertificatePins {
            subject: Some(Subject::parse("CN=cms-demo").unwrap()),
            spki_sha256: Vec::new(),
        };
        assert!(by_subject.accept(Some(&cert)) && by_subject.accept(Some(&renewed)));
        assert!(!by_subject.accept(Some(&other)) && !by_subject.accept(None));

        let by_key = CertificatePins {
            subject: None,
            spki_sha256: vec![cert.spki_sha256()],
        };
        assert!(by_key.accept(Some(&cert)) && by_key.accept(Some(&other)));
        assert!(!by_key.accept(Some(&renewed)) && !by_key.accept(None));
        let rotating = CertificatePins {
            spki_sha256: vec![cert.spki_sha256(), renewed.spki_sha256()],
            ..by_key.clone()
        };
        assert!(rotating.accept(Some(&renewed)));

        let both = CertificatePins {
            subject: by_subject.subject.clone(),
            spki_sha256: by_key.spki_sha256.clone(),
        };
        assert!(both.accept(Some(&cert)));
        assert!(!both.accept(Some(&renewed)) && !both.accept(Some(&other)));
    }

    /// Made and read with OpenSSL 3.0: `openssl req -x509 -newkey ec -pkeyopt
    /// ec_paramgen_curve:P-256 -subj "/C=ES/O=Example Issuer/OU=Cards/CN=cms-demo"`.
    const OPENSSL_CERT: &str = "\
-----BEGIN CERTIFICATE-----
MIIB5zCCAY2gAwIBAgIUE2KAu7/Z5/MECYsZ5Kvi6CE5r34wCgYIKoZIzj0EAwIw
STELMAkGA1UEBhMCRVMxFzAVBgNVBAoMDkV4YW1wbGUgSXNzdWVyMQ4wDAYDVQQL
DAVDYXJkczERMA8GA1UEAwwIY21zLWRlbW8wHhcNMjYxMjA0MDE1NzMwWhcNMjYx
MjA2MDE1NzMwWjBJMQswCQYDVQQGEwJFUzEXMBUGA1UECgwORXhhbXBsZSBJc3N1
ZXIxDjAMBgNVBAsMBUNhcmRzMREwDwYDVQQDDAhjbXMtZGVtbzBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABPERIOLXFMwoPr86Qp6d030U1jJrVb2owyTjOkfec/Uv
lSbm38MAmWYuGyxCoK5C2SZay4RLKFHD0RlY2NA+0p2jUzBRMB0GA1UdDgQWBBTj
6Q1g885jhTSICcr95PkYrQoO1DAfBgNVHSMEGDAWgBTj6Q1g885jhTSICcr95PkY
rQoO1DAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIHyGydAGPw5A
gxzlRokLG4SHZ2XNIyb5I7s+doBuluLBAiEAwxZyX143XMcv0waCaoUyu3tuAUSx
LwAjYBJVqzX94Cc=
-----END CERTIFICATE-----
";
    /// `openssl x509 -noout -subject -nameopt RFC2253`, without `subject=`.
    const OPENSSL_SUBJECT: &str = "CN=cms-demo,OU=Cards,O=Example Issuer,C=ES";
    /// `openssl x509 -noout -pubkey | openssl pkey -pubin -outform der |
    /// openssl dgst -sha256 -binary | base64`, and `openssl dgst -sha256` (hex).
    const OPENSSL_SPKI_BASE64: &str = "9d08GGiQlSTJxqG80xSeJy1Yg8cBsF1mf5MtpatzTY0=";
    const OPENSSL_SPKI_HEX: &str =
        "f5dd3c1868909524c9c6a1bcd3149e272d5883c701b05d667f932da5ab734d8d";

    #[test]
    fn what_the_documented_openssl_commands_print_is_what_is_compared() {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(OPENSSL_CERT.as_bytes()).unwrap();
        let cert = ClientCertificate::from_der(&der).unwrap();
        assert_eq!(cert.subject(), &Subject::parse(OPENSSL_SUBJECT).unwrap());
        assert_eq!(cert.subject().as_str(), OPENSSL_SUBJECT);
        assert_eq!(
            cert.spki_sha256(),
            SpkiSha256::parse(OPENSSL_SPKI_BASE64).unwrap()
        );
        assert_eq!(
            cert.spki_sha256(),
            SpkiSha256::parse(OPENSSL_SPKI_HEX).unwrap()
        );
    }

    #[test]
    fn garbage_is_no_certificate() {
        assert!(ClientCertificate::from_der(b"not a certificate").is_none());
    }
}
