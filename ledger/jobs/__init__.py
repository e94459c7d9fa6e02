"""The job side: what a job, a script or an agent imports.

The asynchronous and synchronous clients (``client``, ``sync_client``), the
durable spool and its outbox (``spool``), the ``ledger run`` wrapper
(``wrapper``) and the batch schedulers it consults (``schedulers``), and the
HTTP read client (``reader``). It never imports the service (``projections``).
"""
