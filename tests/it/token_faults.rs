//! The token goes away and comes back (issue 4, part 5; DESIGN 7.6), on a real
//! gateway over this process's own SoftHSM token, with real signed requests.
//!
//! SoftHSM is taken away by moving its token directory (`support::faults`);
//! each test runs in a child process with a SoftHSM token directory of its own,
//! so the moves disturb no other test process.
//! What was found on SoftHSM 2.6 (`softhsm_after_the_token_directory_is_gone`):
//! it reads its tokens at `C_Initialize` only; once the directory is gone,
//! `C_GetTokenInfo` fails, token objects are invalid handles and `C_FindObjects`
//! finds none, while open sessions still say "logged in" and session objects
//! made before keep working; putting the directory back changes nothing until
//! the library is finalized and initialized again. The gateway holds no session
//! working copies on SoftHSM (it refuses to copy non-modifiable keys), so every
//! card operation needs the token: each fails fast with 503 while it is away,
//! and the gateway re-initializes the library by itself when it is back.

use std::time::{Duration, Instant};

use dcvv_gateway::hsm::{MAX_BACKOFF, TokenState};
use serde_json::{Value, json};

use crate::support;
use crate::support::faults::{in_private_softhsm, set_pin, take_token_away, within};
use crate::support::http::{Answer, EXPIRY, K, K4, Options, PAN, T0, TestGateway, card, key};
use crate::support::logs::Capture;
use crate::support::reference;
use crate::support::routes::{
    CODES, DCVV, ENQUIRY, ENROL, KEY_INVENTORY, METRICS, READYZ, VALUES, VERIFY,
};

/// A refused request must be fast: this is a correctness bound (no waiting on
/// a dead token, no re-initialization on the request path), not a benchmark.
const FAIL_FAST: Duration = Duration::from_millis(500);
/// The watchdog checks every second and `/readyz` checks on every call.
const DETECTION: Duration = Duration::from_secs(3);
/// Recovery waits at most the longest backoff, plus a watchdog tick and slack.
const RECOVERY: Duration = Duration::from_secs(MAX_BACKOFF.as_secs() + 5);

fn dcvv_value() -> String {
    reference::dcvv(&key(K4), PAN, EXPIRY, "226", "3210").1
}

async fn readyz(gw: &TestGateway) -> (u16, Value) {
    let answer = gw.send_raw("GET", READYZ, &[], Vec::new()).await;
    let body = answer.json();
    (answer.status, body)
}

/// Every kind of card work, each as a signed request.
async fn every_request(gw: &TestGateway, cvv2: &str) -> Vec<(&'static str, Answer)> {
    vec![
        (
            "dynamic values",
            gw.call("POST", VALUES, &card(json!({"numberOfValues": 3})))
                .await,
        ),
        (
            "cvv2 verification",
            gw.call("POST", VERIFY, &card(json!({"cvv2": cvv2}))).await,
        ),
        (
            "static code",
            gw.call(
                "POST",
                CODES,
                &card(json!({"kind": "cvv", "serviceCode": "101"})),
            )
            .await,
        ),
        (
            "dcvv verification",
            gw.call(
                "POST",
                DCVV,
                &card(json!({"serviceCode": "226", "atc": "3210", "dcvv": dcvv_value()})),
            )
            .await,
        ),
        (
            "enrolment enquiry",
            gw.call("POST", ENQUIRY, &card(json!({}))).await,
        ),
        ("enrolment", gw.call("POST", ENROL, &card(json!({}))).await),
        (
            "key inventory",
            gw.call("GET", KEY_INVENTORY, &Value::Null).await,
        ),
    ]
}

/// What the gateway answers while the token is up: the values and codes that
/// must come back unchanged after a recovery.
async fn served(gw: &TestGateway) -> (Vec<String>, String) {
    let values = gw
        .call("POST", VALUES, &card(json!({"numberOfValues": 3})))
        .await;
    assert_eq!(
        values.status,
        200,
        "{}",
        String::from_utf8_lossy(&values.body)
    );
    let values = values.json()["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["dcvv2"].as_str().unwrap().to_owned())
        .collect();
    let code = gw
        .call(
            "POST",
            CODES,
            &card(json!({"kind": "cvv", "serviceCode": "101"})),
        )
        .await;
    assert_eq!(code.status, 200);
    (
        values,
        code.json()["securityCode"].as_str().unwrap().to_owned(),
    )
}

async fn verify(gw: &TestGateway, cvv2: &str) -> (String, String) {
    let answer = gw.call("POST", VERIFY, &card(json!({"cvv2": cvv2}))).await;
    let v = answer.ok_json();
    (
        v["result"].as_str().unwrap().to_owned(),
        v["method"].as_str().unwrap().to_owned(),
    )
}

/// Every card request fails with 503 `hsm_unavailable`, `Retry-After`, within
/// the fail-fast bound, and changes nothing in the store.
async fn all_refused_fast(gw: &TestGateway, cvv2: &str) {
    let before = gw.snapshot().await;
    for _ in 0..2 {
        let started = Instant::now();
        for (what, answer) in every_request(gw, cvv2).await {
            assert_eq!(
                answer.status,
                503,
                "{what}: {}",
                String::from_utf8_lossy(&answer.body)
            );
            assert_eq!(answer.code(), "hsm_unavailable", "{what}");
            assert!(
                answer.headers.contains_key("retry-after"),
                "{what}: Retry-After"
            );
        }
        let each = started.elapsed() / 7;
        eprintln!("refused in {} µs each", each.as_micros());
        assert!(
            each < FAIL_FAST,
            "refused requests took {} ms each",
            each.as_millis()
        );
    }
    assert_eq!(
        gw.snapshot().await,
        before,
        "a refused request changes no stored state"
    );
}

async fn until_ready(gw: &TestGateway) -> Duration {
    within(RECOVERY, "readiness after the token came back", || async {
        let (status, body) = readyz(gw).await;
        (status == 200 && body["hsm"] == "ok").then_some(())
    })
    .await
    .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_goes_away_requests_fail_fast_and_it_comes_back_without_restart() {
    if !in_private_softhsm(
        "token_faults::the_token_goes_away_requests_fail_fast_and_it_comes_back_without_restart",
    ) {
        return;
    }
    let gw = TestGateway::start(Options::default()).await;
    let token = std::sync::Arc::clone(&*crate::support::HSM);
    let t = T0 / 300;
    let (values, cvv) = served(&gw).await;
    assert_eq!(values[0], reference::tdcvv2(&key(K), PAN, EXPIRY, t).1);
    assert_eq!(cvv, reference::cvv(&key(K), PAN, EXPIRY, "101", 3).1);
    assert_eq!(
        verify(&gw, &values[0]).await,
        ("approved".into(), "dynamic".into())
    );
    assert_eq!(readyz(&gw).await.0, 200);
    // Counts are the token's since the process started.
    let start = token.recovery_counts();

    for cycle in 0..3u64 {
        let away = take_token_away();
        if cycle > 0 {
            // A request may find out before the watchdog does: 503 too, fast.
            let started = Instant::now();
            let first = gw
                .call(
                    "POST",
                    CODES,
                    &card(json!({"kind": "cvv", "serviceCode": "101"})),
                )
                .await;
            assert_eq!(
                (first.status, first.code()),
                (503, "hsm_unavailable".into())
            );
            assert!(started.elapsed() < FAIL_FAST);
        }
        // Without traffic (first cycle), the watchdog notices.
        let (_, noticed) = within(DETECTION, "the watchdog marks the token missing", || {
            let token = token.clone();
            async move { (token.state() == TokenState::Missing).then_some(()) }
        })
        .await;
        let (status, body) = readyz(&gw).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["hsm"], "missing", "{body}");
        assert_eq!(body["status"], "unavailable");
        assert_eq!(body["store"], "ok", "only the token is missing");

        // The next window's value would be approved if the token were there.
        gw.clock.set_seconds(T0 + 300 * (cycle + 1));
        let next = &reference::tdcvv2(&key(K), PAN, EXPIRY, t + cycle + 1).1;
        all_refused_fast(&gw, next).await;

        // Re-initialization runs on its backoff, not per request: while the
        // token stays away, requests keep failing fast and attempts stay few.
        let attempts = token.recovery_counts().reinit_attempts;
        tokio::time::sleep(Duration::from_secs(3)).await;
        all_refused_fast(&gw, next).await;
        let during = token.recovery_counts().reinit_attempts - attempts;
        assert!(
            during <= 3,
            "{during} re-initialization attempts in 3 s of absence (backoff 1 s doubling)"
        );
        let metrics = gw.send_raw("GET", METRICS, &[], Vec::new()).await;
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        assert!(text.contains("dcvv_hsm_up 0"), "{text}");

        away.put_back();
        let took = until_ready(&gw).await;
        eprintln!(
            "cycle {cycle}: missing noticed in {} ms, ready again {} ms after the token came back",
            noticed.as_millis(),
            took.as_millis()
        );
        // Without a restart: the same values and codes as before, and the
        // value refused while the token was away is approved now.
        gw.clock.set_seconds(T0);
        assert_eq!(served(&gw).await, (values.clone(), cvv.clone()));
        gw.clock.set_seconds(T0 + 300 * (cycle + 1));
        assert_eq!(
            verify(&gw, next).await,
            ("approved".into(), "dynamic".into())
        );
        for (what, answer) in every_request(&gw, next).await {
            assert_eq!(answer.status, 200, "{what} after recovery");
        }
    }
    let counts = token.recovery_counts();
    assert_eq!(counts.losses - start.losses, 3);
    assert_eq!(
        counts.reinit_successes - start.reinit_successes,
        3,
        "one re-initialization brought back each loss: {counts:?}"
    );
    let metrics = gw.send_raw("GET", METRICS, &[], Vec::new()).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(text.contains("dcvv_hsm_up 1"), "{text}");
    assert!(
        text.contains(&format!("dcvv_hsm_losses_total {}", counts.losses)),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "dcvv_hsm_reinit_successes_total {}",
            counts.reinit_successes
        )),
        "{text}"
    );
    let dir = gw.audit_dir.clone();

    // The trail: each request refused for the token after it was admitted
    // has its change record and the compensating `rolled_back` one; every
    // other change record belongs to a request answered 2xx.
    let records: Vec<Value> = crate::support::trail::records(&dir)
        .into_iter()
        .map(|r| Value::Object(r.into_iter().collect()))
        .collect();
    let of = |kind: &str, phase: Option<&str>| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["kind"] == kind && phase.is_none_or(|p| r["phase"] == p))
            .collect()
    };
    let refused: Vec<&str> = of("request", None)
        .into_iter()
        .filter(|r| r["error_code"] == "hsm_unavailable")
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    let rolled_back: Vec<&str> = of("change", Some("rolled_back"))
        .into_iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert!(!refused.is_empty());
    for change in of("change", Some("before_commit")) {
        let id = change["request_id"].as_str().unwrap();
        let served = of("request", None)
            .into_iter()
            .any(|r| r["request_id"] == id && r["status"].as_u64().is_some_and(|s| s < 300));
        assert!(
            served != rolled_back.contains(&id),
            "{id}: either served or rolled back"
        );
        if refused.contains(&id) {
            assert!(
                rolled_back.contains(&id),
                "{id} refused without a rolled_back record"
            );
        }
    }
    assert!(
        refused.iter().any(|id| rolled_back.contains(id)),
        "some request was refused after its change record was sent"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_refused_at_re_login_is_never_retried_and_a_fixed_pin_recovers() {
    if !in_private_softhsm(
        "token_faults::a_pin_refused_at_re_login_is_never_retried_and_a_fixed_pin_recovers",
    ) {
        return;
    }
    let capture = Capture::install(true);
    let wrong = "00112233445566778899aabbccddeeff";
    let gw = TestGateway::start(Options::default()).await;
    let token = std::sync::Arc::clone(&*crate::support::HSM);
    let (values, cvv) = served(&gw).await;

    let away = take_token_away();
    within(DETECTION, "the token is missing", || async {
        (readyz(&gw).await.1["hsm"] == "missing").then_some(())
    })
    .await;
    let right = set_pin(wrong);
    away.put_back();

    // The token is back but refuses the new PIN: readiness says so.
    within(RECOVERY, "readiness reports the refused PIN", || async {
        let (status, body) = readyz(&gw).await;
        (status == 503 && body["hsm"] == "pin_refused").then_some(())
    })
    .await;
    all_refused_fast(&gw, &values[0]).await;
    let counts = token.recovery_counts();
    // No retry storm: the refused PIN is never offered again, however long it
    // stays and however often readiness and the watchdog look.
    for _ in 0..10 {
        assert_eq!(readyz(&gw).await.1["hsm"], "pin_refused");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let later = token.recovery_counts();
    assert_eq!(later.logins, counts.logins, "no login with the refused PIN");
    assert_eq!(later.reinit_attempts, counts.reinit_attempts);
    assert_eq!(token.state(), TokenState::PinRefused);

    // The operator fixes the PIN file: the gateway logs in by itself.
    set_pin(&right);
    let took = until_ready(&gw).await;
    eprintln!("ready {} ms after the PIN was fixed", took.as_millis());
    assert_eq!(
        token.recovery_counts().logins,
        later.logins + 1,
        "one login with the fixed PIN"
    );
    assert_eq!(served(&gw).await, (values, cvv));
    gw.stop().await;

    // Operators see the loss, the refusal and the return once each; never a PIN.
    let log = capture.text();
    let count = |what: &str| log.matches(what).count();
    assert_eq!(count("token lost"), 1, "{log}");
    assert_eq!(count("the token refused the PIN"), 1, "{log}");
    assert_eq!(count("token back"), 1, "{log}");
    assert!(
        !log.contains(wrong) && !log.contains(&right),
        "a PIN in the log"
    );
}

/// Exactly what SoftHSM 2.6 still does from open sessions once the token
/// directory is gone, and that only a re-initialization sees it again.
#[test]
fn softhsm_after_the_token_directory_is_gone() {
    if !in_private_softhsm("token_faults::softhsm_after_the_token_directory_is_gone") {
        return;
    }
    use cryptoki::error::{Error, RvError};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, ObjectClass};
    use dcvv_gateway::hsm::KeyKind;

    let cvk = support::import(K, KeyKind::Cvk, "gone-cvk");
    let session = support::raw_session();
    let find = |session: &cryptoki::session::Session| {
        session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(true),
                Attribute::Label(cvk.as_str().as_bytes().to_vec()),
            ])
            .unwrap()
    };
    let token_key = find(&session)[0];
    let session_des = session
        .generate_key(
            &Mechanism::Des2KeyGen,
            &[
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
            ],
        )
        .unwrap();
    let session_hmac = session
        .generate_key(
            &Mechanism::GenericSecretKeyGen,
            &[
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Sign(true),
                Attribute::ValueLen(32.into()),
            ],
        )
        .unwrap();
    let block = [0u8; 8];
    let des_before = session
        .encrypt(&Mechanism::Des3Ecb, session_des, &block)
        .unwrap();
    let mac_before = session
        .sign(&Mechanism::Sha256Hmac, session_hmac, b"m")
        .unwrap();
    let kcv = session
        .encrypt(&Mechanism::Des3Ecb, token_key, &block)
        .unwrap();
    assert_eq!(hex::encode_upper(&kcv[..3]), "08D7B4");
    let slot = session.get_session_info().unwrap().slot_id();
    let ctx = cryptoki::context::Pkcs11::new(support::module()).unwrap();
    let _ = ctx.initialize(cryptoki::context::CInitializeArgs::new(
        cryptoki::context::CInitializeFlags::OS_LOCKING_OK,
    ));

    // As root (CI), chmod does not take the token away: root ignores modes.
    if running_as_root() {
        use std::os::unix::fs::PermissionsExt;
        let dir = support::faults::token_dir();
        let mode = |m| std::fs::Permissions::from_mode(m);
        std::fs::set_permissions(&dir, mode(0o000)).unwrap();
        let still = session.encrypt(&Mechanism::Des3Ecb, token_key, &block);
        std::fs::set_permissions(&dir, mode(0o700)).unwrap();
        assert_eq!(still.unwrap(), kcv, "chmod 000 took nothing away from root");
        assert!(ctx.get_token_info(slot).is_ok());
    }

    let away = take_token_away();
    assert!(ctx.get_token_info(slot).is_err(), "C_GetTokenInfo fails");
    assert!(
        matches!(
            session.get_session_info().unwrap().session_state(),
            cryptoki::session::SessionState::RwUser
        ),
        "the open session still says logged in: not a usable probe"
    );
    assert!(
        matches!(
            session.encrypt(&Mechanism::Des3Ecb, token_key, &block),
            Err(Error::Pkcs11(RvError::ObjectHandleInvalid, _))
        ),
        "a token object is an invalid handle"
    );
    assert!(find(&session).is_empty(), "token objects cannot be found");
    // What keeps working: objects that live in the session itself.
    assert_eq!(
        session
            .encrypt(&Mechanism::Des3Ecb, session_des, &block)
            .unwrap(),
        des_before,
        "a session key made before still encrypts"
    );
    assert_eq!(
        session
            .sign(&Mechanism::Sha256Hmac, session_hmac, b"m")
            .unwrap(),
        mac_before,
        "a session HMAC key made before still signs"
    );
    // The gateway's own calls fail (it has no working copies on SoftHSM).
    let hsm = &**support::HSM;
    let engine = dcvv_gateway::domain::Engine::new(hsm);
    let static_code = || {
        engine.static_code(
            &cvk,
            &PAN.parse().unwrap(),
            EXPIRY.parse().unwrap(),
            dcvv_gateway::domain::StaticCodeKind::Cvv2,
            dcvv_gateway::domain::CodeLength::THREE,
        )
    };
    let refused = static_code().unwrap_err();
    assert!(
        matches!(
            refused,
            dcvv_gateway::domain::DomainError::Unavailable(
                dcvv_gateway::domain::Dependency::Hsm,
                _
            )
        ),
        "{refused:?}"
    );
    let cause = std::error::Error::source(&refused).map(ToString::to_string);
    assert!(
        cause.as_deref().is_some_and(|c| c.contains("missing")),
        "{cause:?}"
    );
    assert_eq!(hsm.state(), TokenState::Missing);

    away.put_back();
    // Back on disk, but SoftHSM does not see it until re-initialized.
    assert!(ctx.get_token_info(slot).is_err());
    assert!(
        session
            .encrypt(&Mechanism::Des3Ecb, token_key, &block)
            .is_err()
    );
    // Recovery re-initializes the library (once the backoff allows).
    let started = Instant::now();
    while hsm.maintain() != TokenState::Ready {
        assert!(started.elapsed() < RECOVERY, "recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        static_code().unwrap().code.expose(),
        reference::cvv(&key(K), PAN, EXPIRY, "000", 3).1
    );
    // The re-initialization closed every session of the process, the old
    // session's too.
    assert!(session.get_session_info().is_err());
    drop(session);
    assert_eq!(find(&support::raw_session()).len(), 1);
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
    })
}

/// Requests in flight while the token goes and comes back get either their
/// right answer or a fast 503: never a wrong value, a 500 or another code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_under_load_get_the_right_answer_or_a_fast_503() {
    if !in_private_softhsm("token_faults::requests_under_load_get_the_right_answer_or_a_fast_503") {
        return;
    }
    let gw = std::sync::Arc::new(TestGateway::start(Options::default()).await);
    let (values, cvv) = served(&gw).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = (0..2)
        .map(|worker| {
            let (gw, stop, values, cvv) = (gw.clone(), stop.clone(), values.clone(), cvv.clone());
            tokio::spawn(async move {
                let (mut ok, mut refused, mut slowest) = (0u32, 0u32, Duration::ZERO);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let started = Instant::now();
                    let (answer, expected, field) = if worker == 0 {
                        let a = gw
                            .call(
                                "POST",
                                CODES,
                                &card(json!({"kind": "cvv", "serviceCode": "101"})),
                            )
                            .await;
                        (a, cvv.clone(), "securityCode")
                    } else {
                        let a = gw
                            .call("POST", VALUES, &card(json!({"numberOfValues": 1})))
                            .await;
                        (a, values[0].clone(), "dcvv2")
                    };
                    slowest = slowest.max(started.elapsed());
                    match answer.status {
                        200 => {
                            assert_eq!(answer.json()[field], expected.as_str());
                            ok += 1;
                        }
                        503 => {
                            assert_eq!(answer.code(), "hsm_unavailable");
                            refused += 1;
                        }
                        other => {
                            panic!("status {other}: {}", String::from_utf8_lossy(&answer.body))
                        }
                    }
                }
                (ok, refused, slowest)
            })
        })
        .collect::<Vec<_>>();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let away = take_token_away();
    within(DETECTION, "the token is missing", || async {
        (crate::support::HSM.state() == TokenState::Missing).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    away.put_back();
    until_ready(&gw).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (worker, task) in load.into_iter().enumerate() {
        let (ok, refused, slowest) = task.await.unwrap();
        eprintln!(
            "worker {worker}: {ok} served, {refused} refused, slowest {} ms",
            slowest.as_millis()
        );
        assert!(
            ok > 0 && refused > 0,
            "worker {worker}: {ok} served, {refused} refused"
        );
        assert!(
            slowest < Duration::from_secs(2),
            "no request waited on the token"
        );
    }
    assert_eq!(served(&gw).await, (values, cvv));
    // Stopped like every gateway: drained, trail sealed and closed, watchdog
    // ended, before the process (and SoftHSM with it) exits.
    std::sync::Arc::into_inner(gw)
        .expect("the load tasks have ended")
        .stop()
        .await;
}
