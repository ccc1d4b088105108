//! A certificate authority for mutual-TLS tests, made with rcgen: a CA that
//! signs client certificates (`clientAuth`), each for a new key, written as PEM
//! where a gateway or a client needs a file.

use std::path::{Path, PathBuf};

use dcvv_gateway::http::client_cert::SpkiSha256;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use sha2::{Digest, Sha256};

/// A CA that can sign client certificates.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name = subject(&[(DnType::CommonName, name)]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A client certificate (clientAuth) with this subject, for a new key.
    pub fn client(&self, name: &[(DnType, &str)]) -> Identity {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name = subject(name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Identity { cert, key }
    }

    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.cert.pem()).unwrap();
        path.to_owned()
    }
}

pub fn subject(attributes: &[(DnType, &str)]) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    for (kind, value) in attributes {
        name.push(kind.clone(), *value);
    }
    name
}

/// A client certificate and its key.
pub struct Identity {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl Identity {
    /// Its SPKI pin, computed here from the key as the openssl pipeline of
    /// docs/operations/configuration.md does.
    pub fn spki_pin(&self) -> SpkiSha256 {
        let hash = Sha256::digest(self.key.public_key_der());
        SpkiSha256::parse(&hex::encode(hash)).unwrap()
    }
}

impl Identity {
    /// Writes the certificate and the key as PEM files `<name>.pem` and
    /// `<name>.key` in `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, self.cert.pem()).unwrap();
        std::fs::write(&key, self.key.serialize_pem()).unwrap();
        (cert, key)
    }
}
