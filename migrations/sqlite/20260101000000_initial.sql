-- Initial schema of the gateway's store (DESIGN 6), SQLite dialect.
--
-- Cards are identified by `card_id`, a 32-byte keyed hash of the PAN computed in the HSM,
-- and shown to humans as a masked PAN; a clear PAN or a code value is never stored.
-- Times are UTC Unix seconds. Tables are STRICT so a wrong type is an error, not a
-- silent conversion. PostgreSQL keeps its own migrations (BYTEA, BIGINT) in
-- migrations/postgres/, with the same table and column names.

-- Request ids seen per client, refused again until `expires_at` (DESIGN 5: replay).
CREATE TABLE seen_requests (
    client     TEXT    NOT NULL,
    request_id TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (client, request_id)
) STRICT;
CREATE INDEX seen_requests_expires_at ON seen_requests (expires_at);

-- Cards switched to dynamic CVV2 (DESIGN 2.4, 4). The CHECK on masked_pan refuses a
-- value made of digits only, so a clear PAN can never land here by mistake (DESIGN 7.1).
CREATE TABLE enrollments (
    card_id     BLOB    NOT NULL PRIMARY KEY CHECK (length(card_id) = 32),
    programme   TEXT    NOT NULL,
    masked_pan  TEXT    NOT NULL CHECK (masked_pan GLOB '*[^0-9]*'),
    enrolled_at INTEGER NOT NULL
) STRICT;

-- (card, window) pairs whose dCVV2 was accepted, for single use (DESIGN 2.4).
-- `window_index` rather than `window`: WINDOW is a reserved word in PostgreSQL.
CREATE TABLE used_windows (
    card_id      BLOB    NOT NULL CHECK (length(card_id) = 32),
    window_index INTEGER NOT NULL,
    used_at      INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    PRIMARY KEY (card_id, window_index)
) STRICT;
CREATE INDEX used_windows_expires_at ON used_windows (expires_at);

-- Failed dCVV2 checks per card, for the rolling failure limit (DESIGN 2.4).
CREATE TABLE failures (
    id         INTEGER PRIMARY KEY,
    card_id    BLOB    NOT NULL CHECK (length(card_id) = 32),
    at         INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT;
CREATE INDEX failures_card_id_at ON failures (card_id, at);
CREATE INDEX failures_expires_at ON failures (expires_at);

-- One row, rewritten by the readiness probe to prove the store takes writes.
CREATE TABLE heartbeat (
    id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    at INTEGER NOT NULL
) STRICT;
INSERT INTO heartbeat (id, at) VALUES (1, 0);
