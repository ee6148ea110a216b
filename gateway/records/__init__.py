"""Who created which batch, and Idempotency-Key records: the interface, SQLite, Redis."""
