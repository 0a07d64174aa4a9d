"""Structured output: decoding constrained by a JSON schema or a regex, through llguidance.

A request's schema (or regex) compiles to an llguidance grammar, and the request gets its own
`LLMatcher`. Each decode step, for every constrained sequence that samples:

1. the matchers compute their masks of allowed tokens together, into one int32 bitmask
   (batch, ceil(vocab / 32)), on llguidance's own threads (`LLExecutor`);
2. each row's logits outside its mask are -inf; the token is greedy or sampled from what is
   left (temperature and top-p apply to the masked distribution);
3. the token is consumed by the matcher, and its log-probability renormalised over the
   allowed tokens, at temperature 1, is added to the sequence's `logprob`, the answer's
   log-probability under the constrained distribution (a confidence, like a label's).

EOS is in the mask only where the grammar accepts, so a sequence ends on EOS with a complete
answer, or when the matcher stops (nothing more may follow: a JSON object's closing brace).
`max_tokens` still bounds it; cut there, the text may be incomplete (finish_reason "length").

JSON is written in one fixed layout, Python's `json.dumps` default (", " and ": ", no other
whitespace): what the extraction task trains the model to write (`training/task.py`
`fields_json`), and a weak model cannot wander in whitespace until max_tokens. A schema's own
"x-guidance" options override it.

The model's vocabulary (embedding rows) may be larger than the tokenizer's (added label rows,
padding): llguidance gets `n_vocab` = the rows, and rows the tokenizer has no bytes for are
never allowed. llguidance is imported only when a request asks for a grammar.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

# json.dumps's layout; a schema's "x-guidance" options override these (llguidance's order:
# defaults -> schema["x-guidance"] -> overrides).
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_EOS_STANDIN = "<|cascade-structured-eos|>"  # for tokenizers whose engine has no usable EOS


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:  # the `train` extra installs it
        raise ValueError("json_schema: structured output needs llguidance (pip install -e '.[train]')") from exc
    return llguidance


def check_grammar(json_schema: dict | None = None, regex: str | None = None) -> str:
    """The llguidance grammar for a JSON schema or a regex (exactly one), checked without a
    tokenizer: pure, cheap for any schema llguidance's limits allow, what the HTTP routes call
    before queueing a request.

    Raises:
        ValueError naming the field (`json_schema: ...` or `regex: ...`) when it cannot compile.
    """
    if (json_schema is None) == (regex is None):
        raise ValueError("json_schema: give exactly one of json_schema and regex")
    llg = _llguidance()
    field = "json_schema" if json_schema is not None else "regex"
    if json_schema is not None:
        if not isinstance(json_schema, dict):
            raise ValueError(f"json_schema: must be a JSON object (a schema), not {type(json_schema).__name__}")
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(json_schema), defaults=JSON_DEFAULTS)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"json_schema: {exc}") from None
    else:
        if not isinstance(regex, str):
            raise ValueError(f"regex: must be a string, not {type(regex).__name__}")
        grammar = llg.LLMatcher.grammar_from_regex(regex)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"{field}: {messages[0] if messages else 'llguidance cannot compile it'}")
    return grammar


@dataclass
class GrammarState:
    """One sequence's walk through its grammar."""

    matcher: object  # llguidance.LLMatcher, this sequence's own
    field: str  # "json_schema" or "regex": what an error names
    logprob: float = 0.0  # sum of the generated tokens' renormalised log-probabilities

    def advance(self, token: int, logprob: float) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"{self.field}: the grammar refused token {token} ({self.matcher.get_error()})")
        self.logprob += logprob

    @property
    def stopped(self) -> bool:
        """Nothing more may follow (the answer is complete without an EOS)."""
        return self.matcher.is_stopped()


class StructuredOutputs:
    """One engine's grammar machinery: llguidance's view of the tokenizer (built once: ~1 s
    for a 49k vocabulary), compiled matchers by grammar (least recently used out; a request
    gets a copy), and the executor that computes a step's masks in parallel.

    Args:
        tokenizer: the engine's `tokenizers.Tokenizer`.
        vocab_size: the model's embedding rows (the logits' width), >= the tokenizer's size.
        eos_token_id: the engine's EOS, or None (then a grammar ends only when it stops).
        threads: llguidance's mask threads.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | None, threads: int = 1, cache_size: int = 32):
        from tokenizers import AddedToken, Tokenizer

        llg = _llguidance()
        tok = Tokenizer.from_str(tokenizer.to_str())  # a copy, without padding and truncation
        tok.no_padding()
        tok.no_truncation()
        size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = eos_token_id if eos_token_id is not None and eos_token_id < size else None
        eos = self.eos_token_id
        if eos is None:  # llguidance needs an EOS: one the model can never emit (masked off below)
            tok.add_special_tokens([AddedToken(_EOS_STANDIN, special=True)])
            eos = tok.token_to_id(_EOS_STANDIN)
        self.vocab_size = vocab_size
        n_vocab = max(vocab_size, tok.get_vocab_size(with_added_tokens=True))
        self.tokenizer = llg.LLTokenizer(tok.to_str(), n_vocab=n_vocab, eos_token=eos)
        self.llg_eos = eos
        self.words = (n_vocab + 31) // 32
        self.executor = llg.LLExecutor(num_threads=max(1, threads))
        self._matchers: OrderedDict[str, object] = OrderedDict()
        self.cache_size = cache_size

    def start(self, json_schema: dict | None = None, regex: str | None = None) -> GrammarState:
        """A fresh state for one request. Raises ValueError naming the field when llguidance
        cannot compile the grammar for this tokenizer."""
        field = "json_schema" if json_schema is not None else "regex"
        grammar = check_grammar(json_schema, regex)
        template = self._matchers.pop(grammar, None)
        if template is None:
            try:
                template = _llguidance().LLMatcher(self.tokenizer, grammar, log_level=0)
            except Exception as exc:  # documented as never raising for grammar errors; be sure
                raise ValueError(f"{field}: {exc}") from None
            if template.is_error():
                raise ValueError(f"{field}: {template.get_error()}")
            if len(self._matchers) >= self.cache_size:
                self._matchers.popitem(last=False)
        self._matchers[grammar] = template
        return GrammarState(template.deep_copy(), field)

    def masks(self, states: list[GrammarState], allow_eos: list[bool]) -> list[torch.Tensor | Exception]:
        """Each state's allowed tokens as a bool (vocab_size,) row, or the exception that keeps
        it from having one (that request fails alone). All computed in one parallel call."""
        bitmask = torch.zeros(len(states), self.words, dtype=torch.int32)
        failed: dict[int, Exception] = {}
        try:
            self.executor.unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(states)],
                                                  bitmask.data_ptr(), self.words * 4, len(states))
        except Exception:  # one at a time, so only a state that cannot compute its mask fails
            for i, s in enumerate(states):
                try:
                    s.matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), self.words * 4)
                except Exception as exc:
                    failed[i] = exc
        # Unpack: bit b of little-endian word w is token 32 w + b, so the words' bytes unpacked
        # little-endian are the tokens in order. In numpy, on this thread: torch's shift-and-mask
        # was 100x slower (docs/engine.md).
        bits = np.unpackbits(bitmask.numpy().astype("<i4", copy=False).view(np.uint8), axis=1, bitorder="little")
        allowed = bits[:, :self.vocab_size].view(np.bool_)
        if self.llg_eos < self.vocab_size:
            no_eos = [i for i in range(len(states)) if self.eos_token_id is None or not allow_eos[i]]
            allowed[no_eos, self.llg_eos] = False
        any_allowed = allowed.any(axis=1).tolist()
        out: list[torch.Tensor | Exception] = []
        for i, s in enumerate(states):
            if i in failed:
                out.append(failed[i])
            elif s.matcher.is_error():
                out.append(ValueError(f"{s.field}: {s.matcher.get_error()}"))
            elif not any_allowed[i]:
                out.append(ValueError(f"{s.field}: the grammar allows no token here (can this tokenizer write "
                                      f"what it asks for?)"))
            else:
                out.append(torch.from_numpy(allowed[i]))  # a view: no copy
        return out
