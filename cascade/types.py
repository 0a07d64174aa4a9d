"""The two types every part of the cascade speaks: a `Prediction` and the `Tier` protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass
class Prediction:
    """One tier's answer for one text.

    `confidence` is the calibrated probability that `label` is right; the router compares it
    with the tier's threshold. `scores` (label -> probability) is optional: tiers that have a
    full distribution (students, the large model) fill it in.
    """

    label: str
    confidence: float
    tier: str
    fields: dict[str, list[str]] | None = None  # extraction: name -> values (spans of the text)
    scores: dict[str, float] | None = None
    latency_ms: float = 0.0
    degraded: bool = False
    # Every tier's prediction on the way to this one (filled by the router when asked to explain).
    trail: list[Prediction] | None = None

    def to_dict(self) -> dict:
        out = {
            "label": self.label,
            "confidence": self.confidence,
            "tier": self.tier,
            "latency_ms": self.latency_ms,
            "degraded": self.degraded,
        }
        if self.fields:
            out["fields"] = self.fields
        if self.scores is not None:
            out["scores"] = self.scores
        if self.trail is not None:
            out["trail"] = [p.to_dict() for p in self.trail]
        return out


@dataclass
class ItemFailure:
    """No answer for one item: a tier failed on it alone (`code` "item_failed": the item's own
    fault, as a 422), every tier failed with nothing to fall back on ("tier_failed": a 503), or
    its deadline passed first ("deadline_exceeded": a 504). The other items are unaffected."""

    code: str
    message: str
    tier: str | None = None


class TierUnavailable(RuntimeError):
    """A tier (or its backend) cannot answer at all right now: down, hung, over its deadline.
    The router does not retry item by item on this; the batch falls back as a whole. `code` is
    what an item with nothing to fall back on reports (ItemFailure.code)."""

    code = "tier_failed"


class DeadlineExceeded(TierUnavailable):
    """The request's deadline passed before the tier answered."""

    code = "deadline_exceeded"


class TierBusy(TierUnavailable):
    """The tier's queue would not reach this item within its deadline, so it was not queued."""

    code = "overloaded"


@runtime_checkable
class Tier(Protocol):
    """A stage of the cascade: rules, an ONNX student, or the large model.

    The router does not know which kind a tier is; it only sends the still-open texts as one
    batch and reads back one answer (or abstention) per text.
    """

    name: str

    def predict_batch(self, texts: list[str]) -> list[Prediction | None]:
        """Answer a batch.

        Args:
            texts: the texts still unanswered, in order.

        Returns:
            One entry per text, same order: a Prediction, or None to abstain.
        """
        ...

    @property
    def cost(self) -> float:
        """Measured mean milliseconds per item (0.0 before any call); used by calibration."""
        ...


@dataclass
class CostMeter:
    """Running mean of milliseconds per item, kept by each tier for its `cost`."""

    items: int = 0
    seconds: float = 0.0

    def add(self, items: int, seconds: float) -> None:
        self.items += items
        self.seconds += seconds

    @property
    def mean_ms(self) -> float:
        return 1000.0 * self.seconds / self.items if self.items else 0.0
