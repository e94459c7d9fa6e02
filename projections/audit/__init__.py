"""Audit and replay, read from the stream: a run's trail and its state as of a time
(``timeline``), rebuilding the views (``rebuild``) and proving them (``compare``)."""
