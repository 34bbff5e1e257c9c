-- Schema 1 of the SQLite store (retryq 0.1), kept to test the migration to 2.
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY NOT NULL,
    item_type TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    last_attempt INTEGER,
    next_retry INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    scanner_name TEXT NOT NULL,
    target_path TEXT NOT NULL,
    lease_until INTEGER,
    attributes TEXT NOT NULL,
    size_bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS payloads (
    id TEXT PRIMARY KEY NOT NULL,
    body BLOB NOT NULL,
    checksum INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    qid INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    quarantined_at INTEGER NOT NULL,
    body BLOB
);
-- Running item count and byte total, kept by triggers inside the same
-- transaction as the change (so a rollback undoes them too): limits
-- are checked without scanning the table.
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    items INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, items, bytes)
    SELECT 0, COUNT(*), COALESCE(SUM(size_bytes), 0) FROM items;
CREATE TRIGGER IF NOT EXISTS totals_insert AFTER INSERT ON items BEGIN
    UPDATE totals SET items = items + 1, bytes = bytes + NEW.size_bytes WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS totals_delete AFTER DELETE ON items BEGIN
    UPDATE totals SET items = items - 1, bytes = bytes - OLD.size_bytes WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS totals_resize AFTER UPDATE OF size_bytes ON items BEGIN
    UPDATE totals SET bytes = bytes - OLD.size_bytes + NEW.size_bytes WHERE id = 0;
END;
CREATE INDEX IF NOT EXISTS items_ready ON items(status, next_retry, created_at, id);
CREATE INDEX IF NOT EXISTS items_fingerprint ON items(fingerprint) WHERE status IN (0, 1);
CREATE INDEX IF NOT EXISTS items_created ON items(created_at, id);
CREATE INDEX IF NOT EXISTS items_lease ON items(status, lease_until);
