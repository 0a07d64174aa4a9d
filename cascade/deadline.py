"""The deadline of the work a thread is doing, so that a backend deep under a tier (an HTTP
client, the engine) can bound its waits by it without every tier passing it along.

    with deadline_scope(time.monotonic() + 2.0):
        tier.predict_batch(texts)          # inside: remaining() -> seconds left, or None

The serving layer sets it around each tier batch (the latest deadline among the requests in
the batch, capped by `tier_timeout_s`); offline callers set none and backends use their own
timeouts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_deadline: ContextVar[float | None] = ContextVar("cascade_deadline", default=None)


@contextmanager
def deadline_scope(deadline: float | None) -> Iterator[None]:
    """Run the block under `deadline` (a `time.monotonic()` value; None: no deadline)."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining(cap: float | None = None) -> float | None:
    """Seconds left before the current deadline (never below 0), at most `cap`; with no
    deadline set, `cap` itself."""
    deadline = _deadline.get()
    if deadline is None:
        return cap
    left = max(0.0, deadline - time.monotonic())
    return left if cap is None else min(cap, left)
