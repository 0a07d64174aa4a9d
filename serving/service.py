"""The cascade behind HTTP: per-tier micro-batching, deadlines, admission by time, and metrics.

Each tier gets a `TierWorker`: concurrent requests' open texts for that tier are collected for
at most `micro_batch_ms` (or until `micro_batch_size` texts), run as one batch on the tier's
own thread, and handed back to their requests. A request walks the tiers with the router's own
routing generator (`Cascade.route`), so thresholds, fallbacks and `degraded` mean exactly what
they mean in `cascade eval` and `cascade batch`. Items answered by the rules or a student
return as soon as that tier answers; they never wait for the large model.

Isolation: a batch that raises is bisected (`cascade.router.predict_isolated`), so a text that
breaks a tier fails alone and its batch-mates from other requests are answered.

Deadlines: every request has one (`request_timeout_s`, or its own `timeout_s`). It waits for
each tier only until then; past it, it gets its best earlier answer flagged `degraded`, or a
504 when there is none — whatever its batch is still doing. The batch itself runs under the
latest deadline among its requests (`cascade.deadline`), which the backends bound their
timeouts and retries by.

Admission by time: each worker measures its seconds per item (a moving average over batches)
and estimates the wait for a new item as backlog × that. A request whose wait at any tier but
the last exceeds that tier's `max_queue_wait_s` (or its deadline) gets a 429 at once, with
Retry-After from the estimate; an item that would wait too long at the last tier is not queued
there (`TierBusy`), so it gets its earlier answer degraded at once (`overload = "degrade"`) or
the request a 429 (`overload = "reject"`). And before any of that, when the event loop itself
runs more than `max_loop_lag_s` behind (the CPU is short), new requests get a 429 before their
body is read (`LoopLag`, `shed_now`).
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from cascade.deadline import deadline_scope
from cascade.fields import same_fields
from cascade.router import Cascade, predict_isolated
from cascade.types import DeadlineExceeded, ItemFailure, Prediction, TierBusy
from serving.http import LoopLag, cancel_task
from serving.traffic_log import entry_of, llm_answer


class Overloaded(RuntimeError):
    """No room within the request's deadline; the caller should retry later (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TrafficLogCounters:
    """The traffic log's own counts: entries written, and dropped (never a request) by reason."""

    def __init__(self, log):
        self.log = log

    def collect(self):
        written = CounterMetricFamily("cascade_traffic_log_written", "traffic-log entries written")
        written.add_metric([], self.log.written)
        yield written
        dropped = CounterMetricFamily("cascade_traffic_log_dropped", "traffic-log entries dropped (queue full, "
                                      "write error); the requests were answered", labels=["reason"])
        for reason in ("queue_full", "write_error", "closed", "not_written_at_close"):
            dropped.add_metric([reason], self.log.dropped.get(reason, 0))
        yield dropped
        deleted = CounterMetricFamily("cascade_traffic_log_segments_deleted", "oldest segments deleted past "
                                      "max_total_mb")
        deleted.add_metric([], self.log.segments_deleted)
        yield deleted


class RouterCounters:
    """Exports the router's own per-tier counters (the one place that decides and counts)."""

    def __init__(self, cascade: Cascade):
        self.cascade = cascade

    def collect(self):
        last = self.cascade.tiers[-1].name
        esc = CounterMetricFamily("cascade_escalations", "items a tier passed on (abstained or below threshold)",
                                  labels=["tier"])
        item_errors = CounterMetricFamily("cascade_tier_item_errors", "items a tier failed on alone", labels=["tier"])
        for name, c in self.cascade.counters.items():
            if name != last:
                esc.add_metric([name], c.abstained + c.below_threshold)
            item_errors.add_metric([name], c.item_errors)
        yield esc
        yield item_errors
        timeouts = CounterMetricFamily("cascade_rules_timeouts", "texts whose rule matching ran out of time "
                                       "(an abstention)", labels=["tier"])
        for tier in self.cascade.tiers:
            stats = getattr(tier, "stats", None)
            if callable(stats) and "timeouts" in (info := stats()):
                timeouts.add_metric([tier.name], info["timeouts"])
        yield timeouts


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.items = Counter("cascade_items_total", "texts classified", registry=r)
        self.answers = Counter("cascade_answers_total", "answers by the tier that gave them", ["tier"], registry=r)
        self.tier_errors = Counter("cascade_tier_errors_total", "tier batches that failed or timed out", ["tier"],
                                   registry=r)
        self.degraded = Counter("cascade_degraded_total", "answers from an earlier tier after a failure", registry=r)
        self.rejected = Counter("cascade_rejected_total", "items refused with 429", registry=r)
        self.shed = Counter("cascade_shed_total", "items not queued at a tier that could not answer them in time",
                            ["tier"], registry=r)
        self.deadline = Counter("cascade_deadline_exceeded_total", "items whose deadline passed at a tier", ["tier"],
                                registry=r)
        self.estimated_wait = Gauge("cascade_tier_estimated_wait_seconds", "backlog x measured seconds per item",
                                    ["tier"], registry=r)
        self.queue = Gauge("cascade_queue_items", "items admitted and not yet answered", registry=r)
        self.latency = Histogram("cascade_tier_latency_seconds", "per-item latency by answering tier", ["tier"],
                                 registry=r, buckets=(.001, .0025, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.confidence = Histogram("cascade_tier_confidence", "each tier's confidence in its predictions "
                                    "(answered or passed on); a shift is drift", ["tier"], registry=r,
                                    buckets=(.1, .2, .3, .4, .5, .6, .7, .8, .85, .9, .95, .98, .99, 1.0))
        self.batch_size = Histogram("cascade_tier_batch_size", "texts per tier batch", ["tier"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


class TierWorker:
    """Micro-batches one tier across concurrent requests, and knows how long its queue is in
    seconds."""

    def __init__(self, tier, max_batch: int, max_wait_ms: float, timeout_s: float, metrics: Metrics,
                 max_queue_wait_s: float = 1.0):
        self.tier = tier
        self.max_queue_wait_s = max_queue_wait_s  # longest estimated wait before new work is refused
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.pending: list[tuple[list[str], asyncio.Future, float]] = []  # (texts, future, deadline)
        self.pending_items = 0
        self.running_take: list[tuple[list[str], asyncio.Future, float]] = []
        self.running_items = 0
        self.running_since = 0.0
        self.seconds_per_item = 0.0  # moving average over batches, queueing excluded
        self.wakeup: asyncio.Event | None = None  # something is pending
        self.full: asyncio.Event | None = None  # a whole batch is pending: stop waiting early
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tier-{tier.name}")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.wakeup = asyncio.Event()
        self.full = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    def estimated_wait(self) -> float:
        """Seconds until a newly queued item would start: the queue at the measured rate, plus
        what the running batch still needs (a batch past its expected time is assumed to need
        as long again as it has run: a hung backend makes the estimate grow, not stay put)."""
        spi = self.seconds_per_item
        wait = self.pending_items * spi
        if self.running_items:
            expected = self.running_items * spi
            elapsed = time.monotonic() - self.running_since
            wait += expected - elapsed if elapsed < expected else elapsed
        return wait

    async def predict(self, texts: list[str], deadline: float) -> list[Prediction | None | ItemFailure]:
        """This tier's answers for `texts`, or DeadlineExceeded once `deadline` (or
        `tier_timeout_s`) passes: the texts are then dropped from the queue, or their answers
        discarded if already running."""
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((texts, fut, deadline))
        self.pending_items += len(texts)
        self.wakeup.set()
        if self.pending_items >= self.max_batch:
            self.full.set()
        now = time.monotonic()
        by_tier = now + self.timeout_s < deadline  # tier_timeout_s comes first
        try:
            return await asyncio.wait_for(fut, max(0.0, min(deadline, now + self.timeout_s) - now))
        except asyncio.TimeoutError:
            self.metrics.deadline.labels(self.tier.name).inc(len(texts))
            why = f"took longer than tier_timeout_s ({self.timeout_s}s)" if by_tier else \
                "gave no answer before the request's deadline"
            raise DeadlineExceeded(f"tier {self.tier.name!r} {why}") from None

    async def _loop(self) -> None:
        try:
            await self._serve()
        except BaseException as exc:  # cancelled at shutdown, or a bug: nobody may wait forever
            self._fail_pending(exc if isinstance(exc, Exception) else RuntimeError(f"tier {self.tier.name!r} stopped"))
            raise

    def _fail_pending(self, exc: Exception) -> None:
        for _, fut, _ in self.pending + self.running_take:
            if not fut.done():
                fut.set_exception(exc)
        self.running_take = []
        self.pending.clear()
        self.pending_items = 0

    def _take(self) -> list[tuple[list[str], asyncio.Future, float]]:
        """Whole requests up to the batch size (at least one, even if larger); requests whose
        deadline already passed are dropped, not run."""
        take, n = [], 0
        while self.pending and (not take or n + len(self.pending[0][0]) <= self.max_batch):
            texts, fut, deadline = self.pending.pop(0)
            self.pending_items -= len(texts)
            if fut.done():  # its deadline passed while it queued: it has its answer already
                continue
            take.append((texts, fut, deadline))
            n += len(texts)
        if not self.pending:
            self.wakeup.clear()
        if self.pending_items < self.max_batch:
            self.full.clear()
        return take

    def _run(self, batch: list[str], deadline: float) -> list:
        with deadline_scope(deadline):
            return predict_isolated(self.tier, batch)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wakeup.wait()
            if self.pending_items < self.max_batch:  # wait for a full batch, at most max_wait
                try:
                    await asyncio.wait_for(self.full.wait(), self.max_wait)
                except asyncio.TimeoutError:
                    pass
            take = self._take()
            self.running_take = take  # failed by _loop too, should this loop die mid-batch
            batch = [t for texts, _, _ in take for t in texts]
            if not batch:
                continue
            self.metrics.batch_size.labels(self.tier.name).observe(len(batch))
            # The batch serves its latest request; tier_timeout_s caps any one batch.
            deadline = min(max(d for _, _, d in take), time.monotonic() + self.timeout_s)
            self.running_items, self.running_since = len(batch), time.monotonic()
            try:
                preds = await loop.run_in_executor(self.executor, self._run, batch, deadline)
            except Exception as exc:  # the whole batch failed: every request still waiting hears it
                self.metrics.tier_errors.labels(self.tier.name).inc()
                for _, fut, _ in take:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            finally:
                elapsed = time.monotonic() - self.running_since
                self.running_items = 0
                per_item = elapsed / len(batch)
                self.seconds_per_item = per_item if not self.seconds_per_item else (
                    0.8 * self.seconds_per_item + 0.2 * per_item)
            start = 0
            for texts, fut, _ in take:
                if not fut.done():
                    fut.set_result(preds[start:start + len(texts)])
                start += len(texts)

    async def stop(self) -> None:
        await cancel_task(self.task)
        self._fail_pending(RuntimeError(f"tier {self.tier.name!r} is shut down"))
        self.executor.shutdown(wait=False, cancel_futures=True)


class CascadeService:
    """The cascade, its workers, admission and the metrics: what the app serves."""

    def __init__(self, cascade: Cascade, max_queue: int, micro_batch_size: int, micro_batch_ms: float,
                 tier_timeout_s: float, metrics: Metrics | None = None, request_timeout_s: float = 10.0,
                 max_queue_wait_s: float = 1.0, overload: str = "degrade", retry_after_s: int = 1,
                 max_loop_lag_s: float = 0.05, tier_queue_wait_s: list[float | None] | None = None,
                 traffic_log=None, llm_tier: str | None = None, auditor=None, version: str | None = None):
        if overload not in ("degrade", "reject"):
            raise ValueError(f"overload: {overload!r} is not 'degrade' or 'reject'")
        self.cascade = cascade
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.max_queue_wait_s = max_queue_wait_s
        self.overload = overload
        self.retry_after_s = retry_after_s
        self.metrics = metrics or Metrics()
        self.metrics.registry.register(RouterCounters(cascade))
        waits = tier_queue_wait_s or [None] * len(cascade.tiers)
        self.workers = [TierWorker(t, micro_batch_size, micro_batch_ms, tier_timeout_s, self.metrics,
                                   w if w is not None else max_queue_wait_s) for t, w in zip(cascade.tiers, waits)]
        self.in_flight = 0
        self.ready = False
        self.max_loop_lag_s = max_loop_lag_s
        self.loop_lag = LoopLag()
        self.traffic_log = traffic_log  # serving.traffic_log.TrafficLog, or None
        self.llm_tier = llm_tier  # whose answers the log records as the large model's
        if traffic_log is not None:
            self.metrics.registry.register(TrafficLogCounters(traffic_log))
        self.auditor = auditor  # serving.audit.Auditor: cheap answers also asked of the last tier
        self.version = version  # serving.traffic_log.version_id of the config: logged, and sent back
        if auditor is not None:
            self.metrics.registry.register(auditor)

    @classmethod
    def from_config(cls, cascade: Cascade, config, base_dir=None, version: str | None = None) -> CascadeService:
        """From a cascade.config.CascadeConfig: its [serving] table, each tier's own
        `max_queue_wait_s`, and its [traffic_log] (paths against `base_dir`, the config's dir).
        `version`: the config's `version_id`, recorded with each answer."""
        from pathlib import Path

        limits = config.serving
        log = None
        if config.traffic_log is not None:
            from serving.traffic_log import TrafficLog

            log = TrafficLog.from_config(config.traffic_log, Path(base_dir or "."))
        llm = config.tiers[-1].name if config.tiers[-1].kind == "llm" else None
        auditor = None
        if config.audit is not None and len(config.tiers) > 1:
            from serving.audit import Auditor

            auditor = Auditor.from_config(config.audit, config.tiers[:-1])
        return cls(cascade, limits.max_queue, limits.micro_batch_size, limits.micro_batch_ms, limits.tier_timeout_s,
                   request_timeout_s=limits.request_timeout_s, max_queue_wait_s=limits.max_queue_wait_s,
                   overload=limits.overload, retry_after_s=limits.retry_after_s, max_loop_lag_s=limits.max_loop_lag_s,
                   tier_queue_wait_s=[spec.max_queue_wait_s for spec in config.tiers], traffic_log=log,
                   llm_tier=llm, auditor=auditor, version=version)

    async def start(self) -> None:
        for w in self.workers:
            w.start()
        self.loop_lag.start()
        self.ready = True

    def shed_now(self) -> str | None:
        """Why a new request should get a 429 before its body is even read (the event loop is
        behind by more than `max_loop_lag_s`), or None. Refusing then costs a fraction of
        serving, so the backlog drains instead of growing."""
        why = self.loop_lag.behind(self.max_loop_lag_s)
        if why:
            self.metrics.rejected.inc()
        return why

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no request is in flight here (after a reload stopped sending new ones)."""
        end = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return not self.in_flight

    async def stop(self, keep=()) -> None:
        """Stop the workers and close the tiers, but those in `keep` (reused by a new version)."""
        self.ready = False
        await self.loop_lag.stop()
        for task in list(self.auditor.tasks if self.auditor else ()):
            await cancel_task(task)
        for w in self.workers:
            await w.stop()
        # closing joins threads and flushes the log: off the loop, which may still be serving
        await asyncio.to_thread(self.cascade.close, keep)
        if self.traffic_log is not None:
            await asyncio.to_thread(self.traffic_log.close)

    def _refuse(self, n: int, why: str, wait_s: float) -> Overloaded:
        self.metrics.rejected.inc(n)
        return Overloaded(why, max(self.retry_after_s, math.ceil(wait_s)))

    def admit(self, n: int, timeout_s: float) -> None:
        """Raise Overloaded (429) now if `n` items could not start within their budget."""
        if self.in_flight + n > self.max_queue:
            raise self._refuse(n, f"{self.in_flight} items in flight; the queue holds {self.max_queue}", 1.0)
        # Every tier but the last (the cheap path most items take) must be able to start it in
        # time; the last tier's queue is checked when items escalate to it (`_drive`).
        for worker in self.workers[:-1] or self.workers:
            wait = worker.estimated_wait()
            budget = min(timeout_s, worker.max_queue_wait_s)
            if wait > budget:
                raise self._refuse(n, f"tier {worker.tier.name!r} would take about {wait:.2f}s to start this "
                                      f"request; its limit is {budget:.2f}s", wait)

    async def classify(self, texts: list[str], explain: bool = False, timeout_s: float | None = None,
                       request_id: str | None = None) -> list[Prediction | ItemFailure]:
        """Per text, its Prediction or the ItemFailure that says why it has none.

        Raises Overloaded (before any work) when the request cannot start within its budget,
        and, with `overload = "reject"`, when a later tier could not take it in time."""
        timeout_s = timeout_s or self.request_timeout_s
        self.admit(len(texts), timeout_s)
        deadline = time.monotonic() + timeout_s
        self.in_flight += len(texts)
        self.metrics.queue.set(self.in_flight)
        try:
            trail = explain or self.traffic_log is not None  # the log records every tier's prediction
            out = await self._drive(self.cascade.route(texts, trail), deadline)
        finally:
            self.in_flight -= len(texts)
            self.metrics.queue.set(self.in_flight)
        self.metrics.items.inc(len(texts))
        log = self.traffic_log
        for i, (text, pred) in enumerate(zip(texts, out)):
            if isinstance(pred, ItemFailure):
                continue
            if log is not None:
                log.put(entry_of(pred, text, request_id, i, self.llm_tier, log.text, self.version, log.llm_top_k))
                if not explain:
                    pred.trail = None
            if self.auditor is not None and pred.tier != self.workers[-1].tier.name and not pred.degraded:
                self._maybe_audit(text, pred, request_id, i)
            self.metrics.answers.labels(pred.tier).inc()
            # per item: the time it spent in the tiers it went through, queueing included
            self.metrics.latency.labels(pred.tier).observe(pred.latency_ms / 1000.0)
            if pred.degraded:
                self.metrics.degraded.inc()
        return out

    def _maybe_audit(self, text: str, pred: Prediction, request_id: str | None, index: int) -> None:
        """Ask the last tier too, in the background, if this answer is picked, the budget allows
        and the last tier's queue is short (low priority: audits never queue ahead of work)."""
        auditor, last = self.auditor, self.workers[-1]
        if not auditor.pick():
            return
        if last.estimated_wait() > auditor.max_llm_wait_s or last.pending_items:
            auditor.skipped["busy"] += 1
            return
        task = asyncio.get_running_loop().create_task(self._audit(text, pred, request_id, index))
        auditor.tasks.add(task)
        task.add_done_callback(auditor.tasks.discard)

    async def _audit(self, text: str, pred: Prediction, request_id: str | None, index: int) -> None:
        auditor, last = self.auditor, self.workers[-1]
        try:
            (answer,) = await last.predict([text], time.monotonic() + auditor.timeout_s)
        except Exception:  # an audit that fails is counted, never anyone's error
            auditor.skipped["failed"] += 1
            return
        if not isinstance(answer, Prediction):
            auditor.skipped["failed"] += 1
            return
        # an extraction answer agrees when its fields do too (classification: both None)
        auditor.record(pred.tier, answer.label == pred.label and same_fields(answer.fields, pred.fields))
        if self.traffic_log is not None:
            entry = entry_of(pred, text, request_id, index, None, self.traffic_log.text, self.version)
            entry["audit"] = True
            entry["llm"] = llm_answer(answer, self.traffic_log.llm_top_k)
            self.traffic_log.put(entry)

    async def _drive(self, steps, deadline: float) -> list[Prediction | ItemFailure]:
        """Run the routing generator with each tier's micro-batcher, under the deadline."""
        try:
            level, batch = next(steps)
            while True:
                worker = self.workers[level]
                left = deadline - time.monotonic()
                wait = worker.estimated_wait()
                self.metrics.estimated_wait.labels(worker.tier.name).set(wait)
                if left <= 0:  # spent at earlier tiers: a deadline, not an overload
                    self.metrics.deadline.labels(worker.tier.name).inc(len(batch))
                    level, batch = steps.throw(DeadlineExceeded(f"the request's deadline passed before tier "
                                                                f"{worker.tier.name!r}"))
                    continue
                # Only the last tier sheds: an item shed at a middle tier would go on to the
                # costlier last one. The cheaper tiers are guarded at admission (`admit`).
                if level == len(self.workers) - 1 and level > 0 and wait > min(left, worker.max_queue_wait_s):
                    why = (f"tier {worker.tier.name!r} would take about {wait:.2f}s to start; "
                           f"{max(0.0, left):.2f}s of the request's deadline were left")
                    if self.overload == "reject":
                        raise self._refuse(len(batch), why, wait)
                    self.metrics.shed.labels(worker.tier.name).inc(len(batch))
                    level, batch = steps.throw(TierBusy(why))
                    continue
                try:
                    preds = await worker.predict(batch, deadline)
                except Exception as exc:
                    level, batch = steps.throw(exc)
                else:
                    seen = self.metrics.confidence.labels(worker.tier.name)
                    for p in preds:
                        if isinstance(p, Prediction):
                            seen.observe(p.confidence)
                    level, batch = steps.send(preds)
        except StopIteration as done:
            return done.value
