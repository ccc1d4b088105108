//! Every log line of a test process, captured: the process-wide `tracing`
//! subscriber writing (at TRACE, without colours) into memory, as text or as
//! the gateway's own JSON lines, for the tests that look for what must never
//! be logged or for what must be; and the checks of a JSON log's lines.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

/// What the process logged so far.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// Installs the process-wide subscriber into a new capture. Only one test
    /// of a process can: call it in a test that runs in a process of its own.
    pub fn install(with_time: bool) -> Capture {
        let capture = Capture::default();
        let writer = capture.clone();
        let builder = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone());
        if with_time {
            builder.init();
        } else {
            builder.without_time().init();
        }
        capture
    }

    /// As [`Capture::install`], with the gateway's JSON-lines subscriber
    /// ([`dcvv_gateway::telemetry::json`], `[log] format = "json"`) at TRACE.
    pub fn install_json() -> Capture {
        let capture = Capture::default();
        let writer = capture.clone();
        dcvv_gateway::telemetry::json(tracing_subscriber::EnvFilter::new("trace"), move || {
            writer.clone()
        })
        .init();
        capture
    }

    /// The log so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Fields of numeric telemetry in a JSON log, whose values [`json_words`] may
/// leave out: latencies, statuses, addresses, sqlx timings and row counts.
pub const NUMERIC_FIELDS: &[&str] = &[
    "latency_ms",
    "status",
    "elapsed",
    "elapsed_secs",
    "rows_affected",
    "rows_returned",
    "slow_threshold",
    "address",
    "rows",
    "latency",
];

/// Every line of a JSON log as its object; fails the test, naming the line, if
/// a line is not one JSON object with an RFC 3339 UTC `timestamp`, a `level`
/// and a `target`, or if the log holds a terminal colour code.
pub fn json_lines(log: &str) -> Vec<Map<String, Value>> {
    assert!(!log.contains('\u{1b}'), "no ANSI escape in a JSON log");
    log.lines()
        .enumerate()
        .map(|(n, line)| {
            let Ok(Value::Object(object)) = serde_json::from_str::<Value>(line) else {
                panic!("line {} is not a JSON object: {line}", n + 1);
            };
            let text = |key: &str| object.get(key).and_then(Value::as_str);
            let timestamp = text("timestamp").unwrap_or_default();
            assert!(
                timestamp.ends_with('Z')
                    && time::OffsetDateTime::parse(
                        timestamp,
                        &time::format_description::well_known::Rfc3339
                    )
                    .is_ok(),
                "line {}: timestamp is not RFC 3339 UTC: {line}",
                n + 1
            );
            assert!(
                text("level")
                    .is_some_and(|l| ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&l)),
                "line {}: level: {line}",
                n + 1
            );
            assert!(
                text("target").is_some_and(|t| !t.is_empty()),
                "line {}: target: {line}",
                n + 1
            );
            object
        })
        .collect()
}

/// The words (runs of ASCII letters and digits) of every value of a JSON log,
/// nested `span` fields included, for the searches for what must never be
/// logged. Left out: the `timestamp`, the values of `numeric` keys (telemetry
/// whose numbers are legitimate: latencies, statuses, addresses, row counts),
/// and dotted numbers such as addresses.
pub fn json_words(lines: &[Map<String, Value>], numeric: &[&str]) -> Vec<String> {
    fn walk(value: &Value, numeric: &[&str], words: &mut Vec<String>) {
        match value {
            Value::Object(object) => {
                for (key, value) in object {
                    if key != "timestamp" && !numeric.contains(&key.as_str()) {
                        walk(value, numeric, words);
                    }
                }
            }
            Value::Array(values) => values.iter().for_each(|v| walk(v, numeric, words)),
            Value::String(text) => {
                let dotted = text.contains('.')
                    && text
                        .split(['.', ':'])
                        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
                if !dotted {
                    words.extend(
                        text.split(|c: char| !c.is_ascii_alphanumeric())
                            .filter(|w| !w.is_empty())
                            .map(str::to_owned),
                    );
                }
            }
            Value::Number(n) => words.push(n.to_string()),
            Value::Bool(_) | Value::Null => {}
        }
    }
    let mut words = Vec::new();
    for line in lines {
        walk(&Value::Object(line.clone()), numeric, &mut words);
    }
    words
}
