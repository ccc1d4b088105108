//! Prometheus metrics (`GET /metrics`): requests by route, method, status and
//! error code; request latency by route and outcome; token call latency by
//! operation; HSM session-pool use; requests in flight; verifications approved
//! with a previous key version, by programme (key rotation); the audit trail's
//! records, batch sizes, write+fsync latency, seals and whether it is down;
//! whether the token is up and what its recovery did (re-initializations
//! tried and succeeded, logins).
//!
//! Labels are route templates, methods, statuses, stable error codes, operation
//! and programme names — never a PAN, a code, a client secret or a request id.

use std::borrow::Cow;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::audit::AuditObserver;
use crate::domain::operations::{RecoveryCounts, TokenState};
use crate::domain::service::HsmObserver;

// Route templates and error codes are `'static` and the usual methods are
// borrowed, so recording a request allocates nothing once its series exists.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: Cow<'static, str>,
    status: u16,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    route: &'static str,
    outcome: &'static str,
}

/// The method as a label: a borrowed constant for the standard methods, a copy
/// only for an extension method.
fn method_label(method: &str) -> Cow<'static, str> {
    const STANDARD: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT",
    ];
    STANDARD
        .into_iter()
        .find(|m| *m == method)
        .map_or_else(|| Cow::Owned(method.to_owned()), Cow::Borrowed)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HsmLabels {
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgrammeLabels {
    programme: String,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
        5.0,
    ]
    .into_iter()
}

/// The gateway's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    hsm: Family<HsmLabels, Histogram>,
    sessions_in_use: Gauge<i64, std::sync::atomic::AtomicI64>,
    sessions_max: Gauge<i64, std::sync::atomic::AtomicI64>,
    in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
    previous_key_matches: Family<ProgrammeLabels, Counter>,
    audit_records: Counter,
    audit_batch: Histogram,
    audit_fsync: Histogram,
    audit_seals: Family<OutcomeLabels, Counter>,
    audit_down: Gauge<i64, std::sync::atomic::AtomicI64>,
    audit_refused: Counter,
    config_reloads: Family<OutcomeLabels, Counter>,
    hsm_up: Gauge<i64, std::sync::atomic::AtomicI64>,
    hsm_losses: Counter,
    hsm_reinit_attempts: Counter,
    hsm_reinit_successes: Counter,
    hsm_logins: Counter,
    // Connection admission and deadlines (issue 13; `super::connections`).
    connections_open: Gauge<i64, std::sync::atomic::AtomicI64>,
    connections_refused: Family<RefusalLabels, Counter>,
    connections_timed_out: Counter,
}

/// Why a connection was closed at accept.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

/// An `outcome` label (seals, reloads).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A configuration reload was applied (`true`) or refused (`false`).
    pub fn reload(&self, applied: bool) {
        self.config_reloads
            .get_or_create(&OutcomeLabels {
                outcome: if applied { "applied" } else { "refused" },
            })
            .inc();
    }

    /// A new, registered set.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dcvv");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(latency_buckets())) as fn() -> Histogram,
        );
        let hsm = Family::<HsmLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(latency_buckets())) as fn() -> Histogram,
        );
        let sessions_in_use = Gauge::default();
        let sessions_max = Gauge::default();
        let in_flight = Gauge::default();
        let hsm_up = Gauge::default();
        let hsm_losses = Counter::default();
        let hsm_reinit_attempts = Counter::default();
        let hsm_reinit_successes = Counter::default();
        let hsm_logins = Counter::default();
        registry.register(
            "http_requests",
            "HTTP requests by route template, method, status and error code",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route template and outcome",
            latency.clone(),
        );
        registry.register(
            "hsm_call_duration_seconds",
            "Token calls (one per card operation) by operation and outcome",
            hsm.clone(),
        );
        registry.register(
            "hsm_sessions_in_use",
            "PKCS#11 sessions checked out now",
            sessions_in_use.clone(),
        );
        registry.register(
            "hsm_sessions_max",
            "Size of the PKCS#11 session pool",
            sessions_max.clone(),
        );
        registry.register(
            "http_in_flight",
            "Card API requests being served now",
            in_flight.clone(),
        );
        let previous_key_matches = Family::<ProgrammeLabels, Counter>::default();
        registry.register(
            "previous_key_matches",
            "Verifications approved with a previous key version during its grace period, by programme",
            previous_key_matches.clone(),
        );
        let audit_records = Counter::default();
        let audit_batch = Histogram::new([
            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
        ]);
        let audit_fsync = Histogram::new(latency_buckets());
        let audit_seals = Family::<OutcomeLabels, Counter>::default();
        let audit_down = Gauge::default();
        let audit_refused = Counter::default();
        let config_reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP) by outcome: applied, or refused (the previous configuration keeps serving)",
            config_reloads.clone(),
        );
        registry.register(
            "audit_records",
            "Audit records made durable",
            audit_records.clone(),
        );
        registry.register(
            "audit_batch_records",
            "Records per audit group commit (one write and one fsync each)",
            audit_batch.clone(),
        );
        registry.register(
            "audit_write_seconds",
            "Write and fsync time of one audit batch",
            audit_fsync.clone(),
        );
        registry.register(
            "audit_seals",
            "Audit seals by outcome (error: the token could not seal; retried)",
            audit_seals.clone(),
        );
        registry.register(
            "audit_trail_down",
            "1 while the audit trail cannot be written (requests get 503 audit_unavailable)",
            audit_down.clone(),
        );
        registry.register(
            "audit_refused_requests",
            "Requests refused with 503 because the audit trail was down",
            audit_refused.clone(),
        );
        registry.register(
            "hsm_up",
            "1 while the token is present and logged in, 0 while it is down",
            hsm_up.clone(),
        );
        registry.register(
            "hsm_losses",
            "Times the token went from up to down",
            hsm_losses.clone(),
        );
        registry.register(
            "hsm_reinit_attempts",
            "Re-initializations of the PKCS#11 library tried while the token was down",
            hsm_reinit_attempts.clone(),
        );
        registry.register(
            "hsm_reinit_successes",
            "Re-initializations that brought the token back",
            hsm_reinit_successes.clone(),
        );
        registry.register(
            "hsm_logins",
            "C_Login calls made by recovery (re-login and re-initialization)",
            hsm_logins.clone(),
        );
        // Connection admission and deadlines (issue 13; `super::connections`).
        let connections_open = Gauge::default();
        let connections_refused = Family::<RefusalLabels, Counter>::default();
        let connections_timed_out = Counter::default();
        registry.register(
            "connections_open",
            "Client connections open now (TLS handshakes included)",
            connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at accept, by reason (max_connections, max_connections_per_peer)",
            connections_refused.clone(),
        );
        registry.register(
            "connections_timed_out",
            "Connections closed by server.header_read_timeout_ms or server.keep_alive_timeout_ms",
            connections_timed_out.clone(),
        );
        Metrics {
            registry,
            audit_records,
            audit_batch,
            audit_fsync,
            audit_seals,
            config_reloads,
            audit_down,
            audit_refused,
            requests,
            latency,
            hsm,
            sessions_in_use,
            sessions_max,
            in_flight,
            previous_key_matches,
            hsm_up,
            hsm_losses,
            hsm_reinit_attempts,
            hsm_reinit_successes,
            hsm_logins,
            connections_open,
            connections_refused,
            connections_timed_out,
        }
    }

    /// Records one finished request: `route` is a template from
    /// [`super::routes::ROUTES`] (or `unmatched`), `code` a stable error code.
    pub fn request(
        &self,
        route: &'static str,
        method: &str,
        status: u16,
        code: &'static str,
        elapsed: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method: method_label(method),
                status,
                code,
            })
            .inc();
        let outcome = match status {
            200..=299 => "ok",
            400..=499 => "client_error",
            _ => "server_error",
        };
        self.latency
            .get_or_create(&LatencyLabels { route, outcome })
            .observe(elapsed.as_secs_f64());
    }

    /// A card request started (`+1`) or ended (`-1`).
    pub fn in_flight(&self, delta: i64) {
        self.in_flight.inc_by(delta);
    }

    /// The session pool's use, set just before a scrape.
    pub fn sessions(&self, in_use: usize, max: usize) {
        self.sessions_in_use
            .set(i64::try_from(in_use).unwrap_or(i64::MAX));
        self.sessions_max
            .set(i64::try_from(max).unwrap_or(i64::MAX));
    }

    /// The token's state and recovery counts, set just before a scrape (the
    /// counters follow the token's own monotonic counts).
    pub fn token(&self, state: TokenState, counts: RecoveryCounts) {
        self.hsm_up.set(i64::from(state == TokenState::Ready));
        for (counter, total) in [
            (&self.hsm_losses, counts.losses),
            (&self.hsm_reinit_attempts, counts.reinit_attempts),
            (&self.hsm_reinit_successes, counts.reinit_successes),
            (&self.hsm_logins, counts.logins),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// The text exposition format: these families, then the standard process
    /// families ([`super::process`], unprefixed).
    ///
    /// # Errors
    /// Formatting failed (does not happen with a `String` sink).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut text = String::new();
        encode_registry(&mut text, &self.registry)?;
        super::process::encode(&mut text)?;
        encode_eof(&mut text)?;
        Ok(text)
    }
}

impl AuditObserver for Metrics {
    fn batch(&self, records: usize, elapsed: Duration) {
        self.audit_records.inc_by(records as u64);
        self.audit_batch.observe(records as f64);
        self.audit_fsync.observe(elapsed.as_secs_f64());
    }

    fn seal(&self, ok: bool) {
        self.audit_seals
            .get_or_create(&OutcomeLabels {
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    fn down(&self, down: bool) {
        self.audit_down.set(i64::from(down));
    }

    fn refused(&self) {
        self.audit_refused.inc();
    }
}

impl HsmObserver for Metrics {
    fn hsm_call(&self, operation: &'static str, elapsed: Duration, ok: bool) {
        self.hsm
            .get_or_create(&HsmLabels {
                operation,
                outcome: if ok { "ok" } else { "error" },
            })
            .observe(elapsed.as_secs_f64());
    }

    fn previous_key_match(&self, programme: &str) {
        self.previous_key_matches
            .get_or_create(&ProgrammeLabels {
                programme: programme.to_owned(),
            })
            .inc();
    }
}

/// Connection admission and deadlines (issue 13; `super::connections`).
impl Metrics {
    /// A connection was admitted (`+1`) or has closed (`-1`).
    pub fn connection_open(&self, delta: i64) {
        self.connections_open.inc_by(delta);
    }

    /// A connection was closed at accept; `reason` is a fixed label.
    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

    /// A connection was closed by the header-read deadline.
    pub fn connection_timed_out(&self) {
        self.connections_timed_out.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_methods_are_borrowed_and_others_kept_as_sent() {
        assert!(matches!(method_label("POST"), Cow::Borrowed("POST")));
        assert!(matches!(method_label("GET"), Cow::Borrowed("GET")));
        assert_eq!(method_label("PURGE"), "PURGE");
        let m = Metrics::new();
        m.request("unmatched", "PURGE", 404, "not_found", Duration::ZERO);
        let text = m.encode().unwrap();
        assert!(text.contains(
            "dcvv_http_requests_total{route=\"unmatched\",method=\"PURGE\",status=\"404\",code=\"not_found\"} 1"
        ), "{text}");
    }

    #[test]
    fn exposition_has_the_families_and_labels() {
        let m = Metrics::new();
        m.request(
            "/cards/cvv2/verification",
            "POST",
            200,
            "",
            Duration::from_millis(3),
        );
        m.hsm_call("tdcvv2_verify", Duration::from_micros(800), true);
        m.sessions(1, 4);
        let text = m.encode().unwrap();
        assert!(text.contains(
            "dcvv_http_requests_total{route=\"/cards/cvv2/verification\",method=\"POST\",status=\"200\",code=\"\"} 1"
        ), "{text}");
        assert!(
            text.contains(
                "dcvv_hsm_call_duration_seconds_count{operation=\"tdcvv2_verify\",outcome=\"ok\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("dcvv_hsm_sessions_max 4"), "{text}");
        m.previous_key_match("demo");
        m.previous_key_match("demo");
        let text = m.encode().unwrap();
        assert!(
            text.contains("dcvv_previous_key_matches_total{programme=\"demo\"} 2"),
            "{text}"
        );
        let counts = RecoveryCounts {
            reinit_attempts: 3,
            reinit_successes: 1,
            logins: 2,
            losses: 1,
        };
        m.token(TokenState::Missing, counts);
        m.token(TokenState::Missing, counts);
        let text = m.encode().unwrap();
        assert!(text.contains("dcvv_hsm_up 0"), "{text}");
        assert!(text.contains("dcvv_hsm_reinit_attempts_total 3"), "{text}");
        assert!(text.contains("dcvv_hsm_reinit_successes_total 1"), "{text}");
        m.token(TokenState::Ready, counts);
        assert!(m.encode().unwrap().contains("dcvv_hsm_up 1"));
    }
}
