"""The majority tier: always answers one label: the most frequent training label, or the one named
in `options.label` (e.g. the out-of-scope label: "when unsure, say out of scope").

A baseline and a stand-in last tier, so a rules-only cascade can be evaluated end to end before
any model exists. Its confidence is the label's share of the training split (its accuracy if
test looks like train).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cascade.config import TierConfig
from cascade.data import load_split
from cascade.types import CostMeter, Prediction


@dataclass
class MajorityTier:
    name: str
    label: str
    share: float
    meter: CostMeter = field(default_factory=CostMeter)

    def predict_batch(self, texts: list[str]) -> list[Prediction | None]:
        t0 = time.perf_counter()
        out = [Prediction(self.label, self.share, self.name) for _ in texts]
        self.meter.add(len(texts), time.perf_counter() - t0)
        return out

    @property
    def cost(self) -> float:
        return self.meter.mean_ms


class MajorityOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str | None = Field(default=None, description="always answer this label (default: the most frequent)")


def parse_options(options: dict) -> MajorityOptions:
    return MajorityOptions.model_validate(options)


def build_majority_tier(spec: TierConfig, base_dir: Path) -> MajorityTier:
    if spec.path is None:
        raise ValueError(f"tier {spec.name!r}: kind 'majority' needs `path` (a dataset dir)")
    counts = Counter(ex.label for ex in load_split(spec.resolve_path(base_dir), "train"))
    label = parse_options(spec.options).label
    if label is None:
        # Ties broken by name so the choice is reproducible.
        label = min(counts, key=lambda lab: (-counts[lab], lab))
    elif label not in counts:
        raise ValueError(f"tier {spec.name!r}: options.label {label!r} is not a label of {spec.path}")
    return MajorityTier(spec.name, label, counts[label] / sum(counts.values()))
