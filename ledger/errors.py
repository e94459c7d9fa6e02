"""The one error tree of run-ledger.

    LedgerError
    ├── InvalidEvent          bad input: not JSON, wrong field, unsafe id, subject mismatch
    ├── StreamUnavailable     NATS/JetStream cannot be reached or refused the request
    │   └── CredentialsRefused    the server refused the connection's credentials (no key, a wrong key)
    ├── EventRefused          the server refused one event for good (too large, invalid): retrying cannot help
    │   └── PermissionDenied      the server's permissions refused a publish or subscribe (CONTRACT section 7)
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


class EventRefused(LedgerError):
    """The server refused this one event for good (too large, invalid); sending it again cannot help.

    Told apart from a transient failure by JetStream's ``err_code`` or nats-py's
    error class, never by message text.
    """


class CredentialsRefused(StreamUnavailable):
    """The NATS server refused to let this client in: no credentials, or ones it does not know."""


class PermissionDenied(EventRefused):
    """The NATS server's permissions refused a publish or a subscription: ``permission denied: <what>``.

    An EventRefused: sending it again with the same key cannot help.
    """


class ConcurrencyConflict(LedgerError):
    """An append guarded by an expected sequence found the subject moved on."""


class ResumeRefused(LedgerError):
    """A run start broke the resume rules (contract section 2)."""


class CommandRefused(LedgerError):
    """A command refused by the current state (pause a cancelled sweep, kill a finished run)."""


class PortInUse(LedgerError):
    """A port the ledger must listen on is already in use."""
