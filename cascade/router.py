"""The cascade router: send each item down the tiers until one is confident enough."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from cascade.types import ItemFailure, Prediction, Tier, TierUnavailable

log = logging.getLogger(__name__)


class CascadeError(RuntimeError):
    """The cascade could not answer an item (the last tier failed with nothing to fall back on)."""


@dataclass
class TierCounters:
    """What one tier did since the cascade was built (read by metrics and /metrics)."""

    seen: int = 0  # items sent to the tier
    answered: int = 0  # items it answered above threshold (for the last tier: all it answered)
    abstained: int = 0  # returned None
    below_threshold: int = 0  # answered under its threshold, so escalated
    errors: int = 0  # batches that raised
    item_errors: int = 0  # items the tier failed on alone (the rest of their batch was answered)
    seconds: float = 0.0

    @property
    def mean_ms(self) -> float:
        return 1000.0 * self.seconds / self.seen if self.seen else 0.0


@dataclass
class Cascade:
    """Ordered tiers, one threshold each; the last tier always answers.

    Works on batches: every tier receives only the items still open, as one batch, so batched
    models (students, the large model) stay batched however the earlier tiers split the traffic.
    A failing non-last tier counts as abstaining; a failing last tier falls back to the best
    earlier answer, flagged `degraded`.
    """

    tiers: Sequence[Tier]
    thresholds: Sequence[float]
    counters: dict[str, TierCounters] = field(default_factory=dict)
    # Per tier, thresholds that replace the tier's own when its answer is that label: an
    # out-of-scope answer's confidence means "none of the intents", not "which intent".
    label_thresholds: Sequence[Mapping[str, float]] | None = None

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError("a cascade needs at least one tier")
        if len(self.thresholds) != len(self.tiers):
            raise ValueError(
                f"got {len(self.thresholds)} thresholds for {len(self.tiers)} tiers; give one per tier"
            )
        if self.label_thresholds is None:
            self.label_thresholds = [{} for _ in self.tiers]
        if len(self.label_thresholds) != len(self.tiers):
            raise ValueError(f"got {len(self.label_thresholds)} label-threshold maps for {len(self.tiers)} tiers")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        for tier in self.tiers:
            self.counters.setdefault(tier.name, TierCounters())

    def threshold_for(self, level: int, pred: Prediction) -> float:
        """The confidence this tier's answer needs to stand."""
        return self.label_thresholds[level].get(pred.label, self.thresholds[level])

    def close(self, keep: Sequence = ()) -> None:
        """Release what the tiers hold (engine threads, HTTP pools); tiers without `close` are
        skipped, and so are those in `keep` (handed on to another cascade)."""
        for tier in self.tiers:
            if any(tier is k for k in keep):
                continue
            close = getattr(tier, "close", None)
            if callable(close):
                close()

    def predict(self, text: str, explain: bool = False) -> Prediction:
        return self.predict_batch([text], explain=explain)[0]

    def predict_batch(self, texts: Sequence[str], explain: bool = False) -> list[Prediction]:
        """Route a batch; returns one Prediction per text, in order. Raises CascadeError, naming
        the items, if any item got no answer (`answer_batch` returns those per item instead).

        Args:
            texts: the request texts.
            explain: attach every tier's prediction on the way (`Prediction.trail`).
        """
        out = self.answer_batch(texts, explain)
        failed = [(i, a) for i, a in enumerate(out) if isinstance(a, ItemFailure)]
        if failed:
            i, first = failed[0]
            raise CascadeError(f"{len(failed)} of {len(texts)} items got no answer; item {i}: {first.message}")
        return out

    def answer_batch(self, texts: Sequence[str], explain: bool = False) -> list[Prediction | ItemFailure]:
        """Route a batch; per text, a Prediction or the ItemFailure that says why there is none.
        An item that makes a tier raise fails alone (`predict_isolated`); the others are answered
        as if it had not been there."""
        steps = self.route(texts, explain)
        try:
            level, batch = next(steps)
            while True:
                try:
                    preds = predict_isolated(self.tiers[level], batch)
                except Exception as exc:  # handed to the routing, which decides what a failure means
                    level, batch = steps.throw(exc)
                else:
                    level, batch = steps.send(preds)
        except StopIteration as done:
            return done.value

    def route(self, texts: Sequence[str], explain: bool = False
              ) -> Generator[tuple[int, list[str]], list, list[Prediction | ItemFailure]]:
        """The routing itself, without running any tier: yields `(tier index, open texts)` and
        expects that tier's predictions sent back (an ItemFailure in place of an item the tier
        failed on alone), or its exception thrown in when the whole batch failed; returns, per
        text, the final Prediction or an ItemFailure. `answer_batch` drives it synchronously;
        the HTTP service drives it with each tier's micro-batcher, so both share one set of
        rules."""
        results: list[Prediction | ItemFailure | None] = [None] * len(texts)
        # Best answer seen so far per open item (even below threshold): the fallback if a later
        # tier fails.
        best: list[Prediction | None] = [None] * len(texts)
        failure: list[ItemFailure | None] = [None] * len(texts)  # why an item has no answer yet
        trails: list[list[Prediction]] = [[] for _ in texts]
        spent_ms = [0.0] * len(texts)  # time each item spent across the tiers it went through
        open_idx = list(range(len(texts)))
        last = len(self.tiers) - 1

        def fall_back(i: int, why: ItemFailure) -> None:
            """The last tier gave item i nothing: its best earlier answer, degraded, or `why`."""
            results[i] = replace(best[i], degraded=True) if best[i] is not None else why

        for level, tier in enumerate(self.tiers):
            if not open_idx:
                break
            batch = [texts[i] for i in open_idx]
            counters = self.counters[tier.name]
            counters.seen += len(batch)
            t0 = time.perf_counter()
            try:
                preds = yield level, batch
                if len(preds) != len(batch):
                    raise CascadeError(
                        f"tier {tier.name!r} returned {len(preds)} predictions for {len(batch)} texts"
                    )
            except Exception as exc:  # a tier failing must not take the request down
                elapsed = time.perf_counter() - t0
                counters.seconds += elapsed
                counters.errors += 1
                for i in open_idx:
                    spent_ms[i] += 1000.0 * elapsed / len(batch)
                log.warning("tier %s failed on a batch of %d: %s", tier.name, len(batch), exc)
                code = exc.code if isinstance(exc, TierUnavailable) else "tier_failed"
                why = ItemFailure(code, f"tier {tier.name!r}: {exc}", tier.name)
                for i in open_idx:
                    failure[i] = failure[i] or why
                if level == last:
                    for i in open_idx:  # the first reason it has none (a deadline spent earlier, say)
                        fall_back(i, failure[i])
                    open_idx = []
                continue
            elapsed = time.perf_counter() - t0
            counters.seconds += elapsed
            per_item_ms = 1000.0 * elapsed / len(batch)

            still_open = []
            for i, pred in zip(open_idx, preds):
                spent_ms[i] += per_item_ms
                if isinstance(pred, ItemFailure):  # this item alone made the tier raise
                    counters.item_errors += 1
                    failure[i] = pred
                    if level == last:
                        fall_back(i, pred)
                    else:
                        still_open.append(i)
                    continue
                if pred is None:
                    counters.abstained += 1
                    if level == last:
                        fall_back(i, failure[i] or ItemFailure(
                            "tier_failed", f"last tier {tier.name!r} abstained and no earlier tier gave an "
                                           "answer; the last tier must always answer", tier.name))
                    else:
                        still_open.append(i)
                    continue
                pred.latency_ms = per_item_ms
                if explain:
                    trails[i].append(replace(pred))
                if level == last or pred.confidence >= self.threshold_for(level, pred):
                    counters.answered += 1
                    results[i] = pred
                else:
                    counters.below_threshold += 1
                    if best[i] is None or pred.confidence > best[i].confidence:
                        best[i] = pred
                    still_open.append(i)
            open_idx = still_open

        out: list[Prediction | ItemFailure] = []
        for i, pred in enumerate(results):
            assert pred is not None  # the last tier answered, or fall_back set an answer or a failure
            if isinstance(pred, Prediction):
                pred.latency_ms = spent_ms[i]
                if explain:
                    pred.trail = trails[i]
            out.append(pred)
        return out


# Failures that say the tier is out, not that an item is bad: retrying item by item would only
# multiply the wait (a hung backend, a refused connection).
UNAVAILABLE = (TierUnavailable, TimeoutError, ConnectionError)


def _run(tier: Tier, texts: list[str]) -> list:
    preds = tier.predict_batch(texts)
    if len(preds) != len(texts):
        raise CascadeError(f"tier {tier.name!r} returned {len(preds)} predictions for {len(texts)} texts")
    return preds


def predict_isolated(tier: Tier, texts: list[str]) -> list[Prediction | None | ItemFailure]:
    """`tier.predict_batch(texts)`, except that when the batch raises, it is bisected so only
    the items that fail on their own fail (an ItemFailure each) and every other item gets the
    answer it gets alone. If every item fails alone too, or the failure is one of UNAVAILABLE,
    the tier itself is failing: the original exception is raised for the batch to fall back.
    Cost: a clean batch pays nothing; k bad items among n cost about 2k·log2(n) extra calls;
    a tier that fails on everything (but not as UNAVAILABLE) costs 2n - 1 before it is known."""
    try:
        return _run(tier, texts)
    except UNAVAILABLE:
        raise
    except Exception as exc:
        if len(texts) == 1:
            raise
        out = _bisect(tier, texts)
        if all(isinstance(p, ItemFailure) for p in out):
            raise exc from None
        log.warning("tier %s failed on a batch of %d; %d items failed alone", tier.name, len(texts),
                    sum(isinstance(p, ItemFailure) for p in out))
        return out


def _bisect(tier: Tier, texts: list[str]) -> list[Prediction | None | ItemFailure]:
    if len(texts) == 1:
        try:
            return _run(tier, texts)
        except UNAVAILABLE:
            raise
        except Exception as exc:
            return [ItemFailure("item_failed", f"tier {tier.name!r} failed on this item: "
                                               f"{type(exc).__name__}: {exc}", tier.name)]
    mid = len(texts) // 2
    out: list = []
    for half in (texts[:mid], texts[mid:]):
        if len(half) == 1:  # one run decides it (trying it as a "batch" first would run it twice)
            out.extend(_bisect(tier, half))
            continue
        try:
            out.extend(_run(tier, half))
        except UNAVAILABLE:
            raise
        except Exception:
            out.extend(_bisect(tier, half))
    return out
