-- Schema 2: one pending hint per order and platform. News for an order whose hint is still
-- pending is merged into it (seq counts the merges), so a burst of webhooks or a poll window
-- that keeps showing the same orders costs one row, and one read, per order. A hint with
-- by_key = 1 is a look-up: find the order whose key is ref on that platform.
-- due_at is when the hint can be claimed: its arrival, a retry time, or while it is claimed,
-- the end of its lease; claims read it through an index, whatever the backlog.

CREATE TABLE hints_v2 (
    -- AUTOINCREMENT: an id is never reused, so a worker whose lease ran out can never consume
    -- (delete) a newer hint that happened to get its old hint's id.
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    platform    TEXT NOT NULL,
    ref         TEXT NOT NULL,
    by_key      INTEGER NOT NULL DEFAULT 0 CHECK (by_key IN (0, 1)),
    event       TEXT NOT NULL,
    received_at REAL NOT NULL,  -- the newest news merged into it
    observed    TEXT,           -- the status the newest news showed, if it showed one
    observed_at REAL,           -- when that news was received
    order_key   TEXT,           -- the order key the source showed, if it showed one
    seq         INTEGER NOT NULL DEFAULT 1,
    due_at      REAL NOT NULL
);

-- Pending hints move over merged per order; a fresh read decides them (observed is dropped:
-- which of several poll pages was newest is not known here).
INSERT INTO hints_v2 (id, platform, ref, by_key, event, received_at, seq, due_at)
SELECT min(id), platform, ref, 0, 'migrated', max(received_at), count(*), min(received_at)
FROM hints GROUP BY platform, ref;

DROP TABLE hints;
ALTER TABLE hints_v2 RENAME TO hints;

CREATE UNIQUE INDEX hints_one_per_order ON hints (platform, ref, by_key);
CREATE INDEX hints_due ON hints (platform, due_at, id);
