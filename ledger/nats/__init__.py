"""The NATS/JetStream adapter: connecting, the ``LEDGER`` stream and its
ordered reader (``stream``), the pipelined publisher (``publisher``), the
embedded ``nats-server`` (``server``), a job's reconnecting connection
(``connection``), one run or sweep folded from its own subjects (``entity``),
the commands people and agents give (``control``), export and import
(``archive``), the roles' keys and permissions (``auth``).

Library errors are translated here into ``ledger.errors``.
"""
