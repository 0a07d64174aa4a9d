"""The cascade behind HTTP: per-tier micro-batching, admission control and metrics.

Each tier gets a `TierWorker`: concurrent requests' open texts for that tier are collected for
at most `micro_batch_ms` (or until `micro_batch_size` texts), run as one `predict_batch` on the
tier's own thread, and handed back to their requests. A request walks the tiers with the
router's own routing generator (`Cascade.route`), so thresholds, fallbacks and `degraded` mean
exactly what they mean in `cascade eval` and `cascade batch`. Items answered by the rules or a
student return as soon as that tier answers; they never wait for the large model.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cascade.router import Cascade
from cascade.types import Prediction


class Overloaded(RuntimeError):
    """The queue is full; the caller should retry later (HTTP 429)."""


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("cascade_requests_total", "classify requests", ["status"], registry=r)
        self.items = Counter("cascade_items_total", "texts classified", registry=r)
        self.answers = Counter("cascade_answers_total", "answers by the tier that gave them", ["tier"], registry=r)
        self.escalations = Counter("cascade_escalations_total", "items a tier passed on", ["tier"], registry=r)
        self.tier_errors = Counter("cascade_tier_errors_total", "tier batches that failed or timed out", ["tier"],
                                   registry=r)
        self.degraded = Counter("cascade_degraded_total", "answers from an earlier tier after a failure", registry=r)
        self.rejected = Counter("cascade_rejected_total", "items refused with 429", registry=r)
        self.queue = Gauge("cascade_queue_items", "items admitted and not yet answered", registry=r)
        self.latency = Histogram("cascade_tier_latency_seconds", "per-item latency by answering tier", ["tier"],
                                 registry=r, buckets=(.001, .0025, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_size = Histogram("cascade_tier_batch_size", "texts per tier batch", ["tier"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


class TierWorker:
    """Micro-batches one tier across concurrent requests."""

    def __init__(self, tier, max_batch: int, max_wait_ms: float, timeout_s: float, metrics: Metrics):
        self.tier = tier
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.pending: list[tuple[list[str], asyncio.Future]] = []
        self.pending_items = 0
        self.wakeup: asyncio.Event | None = None  # something is pending
        self.full: asyncio.Event | None = None  # a whole batch is pending: stop waiting early
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tier-{tier.name}")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.wakeup = asyncio.Event()
        self.full = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def predict(self, texts: list[str]) -> list[Prediction | None]:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((texts, fut))
        self.pending_items += len(texts)
        self.wakeup.set()
        if self.pending_items >= self.max_batch:
            self.full.set()
        return await fut

    async def _loop(self) -> None:
        try:
            await self._serve()
        except BaseException as exc:  # cancelled at shutdown, or a bug: nobody may wait forever
            self._fail_pending(exc if isinstance(exc, Exception) else RuntimeError(f"tier {self.tier.name!r} stopped"))
            raise

    def _fail_pending(self, exc: Exception) -> None:
        for _, fut in self.pending:
            if not fut.done():
                fut.set_exception(exc)
        self.pending.clear()
        self.pending_items = 0

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wakeup.wait()
            if self.pending_items < self.max_batch:  # wait for a full batch, at most max_wait
                try:
                    await asyncio.wait_for(self.full.wait(), self.max_wait)
                except asyncio.TimeoutError:
                    pass
            # Take whole requests up to the batch size (at least one, even if it is larger).
            take, n = [], 0
            while self.pending and (not take or n + len(self.pending[0][0]) <= self.max_batch):
                texts, fut = self.pending.pop(0)
                take.append((texts, fut))
                n += len(texts)
            self.pending_items -= n
            if not self.pending:
                self.wakeup.clear()
            if self.pending_items < self.max_batch:
                self.full.clear()
            batch = [t for texts, _ in take for t in texts]
            if not batch:
                continue
            self.metrics.batch_size.labels(self.tier.name).observe(len(batch))
            try:
                preds = await asyncio.wait_for(loop.run_in_executor(self.executor, self.tier.predict_batch, batch),
                                               self.timeout_s)
                if len(preds) != len(batch):
                    raise RuntimeError(f"tier {self.tier.name!r} returned {len(preds)} predictions for {len(batch)}")
            except Exception as exc:  # includes the timeout: every waiting request hears it
                if isinstance(exc, asyncio.TimeoutError):
                    exc = TimeoutError(f"tier {self.tier.name!r} took longer than {self.timeout_s}s")
                self.metrics.tier_errors.labels(self.tier.name).inc()
                for _, fut in take:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            start = 0
            for texts, fut in take:
                if not fut.done():
                    fut.set_result(preds[start:start + len(texts)])
                start += len(texts)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except BaseException:  # noqa: S110  the cancellation we asked for
                pass
        self._fail_pending(RuntimeError(f"tier {self.tier.name!r} is shut down"))
        self.executor.shutdown(wait=False, cancel_futures=True)


class CascadeService:
    """The cascade, its workers, the admission limit and the metrics: what the app serves."""

    def __init__(self, cascade: Cascade, max_queue: int, micro_batch_size: int, micro_batch_ms: float,
                 tier_timeout_s: float, metrics: Metrics | None = None):
        self.cascade = cascade
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.workers = [TierWorker(t, micro_batch_size, micro_batch_ms, tier_timeout_s, self.metrics)
                        for t in cascade.tiers]
        self.in_flight = 0
        self.ready = False

    async def start(self) -> None:
        for w in self.workers:
            w.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for w in self.workers:
            await w.stop()
        self.cascade.close()

    async def classify(self, texts: list[str], explain: bool = False) -> list[Prediction]:
        if self.in_flight + len(texts) > self.max_queue:
            self.metrics.rejected.inc(len(texts))
            raise Overloaded(f"{self.in_flight} items in flight; the queue holds {self.max_queue}")
        self.in_flight += len(texts)
        self.metrics.queue.set(self.in_flight)
        try:
            steps = self.cascade.route(texts, explain)
            try:
                level, batch = next(steps)
                while True:
                    try:
                        preds = await self.workers[level].predict(batch)
                    except Exception as exc:
                        level, batch = steps.throw(exc)
                    else:
                        self._count_escalations(level, preds)
                        level, batch = steps.send(preds)
            except StopIteration as done:
                out: list[Prediction] = done.value
        finally:
            self.in_flight -= len(texts)
            self.metrics.queue.set(self.in_flight)
        self.metrics.items.inc(len(texts))
        for pred in out:
            self.metrics.answers.labels(pred.tier).inc()
            # per item: the time it spent in the tiers it went through, queueing included
            self.metrics.latency.labels(pred.tier).observe(pred.latency_ms / 1000.0)
            if pred.degraded:
                self.metrics.degraded.inc()
        return out

    def _count_escalations(self, level: int, preds: list[Prediction | None]) -> None:
        if level == len(self.workers) - 1:
            return
        passed = sum(1 for p in preds if p is None or p.confidence < self.cascade.threshold_for(level, p))
        if passed:
            self.metrics.escalations.labels(self.cascade.tiers[level].name).inc(passed)
