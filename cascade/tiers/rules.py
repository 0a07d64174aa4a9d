"""The rules tier: a rule pack answering the texts it matches, abstaining on the rest."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from cascade.config import TierConfig
from cascade.rulepack import RulePack, decide, load_pack, match_text
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


def build_rules_tier(spec: TierConfig, base_dir: Path) -> RulesTier:
    if spec.path is None:
        raise ValueError(f"tier {spec.name!r}: kind 'rules' needs `path` (a rule pack .toml)")
    timeout_ms = float(spec.options.get("timeout_ms", 20))
    if timeout_ms <= 0:
        raise ValueError(f"tier {spec.name!r}: options.timeout_ms must be > 0, got {timeout_ms}")
    return RulesTier(spec.name, load_pack(spec.resolve_path(base_dir)), timeout_ms / 1000.0)
