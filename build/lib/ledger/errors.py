"""The one error tree of run-ledger.

    LedgerError
    ├── InvalidEvent          bad input: not JSON, wrong field, unsafe id, subject mismatch
    ├── StreamUnavailable     NATS/JetStream cannot be reached or refused the request
    ├── ConcurrencyConflict   an expected-sequence append lost a race (JetStream 10071)
    ├── ResumeRefused         a start broke the resume table of CONTRACT section 2
    ├── CommandRefused        a sweep or run command that makes no sense in the current state
    └── PortInUse             a port the ledger must listen on is already taken

Library errors are translated only at the boundary, always ``raise ... from exc``.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error run-ledger raises on purpose."""


class InvalidEvent(LedgerError):
    """An event that cannot enter the ledger; ``reason`` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StreamUnavailable(LedgerError):
    """NATS or JetStream could not be reached or refused the request."""


class ConcurrencyConflict(LedgerError):
    """An append guarded by an expected sequence found the subject moved on."""


class ResumeRefused(LedgerError):
    """A run start broke the resume rules (contract section 2)."""


class CommandRefused(LedgerError):
    """A command refused by the current state (pause a cancelled sweep, kill a finished run)."""


class PortInUse(LedgerError):
    """A port the ledger must listen on is already in use."""
