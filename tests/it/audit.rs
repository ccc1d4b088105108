//! The audit trail against a real gateway, a real SoftHSM token (seals made and
//! checked in it) and real files: one record per request, refused ones
//! included, and no card data in any; `audit verify` passing a good trail and
//! catching each kind of tampering with its file and line; rotation by size
//! keeping one chain; a restart continuing it; the directory lock; group
//! commit under concurrency; and fail closed on a full disk (a small tmpfs),
//! then recovery without a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dcvv_gateway::audit::record::{self, Fields, GENESIS, parse_file_name};
use dcvv_gateway::domain::service::Clock;
use serde_json::{Value, json};

use crate::support;
use crate::support::disk::{Tmpfs, fill};
use crate::support::http::{EXPIRY, Options, PAN, TestGateway, card, fresh_id};
use crate::support::routes::{
    CODES, ENQUIRY, ENROL, KEY_INVENTORY, METRICS, READYZ, VALUES, VERIFY,
};

/// Every trail file of a directory in chain order, with its records.
fn trail(dir: &Path) -> Vec<(PathBuf, Vec<Fields>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| parse_file_name(p.file_name().unwrap().to_str().unwrap()).is_some())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let records = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            (path, records)
        })
        .collect()
}

fn all_records(dir: &Path) -> Vec<Fields> {
    support::trail::records(dir)
}

fn requests(dir: &Path) -> Vec<Fields> {
    all_records(dir)
        .into_iter()
        .filter(|r| r["kind"] == "request")
        .collect()
}

/// `audit verify` through the binary: (success, stdout, stderr).
fn verify(paths: &[&Path], extra: &[&str]) -> (bool, String, String) {
    let cfg = tempfile::tempdir().unwrap();
    let config = support::config_file(cfg.path());
    let mut args: Vec<String> = vec!["audit".into(), "verify".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(paths.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    support::gateway(&config, &args)
}

/// Asserts `audit verify` fails at `file:line` with a reason containing `why`.
fn assert_caught(paths: &[&Path], extra: &[&str], file: &Path, line: usize, why: &str) {
    let (ok, stdout, stderr) = verify(paths, extra);
    assert!(!ok, "verify passed a tampered trail: {stdout}");
    let expected = format!("error: {}:{line}: ", file.display());
    assert!(
        stderr.starts_with(&expected) && stderr.contains(why),
        "expected {expected}…{why}, got: {stderr}"
    );
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

/// What an attacker without the seal key can do: rewrite records from index
/// `from` on with correct prevs and hashes (seqs unchanged).
fn rechain(lines: &mut [String], from: usize) {
    let mut prev = if from == 0 {
        GENESIS.to_owned()
    } else {
        let f: Fields = serde_json::from_str(&lines[from - 1]).unwrap();
        f["hash"].as_str().unwrap().to_owned()
    };
    for line in lines.iter_mut().skip(from) {
        let mut f: Fields = serde_json::from_str(line).unwrap();
        f.insert("prev".into(), prev.clone().into());
        let hash = record::hash_of(&f);
        f.insert("hash".into(), hash.clone().into());
        *line = String::from_utf8(record::canonical(&f)).unwrap();
        prev = hash;
    }
}

fn copy_dir(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.path().join(entry.file_name())).unwrap();
    }
    to
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_exactly_one_record_and_none_holds_card_data() {
    let keep = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(Options {
        audit_dir: Some(keep.path().join("audit")),
        ..Options::default()
    })
    .await;
    let mut expected: BTreeMap<String, (u16, &str, &str)> = BTreeMap::new();
    let send = async |client: &support::http::TestClient,
                      path: &str,
                      body: &Value|
           -> (String, support::http::Answer) {
        let bytes = serde_json::to_vec(body).unwrap();
        let id = fresh_id();
        let headers = gw.signed_headers(client, &id, gw.clock.now_ms(), "POST", path, &bytes);
        (id, gw.send_raw("POST", path, &headers, bytes).await)
    };
    let main = gw.clients.main.clone();

    let (id, generated) = send(
        &main,
        VALUES,
        &card(json!({"numberOfValues": 3, "channel": "W"})),
    )
    .await;
    assert_eq!(generated.status, 200);
    expected.insert(id.clone(), (200, "ok", ""));
    let generated = generated.json();
    let codes: Vec<String> = generated["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["dcvv2"].as_str().unwrap().to_owned())
        .collect();
    let kcv = generated["keyCheckValue"].as_str().unwrap().to_owned();
    let dynamic_id = id;

    let (id, approved) = send(&main, VERIFY, &card(json!({"cvv2": codes[0]}))).await;
    assert_eq!(approved.json()["result"], "approved");
    expected.insert(id.clone(), (200, "approved", ""));
    let approved_id = id;
    let wrong = if codes[0] == "000" { "001" } else { "000" };
    let (id, declined) = send(&main, VERIFY, &card(json!({"cvv2": wrong}))).await;
    assert_eq!(declined.json()["result"], "declined");
    expected.insert(id, (200, "declined", ""));
    let (id, embossed) = send(&main, CODES, &card(json!({"kind": "cvv2"}))).await;
    assert_eq!(embossed.status, 200);
    let static_code = embossed.json()["securityCode"].as_str().unwrap().to_owned();
    expected.insert(id, (200, "ok", ""));

    // 401: a signature that does not verify.
    let bytes = serde_json::to_vec(&card(json!({}))).unwrap();
    let id = fresh_id();
    let mut headers = gw.signed_headers(&main, &id, gw.clock.now_ms(), "POST", ENQUIRY, &bytes);
    let signature = headers[3].1.clone();
    let flipped = if signature.starts_with('A') { "B" } else { "A" };
    headers[3].1 = format!("{flipped}{}", &signature[1..]);
    let refused = gw.send_raw("POST", ENQUIRY, &headers, bytes.clone()).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (401, "invalid_signature")
    );
    expected.insert(id, (401, "refused", "invalid_signature"));

    // 409: the same signed request twice (one id, two records).
    let id = fresh_id();
    let headers = gw.signed_headers(&main, &id, gw.clock.now_ms(), "POST", ENQUIRY, &bytes);
    let first = gw.send_raw("POST", ENQUIRY, &headers, bytes.clone()).await;
    let replay = gw.send_raw("POST", ENQUIRY, &headers, bytes.clone()).await;
    assert_eq!((first.status, replay.status), (200, 409));
    let replay_signature = headers[3].1.clone();

    // 422: a PAN that fails the Luhn check; 403: a scope the client lacks; 404.
    let bad_pan = "4123456789012340";
    let (id, invalid) = send(
        &main,
        ENQUIRY,
        &json!({"cardNumber": bad_pan, "expiryDate": EXPIRY}),
    )
    .await;
    assert_eq!(
        (invalid.status, invalid.code().as_str()),
        (422, "invalid_card_number")
    );
    expected.insert(id, (422, "refused", "invalid_card_number"));
    let verifier = gw.clients.verifier.clone();
    let (id, forbidden) = send(&verifier, VALUES, &card(json!({}))).await;
    assert_eq!(forbidden.status, 403);
    expected.insert(id, (403, "refused", "forbidden_scope"));
    let (_, missing) = send(&main, "/cards/4123456789012349", &json!({})).await;
    assert_eq!(missing.status, 404);
    // Operational routes are not recorded.
    assert_eq!(gw.send_raw("GET", READYZ, &[], vec![]).await.status, 200);
    let secret = main.secret.clone();
    let audit_dir = gw.audit_dir.clone();
    gw.stop().await;

    let records = requests(&audit_dir);
    assert_eq!(records.len(), expected.len() + 3, "{records:#?}");
    for (id, (status, outcome, code)) in &expected {
        let mine: Vec<&Fields> = records
            .iter()
            .filter(|r| r["request_id"] == id.as_str())
            .collect();
        assert_eq!(mine.len(), 1, "exactly one record for {id}");
        let r = mine[0];
        assert_eq!(r["status"], *status, "{r:?}");
        assert_eq!(r["outcome"], *outcome, "{r:?}");
        if !code.is_empty() {
            assert_eq!(r["error_code"], *code, "{r:?}");
        }
    }
    let replayed: Vec<&Fields> = records
        .iter()
        .filter(|r| r["request_id"] == json!(headers[2].1))
        .collect();
    assert_eq!(
        replayed
            .iter()
            .map(|r| r["status"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![200, 409]
    );
    let dynamic = records
        .iter()
        .find(|r| r["request_id"] == dynamic_id.as_str())
        .unwrap();
    assert_eq!(dynamic["masked_pan"], "412345******2349");
    assert_eq!(dynamic["programme"], "test");
    assert_eq!(dynamic["channel"], "W");
    assert_eq!(dynamic["key_kcv"], kcv.as_str());
    assert_eq!(dynamic["client"], "cms");
    assert_eq!(dynamic["authenticated"], true);
    assert_eq!(dynamic["operation"], VALUES);
    assert!(dynamic["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let approved = records
        .iter()
        .find(|r| r["request_id"] == approved_id.as_str())
        .unwrap();
    assert_eq!(approved["reason"], "match");
    let unsigned = records.iter().find(|r| r["status"] == 401).unwrap();
    assert_eq!(
        (
            unsigned["client"].clone(),
            unsigned["authenticated"].clone()
        ),
        (json!("cms"), json!(false))
    );
    let lost = records.iter().find(|r| r["status"] == 404).unwrap();
    assert_eq!(
        lost["operation"], "unmatched",
        "a raw path is never recorded"
    );

    // No clear PAN (good or bad), code value, secret or signature anywhere.
    for (path, _) in trail(&audit_dir) {
        let text = std::fs::read_to_string(&path).unwrap();
        for needle in [
            PAN,
            bad_pan,
            secret.as_str(),
            signature.as_str(),
            replay_signature.as_str(),
        ] {
            assert!(!text.contains(needle), "{} holds {needle}", path.display());
        }
    }
    for record in all_records(&audit_dir) {
        for value in record.values() {
            if let Value::String(s) = value {
                assert!(
                    !codes.contains(s) && *s != static_code,
                    "a code value in {record:?}"
                );
            }
        }
    }
    let (ok, stdout, stderr) = verify(&[&audit_dir], &["--require-sealed"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("every record is covered by a seal"),
        "{stdout}"
    );
}

/// A sealed trail over several files: seals every 4 records, files of 4 KiB.
async fn sealed_trail() -> (tempfile::TempDir, Vec<PathBuf>) {
    let keep = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(Options {
        audit_dir: Some(keep.path().join("audit")),
        seal_every_records: 4,
        max_file_bytes: 4096,
        ..Options::default()
    })
    .await;
    for _ in 0..30 {
        assert_eq!(gw.call("POST", ENQUIRY, &card(json!({}))).await.status, 200);
    }
    let dir = gw.audit_dir.clone();
    gw.stop().await;
    let copy = copy_dir(&dir);
    let files = trail(copy.path()).into_iter().map(|(p, _)| p).collect();
    (copy, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_passes_a_good_trail_and_catches_each_kind_of_tampering() {
    let (good, files) = sealed_trail().await;
    assert!(files.len() >= 3, "rotation by size: {files:?}");
    let (ok, stdout, stderr) = verify(&[good.path()], &["--require-sealed"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.starts_with(&format!("ok: {} file(s), ", files.len())),
        "{stdout}"
    );

    // Each case works on its own copy; `at` is the first file's name in it.
    let case = |edit: &dyn Fn(&Path)| {
        let dir = copy_dir(good.path());
        edit(dir.path());
        dir
    };
    let first = |dir: &Path| dir.join(files[0].file_name().unwrap());
    let file = |dir: &Path, i: usize| dir.join(files[i].file_name().unwrap());

    // An edited field.
    let d = case(&|dir| {
        let mut lines = lines_of(&first(dir));
        assert!(lines[2].contains("\"status\":200"));
        lines[2] = lines[2].replace("\"status\":200", "\"status\":201");
        write_lines(&first(dir), &lines);
    });
    assert_caught(&[d.path()], &[], &first(d.path()), 3, "hash does not match");

    // An edited field whose own hash was recomputed: the next record's prev breaks.
    let d = case(&|dir| {
        let mut lines = lines_of(&first(dir));
        let mut f: Fields = serde_json::from_str(&lines[2]).unwrap();
        f.insert("outcome".into(), "refused".into());
        let hash = record::hash_of(&f);
        f.insert("hash".into(), hash.into());
        lines[2] = String::from_utf8(record::canonical(&f)).unwrap();
        write_lines(&first(dir), &lines);
    });
    assert_caught(&[d.path()], &[], &first(d.path()), 4, "prev does not match");

    // A whitespace change only (same JSON meaning).
    let d = case(&|dir| {
        let mut lines = lines_of(&first(dir));
        lines[2] = lines[2].replacen(",", ", ", 1);
        write_lines(&first(dir), &lines);
    });
    assert_caught(&[d.path()], &[], &first(d.path()), 3, "canonical form");

    // A deleted record.
    let d = case(&|dir| {
        let mut lines = lines_of(&first(dir));
        lines.remove(4);
        write_lines(&first(dir), &lines);
    });
    assert_caught(
        &[d.path()],
        &[],
        &first(d.path()),
        5,
        "deleted, inserted or reordered",
    );

    // Two records swapped.
    let d = case(&|dir| {
        let mut lines = lines_of(&first(dir));
        lines.swap(3, 4);
        write_lines(&first(dir), &lines);
    });
    assert_caught(
        &[d.path()],
        &[],
        &first(d.path()),
        4,
        "deleted, inserted or reordered",
    );

    // An inserted record (a copy of an earlier one).
    let d = case(&|dir| {
        let mut lines = lines_of(&first(dir));
        let copy = lines[1].clone();
        lines.insert(5, copy);
        write_lines(&first(dir), &lines);
    });
    assert_caught(
        &[d.path()],
        &[],
        &first(d.path()),
        6,
        "deleted, inserted or reordered",
    );

    // A file cut in the middle of a line.
    let d = case(&|dir| {
        let path = file(dir, files.len() - 1);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 20]).unwrap();
    });
    let last = file(d.path(), files.len() - 1);
    let n = lines_of(&last).len();
    assert_caught(&[d.path()], &[], &last, n, "incomplete");

    // Sealed records removed from the end, the final seal with them: the rest
    // still chains, but is no longer sealed.
    let d = case(&|dir| {
        let path = file(dir, files.len() - 1);
        let mut lines = lines_of(&path);
        lines.truncate(lines.len() - 2);
        write_lines(&path, &lines);
    });
    let (ok, _, stderr) = verify(&[d.path()], &[]);
    assert!(ok && stderr.contains("not sealed"), "{stderr}");
    let last = file(d.path(), files.len() - 1);
    let tail: Vec<Fields> = lines_of(&last)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let unsealed_from = tail
        .iter()
        .rposition(|r| r["kind"] == "seal")
        .map_or(1, |i| i + 2);
    assert_caught(
        &[d.path()],
        &["--require-sealed"],
        &last,
        unsealed_from,
        "not covered by a seal",
    );

    // An edit with the whole chain recomputed after it: hashes are consistent,
    // but the next seal no longer verifies in the token.
    let d = case(&|dir| {
        let mut lines = lines_of(&first(dir));
        let mut f: Fields = serde_json::from_str(&lines[1]).unwrap();
        f.insert("client".into(), "someone-else".into());
        lines[1] = String::from_utf8(record::canonical(&f)).unwrap();
        rechain(&mut lines, 1);
        write_lines(&first(dir), &lines);
    });
    let records: Vec<Fields> = lines_of(&first(d.path()))
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seal_line = records
        .iter()
        .skip(1)
        .position(|r| r["kind"] == "seal")
        .unwrap()
        + 2;
    assert_caught(
        &[d.path()],
        &[],
        &first(d.path()),
        seal_line,
        "seal does not verify",
    );

    // A forged seal: a made-up MAC, the chain recomputed around it.
    let d = case(&|dir| {
        let mut lines = lines_of(&first(dir));
        let i = lines
            .iter()
            .position(|l| l.contains("\"kind\":\"seal\""))
            .unwrap();
        let mut f: Fields = serde_json::from_str(&lines[i]).unwrap();
        f.insert("mac".into(), "ab".repeat(32).into());
        lines[i] = String::from_utf8(record::canonical(&f)).unwrap();
        rechain(&mut lines, i);
        write_lines(&first(dir), &lines);
    });
    let forged = lines_of(&first(d.path()))
        .iter()
        .position(|l| l.contains("\"kind\":\"seal\""))
        .unwrap()
        + 1;
    assert_caught(
        &[d.path()],
        &[],
        &first(d.path()),
        forged,
        "seal does not verify",
    );

    // A file of the rotation removed.
    let d = case(&|dir| std::fs::remove_file(file(dir, 1)).unwrap());
    assert_caught(
        &[d.path()],
        &[],
        &file(d.path(), 2),
        1,
        "deleted, inserted or reordered",
    );

    // Two files of the rotation given in the wrong order.
    let d = copy_dir(good.path());
    let (a, b) = (file(d.path(), 1), file(d.path(), 2));
    let mut paths: Vec<PathBuf> = (0..files.len()).map(|i| file(d.path(), i)).collect();
    paths.swap(1, 2);
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    assert_caught(&refs, &[], &b, 1, "deleted, inserted or reordered");
    // ... or renamed into each other's place.
    let tmp = d.path().join("swap");
    std::fs::rename(&a, &tmp).unwrap();
    std::fs::rename(&b, &a).unwrap();
    std::fs::rename(&tmp, &b).unwrap();
    assert_caught(&[d.path()], &[], &a, 1, "file name says");

    // The first file removed: the trail no longer starts at genesis.
    let d = case(&|dir| std::fs::remove_file(first(dir)).unwrap());
    assert_caught(&[d.path()], &[], &file(d.path(), 1), 1, "genesis");
    let (ok, stdout, stderr) = verify(&[d.path()], &["--partial"]);
    assert!(
        ok,
        "--partial verifies from the first file present: {stdout}{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_restarts_keep_one_chain_and_the_directory_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        audit_dir: Some(dir.path().join("trail")),
        seal_every_records: 5,
        max_file_bytes: 4096,
        ..Options::default()
    };
    let gw = TestGateway::start(options.clone()).await;
    // A second gateway on the same directory is refused.
    let second = TestGateway::try_start(options.clone()).await;
    let refusal = second
        .err()
        .expect("a second writer must be refused")
        .to_string();
    assert!(refusal.contains("another gateway process"), "{refusal}");
    for _ in 0..25 {
        assert_eq!(gw.call("POST", ENQUIRY, &card(json!({}))).await.status, 200);
    }
    gw.stop().await;
    let gw = TestGateway::start(options).await;
    for _ in 0..5 {
        assert_eq!(gw.call("POST", ENQUIRY, &card(json!({}))).await.status, 200);
    }
    gw.stop().await;

    let files = trail(&dir.path().join("trail"));
    assert!(files.len() >= 3, "{} files", files.len());
    let mut prev = GENESIS.to_owned();
    let mut seq = 1;
    for (i, (path, records)) in files.iter().enumerate() {
        assert!(
            std::fs::metadata(path).unwrap().len() < 4096 + 2048,
            "rotated by size"
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o640, "{}", path.display());
        let named = parse_file_name(path.file_name().unwrap().to_str().unwrap()).unwrap();
        assert_eq!(named, records[0]["seq"].as_u64().unwrap());
        if i + 1 < files.len() {
            assert_eq!(
                records.last().unwrap()["kind"],
                "seal",
                "a rotated file ends sealed"
            );
        }
        for r in records {
            assert_eq!(
                (r["seq"].as_u64().unwrap(), r["prev"].as_str().unwrap()),
                (seq, prev.as_str())
            );
            prev = r["hash"].as_str().unwrap().to_owned();
            seq += 1;
        }
    }
    let notices: Vec<Fields> = all_records(&dir.path().join("trail"))
        .into_iter()
        .filter(|r| r["kind"] == "notice")
        .collect();
    assert_eq!(notices.len(), 2, "one trail_opened per start");
    assert_eq!(requests(&dir.path().join("trail")).len(), 30);
    let (ok, stdout, stderr) = verify(&[&dir.path().join("trail")], &["--require-sealed"]);
    assert!(ok, "{stdout}{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_fsyncs_and_every_record_is_chained() {
    let keep = tempfile::tempdir().unwrap();
    let gw = std::sync::Arc::new(
        TestGateway::start(Options {
            max_in_flight: 256,
            audit_dir: Some(keep.path().join("audit")),
            ..Options::default()
        })
        .await,
    );
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let gw = std::sync::Arc::clone(&gw);
        tasks.spawn(async move {
            let client = gw.clients.main.clone();
            let path = if i % 2 == 0 { ENQUIRY } else { KEY_INVENTORY };
            let method = if i % 2 == 0 { "POST" } else { "GET" };
            let body = if i % 2 == 0 {
                card(json!({}))
            } else {
                Value::Null
            };
            let bytes = if body.is_null() {
                vec![]
            } else {
                serde_json::to_vec(&body).unwrap()
            };
            let id = fresh_id();
            let headers = gw.signed_headers(&client, &id, gw.clock.now_ms(), method, path, &bytes);
            (id, gw.send_raw(method, path, &headers, bytes).await.status)
        });
    }
    let mut ids = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (id, status) = done.unwrap();
        assert_eq!(status, 200);
        ids.push(id);
    }
    let metrics = gw.send_raw("GET", METRICS, &[], vec![]).await;
    let text = String::from_utf8(metrics.body).unwrap();
    let metric = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .unwrap()
            .parse()
            .unwrap()
    };
    // Each request writes two records: its change record before its commit
    // and its request record after it (plus the notice of the start).
    let (batches, written) = (
        metric("dcvv_audit_batch_records_count"),
        metric("dcvv_audit_records_total"),
    );
    let gw = std::sync::Arc::into_inner(gw).unwrap();
    let dir = gw.audit_dir.clone();
    gw.stop().await;
    let records = requests(&dir);
    assert_eq!(records.len(), 200);
    for id in &ids {
        assert_eq!(
            records
                .iter()
                .filter(|r| r["request_id"] == id.as_str())
                .count(),
            1,
            "{id}"
        );
    }
    let changes = all_records(&dir)
        .into_iter()
        .filter(|r| r["kind"] == "change")
        .count();
    assert_eq!(changes, 200, "one change record per request");
    assert!(written >= 400.0, "{written} records written");
    assert!(
        batches < written,
        "group commit: {batches} batches for {written} records"
    );
    let (ok, stdout, stderr) = verify(&[&dir], &["--require-sealed"]);
    assert!(ok, "{stdout}{stderr}");
}

async fn readiness(gw: &TestGateway) -> (u16, Value) {
    let answer = gw.send_raw("GET", READYZ, &[], vec![]).await;
    (answer.status, answer.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_closed_with_503_and_the_trail_recovers_without_a_restart() {
    let mount = tempfile::tempdir().unwrap();
    let _tmpfs = Tmpfs::mount(mount.path(), "512k");
    let gw = TestGateway::start(Options {
        audit_dir: Some(mount.path().join("audit")),
        ..Options::default()
    })
    .await;
    assert_eq!(gw.call("POST", ENQUIRY, &card(json!({}))).await.status, 200);
    let filler = fill(mount.path());

    // The request during which the disk is found full: 503, not its response.
    // (A few records may still fit in the file's last page.)
    let mut accepted = 1;
    let failed = loop {
        let answer = gw.call("POST", ENQUIRY, &card(json!({}))).await;
        if answer.status != 200 {
            break answer;
        }
        accepted += 1;
        assert!(accepted < 100, "the full disk was never noticed");
    };
    assert_eq!(
        (failed.status, failed.code().as_str()),
        (503, "audit_unavailable")
    );
    assert_eq!(failed.headers["retry-after"], "1");
    assert!(!failed.headers.contains_key("signature"));
    let (status, ready) = readiness(&gw).await;
    assert_eq!(status, 503);
    assert_eq!(
        ready["audit"], "down: no space left on the trail's device",
        "{ready}"
    );
    assert_eq!(ready["store"], "ok");

    // While the trail is down nothing runs: no state change, signed or not.
    let before = gw.snapshot().await;
    let other_card = json!({"cardNumber": "4123450000000001", "expiryDate": EXPIRY});
    let refused = gw.call("POST", ENROL, &other_card).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (503, "audit_unavailable")
    );
    let dynamic = gw.call("POST", VALUES, &other_card).await;
    assert_eq!(dynamic.status, 503);
    let unsigned = gw.send_raw("POST", ENQUIRY, &[], vec![]).await;
    assert_eq!(
        (unsigned.status, unsigned.code().as_str()),
        (503, "audit_unavailable")
    );
    assert_eq!(
        gw.snapshot().await,
        before,
        "a refused request changed the store"
    );
    let metrics = String::from_utf8(gw.send_raw("GET", METRICS, &[], vec![]).await.body).unwrap();
    assert!(metrics.contains("dcvv_audit_trail_down 1"), "{metrics}");

    // Space again: the gateway recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, ready) = readiness(&gw).await;
        if status == 200 {
            assert_eq!(ready["audit"], "ok");
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let enrolled = gw.call("POST", ENROL, &other_card).await;
    assert_eq!(enrolled.status, 200);
    let dir = gw.audit_dir.clone();
    gw.stop().await;

    let records = all_records(&dir);
    let recovered = records
        .iter()
        .find(|r| r.get("event") == Some(&json!("trail_recovered")))
        .unwrap();
    assert!(
        recovered["refused_requests"].as_u64().unwrap() >= 3,
        "{recovered:?}"
    );
    let statuses: Vec<u64> = records
        .iter()
        .filter(|r| r["kind"] == "request")
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        statuses,
        vec![200; accepted + 1],
        "the accepted requests and the one after recovery"
    );
    let (ok, stdout, stderr) = verify(&[&dir], &["--require-sealed"]);
    assert!(ok, "no partial line left behind: {stdout}{stderr}");
}

/// `chattr +i` on a file, undone when dropped (also when the test fails).
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Immutable {
        let out = Command::new("chattr").arg("+i").arg(path).output().unwrap();
        assert!(
            out.status.success(),
            "this test makes the trail file immutable and must run as root on a file system \
             with chattr (CI does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immutable_trail_file_fails_closed_and_recovers_once_writable() {
    let keep = tempfile::tempdir().unwrap();
    let dir = keep.path().join("audit");
    let gw = TestGateway::start(Options {
        audit_dir: Some(dir.clone()),
        ..Options::default()
    })
    .await;
    assert_eq!(gw.call("POST", ENQUIRY, &card(json!({}))).await.status, 200);
    let (file, _) = trail(&dir).pop().unwrap();
    let lock = Immutable::set(&file);
    let failed = gw.call("POST", ENQUIRY, &card(json!({}))).await;
    assert_eq!(
        (failed.status, failed.code().as_str()),
        (503, "audit_unavailable")
    );
    let (status, ready) = readiness(&gw).await;
    assert_eq!(
        (status, ready["audit"].as_str().unwrap()),
        (503, "down: permission denied on the trail's file")
    );
    let before = gw.snapshot().await;
    let other_card = json!({"cardNumber": "4123450000000001", "expiryDate": EXPIRY});
    assert_eq!(gw.call("POST", ENROL, &other_card).await.status, 503);
    assert_eq!(gw.snapshot().await, before);
    drop(lock);
    let deadline = Instant::now() + Duration::from_secs(10);
    while readiness(&gw).await.0 != 200 {
        assert!(Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gw.call("POST", ENROL, &other_card).await.status, 200);
    gw.stop().await;
    let requests = requests(&dir);
    assert_eq!(requests.len(), 2, "only the requests whose answer was sent");
    let (ok, stdout, stderr) = verify(&[&dir], &["--require-sealed"]);
    assert!(ok, "{stdout}{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seals_come_by_time_too_and_a_partial_last_line_is_dropped_at_start() {
    let keep = tempfile::tempdir().unwrap();
    let dir = keep.path().join("audit");
    let options = Options {
        audit_dir: Some(dir.clone()),
        seal_interval: Duration::from_secs(1),
        ..Options::default()
    };
    let gw = TestGateway::start(options.clone()).await;
    assert_eq!(gw.call("POST", ENQUIRY, &card(json!({}))).await.status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !all_records(&dir).iter().any(|r| r["kind"] == "seal") {
        assert!(Instant::now() < deadline, "no seal after the interval");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, stdout, stderr) = verify(&[&dir], &["--require-sealed"]);
    assert!(ok, "sealed while running: {stdout}{stderr}");
    gw.stop().await;

    // A crash in the middle of a write leaves a partial line, never acknowledged.
    let (file, _) = trail(&dir).pop().unwrap();
    let mut text = std::fs::read(&file).unwrap();
    text.extend_from_slice(b"{\"authenticated\":tr");
    std::fs::write(&file, &text).unwrap();
    assert!(!verify(&[&dir], &[]).0);
    let gw = TestGateway::start(options).await;
    assert_eq!(gw.call("POST", ENQUIRY, &card(json!({}))).await.status, 200);
    gw.stop().await;
    let (ok, stdout, stderr) = verify(&[&dir], &["--require-sealed"]);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(requests(&dir).len(), 2);
}

/// One request of the mid-load test: its id, status and code.
struct Sent {
    id: String,
    status: u16,
    code: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trail_failing_mid_load_misses_no_change() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let mount = tempfile::tempdir().unwrap();
    let _tmpfs = Tmpfs::mount(mount.path(), "512k");
    let gw = Arc::new(
        TestGateway::start(Options {
            max_in_flight: 64,
            audit_dir: Some(mount.path().join("audit")),
            ..Options::default()
        })
        .await,
    );
    // Eight clients enrol a new card each, back to back, until told to stop.
    let (next, stop) = (
        Arc::new(AtomicU32::new(1)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (gw, next, stop) = (Arc::clone(&gw), Arc::clone(&next), Arc::clone(&stop));
        tasks.spawn(async move {
            let mut sent = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let n = next.fetch_add(1, Ordering::SeqCst);
                let pan = support::instances::pan(n);
                let body =
                    serde_json::to_vec(&json!({"cardNumber": pan, "expiryDate": EXPIRY})).unwrap();
                let id = fresh_id();
                let headers = gw.signed_headers(
                    &gw.clients.main,
                    &id,
                    gw.clock.now_ms(),
                    "POST",
                    ENROL,
                    &body,
                );
                let answer = gw.send_raw("POST", ENROL, &headers, body).await;
                let code = if answer.status == 200 {
                    String::new()
                } else {
                    answer.code()
                };
                sent.push(Sent {
                    id,
                    status: answer.status,
                    code,
                });
                if answer.status != 200 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            sent
        });
    }
    // Fill the trail's disk while the requests run, keep them running a while
    // against the full disk, then stop them.
    while next.load(Ordering::SeqCst) < 60 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let filler = fill(mount.path());
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::SeqCst);
    let mut sent = Vec::new();
    while let Some(done) = tasks.join_next().await {
        sent.extend(done.unwrap());
    }
    let store = gw.snapshot().await;
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while readiness(&gw).await.0 != 200 {
        assert!(Instant::now() < deadline, "the trail did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dir = gw.audit_dir.clone();
    Arc::into_inner(gw).unwrap().stop().await;

    let unavailable = sent
        .iter()
        .filter(|s| (s.status, s.code.as_str()) == (503, "audit_unavailable"))
        .count();
    assert!(unavailable > 0, "the trail never failed under the load");
    assert!(sent.iter().any(|s| s.status == 200), "nothing was served");
    assert!(
        sent.iter().all(|s| s.status == 200 || s.status == 503),
        "only served or refused for the trail"
    );
    let records = all_records(&dir);
    let before_commit = |request_id: &str| {
        records.iter().any(|r| {
            r["kind"] == "change" && r["phase"] == "before_commit" && r["request_id"] == request_id
        })
    };
    let claimed: Vec<&str> = store["seen_requests"]
        .iter()
        .map(|row| row.split('|').nth(1).unwrap())
        .collect();
    let mut committed_without_response = 0;
    for s in &sent {
        let in_store = claimed.contains(&s.id.as_str());
        if s.status == 200 {
            assert!(in_store, "a 200 whose change is not in the store: {}", s.id);
            let request = records
                .iter()
                .find(|r| r["kind"] == "request" && r["request_id"] == s.id.as_str());
            assert_eq!(request.map(|r| r["status"].clone()), Some(json!(200)));
        } else if in_store {
            committed_without_response += 1;
        }
    }
    // The point: every change the store holds has a durable record from
    // before its commit, including those whose own request record failed.
    for id in &claimed {
        assert!(
            records
                .iter()
                .any(|r| r.get("request_id") == Some(&json!(id))),
            "a change the trail misses: {id}"
        );
    }
    for id in &claimed {
        assert!(before_commit(id), "a change with no record before it: {id}");
    }
    let enrolled: Vec<&str> = store["enrollments"]
        .iter()
        .map(|row| row.split('|').nth(2).unwrap())
        .collect();
    assert_eq!(
        enrolled.len(),
        claimed.len(),
        "one enrolment per spent request id"
    );
    for masked in &enrolled {
        assert!(
            records.iter().any(|r| r["kind"] == "change"
                && r["phase"] == "before_commit"
                && r["operation"] == "enrollment"
                && r["masked_pan"] == *masked),
            "an enrolment with no change record: {masked}"
        );
    }
    let (ok, stdout, stderr) = verify(&[&dir], &[]);
    assert!(ok, "{stdout}{stderr}");
    eprintln!(
        "{} requests: {} served, {unavailable} refused for the trail, \
         {committed_without_response} of them committed before their request record failed",
        sent.len(),
        sent.iter().filter(|s| s.status == 200).count()
    );
}
