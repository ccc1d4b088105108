//! The process's log: one `tracing` subscriber writing to stderr, as text lines
//! for people or as JSON lines for a log pipeline (`[log] format`, issue 12),
//! at `info` when serving and `warn` otherwise unless `RUST_LOG` says more.
//!
//! This module decides how an event is written, never what it holds: every line
//! carries the fields its call site gives and nothing else, in either format, so
//! the redaction rules (no PAN, code, key, PIN, secret or signature in any field;
//! DESIGN 7.1) are the call sites' and hold alike for text and JSON.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{Format, Json, JsonFields};
use tracing_subscriber::fmt::{MakeWriter, SubscriberBuilder};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `TIMESTAMP LEVEL target: message field=value ...`, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line: `timestamp` (RFC 3339, UTC), `level`, `target`,
    /// `message` and the event's fields at the top level, and `span` (the fields
    /// of the innermost span) when the event is inside one. Never coloured.
    Json,
}

impl LogFormat {
    /// The name `[log] format` takes.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `[log] format` that is neither `text` nor `json`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a log format (expected \"text\" or \"json\")")]
pub struct UnknownLogFormat(String);

impl FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(UnknownLogFormat(other.to_owned())),
        }
    }
}

/// The `[log]` section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogSettings {
    /// Text or JSON lines.
    pub format: LogFormat,
}

/// The format [`init`] installed, if it ran.
static INSTALLED: OnceLock<LogFormat> = OnceLock::new();

/// Installs the process-wide subscriber: `format` lines on stderr, at `info`
/// when `serving` and `warn` otherwise unless `RUST_LOG` says more. Events of
/// crates that log through `log` (cryptoki, sqlx) are included. Only the first
/// call of a process installs anything.
pub fn init(format: LogFormat, serving: bool) {
    let filter = filter(serving);
    let installed = match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .try_init(),
        LogFormat::Json => json(filter, std::io::stderr).try_init(),
    };
    if installed.is_ok() {
        let _ = INSTALLED.set(format);
    }
}

/// The format of the subscriber [`init`] installed, `None` before it ran.
#[must_use]
pub fn installed() -> Option<LogFormat> {
    INSTALLED.get().copied()
}

/// `RUST_LOG`, else `info` when serving and `warn` otherwise.
fn filter(serving: bool) -> EnvFilter {
    let default = if serving { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // cryptoki logs an error each time it cannot parse CKA_ALLOWED_MECHANISMS of a
    // derive-only key, which is expected (see hsm::mechanism::read_allowed_mechanisms).
    match "cryptoki::mechanism=off".parse() {
        Ok(quiet) => filter.add_directive(quiet),
        Err(_) => filter,
    }
}

/// The JSON-lines subscriber, ready to install, writing through `writer`: what
/// [`init`] installs for [`LogFormat::Json`], and what tests capture to check
/// every line. The event's fields are flattened into the object, beside
/// `timestamp`, `level` and `target`; of the spans, only the innermost one's
/// fields (`span`) are kept, so a line stays one short object.
pub fn json<W>(
    filter: EnvFilter,
    writer: W,
) -> SubscriberBuilder<JsonFields, Format<Json>, EnvFilter, W>
where
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_ansi(false)
        .with_env_filter(filter)
        .with_writer(writer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_by_their_names_only() {
        for format in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(format.as_str().parse::<LogFormat>().unwrap(), format);
        }
        for bad in ["JSON", "Text", "", "jsonl", "logfmt"] {
            let e = bad.parse::<LogFormat>().unwrap_err().to_string();
            assert!(e.contains("\"text\" or \"json\""), "{e}");
        }
        assert_eq!(LogFormat::default(), LogFormat::Text);
    }
}
