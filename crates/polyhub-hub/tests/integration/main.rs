//! Integration tests of the hub over a fake broker and an in-memory store (and SQLite).

mod child;
mod control;
mod ingest;
mod sqlite;
mod supervision;
mod support;
