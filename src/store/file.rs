//! The Go-compatible file backend (placeholder).
/// File-backed queue.
#[derive(Debug)]
pub struct FileRetryQueue;
