"""Audit sampling: a share of what the cheap tiers answered is also asked of the large model.

    [audit]
    share = 0.02        # of the cheap tiers' answers
    max_per_s = 2.0     # the budget: a token bucket
    max_llm_wait_s = 0.05

An item is picked at random (`share`) after its request has its answer, so an audit never
delays one; it runs as a background task through the large model's own micro-batcher, at low
priority: only while that tier's queue would start it within `max_llm_wait_s` (else it is
skipped and counted), and only while the budget allows. Each audit is logged (the traffic
log's entry with `"audit": true` and the large model's answer) and counted per tier:
`cascade_audit_items_total{tier}`, `cascade_audit_agreements_total{tier}`, the live agreement
`cascade_audit_agreement{tier}`, and `cascade_audit_drift{tier}` = 1 when the agreement's
one-sided upper confidence bound (Wilson, at `confidence`) falls below the calibrated
agreement (the tier's `llm_agreement` in cascade.toml). Audited items are a random sample of
each tier's answered traffic: unbiased evidence for recalibration.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from statistics import NormalDist


def wilson_upper(agree: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound on a proportion (Wilson score interval)."""
    if n == 0:
        return 1.0
    z = NormalDist().inv_cdf(confidence)
    p = agree / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + half) / (1 + z * z / n))


class Auditor:
    def __init__(self, share: float, max_per_s: float, max_llm_wait_s: float, timeout_s: float, confidence: float,
                 expected: dict[str, float], seed: int | None = None):
        self.share, self.rate, self.max_llm_wait_s = share, max_per_s, max_llm_wait_s
        self.timeout_s, self.confidence, self.expected = timeout_s, confidence, expected
        self.random = random.Random(seed)
        self.tokens, self.refilled = max(1.0, max_per_s), time.monotonic()
        self.items: Counter = Counter()
        self.agreements: Counter = Counter()
        self.skipped: Counter = Counter()  # reason -> count
        self.tasks: set = set()

    @classmethod
    def from_config(cls, cfg, tiers) -> Auditor:
        return cls(cfg.share, cfg.max_per_s, cfg.max_llm_wait_s, cfg.timeout_s, cfg.confidence,
                   {t.name: t.llm_agreement for t in tiers if t.llm_agreement is not None})

    def pick(self) -> bool:
        """Whether to audit this answer: the share, then the budget."""
        if self.random.random() >= self.share:
            return False
        now = time.monotonic()
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens < 1.0:
            self.skipped["budget"] += 1
            return False
        self.tokens -= 1.0
        return True

    def record(self, tier: str, agreed: bool) -> None:
        self.items[tier] += 1
        self.agreements[tier] += agreed

    def drift(self, tier: str) -> bool:
        expected = self.expected.get(tier)
        n = self.items[tier]
        return expected is not None and n > 0 and wilson_upper(self.agreements[tier], n, self.confidence) < expected

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        items = CounterMetricFamily("cascade_audit_items", "cheap-tier answers also asked of the large model",
                                    labels=["tier"])
        agree = CounterMetricFamily("cascade_audit_agreements", "audited answers the large model agreed with",
                                    labels=["tier"])
        rate = GaugeMetricFamily("cascade_audit_agreement", "live agreement with the large model", labels=["tier"])
        drift = GaugeMetricFamily("cascade_audit_drift", "1: agreement's upper bound is below the calibrated "
                                  "llm_agreement", labels=["tier"])
        for tier in sorted(set(self.items) | set(self.expected)):
            items.add_metric([tier], self.items[tier])
            agree.add_metric([tier], self.agreements[tier])
            if self.items[tier]:
                rate.add_metric([tier], self.agreements[tier] / self.items[tier])
            drift.add_metric([tier], float(self.drift(tier)))
        skipped = CounterMetricFamily("cascade_audit_skipped", "audits not run: over budget, large model busy, "
                                      "failed", labels=["reason"])
        for reason in ("budget", "busy", "failed"):
            skipped.add_metric([reason], self.skipped[reason])
        yield from (items, agree, rate, drift, skipped)
