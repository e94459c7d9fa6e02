"""The read side of run-ledger: the projector, the SQLite views, queries and the HTTP API."""
