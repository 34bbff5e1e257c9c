//! The embedded default backend (placeholder).
/// SQLite-backed queue.
#[derive(Debug)]
pub struct SqliteRetryQueue;
