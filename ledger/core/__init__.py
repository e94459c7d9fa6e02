"""The pure core: the wire schema (``events``), the state machine of runs and
sweeps (``machine``: ``evolve`` and the state sets), folding recorded events
into views (``fold``) and the decisions of the ledger's own publishers
(``decide``).

No I/O, no clock, no logging: it imports only the standard library, msgspec
and ``ledger.errors``. Time and ids arrive inside events and commands. Every
adapter (the job side, the CLI, the projector, the API, the monitor) calls
these functions; no rule is written anywhere else.
"""
