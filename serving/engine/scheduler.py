"""Continuous batching: which requests compute how many tokens in the next step.

Every step the scheduler walks the running requests (decodes, and prefills still in chunks),
then admits waiting requests while the step's token budget, the sequence limit and the KV pool
allow. A request joins or leaves the batch at any step. When the pool runs out of blocks for a
running request, the most recently admitted request is preempted: its blocks are freed and it
goes back to the front of the queue to be recomputed later (prefix caching usually makes that
cheap). Nothing crashes and nothing is dropped.

The scheduler sees the KV cache only through `KVCacheManager.allocate_slots` / `free`.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from serving.engine.config import SchedulerConfig
from serving.engine.constrained import ChoiceState
from serving.engine.kv_cache import KVCacheManager
from serving.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hits when (last) admitted
    status: Status = Status.WAITING
    failed_steps: int = 0  # forward passes that raised with this request in them
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    choice: ChoiceState | None = None
    logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    generator: object = None  # torch.Generator for seeded sampling
    text: str = ""  # detokenized output so far (stop strings cut)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class ScheduledSeq:
    """One request's share of a step: tokens [start, start + num_new) of its sequence."""

    request: Request
    start: int
    num_new: int
    block_table: list[int]

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens: a new token is due."""
        return self.start + self.num_new == self.request.num_tokens


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, req: Request) -> None:
        """Send a request back to the front of the queue, to be recomputed (its blocks freed)."""
        if req in self.running:
            self.running.remove(req)
            self._preempt(req)

    def _preempt(self, victim: Request) -> None:
        self.kv.free(victim.request_id)
        victim.num_computed_tokens = 0
        victim.status = Status.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self, only: Request | None = None) -> SchedulerOutput:
        """The next step's work. With `only`, that request alone (running or waiting) is
        scheduled: the engine steps suspects of a failed step one by one to find the culprit."""
        if only is not None:
            return self._schedule_alone(only)
        budget = self.config.max_num_batched_tokens
        chunk = self.config.long_prefill_chunk
        planned: list[tuple[Request, int, int]] = []  # (request, start, num_new)
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, chunk, budget)
            while self.kv.allocate_slots(req.request_id, req.all_token_ids, req.num_computed_tokens, num_new) is None:
                victim = self.running.pop()  # the latest admitted goes first
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                planned.append((req, req.num_computed_tokens, num_new))
                budget -= num_new
                i += 1
                continue
            break  # `req` itself was preempted: nothing after it is running any more

        # Admit new work only when nobody was preempted this step (else the queue would thrash).
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            hits, num_cached = self.kv.get_computed_blocks(req.all_token_ids)
            num_new = min(req.num_tokens - num_cached, chunk, budget)
            if self.kv.allocate_slots(req.request_id, req.all_token_ids, num_cached, num_new, hits) is None:
                break
            self.waiting.popleft()
            self.kv.record_prefix_lookup(req.num_tokens, num_cached)
            req.num_computed_tokens = num_cached
            req.num_cached_tokens = num_cached
            req.status = Status.RUNNING
            self.running.append(req)
            planned.append((req, num_cached, num_new))
            budget -= num_new

        seqs = [ScheduledSeq(req, start, n, self.kv.block_table(req.request_id)) for req, start, n in planned]
        return SchedulerOutput(seqs)

    def _schedule_alone(self, req: Request) -> SchedulerOutput:
        num_new = min(req.num_tokens - req.num_computed_tokens, self.config.long_prefill_chunk,
                      self.config.max_num_batched_tokens)
        if req.status is Status.WAITING:
            hits, num_cached = self.kv.get_computed_blocks(req.all_token_ids)
            num_new = min(req.num_tokens - num_cached, self.config.long_prefill_chunk,
                          self.config.max_num_batched_tokens)
            if self.kv.allocate_slots(req.request_id, req.all_token_ids, num_cached, num_new, hits) is None:
                return SchedulerOutput([])  # no room: the engine runs a normal step instead
            self.waiting.remove(req)
            req.num_computed_tokens = req.num_cached_tokens = num_cached
            req.status = Status.RUNNING
            self.running.append(req)
        elif self.kv.allocate_slots(req.request_id, req.all_token_ids, req.num_computed_tokens, num_new) is None:
            return SchedulerOutput([])
        start = req.num_computed_tokens
        return SchedulerOutput([ScheduledSeq(req, start, num_new, self.kv.block_table(req.request_id))])

    def finish(self, req: Request, reason: str) -> None:
        """Mark a request done and give its blocks back (also for aborts of waiting requests)."""
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.kv.free(req.request_id)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
