"""Sampling parameters and the sampler: greedy, temperature, top-p, label constraints, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one request generates.

    Attributes:
        max_tokens: most tokens to generate.
        temperature: below GREEDY_BELOW (0 included) is greedy; otherwise logits are divided by it
            before sampling.
        top_p: nucleus sampling: sample from the smallest set of tokens whose mass >= top_p.
        seed: per-request generator seed (reproducible sampling); None draws from torch's.
        stop: strings that end generation; the returned text stops before them.
        stop_token_ids: token ids that end generation (the eos token is added unless ignore_eos).
        ignore_eos: keep generating past the eos token.
        logprobs: return the top-k log-probabilities of each generated position (None: none).
        choices: constrain the output to one of these strings (classification); `max_tokens`
            is raised to the longest choice.
        json_schema: constrain the output to JSON valid under this schema (llguidance;
            serving/engine/structured.py). The output's `cumulative_logprob` is the answer's
            log-probability renormalised over the allowed tokens. Cut at `max_tokens`, the text
            may be incomplete (finish_reason "length").
        regex: constrain the output to a match of this regex (as json_schema).
        At most one of choices, json_schema and regex.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    choices: list[str] | None = None
    json_schema: dict | None = None
    regex: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: {self.max_tokens} < 1")
        if self.temperature < 0:
            raise ValueError(f"temperature: {self.temperature} < 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: {self.top_p} is not in (0, 1]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs: {self.logprobs} is not in 0..20")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        given = [name for name in ("choices", "json_schema", "regex") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{given[1]}: give at most one of choices, json_schema and regex (got {', '.join(given)})")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise ValueError(f"json_schema: must be a JSON object (a schema), not {type(self.json_schema).__name__}")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"regex: must be a string, not {type(self.regex).__name__}")


# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing by 1e-300 turns
# the logits into inf and the probabilities into NaN.
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def check_sampling(params: SamplingParams) -> None:
    """What __post_init__ cannot see: fields changed after construction, and the seed's range.
    Raises ValueError naming the field (the engine turns it into a RequestError)."""
    params.__post_init__()
    if params.seed is not None and not SEED_RANGE[0] <= params.seed <= SEED_RANGE[1]:
        raise ValueError(f"seed: {params.seed} is not in {SEED_RANGE[0]}..{SEED_RANGE[1]}")
    if any(not isinstance(t, int) or t < 0 for t in params.stop_token_ids):
        raise ValueError(f"stop_token_ids: {params.stop_token_ids} must be non-negative ints")


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the nucleus; the most likely token is always kept."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # mass before this token is still short of top_p
    keep[0] = True
    out = torch.zeros_like(probs)
    out[order[keep]] = sorted_p[keep]
    return out / out.sum()


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                 allowed: list[int] | None = None) -> tuple[int, dict[int, float] | None]:
    """One token from a (vocab,) fp32 logits row.

    Returns:
        The token, and for constrained rows the probabilities of the allowed tokens
        (renormalised over them, at temperature 1: a label's confidence is the model's, not
        the sampling temperature's).
    """
    choice_probs = None
    if allowed is not None:
        idx = torch.tensor(allowed)
        sub = torch.softmax(logits[idx], -1)
        choice_probs = dict(zip(allowed, sub.tolist()))
        masked = torch.full_like(logits, float("-inf"))
        masked[idx] = logits[idx]
        logits = masked
    if params.temperature < GREEDY_BELOW:
        return int(logits.argmax()), choice_probs
    probs = top_p_filter(torch.softmax(logits / params.temperature, -1), params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator)), choice_probs


def sample_allowed(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                   allowed: torch.Tensor) -> tuple[int, float, torch.Tensor]:
    """One token from a (vocab,) fp32 logits row among the tokens `allowed` (a bool row) lets
    through (a grammar's mask).

    Returns:
        The token; its log-probability renormalised over the allowed tokens at temperature 1
        (the model's confidence, not the sampling temperature's); and the masked logits (for
        top-k logprobs over the allowed tokens).
    """
    masked = logits.masked_fill(~allowed, float("-inf"))
    if params.temperature < GREEDY_BELOW:
        token = int(masked.argmax())
    else:
        probs = top_p_filter(torch.softmax(masked / params.temperature, -1), params.top_p)
        token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(masked[token] - torch.logsumexp(masked, -1)), masked


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, dict[int, float]]:
    """The sampled token's log-probability under the model, and the top-k alternatives."""
    logp = torch.log_softmax(logits, -1)
    vals, ids = logp.topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
    return float(logp[token]), dict(zip(ids.tolist(), vals.tolist()))
