"""Where the queue and the documents live: one Backend per database kind (SQLite, PostgreSQL)."""
