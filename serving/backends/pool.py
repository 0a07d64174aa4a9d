"""A pool of OpenAI-compatible endpoints (vLLM or `cascade llm serve` replicas): health checks,
least-outstanding-requests balancing, a circuit breaker per endpoint.

Each attempt of a request takes the endpoint with the fewest requests in flight among those
that may be tried (ties go round-robin). An endpoint may be tried when its breaker is closed,
or half-open: after `cooldown_s` an open breaker lets one request through, and its outcome
closes or re-opens it. The breaker opens after `failures_to_open` failures in a row, and at
once on a refused connection (nothing listens there: every request would pay for finding out).
A health thread asks every endpoint's `/models` each `health_interval_s`; a reply closes its
breaker (the endpoint is back), no reply opens it. Failover is the backend's retry on another
endpoint, within the request's deadline (serving/backends/openai_http.py).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Endpoint:
    url: str  # ends in /v1
    outstanding: int = 0
    failures: int = 0  # in a row
    open_until: float = 0.0  # breaker open until then (0: closed)
    probing: bool = False  # half-open: one request is testing it
    served: int = 0
    failed: int = 0
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def state(self) -> str:
        if self.open_until == 0.0:
            return "closed"
        return "half-open" if time.monotonic() >= self.open_until else "open"


class EndpointPool:
    def __init__(self, urls: list[str], client: httpx.Client, failures_to_open: int = 3, cooldown_s: float = 5.0,
                 health_interval_s: float = 2.0):
        if not urls:
            raise ValueError("url: no endpoints")
        self.endpoints = [Endpoint(u) for u in urls]
        self.client = client
        self.failures_to_open = failures_to_open
        self.cooldown_s = cooldown_s
        self.health_interval_s = health_interval_s
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._health = None
        if len(urls) > 1 and health_interval_s > 0:
            self._health = threading.Thread(target=self._check_health, name="cascade-llm-health", daemon=True)
            self._health.start()

    # --- choosing ------------------------------------------------------------------------

    def acquire(self, avoid: set[str] | None = None) -> tuple[Endpoint, bool] | None:
        """The endpoint to try next (counted as outstanding until `release`) and whether this
        attempt is its half-open probe, preferring endpoints not in `avoid` (already tried by
        this request); None when every breaker is open."""
        with self._lock:
            now = time.monotonic()
            usable = [e for e in self.endpoints if e.open_until == 0.0 or (now >= e.open_until and not e.probing)]
            if not usable and len(self.endpoints) == 1:  # alone, it is tried anyway: the retries' backoff paces it
                usable = self.endpoints
            if not usable:
                return None
            fresh = [e for e in usable if not avoid or e.url not in avoid] or usable
            turn = next(self._turn)
            best = min(fresh, key=lambda e: (e.outstanding, (self.endpoints.index(e) - turn) % len(self.endpoints)))
            probe = bool(best.open_until) and not best.probing
            if probe:
                best.probing = True  # half-open: this request is the probe
            best.outstanding += 1
            return best, probe

    def has_other(self, tried: set[str]) -> bool:
        """Whether an endpoint this request has not tried may be tried now (failover needs no
        backoff wait)."""
        now = time.monotonic()
        return any(e.url not in tried and (e.open_until == 0.0 or (now >= e.open_until and not e.probing))
                   for e in self.endpoints)

    def release(self, endpoint: Endpoint, ok: bool, error: str = "", refused: bool = False, probe: bool = False,
                counts: bool = True) -> None:
        """An attempt ended. Only the probe decides a half-open breaker (a request sent before it
        opened is old evidence); `counts=False`: the attempt says nothing about the endpoint
        (e.g. the caller's own deadline ran out)."""
        with self._lock:
            endpoint.outstanding -= 1
            if probe:
                endpoint.probing = False
            if not counts:
                return
            if ok:
                endpoint.served += 1
                if probe or not endpoint.open_until:
                    endpoint.failures, endpoint.open_until = 0, 0.0
                return
            endpoint.failed += 1
            endpoint.failures += 1
            endpoint.last_error = error
            if refused or endpoint.failures >= self.failures_to_open or endpoint.open_until:
                endpoint.open_until = time.monotonic() + self.cooldown_s

    # --- health --------------------------------------------------------------------------

    def _check_health(self) -> None:
        while not self._stop.wait(self.health_interval_s):
            for e in self.endpoints:
                try:
                    ok = self.client.get(e.url + "/models", timeout=min(2.0, self.health_interval_s)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with self._lock:
                    if ok and e.open_until and not e.probing:
                        e.failures, e.open_until = 0, 0.0  # back: traffic returns
                    elif not ok and not e.open_until:
                        e.open_until = time.monotonic() + self.cooldown_s
                        e.last_error = "health check failed"

    def stats(self) -> list[dict]:
        return [{"url": e.url, "state": e.state, "outstanding": e.outstanding, "served": e.served,
                 "failed": e.failed, "last_error": e.last_error} for e in self.endpoints]

    def close(self) -> None:
        self._stop.set()
