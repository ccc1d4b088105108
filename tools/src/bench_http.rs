//! `bench http`: end-to-end throughput and latency of the signed API of a
//! running gateway, set against engine-only figures for the same operations,
//! measured in this process on the same token in the same run.
//!
//! Three operations (DESIGN 4): CVV2 verification of an enrolled card with its
//! current dynamic value, and dynamic-value generation of 1 and of 24 values.
//! Every request is signed afresh with a unique request id and every response's
//! signature is checked, as a real client would. The engine-only figures come
//! first (temporary keys, as `bench engine`), then the HTTP phase, so the two do
//! not compete for the CPU or the token.
//!
//! Before and after each HTTP phase it scrapes the gateway's `GET /metrics`
//! (unsigned) for `process_cpu_seconds_total` and
//! `process_context_switches_total`, and sets the gateway's CPU per request
//! against the engine's CPU per operation (this process's own CPU over the
//! engine-only phase: the engine and the token library run in it). With
//! `--gateway-pid` the context switches come from `/proc/PID/task/*/status`
//! instead (and the CPU from `/proc/PID/stat` when the metrics lack it).
//!
//! It is a benchmark, not a test: it needs a gateway serving the card API and a
//! client registered in it. Nothing it prints or logs holds a secret; the card
//! number is shown masked, codes never.

use std::collections::BTreeMap;
use std::io::Write;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderValue};
use reqwest::{Method, Url};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use zeroize::Zeroizing;

use crate::call::{self, CallError, Credentials, ResponseSignature};
use dcvv_gateway::cli::CliError;
use dcvv_gateway::cli::bench::{self, EngineOp};
use dcvv_gateway::config::Settings;
use dcvv_gateway::domain::{Expiry, Pan};
use dcvv_gateway::http::process::{self, ContextSwitches, Stat};
use dcvv_gateway::http::signature::RequestId;

/// Luhn-valid test card in BIN 412345, the development configuration's programme.
pub(crate) const DEMO_PAN: &str = "4123450000000019";
/// Expiry of the demo card (`YYMM`).
pub(crate) const DEMO_EXPIRY: &str = "3012";
/// Longest wait for one exchange before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Engine-only threads at most: the reference machine has 2 cores.
const MAX_ENGINE_THREADS: usize = 2;
/// The issue's targets (issue 9).
const TARGET_VERIFICATIONS_PER_SECOND: f64 = 3000.0;
const TARGET_RATIO: f64 = 0.6;
const TARGET_GATEWAY_CPU_TO_ENGINE: f64 = 2.0;
const TARGET_SWITCHES_PER_REQUEST: f64 = 8.0;
const TARGET_P99_MS: f64 = 10.0;
const TARGET_VALUES_24_TO_1: f64 = 0.8;

/// Arguments of `dcvv-tools bench http`.
#[derive(Debug, clap::Args)]
pub(crate) struct HttpBenchArgs {
    /// Base URL of the running gateway (http:// or https://).
    #[arg(long)]
    url: String,
    /// Client id of a client allowed to generate and verify for the card's programme.
    #[arg(long)]
    apikey: String,
    /// Name of the environment variable holding the client secret.
    #[arg(long, value_name = "VAR")]
    secret_env: String,
    /// PEM file of extra trusted root certificate(s), e.g. the development certificate.
    #[arg(long, value_name = "PEM_FILE")]
    cacert: Option<PathBuf>,
    /// PEM file of this client's TLS certificate, for a gateway that requires mutual TLS
    /// (`server.client_ca_file`); with --client-key. The connections of the pool are set up
    /// once, so the figures are of requests, not handshakes.
    #[arg(long, value_name = "PEM_FILE", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM file of the private key of --client-cert.
    #[arg(long, value_name = "PEM_FILE", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Concurrent request tasks sharing one connection pool.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrency: u16,
    /// Seconds per operation, for the HTTP and for the engine-only figures.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Card number to use (a test card of a configured programme).
    #[arg(long, value_name = "PAN", default_value = DEMO_PAN)]
    card: String,
    /// The card's expiry, YYMM.
    #[arg(long, value_name = "YYMM", default_value = DEMO_EXPIRY)]
    expiry: String,
    /// Open loop: send this many requests per second in total, paced across the
    /// tasks, and measure latency from each request's scheduled time. Without it
    /// each task sends its next request when the previous answer arrives (peak).
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// Process id of a gateway on this machine: its context switches are read
    /// from /proc/PID/task/*/status (all threads) rather than its metrics.
    #[arg(long, value_name = "PID")]
    gateway_pid: Option<u32>,
    /// Emit JSON.
    #[arg(long)]
    json: bool,
}

/// The benchmarked operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    /// `POST /cards/cvv2/verification` with the card's current dynamic value.
    Verify,
    /// `POST /cards/pin/dynamic-values` with this `numberOfValues`.
    Generate(u8),
}

impl Operation {
    const ALL: [Operation; 3] = [
        Operation::Verify,
        Operation::Generate(1),
        Operation::Generate(24),
    ];

    fn name(self) -> String {
        match self {
            Operation::Verify => "CVV2 verification (dynamic)".into(),
            Operation::Generate(n) => format!("dynamic values x{n}"),
        }
    }

    fn path(self) -> &'static str {
        match self {
            Operation::Verify => "/cards/cvv2/verification",
            Operation::Generate(_) => "/cards/pin/dynamic-values",
        }
    }

    fn engine(self) -> EngineOp {
        match self {
            Operation::Verify => EngineOp::Tdcvv2Verify,
            Operation::Generate(n) => EngineOp::Tdcvv2Generate(n),
        }
    }
}

/// The card under test: digits only, so the JSON bodies need no escaping.
struct Card {
    pan: Pan,
    expiry: String,
}

impl Card {
    fn parse(pan: &str, expiry: &str) -> Result<Card, CallError> {
        let pan: Pan = pan
            .parse()
            .map_err(|_| CallError::Target("--card: 12 to 19 digits"))?;
        if !pan.is_luhn_valid() {
            return Err(CallError::Target(
                "--card: the Luhn check digit is wrong (the gateway would answer 422)",
            ));
        }
        expiry
            .parse::<Expiry>()
            .map_err(|_| CallError::Target("--expiry: YYMM"))?;
        Ok(Card {
            pan,
            expiry: expiry.to_owned(),
        })
    }

    fn generation_body(&self, count: u8) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(
            format!(
                r#"{{"cardNumber":"{}","expiryDate":"{}","numberOfValues":{count}}}"#,
                self.pan.digits(),
                self.expiry
            )
            .into_bytes(),
        )
    }

    /// `code` is 3 digits (checked by [`parse_values`]).
    fn verification_body(&self, code: &str) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(
            format!(
                r#"{{"cardNumber":"{}","expiryDate":"{}","cvv2":"{code}"}}"#,
                self.pan.digits(),
                self.expiry
            )
            .into_bytes(),
        )
    }
}

/// Why one exchange does not count as an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// Connection refused or reset, TLS failure, unreadable response.
    Transport,
    /// No complete answer within [`REQUEST_TIMEOUT`].
    Timeout,
    /// The response's signature is malformed or wrong.
    Signature,
    /// A 2xx answer whose body is not what the endpoint documents.
    UnexpectedBody,
    /// Re-fetching the current value (window rolled over) did not succeed.
    Refresh,
    /// The client could not sign (clock, request id).
    Client,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Failure::Transport => "transport",
            Failure::Timeout => "timeout",
            Failure::Signature => "response signature",
            Failure::UnexpectedBody => "unexpected body",
            Failure::Refresh => "refresh",
            Failure::Client => "client",
        }
    }

    fn with(self, detail: impl Into<String>) -> Failed {
        Failed {
            kind: self,
            detail: detail.into(),
        }
    }

    fn from_reqwest(e: &reqwest::Error) -> Failed {
        let kind = if e.is_timeout() {
            Failure::Timeout
        } else {
            Failure::Transport
        };
        kind.with(call::error_chain(e))
    }
}

/// A failed exchange: its kind and what went wrong (error texts and URLs,
/// never a body).
#[derive(Debug)]
struct Failed {
    kind: Failure,
    detail: String,
}

/// One answer whose signature verified (or that was unsigned).
struct Reply {
    status: u16,
    version: reqwest::Version,
    body: Vec<u8>,
    signed: bool,
}

/// The client side: one pooled HTTP client, the credentials, request ids.
struct Client {
    http: reqwest::Client,
    credentials: Credentials,
    id_prefix: RequestId,
    sequence: AtomicU64,
}

impl Client {
    /// A unique request id: this run's random prefix and a sequence number.
    fn next_id(&self) -> Option<RequestId> {
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        RequestId::parse(&format!("{}-{n}", self.id_prefix.as_str()))
    }

    /// Signs and sends one POST, reads the answer and checks its signature.
    async fn post(&self, (url, path): &(Url, String), body: &[u8]) -> Result<Reply, Failed> {
        let id = self
            .next_id()
            .ok_or_else(|| Failure::Client.with("request id too long"))?;
        let timestamp = call::now_ms().map_err(|e| Failure::Client.with(e.to_string()))?;
        let mut headers = self
            .credentials
            .sign_request(&id, timestamp, &Method::POST, path, body)
            .map_err(|e| Failure::Client.with(e.to_string()))?;
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let mut response = self
            .http
            .post(url.clone())
            .headers(headers)
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| Failure::from_reqwest(&e))?;
        let status = response.status().as_u16();
        let version = response.version();
        let headers = std::mem::take(response.headers_mut());
        let body = response
            .bytes()
            .await
            .map_err(|e| Failure::from_reqwest(&e))?
            .to_vec();
        let signed = match self
            .credentials
            .check_response(&id, status, &headers, &body)
        {
            Ok(ResponseSignature::Verified) => true,
            Ok(ResponseSignature::Unsigned) => false,
            Err(why) => return Err(Failure::Signature.with(why.to_string())),
        };
        Ok(Reply {
            status,
            version,
            body,
            signed,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerationReply {
    values: Vec<ValueReply>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ValueReply {
    dcvv2: String,
    valid_until: String,
}

#[derive(Deserialize)]
struct VerificationReply {
    result: String,
    reason: Option<String>,
}

#[derive(Deserialize)]
struct ErrorReply {
    code: String,
}

/// A card's current dynamic value and the end of its window.
struct CurrentValue {
    code: Zeroizing<String>,
    valid_until: OffsetDateTime,
}

/// Reads a generation answer: how many values it holds and the first one, whose
/// code must be 3 digits. `None` when the body is not a generation answer.
fn parse_values(body: &[u8]) -> Option<(usize, CurrentValue)> {
    let reply: GenerationReply = serde_json::from_slice(body).ok()?;
    let count = reply.values.len();
    let first = reply.values.into_iter().next()?;
    let code = Zeroizing::new(first.dcvv2);
    let valid_until = OffsetDateTime::parse(&first.valid_until, &Rfc3339).ok()?;
    (code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()))
        .then_some((count, CurrentValue { code, valid_until }))
}

/// `result/reason` of a verification answer, e.g. `declined/code_already_used`.
fn verification_outcome(body: &[u8]) -> Option<String> {
    let reply: VerificationReply = serde_json::from_slice(body).ok()?;
    Some(match reply.reason {
        Some(reason) => format!("{}/{reason}", reply.result),
        None => reply.result,
    })
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = (q * n as f64).ceil() as usize;
    sorted.get(rank.clamp(1, n) - 1).copied()
}

/// The value of one sample of a text exposition: `series` is the name with
/// its labels exactly as the gateway writes them, e.g.
/// `process_context_switches_total{kind="voluntary"}`.
fn exposed_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_ascii_whitespace().next()?.parse().ok()
    })
}

/// The gateway process at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct GatewaySample {
    cpu_seconds: Option<f64>,
    switches: Option<ContextSwitches>,
}

impl GatewaySample {
    /// From the process families of the gateway's `/metrics`.
    fn from_exposition(text: &str) -> GatewaySample {
        let switches = |kind: &str| {
            exposed_value(
                text,
                &format!("process_context_switches_total{{kind=\"{kind}\"}}"),
            )
            .filter(|v| *v >= 0.0)
            .map(|v| v as u64)
        };
        GatewaySample {
            cpu_seconds: exposed_value(text, "process_cpu_seconds_total"),
            switches: switches("voluntary").zip(switches("involuntary")).map(
                |(voluntary, involuntary)| ContextSwitches {
                    voluntary,
                    involuntary,
                },
            ),
        }
    }
}

/// Where the gateway's process figures are read: its `/metrics`, and
/// `/proc/PID` when its process id is known.
struct GatewayProbe {
    metrics: Url,
    pid: Option<u32>,
}

impl GatewayProbe {
    fn switches_source(&self) -> &'static str {
        if self.pid.is_some() {
            "/proc/PID/task/*/status"
        } else {
            "process_context_switches_total of /metrics"
        }
    }

    /// Scrapes the metrics (unsigned GET) and, with a pid, reads `/proc`.
    /// The error is the scrape's, for the report.
    async fn sample(&self, http: &reqwest::Client) -> (GatewaySample, Option<String>) {
        let scraped: Result<String, String> = async {
            let response = http
                .get(self.metrics.clone())
                .send()
                .await
                .map_err(|e| call::error_chain(&e))?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("GET /metrics answered {}", status.as_u16()));
            }
            response.text().await.map_err(|e| call::error_chain(&e))
        }
        .await;
        let (mut sample, error) = match scraped {
            Ok(text) => (GatewaySample::from_exposition(&text), None),
            Err(e) => (GatewaySample::default(), Some(e)),
        };
        if let Some(pid) = self.pid {
            sample.switches = process::process_switches(Some(pid)).ok();
            if sample.cpu_seconds.is_none() {
                sample.cpu_seconds = Stat::read(Some(pid)).ok().map(|s| s.cpu_seconds());
            }
        }
        (sample, error)
    }
}

/// CPU and context switches of one HTTP phase, per request, beside the
/// engine's CPU per operation.
#[derive(Debug, Default, Serialize, PartialEq)]
struct CpuFigure {
    /// Gateway CPU time per request sent in the phase, ms.
    gateway_cpu_ms_per_request: Option<f64>,
    /// Cores the gateway kept busy on average over the phase.
    gateway_cores: Option<f64>,
    /// This process's (the engine-only phase's) CPU time per operation, ms.
    engine_cpu_ms_per_op: Option<f64>,
    /// Gateway CPU per request over engine CPU per operation.
    gateway_cpu_to_engine_cpu: Option<f64>,
    /// The gateway's context switches (all threads) per request.
    gateway_context_switches_per_request: Option<f64>,
    context_switches_source: Option<&'static str>,
    /// This client process's CPU per request, ms (it shares the machine).
    client_cpu_ms_per_request: Option<f64>,
}

/// The phase's figures from the samples before and after it, the requests
/// sent, its length, this process's CPU over it and the engine's CPU per op.
fn cpu_figure(
    gateway: (GatewaySample, GatewaySample),
    client_cpu_seconds: Option<f64>,
    requests: u64,
    elapsed_seconds: f64,
    engine_cpu_seconds_per_op: Option<f64>,
    switches_source: &'static str,
) -> CpuFigure {
    let (before, after) = gateway;
    let gateway_cpu = before
        .cpu_seconds
        .zip(after.cpu_seconds)
        .map(|(b, a)| (a - b).max(0.0));
    let gateway_per_request = gateway_cpu.and_then(|cpu| bench::per_op(cpu, requests));
    let switches = before
        .switches
        .zip(after.switches)
        .map(|(b, a)| a.since(&b).total());
    CpuFigure {
        gateway_cpu_ms_per_request: gateway_per_request.map(|s| s * 1000.0),
        gateway_cores: gateway_cpu
            .filter(|_| elapsed_seconds > 0.0)
            .map(|cpu| cpu / elapsed_seconds),
        engine_cpu_ms_per_op: engine_cpu_seconds_per_op.map(|s| s * 1000.0),
        gateway_cpu_to_engine_cpu: gateway_per_request
            .zip(engine_cpu_seconds_per_op.filter(|e| *e > 0.0))
            .map(|(g, e)| g / e),
        gateway_context_switches_per_request: switches
            .filter(|_| requests > 0)
            .map(|n| n as f64 / requests as f64),
        context_switches_source: switches.map(|_| switches_source),
        client_cpu_ms_per_request: client_cpu_seconds
            .and_then(|cpu| bench::per_op(cpu.max(0.0), requests))
            .map(|s| s * 1000.0),
    }
}

/// What the tasks of one operation saw.
#[derive(Default)]
struct Tally {
    /// Latency in microseconds of every 2xx answer.
    ok_latencies_us: Vec<u64>,
    /// Requests started.
    attempts: u64,
    statuses: BTreeMap<u16, u64>,
    outcomes: BTreeMap<String, u64>,
    errors: BTreeMap<&'static str, u64>,
    /// The first error of each kind, for the report.
    first_errors: BTreeMap<&'static str, String>,
    unsigned: u64,
    refreshes: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok_latencies_us.extend(other.ok_latencies_us);
        self.attempts += other.attempts;
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in other.outcomes {
            *self.outcomes.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.first_errors {
            self.first_errors.entry(k).or_insert(v);
        }
        self.unsigned += other.unsigned;
        self.refreshes += other.refreshes;
    }

    fn error(&mut self, failed: Failed) {
        *self.errors.entry(failed.kind.label()).or_default() += 1;
        self.first_errors
            .entry(failed.kind.label())
            .or_insert(failed.detail);
    }
}

/// Everything the request tasks share.
struct Run {
    client: Client,
    card: Card,
    verify: (Url, String),
    generate: (Url, String),
    /// The value verifications send; re-fetched when its window has passed.
    current: tokio::sync::Mutex<CurrentValue>,
}

impl Run {
    /// Fetches the card's current value (this also enrols it).
    async fn fetch_current(&self) -> Result<CurrentValue, Failed> {
        let reply = self
            .client
            .post(&self.generate, &self.card.generation_body(1))
            .await
            .map_err(|f| {
                Failure::Refresh.with(format!(
                    "re-fetching the current value: {}: {}",
                    f.kind.label(),
                    f.detail
                ))
            })?;
        if reply.status != 200 {
            return Err(Failure::Refresh.with(format!(
                "re-fetching the current value: dynamic-values answered {}",
                reply.status
            )));
        }
        let (_, value) = parse_values(&reply.body).ok_or_else(|| {
            Failure::Refresh.with("re-fetching the current value: no usable value in the answer")
        })?;
        Ok(value)
    }

    /// The code to verify now, re-fetched once by whichever task finds its window over.
    async fn current_code(&self, tally: &mut Tally) -> Result<Zeroizing<String>, Failed> {
        let mut current = self.current.lock().await;
        if OffsetDateTime::now_utc() >= current.valid_until {
            tally.refreshes += 1;
            *current = self.fetch_current().await?;
        }
        Ok(current.code.clone())
    }

    async fn one(&self, op: Operation, tally: &mut Tally) -> Result<Reply, Failed> {
        match op {
            Operation::Verify => {
                let code = self.current_code(tally).await?;
                let body = self.card.verification_body(&code);
                self.client.post(&self.verify, &body).await
            }
            Operation::Generate(n) => {
                self.client
                    .post(&self.generate, &self.card.generation_body(n))
                    .await
            }
        }
    }
}

/// Open-loop pacing: request k is due at start + k / rate, whichever task takes it.
struct Pacer {
    rate: f64,
    next: AtomicU64,
}

async fn task(
    run: Arc<Run>,
    op: Operation,
    pacer: Option<Arc<Pacer>>,
    start: tokio::time::Instant,
    deadline: tokio::time::Instant,
) -> Tally {
    let mut tally = Tally::default();
    loop {
        let scheduled = match &pacer {
            None => {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    break;
                }
                now
            }
            Some(p) => {
                let k = p.next.fetch_add(1, Ordering::Relaxed);
                let due = start + Duration::from_secs_f64(k as f64 / p.rate);
                if due >= deadline {
                    break;
                }
                tokio::time::sleep_until(due).await;
                due
            }
        };
        tally.attempts += 1;
        let sent = tokio::time::Instant::now();
        let outcome = run.one(op, &mut tally).await;
        // Open loop: from the scheduled time, so a backlog shows as latency.
        let since = if pacer.is_some() { scheduled } else { sent };
        let latency = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
        let reply = match outcome {
            Ok(reply) => reply,
            Err(failed) => {
                tally.error(failed);
                continue;
            }
        };
        *tally.statuses.entry(reply.status).or_default() += 1;
        if !reply.signed {
            tally.unsigned += 1;
        }
        if !(200..300).contains(&reply.status) {
            continue;
        }
        let understood = match op {
            Operation::Verify => verification_outcome(&reply.body).map(|outcome| {
                *tally.outcomes.entry(outcome).or_default() += 1;
            }),
            Operation::Generate(n) => parse_values(&reply.body)
                .filter(|(count, _)| *count == usize::from(n))
                .map(drop),
        };
        match understood {
            Some(()) => tally.ok_latencies_us.push(latency),
            None => tally.error(Failure::UnexpectedBody.with(format!(
                "HTTP {}: not the documented answer of POST {}",
                reply.status,
                op.path()
            ))),
        }
    }
    tally
}

/// The HTTP figures of one operation.
#[derive(Debug, Serialize)]
struct HttpFigure {
    /// 2xx answers per second (approved and declined verifications alike).
    ok_per_second: f64,
    /// Requests started per second (the achieved rate).
    attempted_per_second: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    requests: u64,
    elapsed_seconds: f64,
    statuses: BTreeMap<u16, u64>,
    outcomes: BTreeMap<String, u64>,
    errors: BTreeMap<&'static str, u64>,
    first_errors: BTreeMap<&'static str, String>,
    error_count: u64,
    unsigned_responses: u64,
    value_refreshes: u64,
}

async fn measure_http(
    run: &Arc<Run>,
    op: Operation,
    concurrency: usize,
    seconds: f64,
    rate: Option<f64>,
) -> HttpFigure {
    let start = tokio::time::Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let pacer = rate.map(|rate| {
        Arc::new(Pacer {
            rate,
            next: AtomicU64::new(0),
        })
    });
    let handles: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(task(Arc::clone(run), op, pacer.clone(), start, deadline)))
        .collect();
    let mut tally = Tally::default();
    for handle in handles {
        match handle.await {
            Ok(t) => tally.merge(t),
            Err(e) => tally.error(Failure::Client.with(format!("request task ended: {e}"))),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    tally.ok_latencies_us.sort_unstable();
    let ms = |q: f64| percentile(&tally.ok_latencies_us, q).map(|us| us as f64 / 1000.0);
    HttpFigure {
        ok_per_second: tally.ok_latencies_us.len() as f64 / elapsed,
        attempted_per_second: tally.attempts as f64 / elapsed,
        p50_ms: ms(0.50),
        p99_ms: ms(0.99),
        requests: tally.attempts,
        elapsed_seconds: elapsed,
        error_count: tally.errors.values().sum(),
        statuses: tally.statuses,
        outcomes: tally.outcomes,
        errors: tally.errors,
        first_errors: tally.first_errors,
        unsigned_responses: tally.unsigned,
        value_refreshes: tally.refreshes,
    }
}

#[derive(Debug, Serialize)]
struct OperationReport {
    operation: String,
    path: &'static str,
    http: HttpFigure,
    engine_only_per_second: f64,
    http_to_engine: f64,
    cpu: CpuFigure,
}

/// The issue's targets; a `*_met` is `None` when this run cannot tell (an
/// open-loop run for the throughput targets, a closed-loop one for p99, no
/// process figures from the gateway).
#[derive(Debug, Serialize, PartialEq)]
struct Targets {
    verification_per_second: f64,
    verification_rate_met: Option<bool>,
    verification_ratio: f64,
    verification_ratio_met: Option<bool>,
    gateway_cpu_to_engine_cpu: Option<f64>,
    gateway_cpu_met: Option<bool>,
    context_switches_per_request: Option<f64>,
    context_switches_met: Option<bool>,
    p99_ms_at_rate: Option<f64>,
    p99_met: Option<bool>,
    suggested_half_peak_rate: Option<f64>,
    values_24_to_values_1: Option<f64>,
    values_24_to_values_1_met: Option<bool>,
}

#[derive(Debug, Serialize)]
struct Report {
    url: String,
    card: String,
    http_version: String,
    concurrency: usize,
    seconds_per_operation: f64,
    target_rate: Option<f64>,
    engine_threads: usize,
    cpu_cores: usize,
    operations: Vec<OperationReport>,
    targets: Targets,
}

fn check_args(args: &HttpBenchArgs) -> Result<(), CallError> {
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 3600.0) {
        return Err(CallError::Target("--seconds: more than 0, at most 3600"));
    }
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0)
    {
        return Err(CallError::Target("--rate: more than 0, at most 1000000"));
    }
    Ok(())
}

/// Runs `dcvv-tools bench http`.
///
/// # Errors
/// Bad arguments, an unset secret, an unreachable gateway or one that does not
/// generate values for the card, or the token's error in the engine-only phase.
pub(crate) fn run(settings: &Settings, args: HttpBenchArgs) -> Result<(), CliError> {
    check_args(&args)?;
    if let Some(pid) = args.gateway_pid
        && process::thread_switches(Some(pid)).is_err()
    {
        return Err(CliError::Io(format!(
            "--gateway-pid {pid}: no such process readable in /proc"
        )));
    }
    let concurrency = usize::from(args.concurrency);
    let card = Card::parse(&args.card, &args.expiry)?;
    let credentials = Credentials::from_env(&args.apikey, &args.secret_env)?;
    let mut builder = call::client_builder(args.cacert.as_deref())?;
    if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
        builder = call::with_client_identity(builder, cert, key)?;
    }
    let http = builder
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true)
        .no_proxy()
        .build()
        .map_err(|e| CallError::Client(call::error_chain(&e)))?;
    let client = Client {
        http,
        credentials,
        id_prefix: call::random_request_id("bench")?,
        sequence: AtomicU64::new(0),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CallError::Client(e.to_string()))?;

    // 1. Enrol the card and read its current value; fail fast if the gateway
    //    cannot, before spending time on the engine-only phase.
    let mut progress = std::io::stderr();
    let generate = call::target(&args.url, Operation::Generate(1).path())?;
    let verify = call::target(&args.url, Operation::Verify.path())?;
    let first = runtime.block_on(client.post(&generate, &card.generation_body(1)));
    let reply = first.map_err(|f| {
        CliError::Io(format!(
            "dynamic-values for the benchmark card ({}): {}",
            card.pan.masked(),
            f.detail
        ))
    })?;
    if reply.status != 200 {
        let code = serde_json::from_slice::<ErrorReply>(&reply.body)
            .map_or_else(|_| "no error code".to_owned(), |e| e.code);
        return Err(CliError::Io(format!(
            "dynamic-values for the benchmark card ({}) answered {} ({code})",
            card.pan.masked(),
            reply.status
        )));
    }
    let http_version = format!("{:?}", reply.version);
    let (_, current) = parse_values(&reply.body).ok_or_else(|| {
        CliError::Io("dynamic-values answered 200 without a usable first value".into())
    })?;
    let run = Arc::new(Run {
        client,
        card,
        verify,
        generate,
        current: tokio::sync::Mutex::new(current),
    });

    // 2. Engine-only, on this process's own session to the same token, before
    //    any HTTP load.
    let engine_threads = concurrency.min(MAX_ENGINE_THREADS);
    let cpu_cores = std::thread::available_parallelism().map_or(0, NonZeroUsize::get);
    let _ = writeln!(
        progress,
        "engine-only: {} operations x {} s on {engine_threads} thread(s) ...",
        Operation::ALL.len(),
        args.seconds
    );
    let engine_ops: Vec<EngineOp> = Operation::ALL.iter().map(|op| op.engine()).collect();
    let mut engine_rates = Vec::new();
    dcvv_gateway::cli::with_token(settings, |token| {
        engine_rates = bench::engine_rates(token, &engine_ops, engine_threads, args.seconds)?;
        Ok(())
    })?;

    // 3. HTTP, one operation after the other, each between two samples of the
    //    gateway's process figures.
    let probe = GatewayProbe {
        metrics: call::target(&args.url, "/metrics")?.0,
        pid: args.gateway_pid,
    };
    let mut scrape_error_shown = false;
    let mut sample = || {
        let (sample, error) = runtime.block_on(probe.sample(&run.client.http));
        if let Some(e) = error.filter(|_| !scrape_error_shown) {
            scrape_error_shown = true;
            let _ = writeln!(
                progress,
                "note: the gateway's /metrics could not be read ({e}): its CPU is not reported"
            );
        }
        sample
    };
    let mut operations = Vec::new();
    for (op, engine) in Operation::ALL.into_iter().zip(engine_rates) {
        let _ = writeln!(
            std::io::stderr(),
            "HTTP: {} for {} s ...",
            op.name(),
            args.seconds
        );
        let before = sample();
        let client_before = bench::own_cpu_seconds();
        let http = runtime.block_on(measure_http(&run, op, concurrency, args.seconds, args.rate));
        let client_cpu = client_before
            .zip(bench::own_cpu_seconds())
            .map(|(b, a)| a - b);
        let after = sample();
        let cpu = cpu_figure(
            (before, after),
            client_cpu,
            http.requests,
            http.elapsed_seconds,
            engine.cpu_seconds_per_op,
            probe.switches_source(),
        );
        operations.push(OperationReport {
            operation: op.name(),
            path: op.path(),
            http_to_engine: if engine.per_second > 0.0 {
                http.ok_per_second / engine.per_second
            } else {
                0.0
            },
            http,
            engine_only_per_second: engine.per_second,
            cpu,
        });
    }
    drop(runtime);

    let targets = targets(&operations, args.rate);
    let report = Report {
        url: args.url,
        card: run.card.pan.masked(),
        http_version,
        concurrency,
        seconds_per_operation: args.seconds,
        target_rate: args.rate,
        engine_threads,
        cpu_cores,
        operations,
        targets,
    };
    let mut text = Vec::new();
    if args.json {
        serde_json::to_writer_pretty(&mut text, &report)
            .map_err(|e| CliError::Io(e.to_string()))?;
        text.push(b'\n');
    } else {
        print_report(&report, &mut text).map_err(|e| CliError::Io(e.to_string()))?;
    }
    match std::io::stdout().lock().write_all(&text) {
        // A closed stdout (e.g. `| head`) is not an error worth reporting.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(CliError::Io(format!(
                "cannot write to stdout: {}",
                e.kind()
            )));
        }
        _ => {}
    }
    // Figures without a single answer are no measurement: say so in the exit status.
    match report.operations.iter().find(|o| o.http.p50_ms.is_none()) {
        Some(o) => Err(CliError::Io(format!(
            "POST {} got no 2xx answer in {} s (see the errors above)",
            o.path, report.seconds_per_operation
        ))),
        None => Ok(()),
    }
}

fn targets(operations: &[OperationReport], rate: Option<f64>) -> Targets {
    let find = |path: &str, op: Operation| {
        operations
            .iter()
            .find(|o| o.path == path && o.operation == op.name())
    };
    let verification = find(Operation::Verify.path(), Operation::Verify);
    let per_second = verification.map_or(0.0, |o| o.http.ok_per_second);
    let ratio = verification.map_or(0.0, |o| o.http_to_engine);
    let p99 = verification.and_then(|o| o.http.p99_ms);
    let cpu_ratio = verification.and_then(|o| o.cpu.gateway_cpu_to_engine_cpu);
    let switches = verification.and_then(|o| o.cpu.gateway_context_switches_per_request);
    let values = |n| find(Operation::Generate(n).path(), Operation::Generate(n));
    let values_ratio = values(24)
        .zip(values(1))
        .filter(|(_, one)| one.http.ok_per_second > 0.0)
        .map(|(many, one)| many.http.ok_per_second / one.http.ok_per_second);
    // Per request, so measured by either kind of run.
    let gateway_cpu_met = cpu_ratio.map(|r| r <= TARGET_GATEWAY_CPU_TO_ENGINE);
    let context_switches_met = switches.map(|n| n <= TARGET_SWITCHES_PER_REQUEST);
    let closed = Targets {
        verification_per_second: per_second,
        verification_rate_met: Some(per_second >= TARGET_VERIFICATIONS_PER_SECOND),
        verification_ratio: ratio,
        verification_ratio_met: Some(ratio >= TARGET_RATIO),
        gateway_cpu_to_engine_cpu: cpu_ratio,
        gateway_cpu_met,
        context_switches_per_request: switches,
        context_switches_met,
        p99_ms_at_rate: None,
        p99_met: None,
        suggested_half_peak_rate: verification
            .map(|o| (o.http.ok_per_second / 2.0).floor())
            .filter(|rate| *rate >= 1.0),
        values_24_to_values_1: values_ratio,
        values_24_to_values_1_met: values_ratio.map(|r| r >= TARGET_VALUES_24_TO_1),
    };
    match rate {
        // Closed loop: the peak. The p99 target is for half of it: a second run.
        None => closed,
        // Open loop: throughput is what --rate asked for, so the throughput
        // targets say nothing.
        Some(_) => Targets {
            verification_rate_met: None,
            verification_ratio_met: None,
            p99_ms_at_rate: p99,
            p99_met: p99.map(|p| p < TARGET_P99_MS),
            suggested_half_peak_rate: None,
            values_24_to_values_1_met: None,
            ..closed
        },
    }
}

fn fmt_ms(ms: Option<f64>) -> String {
    fmt_fixed(ms, 2)
}

fn fmt_fixed(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

fn counts<K: std::fmt::Display>(map: &BTreeMap<K, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_report(r: &Report, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "dcvv-tools bench http: {} ({}), card {}, {} s per operation",
        r.url, r.http_version, r.card, r.seconds_per_operation
    )?;
    match r.target_rate {
        None => writeln!(
            out,
            "HTTP: {} tasks, closed loop (each sends its next request when the previous \
             answer arrives): peak throughput; latency from send to last body byte",
            r.concurrency
        )?,
        Some(rate) => writeln!(
            out,
            "HTTP: {} tasks, open loop at {rate} req/s in total; latency from each request's \
             scheduled time to its last body byte",
            r.concurrency
        )?,
    }
    writeln!(
        out,
        "engine-only: {} thread(s) = min(concurrency, {MAX_ENGINE_THREADS}), in this process on \
         the same token, measured before the HTTP phase; this machine has {} CPU core(s), \
         shared by the gateway, this client and the token",
        r.engine_threads, r.cpu_cores
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<30} {:>10} {:>8} {:>8} {:>17} {:>13}",
        "operation", "HTTP req/s", "p50 ms", "p99 ms", "engine-only ops/s", "HTTP / engine"
    )?;
    for o in &r.operations {
        writeln!(
            out,
            "{:<30} {:>10.1} {:>8} {:>8} {:>17.1} {:>13.2}",
            o.operation,
            o.http.ok_per_second,
            fmt_ms(o.http.p50_ms),
            fmt_ms(o.http.p99_ms),
            o.engine_only_per_second,
            o.http_to_engine
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<30} {:>13} {:>16} {:>14} {:>8} {:>10} {:>17}",
        "operation",
        "gw CPU ms/req",
        "engine CPU ms/op",
        "gw / engine CPU",
        "gw cores",
        "ctx sw/req",
        "client CPU ms/req"
    )?;
    for o in &r.operations {
        let c = &o.cpu;
        writeln!(
            out,
            "{:<30} {:>13} {:>16} {:>14} {:>8} {:>10} {:>17}",
            o.operation,
            fmt_fixed(c.gateway_cpu_ms_per_request, 3),
            fmt_fixed(c.engine_cpu_ms_per_op, 3),
            fmt_fixed(c.gateway_cpu_to_engine_cpu, 2),
            fmt_fixed(c.gateway_cores, 2),
            fmt_fixed(c.gateway_context_switches_per_request, 1),
            fmt_fixed(c.client_cpu_ms_per_request, 3)
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "HTTP req/s counts 2xx answers (approved and declined verifications alike); \
         p50/p99 are over those answers."
    )?;
    writeln!(
        out,
        "gw CPU: the gateway's process_cpu_seconds_total before and after the phase over the \
         requests sent; engine CPU: this process's CPU over the engine-only phase per \
         operation (10 ms tick resolution); ctx sw: all the gateway's threads ({}); \
         client CPU: this process over the HTTP phase.",
        r.operations
            .iter()
            .find_map(|o| o.cpu.context_switches_source)
            .unwrap_or("not available: no process metrics and no --gateway-pid")
    )?;
    for o in &r.operations {
        let h = &o.http;
        writeln!(out, "{} (POST {}):", o.operation, o.path)?;
        writeln!(
            out,
            "  {} requests in {:.2} s ({:.1}/s sent), HTTP status: {}",
            h.requests,
            h.elapsed_seconds,
            h.attempted_per_second,
            counts(&h.statuses)
        )?;
        if !h.outcomes.is_empty() {
            writeln!(out, "  result/reason: {}", counts(&h.outcomes))?;
        }
        writeln!(
            out,
            "  errors: {} ({}); unsigned responses: {}",
            h.error_count,
            counts(&h.errors),
            h.unsigned_responses
        )?;
        for (kind, detail) in &h.first_errors {
            writeln!(out, "  first {kind} error: {detail}")?;
        }
        if o.path == Operation::Verify.path() {
            writeln!(
                out,
                "  current value re-fetched {} time(s) (window rolled over)",
                h.value_refreshes
            )?;
            if h.outcomes.contains_key("declined/code_already_used") {
                writeln!(
                    out,
                    "  note: single use is on, so only the first verification of the value in \
                     its window is approved; the repeats are declined code_already_used after \
                     the same HSM and store work, and are counted in HTTP req/s"
                )?;
            }
        }
    }
    writeln!(out)?;
    writeln!(out, "targets:")?;
    let t = &r.targets;
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    match t.verification_rate_met {
        Some(met) => writeln!(
            out,
            "  end-to-end verification >= {TARGET_VERIFICATIONS_PER_SECOND} req/s: {:.1} -> {}",
            t.verification_per_second,
            verdict(met)
        )?,
        None => writeln!(
            out,
            "  end-to-end verification >= {TARGET_VERIFICATIONS_PER_SECOND} req/s: not measured \
             by an open-loop run; run without --rate"
        )?,
    }
    match t.verification_ratio_met {
        Some(met) => writeln!(
            out,
            "  end-to-end verification >= {TARGET_RATIO} x engine-only: {:.2} -> {}",
            t.verification_ratio,
            if met { "met" } else { "NOT met" }
        )?,
        None => writeln!(
            out,
            "  end-to-end verification >= {TARGET_RATIO} x engine-only: not measured by an \
             open-loop run (its throughput is the --rate); run without --rate"
        )?,
    }
    match (r.target_rate, t.p99_ms_at_rate) {
        (Some(rate), Some(p99)) => {
            let achieved = r
                .operations
                .iter()
                .find(|o| o.path == Operation::Verify.path())
                .map_or(0.0, |o| o.http.attempted_per_second);
            writeln!(
                out,
                "  verification p99 < {TARGET_P99_MS} ms at half of peak: {p99:.2} ms at \
                 {achieved:.1} req/s achieved ({rate} req/s asked; it should be half the peak \
                 of a run without --rate) -> {}",
                if p99 < TARGET_P99_MS {
                    "met"
                } else {
                    "NOT met"
                }
            )?;
        }
        (Some(_), None) => writeln!(
            out,
            "  verification p99 < {TARGET_P99_MS} ms at half of peak: no 2xx answers to measure"
        )?,
        (None, _) => match t.suggested_half_peak_rate {
            Some(half) => writeln!(
                out,
                "  verification p99 < {TARGET_P99_MS} ms at half of peak: needs a second run \
                 at a fixed rate: add --rate {half}"
            )?,
            None => writeln!(
                out,
                "  verification p99 < {TARGET_P99_MS} ms at half of peak: no peak measured"
            )?,
        },
    }
    match (t.gateway_cpu_to_engine_cpu, t.gateway_cpu_met) {
        (Some(ratio), Some(met)) => writeln!(
            out,
            "  gateway CPU per verification <= {TARGET_GATEWAY_CPU_TO_ENGINE} x engine CPU per \
             operation: {ratio:.2} -> {}",
            verdict(met)
        )?,
        _ => writeln!(
            out,
            "  gateway CPU per verification <= {TARGET_GATEWAY_CPU_TO_ENGINE} x engine CPU per \
             operation: not measured (no process_cpu_seconds_total from the gateway)"
        )?,
    }
    match (t.context_switches_per_request, t.context_switches_met) {
        (Some(n), Some(met)) => writeln!(
            out,
            "  gateway context switches per verification <= {TARGET_SWITCHES_PER_REQUEST}: \
             {n:.1} -> {}",
            verdict(met)
        )?,
        _ => writeln!(
            out,
            "  gateway context switches per verification <= {TARGET_SWITCHES_PER_REQUEST}: not \
             measured (no process_context_switches_total and no --gateway-pid)"
        )?,
    }
    match (t.values_24_to_values_1, t.values_24_to_values_1_met) {
        (Some(ratio), Some(met)) => writeln!(
            out,
            "  dynamic values x24 >= {TARGET_VALUES_24_TO_1} x the x1 figure: {ratio:.2} -> {}",
            verdict(met)
        )?,
        (Some(ratio), None) => writeln!(
            out,
            "  dynamic values x24 >= {TARGET_VALUES_24_TO_1} x the x1 figure: {ratio:.2}, not \
             judged in an open-loop run; run without --rate"
        )?,
        (None, _) => writeln!(
            out,
            "  dynamic values x24 >= {TARGET_VALUES_24_TO_1} x the x1 figure: no x1 answers"
        )?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_card_is_valid_for_the_gateway() {
        let card = Card::parse(DEMO_PAN, DEMO_EXPIRY).unwrap();
        assert!(card.pan.digits().starts_with("412345"));
        assert_eq!(card.pan.len(), 16);
        assert!(Card::parse("4123450000000018", DEMO_EXPIRY).is_err());
        assert!(Card::parse(DEMO_PAN, "3013").is_err());
    }

    #[test]
    fn request_bodies_are_the_documented_json() {
        let card = Card::parse(DEMO_PAN, DEMO_EXPIRY).unwrap();
        let generation: serde_json::Value =
            serde_json::from_slice(&card.generation_body(24)).unwrap();
        assert_eq!(
            generation,
            serde_json::json!({"cardNumber": DEMO_PAN, "expiryDate": "3012", "numberOfValues": 24})
        );
        let verification: serde_json::Value =
            serde_json::from_slice(&card.verification_body("209")).unwrap();
        assert_eq!(
            verification,
            serde_json::json!({"cardNumber": DEMO_PAN, "expiryDate": "3012", "cvv2": "209"})
        );
    }

    #[test]
    fn generation_answers_are_read() {
        let body = br#"{"cardNumber":"412345******0019","dcvv2":"209",
            "values":[{"dcvv2":"209","validFrom":"2026-01-01T00:00:00Z","validUntil":"2026-01-01T00:05:00Z"},
                      {"dcvv2":"118","validFrom":"2026-01-01T00:05:00Z","validUntil":"2026-01-01T00:10:00Z"}]}"#;
        let (count, first) = parse_values(body).unwrap();
        assert_eq!(count, 2);
        assert_eq!(first.code.as_str(), "209");
        assert_eq!(first.valid_until.unix_timestamp(), 1_767_225_900);
        assert!(parse_values(br#"{"values":[]}"#).is_none());
        assert!(
            parse_values(br#"{"values":[{"dcvv2":"2\"9","validUntil":"2026-01-01T00:05:00Z"}]}"#)
                .is_none()
        );
        assert!(parse_values(br#"{"values":[{"dcvv2":"209","validUntil":"tomorrow"}]}"#).is_none());
    }

    #[test]
    fn verification_outcomes_are_result_and_reason() {
        assert_eq!(
            verification_outcome(
                br#"{"result":"declined","reason":"code_already_used","method":"dynamic"}"#
            )
            .as_deref(),
            Some("declined/code_already_used")
        );
        assert_eq!(
            verification_outcome(br#"{"result":"approved"}"#).as_deref(),
            Some("approved")
        );
        assert_eq!(verification_outcome(b"{}"), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&samples, 0.50), Some(50));
        assert_eq!(percentile(&samples, 0.99), Some(99));
        assert_eq!(percentile(&samples, 1.0), Some(100));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[1, 2], 0.5), Some(1));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn tallies_merge() {
        let mut a = Tally {
            attempts: 2,
            ok_latencies_us: vec![1],
            statuses: BTreeMap::from([(200, 1)]),
            ..Tally::default()
        };
        a.error(Failure::Timeout.with("operation timed out"));
        let b = Tally {
            attempts: 3,
            ok_latencies_us: vec![2, 3],
            statuses: BTreeMap::from([(200, 2), (429, 1)]),
            outcomes: BTreeMap::from([("approved/match".to_owned(), 1)]),
            ..Tally::default()
        };
        a.merge(b);
        assert_eq!(a.attempts, 5);
        assert_eq!(a.ok_latencies_us.len(), 3);
        assert_eq!(a.statuses[&200], 3);
        assert_eq!(a.statuses[&429], 1);
        assert_eq!(a.errors["timeout"], 1);
        assert_eq!(a.first_errors["timeout"], "operation timed out");
        assert_eq!(a.outcomes["approved/match"], 1);
    }

    const EXPOSITION: &str = "# HELP dcvv_http_in_flight Card API requests being served now\n\
        # TYPE dcvv_http_in_flight gauge\n\
        dcvv_http_in_flight 3\n\
        # TYPE process_cpu_seconds counter\n\
        process_cpu_seconds_total 12.34\n\
        # TYPE process_cpu_seconds_extra counter\n\
        process_cpu_seconds_total_extra 99\n\
        # TYPE process_context_switches counter\n\
        process_context_switches_total{kind=\"voluntary\"} 1500\n\
        process_context_switches_total{kind=\"involuntary\"} 40\n\
        # EOF\n";

    #[test]
    fn exposed_values_are_read_by_their_exact_series() {
        assert_eq!(
            exposed_value(EXPOSITION, "process_cpu_seconds_total"),
            Some(12.34)
        );
        assert_eq!(exposed_value(EXPOSITION, "dcvv_http_in_flight"), Some(3.0));
        assert_eq!(exposed_value(EXPOSITION, "process_cpu"), None);
        assert_eq!(exposed_value("x 1 1767225600\n", "x"), Some(1.0));
        assert_eq!(exposed_value("x NaN-ish\n", "x"), None);
        assert_eq!(
            GatewaySample::from_exposition(EXPOSITION),
            GatewaySample {
                cpu_seconds: Some(12.34),
                switches: Some(ContextSwitches {
                    voluntary: 1500,
                    involuntary: 40
                }),
            }
        );
        assert_eq!(
            GatewaySample::from_exposition("dcvv_http_in_flight 1\n# EOF\n"),
            GatewaySample::default()
        );
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn cpu_figures_are_per_request_and_per_operation() {
        let at = |cpu, voluntary, involuntary| GatewaySample {
            cpu_seconds: Some(cpu),
            switches: Some(ContextSwitches {
                voluntary,
                involuntary,
            }),
        };
        // 2000 requests in 2 s, 1.1 s of gateway CPU, 66 000 switches; the
        // engine took 0.19 ms per operation.
        let f = cpu_figure(
            (at(10.0, 1_000, 500), at(11.1, 61_000, 6_500)),
            Some(0.4),
            2000,
            2.0,
            Some(0.000_19),
            "test",
        );
        assert!(close(f.gateway_cpu_ms_per_request, 0.55), "{f:?}");
        assert!(close(f.gateway_cores, 0.55), "{f:?}");
        assert!(close(f.engine_cpu_ms_per_op, 0.19), "{f:?}");
        assert!(close(f.gateway_cpu_to_engine_cpu, 0.55 / 0.19), "{f:?}");
        assert!(close(f.gateway_context_switches_per_request, 33.0), "{f:?}");
        assert_eq!(f.context_switches_source, Some("test"));
        assert!(close(f.client_cpu_ms_per_request, 0.2), "{f:?}");
        // Nothing to divide by, or nothing read: no figure rather than a wrong one.
        let none = cpu_figure(
            (GatewaySample::default(), at(1.0, 1, 1)),
            None,
            0,
            0.0,
            None,
            "test",
        );
        assert_eq!(none, CpuFigure::default());
        let no_requests = cpu_figure((at(1.0, 1, 1), at(2.0, 5, 5)), None, 0, 1.0, Some(0.1), "t");
        assert_eq!(no_requests.gateway_cpu_ms_per_request, None);
        assert_eq!(no_requests.gateway_context_switches_per_request, None);
        assert!(close(no_requests.gateway_cores, 1.0));
        assert_eq!(bench::per_op(1.0, 0), None);
        assert_eq!(bench::per_op(1.0, 4), Some(0.25));
    }

    fn report(op: Operation, per_second: f64, engine: f64, cpu: CpuFigure) -> OperationReport {
        OperationReport {
            operation: op.name(),
            path: op.path(),
            http: HttpFigure {
                ok_per_second: per_second,
                attempted_per_second: per_second,
                p50_ms: Some(1.0),
                p99_ms: Some(4.0),
                requests: 1,
                elapsed_seconds: 1.0,
                statuses: BTreeMap::new(),
                outcomes: BTreeMap::new(),
                errors: BTreeMap::new(),
                first_errors: BTreeMap::new(),
                error_count: 0,
                unsigned_responses: 0,
                value_refreshes: 0,
            },
            engine_only_per_second: engine,
            http_to_engine: per_second / engine,
            cpu,
        }
    }

    #[test]
    fn targets_are_judged_as_the_issue_states_them() {
        let ops = vec![
            report(
                Operation::Verify,
                3200.0,
                5000.0,
                CpuFigure {
                    gateway_cpu_to_engine_cpu: Some(2.5),
                    gateway_context_switches_per_request: Some(7.5),
                    ..CpuFigure::default()
                },
            ),
            report(Operation::Generate(1), 1000.0, 5000.0, CpuFigure::default()),
            report(Operation::Generate(24), 790.0, 400.0, CpuFigure::default()),
        ];
        let t = targets(&ops, None);
        assert_eq!(t.verification_rate_met, Some(true));
        assert_eq!(t.verification_ratio_met, Some(true));
        assert!((t.verification_ratio - 0.64).abs() < 1e-9);
        assert_eq!(t.gateway_cpu_met, Some(false));
        assert_eq!(t.context_switches_met, Some(true));
        assert_eq!(t.values_24_to_values_1_met, Some(false));
        assert!(close(t.values_24_to_values_1, 0.79));
        assert_eq!(t.suggested_half_peak_rate, Some(1600.0));
        assert_eq!(t.p99_met, None);
        let open = targets(&ops, Some(1600.0));
        assert_eq!(open.verification_rate_met, None);
        assert_eq!(open.verification_ratio_met, None);
        assert_eq!(open.values_24_to_values_1_met, None);
        assert_eq!(open.p99_met, Some(true));
        assert_eq!(open.gateway_cpu_met, Some(false));
        let mut text = Vec::new();
        let r = Report {
            url: "https://127.0.0.1:8443".into(),
            card: "412345******0019".into(),
            http_version: "HTTP/1.1".into(),
            concurrency: 8,
            seconds_per_operation: 1.0,
            target_rate: None,
            engine_threads: 2,
            cpu_cores: 2,
            operations: ops,
            targets: t,
        };
        print_report(&r, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        for line in [
            "end-to-end verification >= 3000 req/s: 3200.0 -> met",
            "x engine CPU per operation: 2.50 -> NOT met",
            "context switches per verification <= 8: 7.5 -> met",
            "dynamic values x24 >= 0.8 x the x1 figure: 0.79 -> NOT met",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
    }
}
