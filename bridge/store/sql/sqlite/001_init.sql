-- Schema 1: inbox (hints), orders and their per-platform state, outbox (one desired write per
-- order and target), problems, poll watermarks, audit trail. Times are Unix seconds (REAL).

-- Inbox. A hint is deleted when the worker's verdict on it is committed, so the table stays
-- as small as the backlog; claimed_until is the lease (NULL: never claimed).
CREATE TABLE hints (
    -- AUTOINCREMENT: an id is never reused, so a worker whose lease ran out can never consume
    -- (delete) a newer hint that happened to get its old hint's id.
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    platform      TEXT NOT NULL,
    ref           TEXT NOT NULL,
    event         TEXT NOT NULL,
    received_at   REAL NOT NULL,
    observed      TEXT,
    claimed_until REAL
);
-- Covers the claim query (group by order, max lease, min id via the rowid).
CREATE INDEX hints_by_order ON hints (platform, ref, claimed_until);

-- version is the optimistic-concurrency counter of commit_observation. A row with version 0
-- exists only when a platform reference was learned before any verdict was committed.
CREATE TABLE orders (
    order_key TEXT PRIMARY KEY,
    canonical TEXT,
    version   INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE platform_states (
    order_key       TEXT NOT NULL REFERENCES orders (order_key) ON DELETE CASCADE,
    platform        TEXT NOT NULL,
    ref             TEXT,
    last_seen       TEXT,
    last_seen_at    REAL,
    last_written    TEXT,
    last_written_at REAL,
    PRIMARY KEY (order_key, platform)
) WITHOUT ROWID;
-- A platform's reference names one order at most (NULLs are distinct in SQLite).
CREATE UNIQUE INDEX platform_states_by_ref ON platform_states (platform, ref);

-- Outbox: what each target platform should show. version bumps whenever the desire changes,
-- so a delivery finishing an older version cannot mark a newer desire done.
CREATE TABLE deliveries (
    order_key    TEXT NOT NULL REFERENCES orders (order_key) ON DELETE CASCADE,
    platform     TEXT NOT NULL,
    canonical    TEXT NOT NULL,
    native       TEXT NOT NULL,
    version      INTEGER NOT NULL,
    attempts     INTEGER NOT NULL,
    first_try_at REAL NOT NULL,
    next_try_at  REAL NOT NULL,
    lease_until  REAL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'done', 'superseded', 'dead')),
    last_error   TEXT,
    updated_at   REAL NOT NULL,
    PRIMARY KEY (order_key, platform)
) WITHOUT ROWID;
-- Only pending rows are ever scanned by the delivery loop; done rows pile up and must not.
CREATE INDEX deliveries_due ON deliveries (platform, next_try_at, updated_at)
    WHERE state = 'pending';

CREATE TABLE problems (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL,
    order_key  TEXT,
    platform   TEXT NOT NULL,
    ref        TEXT,
    canonical  TEXT,
    reason     TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX problems_newest ON problems (created_at, id);

CREATE TABLE watermarks (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- detail is a JSON object (text).
CREATE TABLE audit (
    id        INTEGER PRIMARY KEY,
    at        REAL NOT NULL,
    order_key TEXT,
    platform  TEXT,
    kind      TEXT NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX audit_newest ON audit (at, id);
CREATE INDEX audit_by_order ON audit (order_key, at, id);
