"""Scaling-law sizing: how many parameters and tokens to spend, before spending them.

Three answers for one budget (pure math, no torch, unit-tested on worked examples):

- `compute_optimal`: the Chinchilla rule of thumb, ~20 training tokens per parameter.
- `fit_optimal`: Hoffmann et al. 2022 approach 3, minimising the fitted loss
  L(N, D) = E + A / N^alpha + B / D^beta under the budget C = 6 N D.
- `inference_aware`: Sardana & Frankle 2023: reach the same loss as `fit_optimal` with the
  fewest training + lifetime inference FLOPs, 6 N D_train + 2 N D_inference. Heavy inference
  traffic moves the optimum to a smaller model trained on more tokens, which is the case for
  the students that answer most of the cascade's traffic.

N counts non-embedding parameters, as in the papers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True)
class LossFit:
    """Parametric loss L(N, D) = E + A/N^alpha + B/D^beta; defaults: Chinchilla approach 3."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28

    def loss(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def tokens_for_loss(self, params: float, loss: float) -> float:
        """Training tokens a model of `params` needs to reach `loss` (inf if it never can)."""
        gap = loss - self.E - self.A / params**self.alpha
        return (self.B / gap) ** (1.0 / self.beta) if gap > 0 else math.inf

    def optimal_split(self, compute: float) -> tuple[float, float]:
        """Approach 3's closed form: argmin L(N, D) subject to 6 N D = compute."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        params = g * (compute / 6.0) ** (b / (a + b))
        return params, compute / (6.0 * params)


@dataclass
class SizePoint:
    params: float
    tokens: float  # training tokens
    train_flops: float
    inference_flops: float
    loss: float


@dataclass
class Plan:
    compute_optimal: SizePoint
    fit_optimal: SizePoint
    inference_aware: SizePoint
    inference_tokens: float

    def to_json(self) -> dict:
        return {
            "inference_tokens": self.inference_tokens,
            "compute_optimal": asdict(self.compute_optimal),
            "fit_optimal": asdict(self.fit_optimal),
            "inference_aware": asdict(self.inference_aware),
        }


def _point(fit: LossFit, params: float, tokens: float, inference_tokens: float) -> SizePoint:
    return SizePoint(params, tokens, 6.0 * params * tokens, 2.0 * params * inference_tokens,
                     fit.loss(params, tokens))


def minimise_log(f, lo: float, hi: float, iters: int = 200) -> float:
    """Golden-section search for the minimum of a unimodal f on [lo, hi], in log space."""
    a, b = math.log(lo), math.log(hi)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(math.exp(d))
    return math.exp((a + b) / 2)


def inference_aware_point(fit: LossFit, target_loss: float, inference_tokens: float) -> SizePoint:
    """Fewest total FLOPs (training + inference) for a model that reaches `target_loss`."""
    if target_loss <= fit.E:
        raise ValueError(f"target loss {target_loss} is below the irreducible loss E={fit.E}")

    def total(params: float) -> float:
        tokens = fit.tokens_for_loss(params, target_loss)
        return 6.0 * params * tokens + 2.0 * params * inference_tokens

    # Smallest model that can reach the loss at all (with infinite data), times a margin.
    n_min = (fit.A / (target_loss - fit.E)) ** (1.0 / fit.alpha) * 1.000001
    # The total is convex-like in log N: huge below n_min's neighbourhood (data explodes),
    # growing linearly in N far above it.
    params = minimise_log(total, n_min, n_min * 1e8)
    return _point(fit, params, fit.tokens_for_loss(params, target_loss), inference_tokens)


def plan(*, compute: float | None = None, tokens: float | None = None, inference_tokens: float = 0.0,
         fit: LossFit | None = None) -> Plan:
    """Size a model for a training budget, given as FLOPs (`compute`) or as training `tokens`.

    With `tokens`, the budget is the compute a 20-tokens-per-parameter model of that data uses,
    C = 6 (T/20) T; all three answers then spend (about) that compute or reach that loss.
    """
    fit = fit or LossFit()
    if (compute is None) == (tokens is None):
        raise ValueError("give exactly one of compute (FLOPs) or tokens")
    if inference_tokens < 0:
        raise ValueError(f"inference_tokens must be >= 0, got {inference_tokens}")
    if tokens is not None:
        if tokens <= 0:
            raise ValueError(f"tokens must be > 0, got {tokens}")
        compute = 6.0 * (tokens / TOKENS_PER_PARAM) * tokens
    assert compute is not None
    if compute <= 0:
        raise ValueError(f"compute must be > 0, got {compute}")
    n20 = math.sqrt(compute / (6.0 * TOKENS_PER_PARAM))
    compute_optimal = _point(fit, n20, TOKENS_PER_PARAM * n20, inference_tokens)
    n_fit, d_fit = fit.optimal_split(compute)
    fit_optimal = _point(fit, n_fit, d_fit, inference_tokens)
    inference_aware = inference_aware_point(fit, fit_optimal.loss, inference_tokens)
    return Plan(compute_optimal, fit_optimal, inference_aware, inference_tokens)


def nearest_size(sizes: dict[str, int], target: float) -> str:
    """The name whose parameter count is nearest `target` in log space."""
    return min(sizes, key=lambda n: abs(math.log(sizes[n]) - math.log(target)))


def format_plan(p: Plan) -> str:
    def human(x: float) -> str:
        for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(x) >= scale:
                return f"{x / scale:.3g}{unit}"
        return f"{x:.3g}"

    lines = [f"{'':<17}{'params':>9}{'tokens':>9}{'train FLOPs':>13}{'infer FLOPs':>13}{'loss':>8}"]
    for name in ("compute_optimal", "fit_optimal", "inference_aware"):
        pt: SizePoint = getattr(p, name)
        lines.append(f"{name:<17}{human(pt.params):>9}{human(pt.tokens):>9}{pt.train_flops:>13.3e}"
                     f"{pt.inference_flops:>13.3e}{pt.loss:>8.4f}")
    lines.append(f"(inference tokens over the model's life: {human(p.inference_tokens)})")
    return "\n".join(lines)
