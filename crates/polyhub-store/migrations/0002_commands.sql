-- polyhub schema, version 2: commands to devices (issue 5, Polyglot commands).
--
-- No foreign key to devices: a command outlives the device it was sent to, so the history of
-- a deleted device stays readable. The store checks that the device exists when a command is
-- created. `payload` and `reply` are JSON text.

CREATE TABLE commands (
    id               TEXT     NOT NULL PRIMARY KEY,
    device_id        TEXT     NOT NULL,
    hub_id           TEXT     NOT NULL,
    protocol         TEXT     NOT NULL,
    name             TEXT     NOT NULL,
    payload          TEXT     NOT NULL,
    seq              BIGINT   NOT NULL,
    state            TEXT     NOT NULL CHECK (state IN ('queued', 'sent', 'delivered',
                                  'acknowledged', 'expired', 'failed', 'cancelled')),
    created_at       BIGINT   NOT NULL,
    expires_at       BIGINT,
    sent_at          BIGINT,
    delivered_at     BIGINT,
    acknowledged_at  BIGINT,
    finished_at      BIGINT,
    reason           TEXT,
    reply            TEXT,
    attempts         BIGINT   NOT NULL DEFAULT 0 CHECK (attempts >= 0)
);
-- Per-device order: the next seq (MAX), a device's list, paging by seq. Unique, so two
-- commands of one device can never share a position.
CREATE UNIQUE INDEX commands_by_device_seq ON commands (device_id, seq);
-- Lists across all devices, newest or oldest first, paged by (created_at, id).
CREATE INDEX commands_by_creation ON commands (created_at, id);
-- What the dispatcher reloads at start-up: small, since most commands end in a final state.
-- Queries must repeat this WHERE clause verbatim for SQLite to use the partial index.
CREATE INDEX commands_unfinished ON commands (device_id, seq)
    WHERE state IN ('queued', 'sent', 'delivered');
