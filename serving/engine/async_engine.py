"""The engine on a background thread, so the HTTP app and the cascade tier share one batch.

Callers hand in a request with a `sink` (called on the engine thread with every
`RequestOutput` of that request); the thread adds queued requests between steps, steps while
work remains, and sleeps on a condition when idle. `stream()` (asyncio) and `run_sync()`
(blocking) are the two ways in; both feed the same continuous batch.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from serving.engine.engine import LLMEngine, RequestError, RequestOutput
from serving.engine.sampling import SamplingParams

Sink = Callable[[RequestOutput | BaseException], None]


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._cond = threading.Condition()
        self._inbox: list[tuple[str | list[int], SamplingParams, Sink, str]] = []
        self._aborts: list[str] = []
        self._sinks: dict[str, Sink] = {}
        self._stop = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="cascade-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: str | list[int], params: SamplingParams, sink: Sink) -> str:
        """Queue a request; returns its id at once (so it can be aborted before any output)."""
        return self.submit_many([(prompt, params, sink)])[0]

    def submit_many(self, requests: list[tuple[str | list[int], SamplingParams, Sink]]) -> list[str]:
        """Queue requests together: the engine thread sees all of them at its next step. One at
        a time, it could wake on the first and step with a few while the rest were still being
        queued."""
        with self._cond:
            if self._stop:
                raise RuntimeError("the engine is shut down")
            rids = []
            for prompt, params, sink in requests:
                rid = f"async-{next(self._ids)}"
                self._inbox.append((prompt, params, sink, rid))
                rids.append(rid)
            self._cond.notify()
            return rids

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def alive(self) -> bool:
        """The engine thread runs (it ends only at shutdown, or on a bug outside a step)."""
        return self._thread.is_alive() and not self._stop

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _deliver(self, rid: str, sink: Sink, item: RequestOutput | BaseException) -> bool:
        """Hand an item to a caller; a sink that raises (its event loop closed, say) loses its
        request, not the engine thread."""
        try:
            sink(item)
            return True
        except Exception:
            self.engine.abort(rid)
            self._sinks.pop(rid, None)
            return False

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._inbox or self._aborts or self.engine.has_unfinished()):
                    self._cond.wait()
                if self._stop:
                    pending = list(self._sinks.items()) + [(rid, s) for _, _, s, rid in self._inbox]
                    break
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            for prompt, params, sink, rid in inbox:
                try:
                    self.engine.add_request(prompt, params, request_id=rid)
                except Exception as exc:  # a bad request fails alone, with its reason
                    self._deliver(rid, sink, exc)
                    continue
                self._sinks[rid] = sink
            for rid in aborts:  # after adding: an abort may name a request queued in the same batch
                self.engine.abort(rid)
                self._sinks.pop(rid, None)
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()  # a failing forward pass fails only the requests it blames
            except Exception as exc:  # a bug outside the forward pass: every caller hears it, none hangs
                for rid, sink in list(self._sinks.items()):
                    self._deliver(rid, sink, exc)
                    self.engine.abort(rid)
                self._sinks.clear()
                self.engine.kv.reset_prefix_cache()  # blocks of the failed step may be half written
                continue
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                item = RequestError(out.error) if out.error is not None else out
                if sink is not None and self._deliver(out.request_id, sink, item) and out.finished:
                    del self._sinks[out.request_id]
        for rid, sink in pending:
            self._deliver(rid, sink, RuntimeError("the engine shut down before the request finished"))

    # --- the two ways in -------------------------------------------------------------------

    async def stream(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Every output of one request as it is produced; raises the request's error."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = self.submit(prompt, params, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        done = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
                if item.finished:
                    done = True
                    return
        finally:
            if not done:  # the client went away (even before any output): free its blocks
                self.abort(rid)

    def run_sync(self, prompts: list[str | list[int]], params: list[SamplingParams],
                 timeout: float | None = None) -> list[RequestOutput]:
        """Blocking: submit all, wait for all final outputs (in order), `timeout` seconds in all."""
        futures: list[Future] = []
        requests = []
        for prompt, p in zip(prompts, params):
            fut: Future = Future()

            def sink(item, fut=fut):
                if isinstance(item, BaseException):
                    fut.set_exception(item)
                elif item.finished:
                    fut.set_result(item)

            requests.append((prompt, p, sink))
            futures.append(fut)
        rids = self.submit_many(requests)
        end = None if timeout is None else time.monotonic() + timeout  # one deadline for all
        try:
            return [f.result(timeout=None if end is None else max(0.0, end - time.monotonic())) for f in futures]
        except BaseException:  # timed out (or one failed): stop computing the rest
            for rid, fut in zip(rids, futures):
                if not fut.done():
                    self.abort(rid)
            raise
