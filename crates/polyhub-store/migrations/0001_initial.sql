-- polyhub schema, version 1.
--
-- Types are spelled the way PostgreSQL spells them where SQLite accepts the same name with the
-- same meaning (TEXT, BIGINT, DOUBLE PRECISION, SMALLINT), so a PostgreSQL migration can stay
-- close to this one. Times are milliseconds since the Unix epoch.

CREATE TABLE groups (
    id          TEXT    NOT NULL PRIMARY KEY,
    name        TEXT    NOT NULL,
    metadata    TEXT    NOT NULL,           -- a JSON object
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);

CREATE TABLE hubs (
    id             TEXT    NOT NULL PRIMARY KEY,
    group_id       TEXT    NOT NULL REFERENCES groups (id),
    name           TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,        -- a JSON object
    settings       TEXT    NOT NULL,        -- HubSettings as JSON
    desired_state  TEXT    NOT NULL CHECK (desired_state IN ('running', 'stopped')),
    created_at     BIGINT  NOT NULL,
    updated_at     BIGINT  NOT NULL
);
CREATE INDEX hubs_by_group ON hubs (group_id, id);

-- Device ids are unique across all hubs: commands and URLs address a device by id alone.
CREATE TABLE devices (
    id          TEXT    NOT NULL PRIMARY KEY,
    hub_id      TEXT    NOT NULL REFERENCES hubs (id),
    name        TEXT    NOT NULL,
    protocol    TEXT    NOT NULL,
    metadata    TEXT    NOT NULL,           -- a JSON object
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);
CREATE INDEX devices_by_hub ON devices (hub_id, id);

-- No foreign key to devices: telemetry outlives the device that produced it.
-- kind: 0 number (num), 1 boolean (num = 0 or 1, so booleans aggregate), 2 text (text).
-- `id` is the rowid: rows are appended in arrival order, which keeps the table's B-tree
-- append-only; it also breaks ties between rows with the same ts in range cursors.
CREATE TABLE telemetry (
    id         INTEGER            NOT NULL PRIMARY KEY,
    device_id  TEXT               NOT NULL,
    signal     TEXT               NOT NULL,
    ts         BIGINT             NOT NULL,
    kind       SMALLINT           NOT NULL CHECK (kind IN (0, 1, 2)),
    num        DOUBLE PRECISION,
    text       TEXT
);
-- Serves latest, per-signal range and downsample. A range over all signals of a device uses
-- it too (SQLite sorts the device's rows within the time bounds), which costs less than a
-- second index on every insert.
CREATE INDEX telemetry_by_series ON telemetry (device_id, signal, ts);

-- Broker seqs already committed per hub, so a redelivered message is skipped whole.
CREATE TABLE ingest_seqs (
    hub_id       TEXT    NOT NULL,
    seq          BIGINT  NOT NULL,
    received_at  BIGINT  NOT NULL,
    PRIMARY KEY (hub_id, seq)
) WITHOUT ROWID;

CREATE TABLE dead_letters (
    id           INTEGER  NOT NULL PRIMARY KEY,
    hub_id       TEXT     NOT NULL,
    device_id    TEXT,
    topic        TEXT     NOT NULL,
    payload      BLOB     NOT NULL,
    reason       TEXT     NOT NULL,
    received_at  BIGINT   NOT NULL
);
CREATE INDEX dead_letters_by_hub ON dead_letters (hub_id, id);

CREATE TABLE parser_events (
    id      INTEGER  NOT NULL PRIMARY KEY,
    hub_id  TEXT     NOT NULL,
    kind    TEXT     NOT NULL CHECK (kind IN ('started', 'stopped', 'failed', 'restarted')),
    reason  TEXT,
    at      BIGINT   NOT NULL
);
CREATE INDEX parser_events_by_hub ON parser_events (hub_id, id);

CREATE TABLE presence (
    device_id   TEXT      NOT NULL PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    online      SMALLINT  NOT NULL CHECK (online IN (0, 1)),
    last_seen   BIGINT,
    changed_at  BIGINT
);
