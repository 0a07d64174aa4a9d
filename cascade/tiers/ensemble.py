"""The ensemble tier: several students over the same labels, their calibrated probabilities averaged.

    [[tiers]]
    name = "students"
    kind = "ensemble"
    path = "models"            # the members' base dir, relative to this file (default: this file's dir)
    options = { members = ["student", "student-minilm-l6"] }

Each member is a student dir as the `student` tier loads it (its own tokenizer, temperature,
int8 graph: `cascade.tiers.student`); the tier answers the argmax of the weighted mean of their
calibrated distributions, with that mean's probability as its confidence. Why: two students
distilled from one teacher along different routes (the teacher's own 2-layer slice, and the
pre-trained MiniLM encoder; docs/students.md) are wrong on different texts, so their mean can
rank which texts are safe to answer better than either alone (docs/students.md "An ensemble of
the two students" measures whether it does). It costs the members' time added up.

The confidence is a mean of calibrated probabilities, not itself refitted: where the members
disagree it is lower than either's, so it errs towards escalating. Routing does not depend on
that, as `cascade calibrate` picks the threshold on the measured confidences.

The mean is taken member by member in the configured order, and each member's probabilities
do not depend on a text's batch-mates (docs/students.md "Answers that don't depend on the
batch"), so neither do the ensemble's. The flywheel refuses an ensemble (it retrains one
student dir and would leave the ensemble averaging the old one).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cascade.config import ConfigError, TierConfig
from cascade.tiers.student import StudentTier, load_student_tier
from cascade.types import CostMeter, Prediction


@dataclass
class EnsembleTier:
    name: str
    members: list[StudentTier]
    weights: np.ndarray  # one per member, summing to 1
    meter: CostMeter = field(default_factory=CostMeter)

    @property
    def labels(self) -> list[str]:
        return self.members[0].labels

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(len(texts), len(labels)): the weighted mean of the members' calibrated probabilities."""
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float64)
        for w, member in zip(self.weights, self.members):  # a fixed order: the same sum for every batch
            out += w * member.probabilities(texts)
        return out

    def predict_batch(self, texts: list[str]) -> list[Prediction | None]:
        t0 = time.perf_counter()
        probs = self.probabilities(list(texts))
        preds = []
        for row in probs:
            best = int(row.argmax())
            preds.append(Prediction(self.labels[best], float(row[best]), self.name,
                                    scores=dict(zip(self.labels, row.tolist()))))
        self.meter.add(len(texts), time.perf_counter() - t0)
        return preds

    @property
    def cost(self) -> float:
        return self.meter.mean_ms


class EnsembleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    members: list[str] = Field(min_length=2, description="student dirs, relative to the tier's `path`")
    weights: list[float] | None = Field(default=None, description="one per member (default: equal); "
                                                                  "normalised to sum to 1")
    model: str = Field(default="model.int8.onnx", min_length=1, description="ONNX file in each member's dir")
    threads: int = Field(default=0, ge=0, le=1024, description="onnxruntime intra-op threads per member")
    batch_size: int = Field(default=32, ge=1, le=4096, description="rows per onnxruntime run")
    spin_wait: bool = Field(default=False, description="let onnxruntime's idle threads spin (as the student tier)")

    @field_validator("members")
    @classmethod
    def _distinct(cls, members: list[str]) -> list[str]:
        if any(not m for m in members):
            raise ValueError("members: an empty dir name")
        if len(set(members)) != len(members):
            raise ValueError(f"members: {members} names a dir twice")
        return members

    @model_validator(mode="after")
    def _weights_fit(self) -> EnsembleOptions:
        if self.weights is not None:
            if len(self.weights) != len(self.members):
                raise ValueError(f"weights: {len(self.weights)} given for {len(self.members)} members")
            if any(not (math.isfinite(w) and w > 0) for w in self.weights) or not math.isfinite(sum(self.weights)):
                raise ValueError(f"weights: each must be finite and > 0 (and their sum finite), got {self.weights}")
        return self


def parse_options(options: dict) -> EnsembleOptions:
    return EnsembleOptions.model_validate(options)


def build_ensemble_tier(spec: TierConfig, base_dir: Path) -> EnsembleTier:
    opts = parse_options(spec.options)
    base = spec.resolve_path(base_dir) if spec.path is not None else Path(base_dir)
    dirs = [(base / m).resolve() for m in opts.members]
    if len(set(dirs)) != len(dirs):  # "a" and "./a" pass the options check
        raise ConfigError(f"tier {spec.name!r}: options.members {opts.members} name one dir twice ({base})")
    members = []
    for i, m in enumerate(opts.members):
        try:
            tier = load_student_tier(base / m, f"{spec.name}/{m}", opts.model, opts.threads, opts.batch_size,
                                     opts.spin_wait)
        except ConfigError as exc:
            raise ConfigError(f"tier {spec.name!r}: options.members[{i}] ({m!r}): {exc}") from None
        if tier.tagging is not None:
            raise ConfigError(f"tier {spec.name!r}: options.members[{i}]: {base / m} is a tagging student; an "
                              "ensemble averages label distributions only")
        if members and tier.labels != members[0].labels:
            raise ConfigError(f"tier {spec.name!r}: options.members[{i}]: {base / m} has other labels (or another "
                              f"order) than {base / opts.members[0]}; an ensemble's members share one label list")
        members.append(tier)
    w = np.ones(len(members)) if opts.weights is None else np.asarray(opts.weights, dtype=np.float64)
    return EnsembleTier(spec.name, members, w / w.sum())
