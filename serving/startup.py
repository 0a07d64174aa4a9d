"""Readiness: the port opens at once and the models load behind it.

A server that loads before it listens looks dead to an orchestrator for as long as the load
takes (a large model: tens of seconds), and says nothing about why. Here the app answers from
its first second: `/healthz` 200 (the process lives), `/readyz` (or `/health` on `cascade llm
serve`) 503 with each part's state — waiting, loading, warming, ready — until all are ready,
then 200. Work routes answer 503 `not_ready` with Retry-After meanwhile.

A load that fails (a missing file, a model onnxruntime cannot read) is a fault of the
deployment, not of a request: the app logs it as one line naming the file and the process
exits non-zero (`on_error`), the way it would have before listening. Everything that can be
checked without loading a model — the config's keys and types, a free port — is checked
before the port opens (`cascade serve`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

log = logging.getLogger("cascade.startup")
WARM_UP_TEXT = "hello"
WARM_UP_S = 10.0  # a warm-up that hangs (a remote large model still starting) does not block readiness


class Startup:
    """Where loading stands: each part's state, and the error that ended it, if any."""

    def __init__(self, parts: list[str]):
        self.state = {name: "waiting" for name in parts}
        self.error: str | None = None
        self.started = time.monotonic()

    @property
    def ready(self) -> bool:
        return self.error is None and all(s == "ready" for s in self.state.values())

    def set(self, name: str, state: str) -> None:
        self.state[name] = state
        log.info("%s: %s (%.1fs since start)", name, state, time.monotonic() - self.started)

    def not_ready(self) -> str | None:
        """Why work cannot be served yet, or None."""
        if self.error is not None:
            return f"loading failed: {self.error}"
        left = [f"{n} ({s})" for n, s in self.state.items() if s != "ready"]
        return f"still loading: {', '.join(left)}" if left else None

    def report(self) -> tuple[int, dict]:
        """The readiness probe's status and body."""
        if self.error is not None:
            return 503, {"status": "failed", "error": self.error, "parts": dict(self.state)}
        status = "ready" if self.ready else "loading"
        return (200 if self.ready else 503), {"status": status, "parts": dict(self.state),
                                              "seconds": round(time.monotonic() - self.started, 1)}


def warm_up(tier) -> None:
    """One prediction so the first real request does not pay for lazy set-up (the attention
    kernel's compile, onnxruntime's first run). A tier that fails here is not failed: its
    requests will say what is wrong, and a remote model may simply be starting."""
    from cascade.deadline import deadline_scope

    try:
        with deadline_scope(time.monotonic() + WARM_UP_S):
            tier.predict_batch([WARM_UP_TEXT])
    except Exception as exc:
        log.warning("%s: warm-up failed (%s: %s); serving it anyway", tier.name, type(exc).__name__, exc)


def exit_on_load_error(message: str) -> None:
    """The default when loading fails under a plain `uvicorn --factory`: end the process
    (uvicorn stops on SIGTERM) so the orchestrator restarts or reports it."""
    log.error("error: %s", message)
    os.kill(os.getpid(), signal.SIGTERM)


async def load_in_background(startup: Startup, load, on_loaded, on_error) -> asyncio.Task:
    """Run `load()` on a thread (it calls `startup.set` as parts progress), then `await
    on_loaded(result)` on the loop; a failure becomes `startup.error` and `on_error(message)`."""

    async def run():
        try:
            result = await asyncio.to_thread(load)
            await on_loaded(result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            startup.error = load_error_message(exc)
            on_error(startup.error)

    return asyncio.get_running_loop().create_task(run())


def load_error_message(exc: BaseException) -> str:
    """One line naming what failed: a user error's own message (it names the file), else the
    exception's type and message."""
    from cascade.config import ConfigError
    from cascade.data import DataError

    if isinstance(exc, (ConfigError, DataError, FileNotFoundError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
