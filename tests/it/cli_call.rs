//! `dcvv-tools call` against a real gateway (issue 3, item 6): the binary signs
//! the request, the gateway (TLS, this process's SoftHSM token, a SQLite file)
//! accepts it, and the command checks the response signature. This is the README's
//! walk from set-up to a first dynamic value, run as a test.
//!
//! It runs the built `dcvv-tools` binary, as a person or a script would: what is
//! tested is the command (arguments, secret from the environment, exit status,
//! stdout and stderr), which an in-process call could not observe without
//! changing the command. The binary is not this package's, so Cargo gives no
//! `CARGO_BIN_EXE_` for it; `tools/` is a default member of the workspace, so
//! `cargo nextest run` (or `cargo test`) at the root builds it, before any test
//! runs, into the directory that holds `dcvv-gateway`.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::support::http::{EXPIRY, Options, PAN, TestGateway, self_signed_tls};
use crate::support::pki::Ca;
use crate::support::routes::{KEY_INVENTORY, VALUES, VERIFY};

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The JSON body `call` printed after its status line.
    fn body(&self) -> Value {
        let (_status, body) = self
            .stdout
            .split_once('\n')
            .unwrap_or_else(|| panic!("no body: {}\n{}", self.stdout, self.stderr));
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {}", self.stdout))
    }
}

/// The `dcvv-tools` binary of this build, beside `dcvv-gateway` (see above).
fn tools_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_dcvv-gateway"))
        .with_file_name(format!("dcvv-tools{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: run the tests from the workspace root (or cargo build -p dcvv-tools)",
        path.display()
    );
    path
}

/// Runs `call` with the secret in `DCVV_TEST_SECRET`, off the runtime's threads.
async fn call(gw: &TestGateway, ca: &Path, secret: &str, args: &[&str]) -> Run {
    let mut command = std::process::Command::new(tools_binary());
    command
        .args([
            "call",
            "--url",
            &gw.url,
            "--apikey",
            &gw.clients.main.apikey,
        ])
        .args(["--secret-env", "DCVV_TEST_SECRET", "--cacert"])
        .arg(ca)
        .args(args)
        .env("DCVV_TEST_SECRET", secret);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_gets_dynamic_values_and_verifies_one_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_path, key_path, ca) = (
        dir.path().join("server.pem"),
        dir.path().join("server.key"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let gw = TestGateway::start(Options {
        tls: Some((cert_path, key_path)),
        ..Options::default()
    })
    .await;
    // `call` stamps requests with the real time; the gateway's clock must agree.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    gw.clock.set_seconds(now.as_secs());
    let secret = gw.clients.main.secret.clone();

    let card = format!(r#"{{"cardNumber":"{PAN}","expiryDate":"{EXPIRY}""#);
    let values = call(
        &gw,
        &ca,
        &secret,
        &[
            "--data",
            &format!(r#"{card},"numberOfValues":2}}"#),
            "POST",
            VALUES,
        ],
    )
    .await;
    assert!(values.ok, "{}\n{}", values.stdout, values.stderr);
    assert!(values.stdout.starts_with("HTTP/"), "{}", values.stdout);
    assert!(
        values.stderr.contains("response signature: verified"),
        "{}",
        values.stderr
    );
    let body = values.body();
    let list = body["values"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{body}");
    let first = list[0]["dcvv2"].as_str().unwrap().to_owned();

    // The first value is the current one: it verifies, through a body file.
    let request = dir.path().join("verify.json");
    std::fs::write(&request, format!(r#"{card},"cvv2":"{first}"}}"#)).unwrap();
    let verified = call(
        &gw,
        &ca,
        &secret,
        &["--data-file", request.to_str().unwrap(), "POST", VERIFY],
    )
    .await;
    assert!(verified.ok, "{}\n{}", verified.stdout, verified.stderr);
    assert_eq!(verified.body()["result"], "approved", "{}", verified.stdout);

    // Another client's secret: the gateway's 401, printed, and a failing exit status.
    let wrong = call(
        &gw,
        &ca,
        &gw.clients.verifier.secret,
        &["GET", KEY_INVENTORY],
    )
    .await;
    assert!(!wrong.ok);
    assert_eq!(
        wrong.body()["code"],
        "invalid_signature",
        "{}",
        wrong.stdout
    );
    // The secret never reaches the output.
    for run in [&values, &verified, &wrong] {
        assert!(!run.stdout.contains(&secret) && !run.stderr.contains(&secret));
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_presents_a_client_certificate_to_a_gateway_that_requires_one() {
    let dir = tempfile::tempdir().unwrap();
    let (server, cert_path, key_path) = self_signed_tls(dir.path());
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, server.cert.pem()).unwrap();
    let clients_ca = Ca::new("Test Issuer Client CA");
    let gw = TestGateway::start(Options {
        tls: Some((cert_path, key_path)),
        client_ca: Some(clients_ca.write(&dir.path().join("clients-ca.pem"))),
        ..Options::default()
    })
    .await;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    gw.clock.set_seconds(now.as_secs());
    let secret = gw.clients.main.secret.clone();
    let (cert, key) = clients_ca
        .client(&[(rcgen::DnType::CommonName, "cms")])
        .write(dir.path(), "cms");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());

    let keys = call(
        &gw,
        &ca,
        &secret,
        &[
            "--client-cert",
            cert,
            "--client-key",
            key,
            "GET",
            KEY_INVENTORY,
        ],
    )
    .await;
    assert!(keys.ok, "{}\n{}", keys.stdout, keys.stderr);
    assert!(
        keys.stderr.contains("response signature: verified"),
        "{}",
        keys.stderr
    );

    // Without a certificate the handshake fails: no HTTP answer.
    let refused = call(&gw, &ca, &secret, &["GET", KEY_INVENTORY]).await;
    assert!(!refused.ok);
    assert!(refused.stdout.is_empty(), "{}", refused.stdout);
    assert!(
        refused.stderr.contains("request failed"),
        "{}",
        refused.stderr
    );
    // One of the two files alone is refused by the command; a key that is
    // not PEM is named, its content is not.
    let alone = call(
        &gw,
        &ca,
        &secret,
        &["--client-cert", cert, "GET", KEY_INVENTORY],
    )
    .await;
    assert!(
        !alone.ok && alone.stderr.contains("--client-key"),
        "{}",
        alone.stderr
    );
    let bad_key = dir.path().join("bad.key");
    std::fs::write(&bad_key, "sekrit-not-a-key\n").unwrap();
    let bad = call(
        &gw,
        &ca,
        &secret,
        &[
            "--client-cert",
            cert,
            "--client-key",
            bad_key.to_str().unwrap(),
            "GET",
            KEY_INVENTORY,
        ],
    )
    .await;
    assert!(!bad.ok);
    assert!(
        bad.stderr
            .contains("not a PEM certificate and its private key"),
        "{}",
        bad.stderr
    );
    assert!(!bad.stderr.contains("sekrit"), "{}", bad.stderr);
    gw.stop().await;
}

/// `dcvv-tools bench http` with `--client-cert/--client-key` against a gateway
/// that requires mutual TLS: every phase gets only 2xx, signed answers, in its
/// JSON output; without the certificate every request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_http_runs_against_a_gateway_that_requires_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (server, cert_path, key_path) = self_signed_tls(dir.path());
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, server.cert.pem()).unwrap();
    let clients_ca = Ca::new("Test Issuer Client CA");
    let gw = TestGateway::start(Options {
        tls: Some((cert_path, key_path)),
        client_ca: Some(clients_ca.write(&dir.path().join("clients-ca.pem"))),
        ..Options::default()
    })
    .await;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    gw.clock.set_seconds(now.as_secs());
    let (cert, key) = clients_ca
        .client(&[(rcgen::DnType::CommonName, "cms")])
        .write(dir.path(), "cms");
    let config = crate::support::config_file(dir.path());
    let bench = |identity: Option<(&Path, &Path)>| {
        let mut command = std::process::Command::new(tools_binary());
        command
            .arg("--config")
            .arg(&config)
            .args(["bench", "http", "--url", &gw.url, "--apikey"])
            .arg(&gw.clients.main.apikey)
            .args(["--secret-env", "DCVV_TEST_SECRET", "--cacert"])
            .arg(&ca)
            .args(["--seconds", "1", "--concurrency", "2", "--json"])
            .env("DCVV_TEST_SECRET", &gw.clients.main.secret);
        if let Some((cert, key)) = identity {
            command
                .arg("--client-cert")
                .arg(cert)
                .arg("--client-key")
                .arg(key);
        }
        command
    };
    let mut with = bench(Some((&cert, &key)));
    let out = tokio::task::spawn_blocking(move || with.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let operations = report["operations"].as_array().unwrap();
    assert_eq!(operations.len(), 3, "{report}");
    for op in operations {
        let http = &op["http"];
        let requests = http["requests"].as_u64().unwrap();
        assert!(requests > 0, "{op}");
        assert_eq!(http["statuses"]["200"].as_u64(), Some(requests), "{op}");
        assert_eq!(http["error_count"], 0, "{op}");
        assert_eq!(http["unsigned_responses"], 0, "{op}");
    }

    let mut without = bench(None);
    let out = tokio::task::spawn_blocking(move || without.output().unwrap())
        .await
        .unwrap();
    let combined = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "no certificate, no benchmark: {combined}"
    );
    gw.stop().await;
}
