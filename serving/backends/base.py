"""What every large-model backend offers the cascade: constrained choice among labels, and
JSON under a schema (field extraction). No torch here (the `openai` backend runs without it)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass
class ChoiceResult:
    """One prompt's answer: the chosen choice's index, its probability, and the distribution
    over all choices (sums to 1)."""

    index: int
    prob: float
    scores: list[float]


@dataclass
class JsonResult:
    """One prompt's JSON answer under its schema.

    Attributes:
        text: the generated text (valid JSON under the schema when finish_reason is "stop").
        value: the parsed answer (a dict under an object schema); None when the text does not
            parse: cut by max_tokens, or from a backend that did not apply the schema (a server
            that ignores `response_format`), which `complete` alone would not show.
        logprob: the answer's log-probability under the constrained distribution: the sum over
            its tokens of the log-probability renormalised over the tokens the grammar allowed.
        finish_reason: "stop" (complete) or "length" (cut at max_tokens: possibly incomplete).
    """

    text: str
    value: Any
    logprob: float
    finish_reason: str = "stop"

    @property
    def complete(self) -> bool:
        return self.finish_reason == "stop"


def json_result(text: str, logprob: float, finish_reason: str | None) -> JsonResult:
    """A backend's answer as a JsonResult; `value` None when the text does not parse."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    return JsonResult(text, value, float(logprob), finish_reason or "stop")


@runtime_checkable
class LLMBackend(Protocol):
    name: str

    def choose(self, prompts: list[str], choices: list[str]) -> list[ChoiceResult]:
        """Constrained decoding: each prompt's continuation is one of `choices`.

        Args:
            prompts: full prompts (template applied).
            choices: the label strings the model may produce.

        Returns:
            One ChoiceResult per prompt, same order. Raises on backend failure.
        """
        ...

    def generate_json(self, prompts: list[str], schemas: list[dict], max_tokens: int) -> list[JsonResult]:
        """Constrained decoding to JSON: each prompt's continuation is valid JSON under its own
        schema (greedy), with its log-probability under the constrained distribution.

        Args:
            prompts: full prompts (template applied).
            schemas: one JSON schema per prompt.
            max_tokens: most tokens per answer; an answer cut there may be incomplete
                (`JsonResult.finish_reason` "length").

        Returns:
            One JsonResult per prompt, same order. Raises on backend failure (a schema the
            backend cannot compile included).
        """
        ...

    def close(self) -> None:
        ...


def distribution_from_logprobs(text: str, top: dict[str, float], choices: list[str],
                               path_logprob: float | None = None) -> ChoiceResult:
    """Turn a constrained answer and the top log-probabilities of its first position into a
    distribution over `choices`.

    Exact for single-token choices (the label-token models): the choices found among the top
    entries are renormalised among themselves. For a multi-token answer that is not among the
    top entries, the chosen choice gets its path probability and the rest is spread evenly.
    """
    stripped = text.strip()
    try:
        index = choices.index(text) if text in choices else [c.strip() for c in choices].index(stripped)
    except ValueError:
        raise ValueError(f"backend answered {text!r}, which is not one of the {len(choices)} choices") from None
    found = {i: math.exp(top[c]) for i, c in enumerate(choices) if c in top}
    if index in found:
        total = sum(found.values())
        scores = [found.get(i, 0.0) / total for i in range(len(choices))]
        return ChoiceResult(index, scores[index], scores)
    prob = math.exp(path_logprob) if path_logprob is not None else 1.0
    rest = (1.0 - prob) / max(1, len(choices) - 1)
    scores = [prob if i == index else rest for i in range(len(choices))]
    return ChoiceResult(index, prob, scores)
