//! Crash consistency (issue 12, item 5): a real `dcvv-gateway serve` under
//! concurrent load is SIGKILLed several times at random moments and started
//! again on the same store (a SQLite file, or a PostgreSQL database) and the
//! same audit trail directory.
//!
//! Six clients enrol cards, ask for dynamic values, verify the codes those
//! values hold (often twice at once, and again after restarts, so single-use
//! windows are contended) and now and then send a request id again. Every
//! answer that came back 2xx before a kill goes into a ledger; a request cut
//! off by the kill has no answer and promises nothing. What must hold:
//!
//! - after each kill, with the process gone: the trail holds a `request` record
//!   of every 2xx with its status and outcome; `audit verify` passes, except on
//!   a torn last line (a write cut short), where it must fail naming the
//!   incomplete line. Some kills get a torn line added by the test, as a crash
//!   in the middle of a write leaves one. And every change the store holds
//!   (spent request ids, enrolments, spent windows) has its `before_commit`
//!   change record, also for the requests the kill cut off after their commit;
//! - after each restart, before any request: the gateway truncated a torn line
//!   and opened the trail with a `trail_opened` notice, and `audit verify`
//!   passes;
//! - after each restart: every card enrolled by a 2xx is enrolled; every window
//!   approved by a 2xx is declined as `code_already_used`; no (card, window) was
//!   approved twice in the whole ledger; every request id answered 2xx (so
//!   spent) is refused with 409 `duplicate_request`.
//!
//! The random choices (what each client sends, how much load before each kill,
//! how many kills, which kills tear a line) come from one seed, printed at the
//! start; `DCVV_CRASH_SEED=<seed>` runs the same choices again (the
//! interleaving of the clients is the scheduler's). No assertion is about
//! time: a kill comes after a random number of 2xx answers, not after a delay.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcvv_gateway::audit::record::parse_file_name;
use serde_json::{Value, json};

use crate::support;
use crate::support::http::{Answer, EXPIRY, K, key};
use crate::support::instances::{Fleet, Instance, TrailSettings, fresh_id, now_ms, pan};
use crate::support::reference;
use crate::support::routes::{ENQUIRY, ENROL, VALUES, VERIFY};

/// The test programme's window (instances.rs).
const WINDOW_SECONDS: u64 = 300;
const CARDS: usize = 40;
const CLIENTS: usize = 6;
/// The instance's name: its config file and audit directory.
const NAME: &str = "gw";
/// A run is killed after a random number of 2xx answers, from 20 up to this,
/// whatever the load looks like; if they do not come within [`LOAD_DEADLINE`],
/// it is killed then.
const MOST_ANSWERS_PER_RUN: u64 = 120;
const LOAD_DEADLINE: Duration = Duration::from_secs(40);

/// splitmix64: small, seedable, and good enough to pick what to send.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn index(&mut self, len: usize) -> usize {
        usize::try_from(self.below(u64::try_from(len).unwrap())).unwrap()
    }

    fn fork(&mut self) -> Rng {
        Rng(self.next())
    }
}

/// `DCVV_CRASH_SEED` when set, else the clock.
fn seed() -> u64 {
    std::env::var("DCVV_CRASH_SEED")
        .ok()
        .map(|s| s.parse().expect("DCVV_CRASH_SEED: a number"))
        .unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            u64::try_from(nanos % u128::from(u64::MAX)).unwrap()
        })
}

/// A request as sent: replaying it sends the same id and body.
#[derive(Clone, Debug)]
struct Sent {
    id: String,
    route: &'static str,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
}

/// What a 2xx answer promised about the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    /// Nothing beyond the spent request id (an enquiry).
    Nothing,
    /// The card is enrolled.
    Enrolled,
    /// The (card, window) code was approved: the window is spent.
    Approved(u64),
    /// The (card, window) code was declined as already used.
    AlreadyUsed(u64),
}

/// One request answered 2xx before a kill.
#[derive(Clone, Debug)]
struct Answered {
    sent: Sent,
    card: usize,
    status: u16,
    effect: Effect,
    /// Which run of the process answered it (0 before the first kill).
    run: usize,
}

/// What the clients saw, across every run.
#[derive(Default)]
struct Ledger {
    answered: Vec<Answered>,
    /// The newest code each card was given: (window, code).
    codes: HashMap<usize, (u64, String)>,
    /// "route status code" → how many, for the summary.
    statuses: BTreeMap<String, u32>,
    /// Requests that got no whole answer (cut off by a kill).
    unanswered: u32,
    /// Replays refused with 409 during the load.
    replays_refused: u32,
}

struct Load {
    instance: Arc<Instance>,
    cards: Arc<Vec<String>>,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    answered_this_run: Arc<AtomicUsize>,
    run: usize,
}

fn card_body(pan: &str, extra: Value) -> Vec<u8> {
    let mut body = json!({"cardNumber": pan, "expiryDate": EXPIRY});
    if let (Value::Object(map), Value::Object(more)) = (&mut body, extra) {
        map.extend(more);
    }
    serde_json::to_vec(&body).unwrap()
}

fn text(answer: &Answer) -> String {
    format!(
        "{} {}",
        answer.status,
        String::from_utf8_lossy(&answer.body)
            .chars()
            .take(300)
            .collect::<String>()
    )
}

impl Load {
    fn sign(&self, id: String, route: &'static str, body: Vec<u8>) -> Sent {
        let headers = self.instance.headers(&id, "POST", route, &body);
        Sent {
            id,
            route,
            body,
            headers,
        }
    }

    async fn send(&self, sent: &Sent) -> Option<Answer> {
        let answer = self
            .instance
            .try_send(sent.route, &sent.headers, sent.body.clone())
            .await
            .ok();
        let mut ledger = self.ledger.lock().unwrap();
        match &answer {
            Some(a) => {
                let label = if a.status == 200 {
                    format!("{} 200", sent.route)
                } else {
                    format!("{} {} {}", sent.route, a.status, a.code())
                };
                *ledger.statuses.entry(label).or_default() += 1;
            }
            None => ledger.unanswered += 1,
        }
        answer
    }

    /// A fresh request's answer: 200, or an overload / unavailable answer
    /// (which promises nothing), or `None` when the kill cut it off. Anything
    /// else fails the test.
    async fn fresh(&self, sent: &Sent) -> Option<Answer> {
        let answer = self.send(sent).await?;
        match answer.status {
            200 => Some(answer),
            429 | 503 => None,
            _ => panic!(
                "{} {} answered {} in run {}",
                sent.route,
                sent.id,
                text(&answer),
                self.run
            ),
        }
    }

    fn keep(&self, sent: Sent, card: usize, effect: Effect) {
        self.ledger.lock().unwrap().answered.push(Answered {
            sent,
            card,
            status: 200,
            effect,
            run: self.run,
        });
        self.answered_this_run.fetch_add(1, Ordering::SeqCst);
    }

    async fn values(&self, card: usize) {
        let pan = &self.cards[card];
        let sent = self.sign(fresh_id(), VALUES, card_body(pan, json!({})));
        let Some(answer) = self.fresh(&sent).await else {
            return;
        };
        let body = answer.json();
        let code = body["values"][0]["dcvv2"].as_str().unwrap().to_owned();
        let from = body["values"][0]["validFrom"].as_str().unwrap();
        let from =
            time::OffsetDateTime::parse(from, &time::format_description::well_known::Rfc3339)
                .unwrap()
                .unix_timestamp();
        let window = u64::try_from(from).unwrap() / WINDOW_SECONDS;
        assert_eq!(
            code,
            reference::tdcvv2(&key(K), pan, EXPIRY, window).1,
            "the gateway's value of window {window} is not the reference's"
        );
        {
            let mut ledger = self.ledger.lock().unwrap();
            let newest = ledger.codes.entry(card).or_insert((window, code.clone()));
            if newest.0 < window {
                *newest = (window, code);
            }
        }
        self.keep(sent, card, Effect::Enrolled);
    }

    async fn enrol(&self, card: usize) {
        let sent = self.sign(fresh_id(), ENROL, card_body(&self.cards[card], json!({})));
        if let Some(answer) = self.fresh(&sent).await {
            assert_eq!(answer.json()["enrollment"], "enrolled", "{}", text(&answer));
            self.keep(sent, card, Effect::Enrolled);
        }
    }

    async fn enquiry(&self, card: usize) {
        let sent = self.sign(fresh_id(), ENQUIRY, card_body(&self.cards[card], json!({})));
        if self.fresh(&sent).await.is_some() {
            self.keep(sent, card, Effect::Nothing);
        }
    }

    /// The card's newest code, once or twice at once (a single-use window is
    /// approved at most once).
    async fn verify(&self, card: usize, window: u64, code: &str, twice: bool) {
        let body = card_body(&self.cards[card], json!({"cvv2": code}));
        let one = self.sign(fresh_id(), VERIFY, body.clone());
        let two = self.sign(fresh_id(), VERIFY, body);
        let (a, b) = if twice {
            tokio::join!(self.fresh(&one), self.fresh(&two))
        } else {
            (self.fresh(&one).await, None)
        };
        for (sent, answer) in [(one, a), (two, b)] {
            let Some(answer) = answer else { continue };
            let verdict = answer.verdict();
            let effect = match (verdict.0.as_str(), verdict.1.as_str(), verdict.2.as_str()) {
                ("approved", "match", "dynamic") => Effect::Approved(window),
                ("declined", "code_already_used", "dynamic") => Effect::AlreadyUsed(window),
                _ => panic!(
                    "the right code of window {window} got {verdict:?} in run {}",
                    self.run
                ),
            };
            self.keep(sent, card, effect);
        }
    }

    /// Sends an answered request again with its id: refused with 409 whether
    /// replayed byte for byte or signed again.
    async fn replay(&self, rng: &mut Rng) {
        let original = {
            let ledger = self.ledger.lock().unwrap();
            if ledger.answered.is_empty() {
                return;
            }
            let i = rng.index(ledger.answered.len());
            ledger.answered[i].clone()
        };
        let sent = if rng.below(2) == 0 {
            original.sent.clone()
        } else {
            self.sign(
                original.sent.id.clone(),
                original.sent.route,
                original.sent.body.clone(),
            )
        };
        let Some(answer) = self.send(&sent).await else {
            return;
        };
        match (answer.status, answer.code().as_str()) {
            (409, "duplicate_request") => self.ledger.lock().unwrap().replays_refused += 1,
            (429 | 503, _) => {}
            _ => panic!(
                "request id {} (answered {} in run {}) sent again in run {}: {}",
                sent.id,
                original.status,
                original.run,
                self.run,
                text(&answer)
            ),
        }
    }

    /// One client until the run stops.
    async fn client(self: Arc<Self>, mut rng: Rng) {
        while !self.stop.load(Ordering::SeqCst) {
            let card = rng.index(self.cards.len());
            let code = self.ledger.lock().unwrap().codes.get(&card).cloned();
            match (rng.below(100), code) {
                (0..15, _) => self.replay(&mut rng).await,
                (15..25, _) => self.enrol(card).await,
                (25..30, _) => self.enquiry(card).await,
                (30..80, Some((window, code))) => {
                    self.verify(card, window, &code, rng.below(3) == 0).await;
                }
                _ => self.values(card).await,
            }
        }
    }
}

/// The trail's records in chain order, read while no process writes it, and
/// whether the last file ends in a partial line (dropped here).
fn read_trail(dir: &Path) -> (Vec<Value>, bool) {
    let mut files: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| Some((parse_file_name(p.file_name()?.to_str()?)?, p)))
        .collect();
    files.sort();
    let texts: Vec<(std::path::PathBuf, Vec<u8>)> = files
        .into_iter()
        .map(|(_, p)| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .filter(|(_, t)| !t.is_empty())
        .collect();
    let mut records = Vec::new();
    let mut torn = false;
    for (i, (path, bytes)) in texts.iter().enumerate() {
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < bytes.len() {
            assert_eq!(
                i + 1,
                texts.len(),
                "{}: a partial line before the last file",
                path.display()
            );
            torn = true;
        }
        for (n, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
            if !line.is_empty() {
                records.push(serde_json::from_slice(line).unwrap_or_else(|e| {
                    panic!(
                        "{}:{}: not a JSON record ({e}): {}",
                        path.display(),
                        n + 1,
                        String::from_utf8_lossy(line)
                    )
                }));
            }
        }
    }
    (records, torn)
}

/// The last trail file (the one being appended to).
fn last_file(dir: &Path) -> std::path::PathBuf {
    let mut files: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| Some((parse_file_name(p.file_name()?.to_str()?)?, p)))
        .filter(|(_, p)| std::fs::metadata(p).unwrap().len() > 0)
        .collect();
    files.sort();
    files.pop().unwrap().1
}

/// `audit verify` on the trail, through the binary: (success, its output).
fn audit_verify(fleet: &Fleet) -> (bool, String) {
    let dir = fleet.audit_dir(NAME).display().to_string();
    let (ok, stdout, stderr) =
        support::gateway(&fleet.config_path(NAME), &["audit", "verify", &dir]);
    (ok, format!("{stdout}{stderr}"))
}

/// With the process gone: every 2xx has its record, and `audit verify` holds
/// unless the last line is torn (then it names it). Returns whether it is torn.
fn check_trail_after_kill(fleet: &Fleet, ledger: &Ledger, context: &str) -> bool {
    let (records, torn) = read_trail(&fleet.audit_dir(NAME));
    let mut by_id: HashMap<&str, Vec<&Value>> = HashMap::new();
    for r in records.iter().filter(|r| r["kind"] == "request") {
        by_id
            .entry(r["request_id"].as_str().unwrap())
            .or_default()
            .push(r);
    }
    let mut missing = Vec::new();
    for a in &ledger.answered {
        let (outcome, reason) = match a.effect {
            Effect::Approved(_) => ("approved", Some("match")),
            Effect::AlreadyUsed(_) => ("declined", Some("code_already_used")),
            Effect::Nothing | Effect::Enrolled => ("ok", None),
        };
        let found = by_id.get(a.sent.id.as_str()).is_some_and(|rs| {
            rs.iter().any(|r| {
                r["status"] == a.status
                    && r["operation"] == a.sent.route
                    && r["outcome"] == outcome
                    && reason.is_none_or(|reason| r["reason"] == reason)
            })
        });
        if !found {
            missing.push(format!(
                "{} {} ({:?}, run {})",
                a.sent.route, a.sent.id, a.effect, a.run
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "{context}: {} of {} requests answered 2xx have no matching record in the trail: {missing:?}",
        missing.len(),
        ledger.answered.len()
    );
    let (ok, out) = audit_verify(fleet);
    if torn {
        assert!(
            !ok && out.contains("the last line is incomplete"),
            "{context}: audit verify on a torn last line: {out}"
        );
    } else {
        assert!(ok, "{context}: audit verify after the kill: {out}");
    }
    torn
}

/// Appends the first part of a record, as a crash in the middle of a write
/// leaves it (a write of the trail is one `write` of whole lines; the kernel
/// may still have written only part of it).
fn tear_last_line(fleet: &Fleet, rng: &mut Rng) {
    let file = last_file(&fleet.audit_dir(NAME));
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes[..bytes.len() - 1]
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap()
        .to_vec();
    let cut = 1 + rng.index(last.len() - 1);
    bytes.extend_from_slice(&last[..cut]);
    std::fs::write(&file, &bytes).unwrap();
}

/// Right after a restart, before any request: the torn line is gone, the
/// trail was opened with a notice (one per start), and `audit verify` passes.
fn check_trail_after_restart(fleet: &Fleet, starts: usize, context: &str) {
    let (records, torn) = read_trail(&fleet.audit_dir(NAME));
    assert!(
        !torn,
        "{context}: the restarted gateway left a partial last line"
    );
    let last = records.last().unwrap();
    assert_eq!(
        (&last["kind"], &last["event"]),
        (&json!("notice"), &json!("trail_opened")),
        "{context}: the last record after a restart: {last}"
    );
    let opened = records
        .iter()
        .filter(|r| r["kind"] == "notice" && r["event"] == "trail_opened")
        .count();
    assert_eq!(
        opened, starts,
        "{context}: one trail_opened notice per start"
    );
    let (ok, out) = audit_verify(fleet);
    assert!(ok, "{context}: audit verify after the restart: {out}");
}

/// With the process gone: every change the store holds has a `before_commit`
/// change record in the trail (docs/security/audit-trail.md, change records):
/// each spent request id, each enrolled card, and as many CVV2 verifications of
/// a card as it has spent windows. Returns how many spent request ids have a
/// `before_commit` record and no `request` record: requests the kill cut off
/// after their commit.
async fn check_changes_recorded(fleet: &Fleet, context: &str) -> usize {
    let (records, _) = read_trail(&fleet.audit_dir(NAME));
    let before_commit: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "change" && r["phase"] == "before_commit")
        .collect();
    let ids: BTreeSet<&str> = before_commit
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    let answered: BTreeSet<&str> = records
        .iter()
        .filter(|r| r["kind"] == "request")
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    let changes_of = |pan: &str, operations: &[&str]| {
        before_commit
            .iter()
            .filter(|r| r["masked_pan"] == pan && operations.iter().any(|o| r["operation"] == *o))
            .count()
    };

    let spent = fleet.strings("SELECT request_id FROM seen_requests").await;
    let unrecorded: Vec<&String> = spent
        .iter()
        .filter(|id| !ids.contains(id.as_str()))
        .collect();
    assert!(
        unrecorded.is_empty(),
        "{context}: request ids spent in the store without a before_commit record: {unrecorded:?}"
    );
    let enrolled = fleet.strings("SELECT masked_pan FROM enrollments").await;
    let unrecorded: Vec<&String> = enrolled
        .iter()
        .filter(|pan| changes_of(pan, &["dynamic_values", "enrollment"]) == 0)
        .collect();
    assert!(
        unrecorded.is_empty(),
        "{context}: cards enrolled in the store without a before_commit record: {unrecorded:?}"
    );
    let mut windows: BTreeMap<String, usize> = BTreeMap::new();
    for pan in fleet
        .strings(
            "SELECT e.masked_pan FROM used_windows u JOIN enrollments e ON e.card_id = u.card_id",
        )
        .await
    {
        *windows.entry(pan).or_default() += 1;
    }
    for (pan, spent) in &windows {
        let verifications = changes_of(pan, &["cvv2_verification"]);
        assert!(
            verifications >= *spent,
            "{context}: {pan} has {spent} spent windows and {verifications} before_commit records of verifications"
        );
    }
    spent
        .iter()
        .filter(|id| !answered.contains(id.as_str()))
        .count()
}

/// What the store must show after a restart, asked through the gateway.
#[derive(Debug, Clone)]
enum Check {
    /// The card is enrolled.
    Enrolled(usize),
    /// The window's code is declined as already used.
    Spent(usize, u64),
    /// The request id is refused.
    Replay(Sent),
}

/// Sends `body` (signed now, with `id`) until an answer other than 429/503.
async fn ask(instance: &Instance, route: &'static str, id: &str, body: &[u8]) -> Answer {
    let mut tries = 0;
    loop {
        let headers = instance.headers(id, "POST", route, body);
        let answer = instance.send(route, &headers, body.to_vec()).await;
        tries += 1;
        if !matches!(answer.status, 429 | 503) || tries == 20 {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One check; the failure, if any.
async fn check(instance: &Instance, cards: &[String], check: &Check) -> Option<String> {
    match check {
        Check::Enrolled(card) => {
            let answer = ask(
                instance,
                ENQUIRY,
                &fresh_id(),
                &card_body(&cards[*card], json!({})),
            )
            .await;
            (answer.status != 200 || answer.json()["enrollment"] != "enrolled").then(|| {
                format!(
                    "card {card} enrolled by a 2xx: enquiry says {}",
                    text(&answer)
                )
            })
        }
        Check::Spent(card, window) => {
            let code = reference::tdcvv2(&key(K), &cards[*card], EXPIRY, *window).1;
            let body = card_body(&cards[*card], json!({"cvv2": code}));
            let answer = ask(instance, VERIFY, &fresh_id(), &body).await;
            let declined = answer.status == 200
                && answer.json()["result"] == "declined"
                && answer.json()["reason"] == "code_already_used";
            (!declined).then(|| {
                format!(
                    "card {card} window {window} approved by a 2xx: verified again, {}",
                    text(&answer)
                )
            })
        }
        Check::Replay(sent) => {
            let answer = ask(instance, sent.route, &sent.id, &sent.body).await;
            (answer.status != 409 || answer.code() != "duplicate_request").then(|| {
                format!(
                    "request id {} ({}) answered 2xx: sent again, {}",
                    sent.id,
                    sent.route,
                    text(&answer)
                )
            })
        }
    }
}

/// After a restart: every 2xx's state is in the store, no window was approved
/// twice, and every spent request id is refused.
async fn check_store_after_restart(
    instance: &Arc<Instance>,
    cards: &Arc<Vec<String>>,
    answered: &[Answered],
    context: &str,
) {
    let mut approvals: BTreeMap<(usize, u64), Vec<&Answered>> = BTreeMap::new();
    let mut enrolled = BTreeSet::new();
    let mut checks = Vec::new();
    for a in answered {
        match a.effect {
            Effect::Approved(window) => approvals.entry((a.card, window)).or_default().push(a),
            Effect::Enrolled => {
                enrolled.insert(a.card);
            }
            Effect::Nothing | Effect::AlreadyUsed(_) => {}
        }
        checks.push(Check::Replay(a.sent.clone()));
    }
    let twice: Vec<_> = approvals
        .iter()
        .filter(|(_, by)| by.len() > 1)
        .map(|(w, by)| {
            (
                w,
                by.iter().map(|a| (&a.sent.id, a.run)).collect::<Vec<_>>(),
            )
        })
        .collect();
    assert!(
        twice.is_empty(),
        "{context}: windows approved more than once: {twice:?}"
    );
    checks.extend(enrolled.iter().map(|&c| Check::Enrolled(c)));
    checks.extend(approvals.keys().map(|&(c, w)| Check::Spent(c, w)));

    let checks = Arc::new(checks);
    let lanes = 4;
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..lanes {
        let (instance, cards, checks) = (instance.clone(), cards.clone(), checks.clone());
        tasks.spawn(async move {
            let mut failures = Vec::new();
            for c in checks.iter().skip(lane).step_by(lanes) {
                failures.extend(check(&instance, &cards, c).await);
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(lane) = tasks.join_next().await {
        failures.extend(lane.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{context}: {} of {} checks failed: {failures:#?}\n{}",
        failures.len(),
        checks.len(),
        instance.log_text()
    );
}

/// Cards whose codes differ in every window the test can touch (the gateway
/// claims the first accepted window whose code matches: where two neighbouring
/// windows share a code, which one that is would depend on its clock).
fn cards() -> Vec<String> {
    let t = reference::window(now_ms() / 1000, WINDOW_SECONDS);
    (0..10_000)
        .map(|n| pan(4000 + n))
        .filter(|pan| {
            let codes: BTreeSet<String> = (t - 1..=t + 2)
                .map(|w| reference::tdcvv2(&key(K), pan, EXPIRY, w).1)
                .collect();
            codes.len() == 4
        })
        .take(CARDS)
        .collect()
}

async fn sigkill_under_load(mut fleet: Fleet, backend: &str) {
    let seed = seed();
    eprintln!("crash test on {backend}: seed {seed} (DCVV_CRASH_SEED={seed} repeats its choices)");
    let mut rng = Rng(seed);
    // Seals by count only (none by time, so a gateway that serves nothing writes
    // nothing while the test reads its trail), and small files: kills land near
    // seals and rotations too.
    fleet.trail = TrailSettings {
        seal_every_records: 20,
        seal_interval_seconds: 3600,
        max_file_bytes: 16 * 1024,
    };
    let kills = 3 + rng.index(3);
    let cards = Arc::new(cards());
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut torn_by_kill = 0;
    let mut torn_by_test = 0;
    let mut cut_off_after_commit = 0;
    let mut last = None;
    for run in 0..=kills {
        let instance = Arc::new(fleet.start(NAME).await);
        last = Some(instance.clone());
        if run > 0 {
            let context = format!("{backend}, seed {seed}, after restart {run}");
            check_trail_after_restart(&fleet, run + 1, &context);
            let answered = ledger.lock().unwrap().answered.clone();
            check_store_after_restart(&instance, &cards, &answered, &context).await;
        }
        if run == kills {
            break;
        }

        // Load, then a kill after a random number of 2xx answers.
        let target = 20 + rng.below(MOST_ANSWERS_PER_RUN - 20);
        let load = Arc::new(Load {
            instance: instance.clone(),
            cards: cards.clone(),
            ledger: ledger.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            answered_this_run: Arc::new(AtomicUsize::new(0)),
            run,
        });
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| tokio::spawn(load.clone().client(rng.fork())))
            .collect();
        let deadline = Instant::now() + LOAD_DEADLINE;
        while (load.answered_this_run.load(Ordering::SeqCst) as u64) < target
            && Instant::now() < deadline
            && !clients.iter().any(|c| c.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.below(20))).await;
        instance.kill();
        load.stop.store(true, Ordering::SeqCst);
        for client in clients {
            client.await.unwrap();
        }
        let answered = load.answered_this_run.load(Ordering::SeqCst);
        eprintln!("run {run}: killed after {answered} answers (target {target})");
        assert!(
            answered > 0,
            "run {run}: no request was answered 2xx:\n{}",
            instance.log_text()
        );

        let context = format!("{backend}, seed {seed}, after kill {}", run + 1);
        let torn = check_trail_after_kill(&fleet, &ledger.lock().unwrap(), &context);
        cut_off_after_commit = check_changes_recorded(&fleet, &context).await;
        if torn {
            torn_by_kill += 1;
        } else if rng.below(2) == 0 {
            tear_last_line(&fleet, &mut rng);
            torn_by_test += 1;
            let (ok, out) = audit_verify(&fleet);
            assert!(
                !ok && out.contains("the last line is incomplete"),
                "{context}: audit verify on a torn last line: {out}"
            );
        }
    }

    if let Some(instance) = last {
        instance.kill();
    }
    let ledger = ledger.lock().unwrap();
    let approvals = ledger
        .answered
        .iter()
        .filter(|a| matches!(a.effect, Effect::Approved(_)))
        .count();
    eprintln!(
        "{backend}: {kills} kills; {} answered 2xx ({approvals} approvals), {} cut off, \
         {} replays refused during the load; torn last lines: {torn_by_kill} by a kill, \
         {torn_by_test} by the test; {cut_off_after_commit} request ids spent with a \
         before_commit record and no request record (cut off after their commit); answers: {:?}",
        ledger.answered.len(),
        ledger.unanswered,
        ledger.replays_refused,
        ledger.statuses
    );
    assert!(
        approvals > 0,
        "no window was approved: the test showed nothing about single use"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_sigkill_under_load_keeps_every_answered_request() {
    sigkill_under_load(Fleet::sqlite(2000), "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_sigkill_under_load_keeps_every_answered_request() {
    sigkill_under_load(Fleet::new(2000).await, "postgres").await;
}
