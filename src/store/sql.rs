//! The SQL text of the store, shared by every backend.
//!
//! Statements are written once, in the common subset of SQLite and PostgreSQL:
//! `$n` placeholders, `INSERT … ON CONFLICT`, 64-bit integers, binary card ids.
//! Nothing here may use a dialect-only feature; a statement that has to differ per
//! backend gets its own constant with the backend in its name. Values are always
//! bound, never formatted into the text.

/// `$1` client, `$2` request id, `$3` expires_at, `$4` now. Affects one row when the
/// id is new or its earlier claim has expired, none when it is still live.
pub(crate) const CLAIM_REQUEST: &str = "INSERT INTO seen_requests (client, request_id, expires_at) \
     VALUES ($1, $2, $3) \
     ON CONFLICT (client, request_id) DO UPDATE SET expires_at = excluded.expires_at \
     WHERE seen_requests.expires_at <= $4";

/// `$1` client, `$2` request id, `$3` now.
pub(crate) const REQUEST_SEEN: &str = "SELECT 1 FROM seen_requests \
     WHERE client = $1 AND request_id = $2 AND expires_at > $3";

/// `$1` card id.
pub(crate) const ENROLLMENT: &str =
    "SELECT programme, masked_pan, enrolled_at FROM enrollments WHERE card_id = $1";

/// `$1` card id, `$2` programme, `$3` masked PAN, `$4` enrolled_at. Affects no row
/// when the card is already enrolled (the existing row is kept as it is).
pub(crate) const ENROLL: &str = "INSERT INTO enrollments (card_id, programme, masked_pan, enrolled_at) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (card_id) DO NOTHING";

/// `$1` card id.
pub(crate) const UNENROLL: &str = "DELETE FROM enrollments WHERE card_id = $1";

/// `$1` card id, `$2` since.
pub(crate) const FAILURES_SINCE: &str =
    "SELECT COUNT(*) FROM failures WHERE card_id = $1 AND at >= $2";

/// `$1` card id, `$2` at, `$3` expires_at.
pub(crate) const ADD_FAILURE: &str =
    "INSERT INTO failures (card_id, at, expires_at) VALUES ($1, $2, $3)";

/// `$1` card id.
pub(crate) const CLEAR_FAILURES: &str = "DELETE FROM failures WHERE card_id = $1";

/// `$1` card id, `$2` window, `$3` used_at, `$4` expires_at. Affects no row when the
/// window was already used.
pub(crate) const CLAIM_WINDOW: &str = "INSERT INTO used_windows (card_id, window_index, used_at, expires_at) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (card_id, window_index) DO NOTHING";

/// `$1` now. The row exists from the first migration on; the upsert keeps the probe
/// a write even if it were missing.
pub(crate) const HEARTBEAT: &str = "INSERT INTO heartbeat (id, at) VALUES (1, $1) \
     ON CONFLICT (id) DO UPDATE SET at = excluded.at";

/// Each `$1` now: rows whose `expires_at <= now` are gone.
pub(crate) const CLEANUP: [&str; 3] = [
    "DELETE FROM seen_requests WHERE expires_at <= $1",
    "DELETE FROM used_windows WHERE expires_at <= $1",
    "DELETE FROM failures WHERE expires_at <= $1",
];
