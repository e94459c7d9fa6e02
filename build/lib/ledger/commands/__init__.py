"""The verbs of the ``ledger`` command, one module per kind of work."""
