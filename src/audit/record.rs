//! The record format: one JSON object per line, flat (every value a string,
//! number, boolean or null), keys in sorted order, no spaces — that text is the
//! record's canonical form. Every record has:
//!
//! - `seq`: 1 for the first record of a trail, then +1 per record, across files;
//! - `prev`: the `hash` of the record before it ([`GENESIS`] for `seq` 1);
//! - `kind`: `request`, `seal` or `notice`;
//! - `hash`: lowercase hex SHA-256 of the canonical bytes of the record without
//!   its `hash` field.
//!
//! So each record commits to every record before it; a seal record adds an
//! HMAC, made in the token, over the chain head it follows ([`seal_message`]).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The `prev` of the first record of a trail: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Domain separation of the seal HMAC input.
pub const SEAL_CONTEXT: &str = "dcvv-gateway/audit-seal/v1";

/// A record as a sorted map (its canonical form).
pub type Fields = BTreeMap<String, Value>;

/// The name of a trail file whose first record has `first_seq`; names sort in
/// chain order.
pub fn file_name(first_seq: u64) -> String {
    format!("audit-{first_seq:020}.jsonl")
}

/// The first seq a trail file name promises, if it is one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// What the HTTP layer knows about one request; no card data beyond a masked
/// PAN, never a code value, a secret or a signature.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestFacts {
    /// When the request arrived, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The client's `X-Client-Request-Id` when well formed, else the gateway's id.
    pub request_id: String,
    /// The `apikey` when it names a configured client, else null.
    pub client: Option<String>,
    /// Whether the request's signature verified.
    pub authenticated: bool,
    /// HTTP method.
    pub method: String,
    /// Route template (`unmatched` for unknown paths: never a raw path).
    pub operation: String,
    /// `412345******2345`, when the body held a valid PAN.
    pub masked_pan: Option<String>,
    /// The card's programme, when resolved.
    pub programme: Option<String>,
    /// Dynamic values: `I`, `A` or `W` when given.
    pub channel: Option<String>,
    /// Dynamic values: the `organizationNumber` named, as 3 digits.
    pub organization: Option<String>,
    /// What the request did when its operation alone does not say it:
    /// `unenroll` for dynamic values with `disableDCVV2 = "Y"`.
    pub action: Option<String>,
    /// The key the result was computed under.
    pub key_label: Option<String>,
    /// Its KCV.
    pub key_kcv: Option<String>,
    /// `ok`, `approved`, `declined`, `refused` (4xx) or `failed` (5xx).
    pub outcome: String,
    /// A verification's reason (`match`, `mismatch`, ...).
    pub reason: Option<String>,
    /// The stable error code of a 4xx/5xx.
    pub error_code: Option<String>,
    /// HTTP status sent.
    pub status: u16,
    /// Time from arrival to the response, before the audit write, microseconds.
    pub latency_us: u64,
    /// Peer address, when known.
    pub peer: Option<String>,
}

/// Turns a flat serializable value into fields.
pub fn fields_of(value: &impl Serialize) -> Fields {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map.into_iter().collect(),
        _ => Fields::new(),
    }
}

/// The canonical bytes: compact JSON of the sorted map.
pub fn canonical(fields: &Fields) -> Vec<u8> {
    // Serializing a map of JSON values cannot fail.
    serde_json::to_vec(fields).unwrap_or_default()
}

/// Lowercase hex SHA-256 of the canonical bytes of `fields` without `hash`.
pub fn hash_of(fields: &Fields) -> String {
    let mut unhashed = fields.clone();
    unhashed.remove("hash");
    hex::encode(Sha256::digest(canonical(&unhashed)))
}

/// Completes a record: `seq`, `prev`, `kind`, then its `hash`. Returns the line
/// (with its newline) and the hash.
pub fn seal_fields(mut fields: Fields, seq: u64, prev: &str, kind: &str) -> (Vec<u8>, String) {
    fields.insert("seq".into(), Value::from(seq));
    fields.insert("prev".into(), Value::from(prev));
    fields.insert("kind".into(), Value::from(kind));
    fields.remove("hash");
    let hash = hash_of(&fields);
    fields.insert("hash".into(), Value::from(hash.clone()));
    let mut line = canonical(&fields);
    line.push(b'\n');
    (line, hash)
}

/// The bytes a seal's HMAC covers: the context, the seal's own seq and the
/// chain head it follows (the hash of the record before it).
pub fn seal_message(seq: u64, head: &str) -> Vec<u8> {
    format!("{SEAL_CONTEXT}\n{seq}\n{head}").into_bytes()
}

/// RFC 3339 UTC with milliseconds of Unix milliseconds.
pub fn time_text(unix_ms: u64) -> String {
    let nanos = i128::from(unix_ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
            .ok()
        })
        .unwrap_or_default()
}

/// Unix milliseconds now (the writer's own records: seals and notices).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_canonical_and_hash_their_content() {
        let facts = RequestFacts {
            request_id: "r-1".into(),
            status: 200,
            ..RequestFacts::default()
        };
        let (line, hash) = seal_fields(fields_of(&facts), 1, GENESIS, "request");
        let text = std::str::from_utf8(&line).unwrap();
        assert!(text.ends_with("}\n") && !text.contains(": "));
        let parsed: Fields = serde_json::from_slice(&line).unwrap();
        assert_eq!(canonical(&parsed), line[..line.len() - 1]);
        assert_eq!(hash_of(&parsed), hash);
        assert_eq!(parsed["hash"], Value::from(hash.clone()));
        let mut edited = parsed.clone();
        edited.insert("status".into(), Value::from(201));
        assert_ne!(hash_of(&edited), hash);
    }

    #[test]
    fn file_names_sort_in_chain_order_and_parse_back() {
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert!(file_name(9) < file_name(10));
        assert_eq!(parse_file_name("audit-1.jsonl"), None);
        assert_eq!(parse_file_name(".lock"), None);
    }

    #[test]
    fn times_have_milliseconds() {
        assert_eq!(time_text(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
    }
}
