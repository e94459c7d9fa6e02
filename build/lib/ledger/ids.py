"""Event and run ids: ULIDs (48-bit millisecond time + 80 random bits, Crockford base32).

Written here rather than taken from python-ulid: that package costs ``ledger run``
~14 ms of start-up (it reads its own version through importlib.metadata) and
was 12% of the CPU of a client heartbeating 2,000 runs (bench/jobs.py).
"""

from __future__ import annotations

import os
import time
from typing import Final

_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id() -> str:
    """A fresh ULID: 26 characters, unique, sortable by creation time to the millisecond, safe in a NATS subject."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))
