"""The rules tier: a rule pack answering the texts it matches, abstaining on the rest."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cascade.config import TierConfig
from cascade.rules.pack import RulePack, decide, load_pack, match_text
from cascade.types import CostMeter, Prediction


@dataclass
class RulesTier:
    name: str
    pack: RulePack
    timeout_s: float = 0.02
    meter: CostMeter = field(default_factory=CostMeter)
    # Outcome counts ("answered", "no_match", "conflict", "timeout"): timeouts are abstentions
    # and show up in eval reports and /metrics.
    outcomes: dict[str, int] = field(default_factory=dict)

    def predict_batch(self, texts: list[str]) -> list[Prediction | None]:
        t0 = time.perf_counter()
        out: list[Prediction | None] = []
        for text in texts:
            decision = decide(match_text(self.pack, text, self.timeout_s))
            self.outcomes[decision.outcome] = self.outcomes.get(decision.outcome, 0) + 1
            if decision.match is None:
                out.append(None)
                continue
            rule = decision.match.rule
            out.append(Prediction(label=rule.label, confidence=rule.confidence, tier=self.name,
                                  fields=decision.match.fields or None))
        self.meter.add(len(texts), time.perf_counter() - t0)
        return out

    @property
    def cost(self) -> float:
        return self.meter.mean_ms

    def stats(self) -> dict:
        return {"outcomes": dict(self.outcomes), "timeouts": self.outcomes.get("timeout", 0)}


class RulesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_ms: float = Field(default=20.0, gt=0.0, le=60_000.0,
                              description="matching budget per text; a timeout is an abstention")


def parse_options(options: dict) -> RulesOptions:
    return RulesOptions.model_validate(options)


def build_rules_tier(spec: TierConfig, base_dir: Path) -> RulesTier:
    if spec.path is None:
        raise ValueError(f"tier {spec.name!r}: kind 'rules' needs `path` (a rule pack .toml)")
    opts = parse_options(spec.options)
    return RulesTier(spec.name, load_pack(spec.resolve_path(base_dir)), opts.timeout_ms / 1000.0)
