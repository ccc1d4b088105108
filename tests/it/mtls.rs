//! Mutual TLS (issue 12, item 1), against a real gateway on a real token:
//! with `[server] client_ca_file`, a connection without a client certificate,
//! or with one of another CA, never gets past the handshake; a client pinned
//! to a subject or an SPKI hash is refused with the bad-signature 401 over
//! another client's certificate, even with its own correct HMAC, and nothing
//! changes; a client without pins takes any certificate of the CA; the HMAC
//! stays required; and a client CA file that cannot be used stops the start,
//! naming it. Every CA and certificate is made here with rcgen.

use std::net::SocketAddr;
use std::sync::Arc;

use dcvv_gateway::domain::service::Clock;
use dcvv_gateway::http::client_cert::{CertificatePins, Subject};
use rcgen::DnType;
use rustls::AlertDescription;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::http::{
    Answer, Options, TestClient, TestGateway, card, fresh_id, self_signed_tls,
};
use crate::support::pki::{Ca, Identity};
use crate::support::routes::{ENQUIRY, ENROL, HEALTHZ, METRICS, VERIFY};

const CMS: &[(DnType, &str)] = &[
    (DnType::OrganizationName, "Test Issuer"),
    (DnType::CommonName, "cms"),
];
const CMS_SUBJECT: &str = "CN=cms,O=Test Issuer";
const OTHER_BANK: &[(DnType, &str)] = &[
    (DnType::OrganizationName, "Other Bank"),
    (DnType::CommonName, "other-bank"),
];

/// A mutual-TLS gateway: the server's self-signed certificate, client CA
/// `ca`, and the given pins.
struct Setup {
    gw: TestGateway,
    server: rcgen::CertifiedKey,
    _dir: tempfile::TempDir,
}

async fn mutual_tls(ca: &Ca, pins: Vec<(String, CertificatePins)>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (server, cert, key) = self_signed_tls(dir.path());
    let gw = TestGateway::start(Options {
        tls: Some((cert, key)),
        client_ca: Some(ca.write(&dir.path().join("client-ca.pem"))),
        pins,
        ..Options::default()
    })
    .await;
    Setup {
        gw,
        server,
        _dir: dir,
    }
}

impl Setup {
    /// An HTTP client that trusts the server and presents `identity`, if any.
    fn http(&self, identity: Option<&Identity>) -> reqwest::Client {
        let root = reqwest::Certificate::from_pem(self.server.cert.pem().as_bytes()).unwrap();
        let mut builder = reqwest::Client::builder().add_root_certificate(root);
        if let Some(id) = identity {
            let pem = format!("{}{}", id.cert.pem(), id.key.serialize_pem());
            builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
        }
        builder.build().unwrap()
    }

    /// A raw TLS connection presenting `identity`, if any, that asks for
    /// `/healthz`: the response's bytes, or the error the connection ended in.
    async fn raw_healthz(&self, identity: Option<&Identity>) -> std::io::Result<Vec<u8>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.server.cert.der().clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some(id) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from(id.cert.der().to_vec())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.serialize_der())),
                )
                .unwrap(),
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let address: SocketAddr = self.gw.url.trim_start_matches("https://").parse().unwrap();
        let tcp = tokio::net::TcpStream::connect(address).await?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        let request =
            format!("GET {HEALTHZ} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tls.read_to_end(&mut response).await?;
        Ok(response)
    }
}

impl Setup {
    /// The body of an unsigned GET of `path`, over `http`.
    async fn send_plain(&self, http: &reqwest::Client, path: &str) -> String {
        let response = http
            .get(format!("{}{path}", self.gw.url))
            .send()
            .await
            .unwrap();
        response.text().await.unwrap()
    }

    /// A POST signed by `client` at the gateway's clock, over `http`.
    async fn send_signed(
        &self,
        http: &reqwest::Client,
        client: &TestClient,
        path: &str,
        body: &serde_json::Value,
    ) -> reqwest::Result<Answer> {
        let bytes = serde_json::to_vec(body).unwrap();
        let headers = self.gw.signed_headers(
            client,
            &fresh_id(),
            self.gw.clock.now_ms(),
            "POST",
            path,
            &bytes,
        );
        let mut request = http.post(format!("{}{path}", self.gw.url)).body(bytes);
        for (k, v) in &headers {
            request = request.header(k.as_str(), v.as_str());
        }
        Ok(Answer::of(request.send().await?).await)
    }
}

/// The TLS alert the server sent, from a connection's error.
fn alert(e: &std::io::Error) -> Option<AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_client_certificate_or_with_one_of_another_ca_the_handshake_is_refused() {
    let ca = Ca::new("Test Issuer Client CA");
    let foreign = Ca::new("Someone Else's CA");
    let s = mutual_tls(&ca, Vec::new()).await;
    let before = s.gw.snapshot().await;

    // No certificate: the server ends the handshake with certificate_required.
    let e = s.raw_healthz(None).await.unwrap_err();
    assert_eq!(
        alert(&e),
        Some(AlertDescription::CertificateRequired),
        "{e}"
    );
    // A certificate of another CA, even with a client's very subject: unknown_ca.
    let stranger = foreign.client(CMS);
    let e = s.raw_healthz(Some(&stranger)).await.unwrap_err();
    assert_eq!(alert(&e), Some(AlertDescription::UnknownCA), "{e}");
    // The control: a certificate of the CA gets its HTTP answer.
    let response = s.raw_healthz(Some(&ca.client(CMS))).await.unwrap();
    assert!(response.starts_with(b"HTTP/1.1 200"), "{response:?}");

    // An HTTP client gets no answer either way, not even to a signed request.
    for identity in [None, Some(&stranger)] {
        let http = s.http(identity);
        let health = http.get(format!("{}{HEALTHZ}", s.gw.url)).send().await;
        assert!(health.is_err(), "{health:?}");
        let signed = s
            .send_signed(&http, &s.gw.clients.main, ENROL, &card(json!({})))
            .await;
        assert!(signed.is_err());
    }
    assert_eq!(s.gw.snapshot().await, before, "nothing reached the store");
    s.gw.stop().await;
}

/// A 401 exactly like a bad signature's: the same code and message, and
/// unsigned.
fn assert_bad_signature(answer: &Answer, like: &Answer) {
    assert_eq!(
        answer.status,
        401,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.code(), "invalid_signature");
    assert_eq!(answer.json()["message"], like.json()["message"]);
    assert!(!answer.headers.contains_key("signature"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_over_another_clients_certificate_gets_the_bad_signature_401() {
    let ca = Ca::new("Test Issuer Client CA");
    let cms_cert = ca.client(CMS);
    let other_cert = ca.client(OTHER_BANK);
    // cms is pinned to its subject, other-bank to its key.
    let pins = vec![
        (
            "cms".to_owned(),
            CertificatePins {
                subject: Some(Subject::parse(CMS_SUBJECT).unwrap()),
                spki_sha256: Vec::new(),
            },
        ),
        (
            "other-bank".to_owned(),
            CertificatePins {
                subject: None,
                spki_sha256: vec![other_cert.spki_pin()],
            },
        ),
    ];
    let mut s = mutual_tls(&ca, pins).await;
    let main = s.gw.clients.main.clone();
    let other = s.gw.clients.other_programme.clone();
    let enrol = card(json!({}));
    let other_card = json!({"cardNumber": "5123456789012346", "expiryDate": "2812"});
    let before = s.gw.snapshot().await;

    // What a bad signature gets, over cms's own certificate.
    let over_cms = s.http(Some(&cms_cert));
    let mut forged = main.clone();
    forged.secret = "x".repeat(43);
    let bad_signature = s
        .send_signed(&over_cms, &forged, ENROL, &enrol)
        .await
        .unwrap();
    assert_eq!(bad_signature.status, 401);
    assert_eq!(bad_signature.code(), "invalid_signature");

    // cms's apikey and correct HMAC over other-bank's certificate: the same 401.
    let over_other = s.http(Some(&other_cert));
    let answer = s
        .send_signed(&over_other, &main, ENROL, &enrol)
        .await
        .unwrap();
    assert_bad_signature(&answer, &bad_signature);
    // other-bank's apikey and HMAC over cms's certificate: the same.
    let answer = s
        .send_signed(&over_cms, &other, ENROL, &other_card)
        .await
        .unwrap();
    assert_bad_signature(&answer, &bad_signature);
    // A new key under cms's subject still is cms (the subject pin survives
    // a renewal); a new key under other-bank's subject is not other-bank.
    let renewed_other = ca.client(OTHER_BANK);
    let over_renewed_other = s.http(Some(&renewed_other));
    let answer = s
        .send_signed(&over_renewed_other, &other, ENROL, &other_card)
        .await
        .unwrap();
    assert_bad_signature(&answer, &bad_signature);
    assert_eq!(
        s.gw.snapshot().await,
        before,
        "no refused request changed anything"
    );

    // The right certificate, and a correct signature: served, and signed.
    s.gw.http = over_cms.clone();
    let answer = s.gw.call("POST", ENROL, &enrol).await;
    assert_eq!(answer.ok_json()["enrollment"], "enrolled");
    assert!(answer.headers.contains_key("signature"));
    s.gw.http = s.http(Some(&ca.client(CMS)));
    let answer = s.gw.call("POST", ENQUIRY, &enrol).await;
    assert_eq!(
        answer.ok_json()["enrollment"],
        "enrolled",
        "a renewed cms key"
    );
    s.gw.http = over_other.clone();
    let answer = s.gw.call_as(&other, "POST", ENROL, &other_card).await;
    assert_eq!(answer.ok_json()["enrollment"], "enrolled");

    // The right certificate does not stand in for the HMAC.
    let after = s.gw.snapshot().await;
    let unenrol = s
        .send_signed(&over_cms, &forged, ENROL, &enrol)
        .await
        .unwrap();
    assert_bad_signature(&unenrol, &bad_signature);
    let unsigned = over_cms
        .post(format!("{}{ENROL}", s.gw.url))
        .body(serde_json::to_vec(&enrol).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    assert_eq!(s.gw.snapshot().await, after);

    // Counted like bad signatures: 5 of them on the enrolment route, and
    // the one unsigned request as a missing header.
    s.gw.http = reqwest::Client::new();
    let metrics = s.send_plain(&over_cms, METRICS).await;
    let line = format!(
        r#"dcvv_http_requests_total{{route="{ENROL}",method="POST",status="401",code="invalid_signature"}} 5"#
    );
    assert!(metrics.contains(&line), "{metrics}");
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_pins_takes_any_certificate_of_the_ca_and_still_needs_its_hmac() {
    let ca = Ca::new("Test Issuer Client CA");
    let mut s = mutual_tls(&ca, Vec::new()).await;
    let verifier = s.gw.clients.verifier.clone();
    for name in [CMS, OTHER_BANK, &[(DnType::CommonName, "anyone at all")]] {
        s.gw.http = s.http(Some(&ca.client(name)));
        let answer =
            s.gw.call_as(&verifier, "POST", VERIFY, &card(json!({"cvv2": "123"})))
                .await;
        assert_eq!(answer.ok_json()["method"], "static");
    }
    let mut forged = verifier.clone();
    forged.secret = "y".repeat(43);
    let http = s.http(Some(&ca.client(CMS)));
    let answer = s
        .send_signed(&http, &forged, VERIFY, &card(json!({"cvv2": "123"})))
        .await
        .unwrap();
    assert_eq!(answer.status, 401);
    assert_eq!(answer.code(), "invalid_signature");
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_file_that_cannot_be_used_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = self_signed_tls(dir.path());
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let secret_line = key_pem.lines().nth(1).unwrap().to_owned();
    let file = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    };
    let cases = [
        (
            dir.path().join("missing.pem"),
            "cannot be read: entity not found",
        ),
        (file("empty.pem", ""), "holds no PEM CERTIFICATE"),
        (
            file("text.pem", "not a certificate\n"),
            "holds no PEM CERTIFICATE",
        ),
        (file("key.pem", &key_pem), "holds no PEM CERTIFICATE"),
        (
            file(
                "broken.pem",
                "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
            ),
            "is not valid PEM",
        ),
        (
            file(
                "not-x509.pem",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            ),
            "certificate 1 is not a usable CA",
        ),
    ];
    for (path, reason) in cases {
        let refused = TestGateway::try_start(Options {
            tls: Some((cert.clone(), key.clone())),
            client_ca: Some(path.clone()),
            ..Options::default()
        })
        .await;
        let Err(e) = refused else {
            panic!("{} was accepted", path.display())
        };
        let text = e.to_string();
        assert!(
            text.starts_with("refusing to start: TLS: server.client_ca_file "),
            "{text}"
        );
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains(reason), "{text}");
        assert!(!text.contains(&secret_line), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }
}
