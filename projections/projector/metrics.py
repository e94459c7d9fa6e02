"""Prometheus metrics of the projector and the API, in one registry per process."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY: Final = CollectorRegistry()

EVENTS: Final = Counter(
    "ledger_events_total", "Stream messages the projector handled, by outcome.",
    ["outcome"], registry=REGISTRY,
)
"""Outcomes: applied, unchanged, late, stale, duplicate, quarantined."""
LAST_SEQ: Final = Gauge("ledger_projector_last_seq", "Last stream sequence applied to the views.", registry=REGISTRY)
STREAM_LAST_SEQ: Final = Gauge("ledger_stream_last_seq", "Last stream sequence the projector knows of.", registry=REGISTRY)
LAG: Final = Gauge("ledger_projector_lag", "Stream messages not yet applied to the views.", registry=REGISTRY)
BATCH_SECONDS: Final = Histogram(
    "ledger_projector_batch_seconds", "Time to apply and commit one batch.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=REGISTRY,
)
BATCH_SIZE: Final = Histogram(
    "ledger_projector_batch_size", "Messages per committed batch.",
    buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000), registry=REGISTRY,
)
