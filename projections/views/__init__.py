"""The read model: the SQLite views (``schema``), their one write path (``store``), the batch
lookups the fold reads through (``lookups``), and the queries that answer from them (``queries``,
``listing``)."""
