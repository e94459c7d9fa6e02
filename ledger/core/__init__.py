"""The pure core: the wire schema (``events``), the state machine of runs and
sweeps (``machine``: ``evolve`` and the state sets), folding recorded events
into views (``fold``), the Decider for every command people and agents give
(``decide``) and the facts the ledger derives from state and time
(``react``: crash on silence, kill on cancel, finish on stopped-and-done).

No I/O, no clock, no logging: it imports only the standard library, msgspec
and ``ledger.errors``. Time and ids arrive inside events and commands. Every
adapter (the job side, the CLI, the projector, the API, the monitor) calls
these functions; no rule is written anywhere else.
"""
