"""The engine on a background thread, so the HTTP app and the cascade tier share one batch.

Callers hand in a request with a `sink` (called on the engine thread with every
`RequestOutput` of that request); the thread adds queued requests between steps, steps while
work remains, and sleeps on a condition when idle. `stream()` (asyncio) and `run_sync()`
(blocking) are the two ways in; both feed the same continuous batch.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from serving.engine.engine import LLMEngine, RequestOutput
from serving.engine.sampling import SamplingParams

Sink = Callable[[RequestOutput | BaseException], None]


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._cond = threading.Condition()
        self._inbox: list[tuple[str | list[int], SamplingParams, Sink]] = []
        self._aborts: list[str] = []
        self._sinks: dict[str, Sink] = {}
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="cascade-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: str | list[int], params: SamplingParams, sink: Sink) -> None:
        with self._cond:
            if self._stop:
                raise RuntimeError("the engine is shut down")
            self._inbox.append((prompt, params, sink))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    @property
    def load(self) -> int:
        """Requests queued or running: the app's overload signal."""
        return len(self._sinks) + len(self._inbox)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._inbox or self._aborts or self.engine.has_unfinished()):
                    self._cond.wait()
                if self._stop:
                    pending = list(self._sinks.values()) + [s for _, _, s in self._inbox]
                    break
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            for rid in aborts:
                self.engine.abort(rid)
                self._sinks.pop(rid, None)
            for prompt, params, sink in inbox:
                try:
                    rid = self.engine.add_request(prompt, params)
                except Exception as exc:  # a bad request fails alone, with its reason
                    sink(exc)
                    continue
                self._sinks[rid] = sink
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the model failed: every caller hears it, none hangs
                self.error = exc
                for rid, sink in list(self._sinks.items()):
                    sink(exc)
                    self.engine.abort(rid)
                self._sinks.clear()
                continue
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    sink(out)
                    if out.finished:
                        del self._sinks[out.request_id]
        for sink in pending:
            sink(RuntimeError("the engine shut down before the request finished"))

    # --- the two ways in -------------------------------------------------------------------

    async def stream(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Every output of one request as it is produced; raises the request's error."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self.submit(prompt, params, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        rid = None
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                rid = item.request_id
                yield item
                if item.finished:
                    rid = None
                    return
        finally:
            if rid is not None:  # the client went away mid-stream: free its blocks
                self.abort(rid)

    def run_sync(self, prompts: list[str | list[int]], params: list[SamplingParams],
                 timeout: float | None = None) -> list[RequestOutput]:
        """Blocking: submit all, wait for all final outputs (in order)."""
        futures: list[Future] = []
        for prompt, p in zip(prompts, params):
            fut: Future = Future()

            def sink(item, fut=fut):
                if isinstance(item, BaseException):
                    fut.set_exception(item)
                elif item.finished:
                    fut.set_result(item)

            self.submit(prompt, p, sink)
            futures.append(fut)
        return [f.result(timeout=timeout) for f in futures]
