-- Initial schema of the gateway's store (DESIGN 6), PostgreSQL dialect.
--
-- Same tables and columns as migrations/sqlite/, so the store's SQL text serves both.
-- Cards are identified by `card_id`, a 32-byte keyed hash of the PAN computed in the HSM,
-- and shown to humans as a masked PAN; a clear PAN or a code value is never stored.
-- Times are UTC Unix seconds (BIGINT). Several gateway processes share these tables:
-- every claim is an INSERT ... ON CONFLICT on a primary key, so the database decides
-- which of two racing requests wins.

-- Request ids seen per client, refused again until `expires_at` (DESIGN 5: replay).
CREATE TABLE seen_requests (
    client     TEXT   NOT NULL,
    request_id TEXT   NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (client, request_id)
);
CREATE INDEX seen_requests_expires_at ON seen_requests (expires_at);

-- Cards switched to dynamic CVV2 (DESIGN 2.4, 4). The CHECK on masked_pan refuses a
-- value made of digits only, so a clear PAN can never land here by mistake (DESIGN 7.1).
CREATE TABLE enrollments (
    card_id     BYTEA  NOT NULL PRIMARY KEY CHECK (octet_length(card_id) = 32),
    programme   TEXT   NOT NULL,
    masked_pan  TEXT   NOT NULL CHECK (masked_pan ~ '[^0-9]'),
    enrolled_at BIGINT NOT NULL
);

-- (card, window) pairs whose dCVV2 was accepted, for single use (DESIGN 2.4).
CREATE TABLE used_windows (
    card_id      BYTEA  NOT NULL CHECK (octet_length(card_id) = 32),
    window_index BIGINT NOT NULL,
    used_at      BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    PRIMARY KEY (card_id, window_index)
);
CREATE INDEX used_windows_expires_at ON used_windows (expires_at);

-- Failed dCVV2 checks per card, for the rolling failure limit (DESIGN 2.4). Counted
-- under a per-card advisory lock (StoreTx::lock_card), so the limit holds across
-- gateway processes.
CREATE TABLE failures (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    card_id    BYTEA  NOT NULL CHECK (octet_length(card_id) = 32),
    at         BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX failures_card_id_at ON failures (card_id, at);
CREATE INDEX failures_expires_at ON failures (expires_at);

-- One row, rewritten by the readiness probe to prove the store takes writes.
CREATE TABLE heartbeat (
    id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    at BIGINT  NOT NULL
);
INSERT INTO heartbeat (id, at) VALUES (1, 0);
