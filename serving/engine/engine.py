"""The built-in engine: requests in, tokens out, one scheduler step at a time.

    engine = LLMEngine.from_model_dir("models/large-clinc150")
    outs = engine.generate(["The capital of France is"], SamplingParams(max_tokens=8))
    labels = engine.classify(prompts, choices=["<|balance|>", "<|transfer|>"])

Layers, as vLLM's: this engine (requests, detokenizing, stop conditions) -> `Scheduler`
(continuous batching) -> `KVCacheManager` (paged blocks, prefix cache) -> `ModelRunner` (the
forward pass). `AsyncEngine` (serving/engine/async_engine.py) runs it in a thread for the app.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from cascade.cpu import has_fast_bf16
from serving.engine.config import EngineConfig
from serving.engine.constrained import ChoiceState, TokenTrie
from serving.engine.kv_cache import KVCacheManager, allocate_kv_tensors, kv_bytes_per_token
from serving.engine.runner import ModelRunner
from serving.engine.sampling import SamplingParams, check_sampling, sample_allowed, sample_token, top_logprobs
from serving.engine.scheduler import Request, Scheduler
from serving.engine.structured import GrammarState, StructuredOutputs
from training.model import Transformer

# A request in this many failed steps is failed itself (see LLMEngine.step).
MAX_FAILED_STEPS = 3


class RequestError(ValueError):
    """A request the engine cannot serve (too long, bad parameters); the message says which."""


@dataclass
class RequestOutput:
    """A request's state after a step: everything generated so far, and `delta`, the text new
    since the last output (what a stream sends)."""

    request_id: str
    prompt_tokens: int
    token_ids: list[int]
    text: str
    delta: str
    finished: bool
    finish_reason: str | None
    cached_tokens: int = 0
    logprobs: list[tuple[float, dict[int, float]]] | None = None
    choice: int | None = None  # index into SamplingParams.choices
    choice_prob: float | None = None
    choice_scores: list[float] | None = None
    error: str | None = None  # finish_reason "error": why the engine could not run this request
    # json_schema / regex requests: the answer's log-probability so far, each token's renormalised
    # over the tokens the grammar allowed (temperature 1); None for other requests.
    cumulative_logprob: float | None = None


# Time-to-first-token buckets (seconds), as `EngineCounters.ttft_buckets` counts them.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class EngineCounters:
    """What the engine did since it started, for /metrics (serving exports it; the engine only
    counts). Written by the engine thread, read by a scrape: plain ints, no lock needed for a
    monitoring view."""

    prompt_tokens: int = 0  # tokens of admitted prompts (prefix-cache hits included)
    generation_tokens: int = 0
    requests_finished: int = 0
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_count: int = 0
    ttft_sum: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))  # (monotonic, tokens) per step

    def first_token(self, seconds: float) -> None:
        self.ttft_count += 1
        self.ttft_sum += seconds
        for i, le in enumerate(TTFT_BUCKETS):
            if seconds <= le:
                self.ttft_buckets[i] += 1

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        """Generated tokens per second over the last `window_s` seconds."""
        since = time.monotonic() - window_s
        return sum(n for t, n in list(self.recent) if t >= since) / window_s


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() or has_fast_bf16() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 eos_token_id: int | None = None):
        self.config = config or EngineConfig.default()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.tokenizer = tokenizer
        self.model = model.eval()
        cfg = model.cfg
        self.dtype = next(model.parameters()).dtype
        self.eos_token_id = cfg.eos_token_id if eos_token_id is None else eos_token_id
        self.max_model_len = self.config.max_model_len or cfg.max_seq_len
        cache = self.config.cache
        self.kv_bytes_per_token = kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, self.dtype)
        num_blocks = cache.num_blocks or max(
            1, int(cache.memory_gb * 2**30 // (self.kv_bytes_per_token * cache.block_size)))
        self.num_blocks = num_blocks
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.config.scheduler, self.kv)
        tensors = allocate_kv_tensors(cfg.n_layers, num_blocks, cache.block_size, cfg.n_kv_heads, cfg.head_dim,
                                      self.dtype, next(model.parameters()).device)
        c = self.config
        self.runner = ModelRunner(model, tensors, cache.block_size, attention=c.attention, kernel_chunk=c.kernel_chunk,
                                  group_prefill_max=c.group_prefill_max, prefill_max_padding=c.prefill_max_padding)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._sent: dict[str, int] = {}
        self._tries: dict[tuple, tuple[TokenTrie, int]] = {}
        self._structured: StructuredOutputs | None = None  # built at the first grammar request
        self._grammars: dict[str, GrammarState] = {}  # request id -> its grammar's state
        self.steps = 0
        self.peak_kv = {"blocks": 0, "tokens": 0}
        self.vocab_size = model.embed_tokens.num_embeddings
        # After a failed step: the requests it ran, to be stepped alone one by one until each
        # has run a step or failed alone (see `step`).
        self.suspects: list[str] = []
        self.failed_steps = 0
        self.counters = EngineCounters()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: EngineConfig | None = None) -> LLMEngine:
        """Any HF Llama-family dir with a `tokenizer.json` (ours, an imported SmolLM2, ...)."""
        from training.hf_io import load_hf

        config = config or EngineConfig.default()
        d = Path(model_dir)
        if not (d / "tokenizer.json").exists():
            raise FileNotFoundError(f"{d / 'tokenizer.json'}: not found; the engine needs the model's fast tokenizer")
        model = load_hf(d, dtype=resolve_dtype(config.dtype)).to(config.device)
        eos = None
        gen = d / "generation_config.json"
        if gen.exists():
            e = json.loads(gen.read_text()).get("eos_token_id")
            eos = e[0] if isinstance(e, list) else e
        return cls(model, Tokenizer.from_file(str(d / "tokenizer.json")), config, eos)

    # --- requests --------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        ids = self._prompt_ids(prompt)
        try:
            check_sampling(params)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        choice = None
        if params.choices is not None:
            trie, longest = self._trie(tuple(params.choices))
            choice = ChoiceState(trie)
            params.max_tokens = max(params.max_tokens, longest + 1)
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(f"prompt: {len(ids)} tokens + max_tokens {params.max_tokens} = {total} "
                               f"exceeds the model's length {self.max_model_len}")
        if math.ceil(total / self.kv.block_size) > self.num_blocks:
            raise RequestError(f"prompt: {total} tokens need more KV blocks than the pool has ({self.num_blocks})")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise RequestError(f"request_id: {rid!r} is already running")
        grammar = self._grammar(params) if params.json_schema is not None or params.regex is not None else None
        gen = None
        if params.seed is not None:
            gen = torch.Generator().manual_seed(params.seed)
        req = Request(rid, ids, params, choice=choice, generator=gen)
        self.requests[rid] = req
        self._sent[rid] = 0
        if grammar is not None:
            self._grammars[rid] = grammar
        self.scheduler.add(req)
        self.counters.prompt_tokens += len(ids)
        return rid

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids, every one checked against the vocabulary: a request is refused
        alone here rather than failing the step of every sequence batched with it."""
        if isinstance(prompt, str):
            try:
                ids = self.tokenizer.encode(prompt).ids
            except Exception as exc:  # e.g. a lone surrogate: the tokenizer cannot encode it
                raise RequestError(f"prompt: cannot be tokenized ({exc})") from None
        else:
            ids = list(prompt)
            vocab = self.vocab_size
            for i, t in enumerate(ids):
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                    raise RequestError(f"prompt[{i}]: token id {t!r} is not in the vocabulary (0..{vocab - 1})")
        if not ids:
            raise RequestError("prompt: empty (no tokens)")
        return ids

    def _trie(self, choices: tuple[str, ...]) -> tuple[TokenTrie, int]:
        """The label set's token trie and its longest label in tokens, built once per label set
        (a classification tier sends the same set with every request; tokenizing its labels each
        time cost the CLINC150 tier a seventh of its throughput: docs/engine.md). Tries are
        read-only."""
        key = (choices, self.eos_token_id)  # the end token is part of the trie
        hit = self._tries.pop(key, None)
        if hit is None:
            try:
                seqs = [self.tokenizer.encode(c, add_special_tokens=False).ids for c in choices]
            except Exception as exc:
                raise RequestError(f"choices: cannot be tokenized ({exc})") from None
            try:
                hit = (TokenTrie(seqs, self.eos_token_id), max(len(s) for s in seqs))
            except ValueError as exc:
                raise RequestError(str(exc)) from exc
            if len(self._tries) >= 16:  # least recently used out
                self._tries.pop(next(iter(self._tries)))
        self._tries[key] = hit
        return hit

    def _grammar(self, params: SamplingParams) -> GrammarState:
        """A fresh grammar state for a json_schema / regex request; a schema llguidance cannot
        compile is this request's error alone. The llguidance tokenizer is built at the first
        such request (once per engine)."""
        field = "json_schema" if params.json_schema is not None else "regex"
        if self._structured is None:
            try:
                self._structured = StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_token_id,
                                                     threads=torch.get_num_threads())
            except Exception as exc:  # e.g. a tokenizer without a decoder: llguidance cannot see its bytes
                raise RequestError(f"{field}: structured output is not available with this model's tokenizer "
                                   f"({type(exc).__name__}: {exc})") from None
        try:
            return self._structured.start(params.json_schema, params.regex)
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        self._sent.pop(request_id, None)
        self._grammars.pop(request_id, None)
        if req is not None and not req.finished:
            self.scheduler.finish(req, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the loop --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that produced text.

        If the forward pass raises, only the requests it can be blamed on fail: the step's
        requests are preempted (their blocks may be half written, so they recompute, and the
        prefix cache is dropped) and become suspects; the next steps run one suspect alone until
        it has computed all its known tokens and sampled. A suspect whose solo step raises is
        finished with `finish_reason` "error" and the message in `RequestOutput.error`; one that
        gets through rejoins the batch. A lone request whose step raises is blamed at once, and
        a request in `MAX_FAILED_STEPS` failed steps is blamed too, so a failure that only
        batches trigger (no single culprit) cannot livelock the engine."""
        solo = self._next_suspect()
        plan = self.scheduler.schedule(only=solo) if solo is not None else None
        if plan is None or not plan.seqs:  # no suspect, or no room to run it alone: a normal step
            solo, plan = None, self.scheduler.schedule()
        if not plan.seqs:
            return []
        try:
            logits = self.runner.execute(plan.seqs)
        except Exception as exc:
            return self._step_failed(plan.seqs, exc)
        if solo is not None and plan.seqs[0].samples:  # its whole sequence ran alone, cleanly
            self.suspects.remove(solo.request_id)
        self.steps += 1
        used = self.kv.num_used_blocks
        if used > self.peak_kv["blocks"]:
            self.peak_kv = {"blocks": used, "tokens": sum(r.num_tokens for r in self.scheduler.running)}
        outputs, row = [], 0
        masks = self._grammar_masks([s.request for s in plan.seqs if s.samples])
        for s in plan.seqs:
            req = s.request
            req.num_computed_tokens = s.start + s.num_new
            if not s.samples:
                continue
            try:  # sampling is per request: one that cannot be sampled fails alone
                self._append_token(req, logits[row], masks.get(req.request_id))
            except Exception as exc:
                outputs.append(self._fail(req, f"sampling failed for this request: {type(exc).__name__}: {exc}"))
            else:
                outputs.append(self._output(req))
                self._count(req)
            row += 1
        if row:
            self.counters.generation_tokens += row
            self.counters.recent.append((time.monotonic(), row))
        return outputs

    def _grammar_masks(self, sampling: list[Request]) -> dict[str, torch.Tensor | Exception]:
        """The allowed tokens of this step's constrained sequences, computed in one parallel call
        (an exception in place of a mask fails that request alone)."""
        reqs = [r for r in sampling if r.request_id in self._grammars]
        if not reqs:
            return {}
        states = [self._grammars[r.request_id] for r in reqs]
        allow_eos = [not r.params.ignore_eos for r in reqs]
        return {r.request_id: m for r, m in zip(reqs, self._structured.masks(states, allow_eos))}

    def _count(self, req: Request) -> None:
        if len(req.output_token_ids) == 1:
            self.counters.first_token(time.monotonic() - req.arrival)
        if req.finished:
            self.counters.requests_finished += 1

    def _next_suspect(self) -> Request | None:
        while self.suspects:
            req = self.requests.get(self.suspects[0])
            if req is not None and not req.finished:
                return req
            self.suspects.pop(0)  # aborted meanwhile
        return None

    def _fail(self, req: Request, message: str) -> RequestOutput:
        if req.request_id in self.suspects:
            self.suspects.remove(req.request_id)
        self.scheduler.finish(req, "error")
        out = self._output(req)
        out.error = message
        return out

    def _step_failed(self, seqs, exc: Exception) -> list[RequestOutput]:
        self.failed_steps += 1
        self.kv.reset_prefix_cache()  # blocks written by the failed step may be half written
        reason = f"{type(exc).__name__}: {exc}"
        reqs = [s.request for s in seqs]
        if len(reqs) == 1:  # alone: it is to blame
            return [self._fail(reqs[0], f"the model failed on this request: {reason}")]
        failed = []
        for req in reqs:
            req.failed_steps += 1
            if req.failed_steps >= MAX_FAILED_STEPS:
                failed.append(self._fail(req, f"the model failed on {req.failed_steps} steps this request was "
                                              f"in (no single request to blame); last: {reason}"))
                continue
            self.scheduler.preempt(req)
            if req.request_id not in self.suspects:
                self.suspects.append(req.request_id)
        return failed

    def _append_token(self, req: Request, logits: torch.Tensor, mask: torch.Tensor | Exception | None = None) -> None:
        p = req.params
        grammar = self._grammars.get(req.request_id)
        if grammar is not None:
            if isinstance(mask, Exception):
                raise mask
            token, logprob, masked = sample_allowed(logits, p, req.generator, mask)
            grammar.advance(token, logprob)
            req.output_token_ids.append(token)
            if p.logprobs is not None:  # over the allowed tokens, as for choices below
                req.logprobs.append(top_logprobs(masked, token, min(p.logprobs, int(mask.sum()))))
            self._check_stop(req, grammar)
            return
        allowed = req.choice.allowed() if req.choice is not None else None
        token, choice_probs = sample_token(logits, p, req.generator, allowed)
        req.output_token_ids.append(token)
        if p.logprobs is not None:
            if allowed is not None:
                # Constrained: log-probabilities over the allowed tokens (what vLLM calls processed
                # logprobs), so a client sees the label distribution, not the raw vocabulary's.
                masked = torch.full_like(logits, float("-inf"))
                masked[allowed] = logits[allowed]
                k = min(p.logprobs, len(allowed))
                req.logprobs.append(top_logprobs(masked, token, k))
            else:
                req.logprobs.append(top_logprobs(logits, token, p.logprobs))
        if req.choice is not None:
            if req.choice.advance(token, choice_probs):
                req.text = p.choices[req.choice.label]
                self.scheduler.finish(req, "stop")
            return
        self._check_stop(req)

    def _check_stop(self, req: Request, grammar: GrammarState | None = None) -> None:
        """After a token: eos and stop tokens, stop strings, a grammar that is complete, length."""
        p, token = req.params, req.output_token_ids[-1]
        stops = set(p.stop_token_ids)
        if not p.ignore_eos and self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        if token in stops:
            req.text = self.tokenizer.decode(req.output_token_ids[:-1])
            self.scheduler.finish(req, "stop")
            return
        req.text = self.tokenizer.decode(req.output_token_ids)
        for stop in p.stop:
            cut = req.text.find(stop)
            if cut >= 0:
                req.text = req.text[:cut]
                self.scheduler.finish(req, "stop")
                return
        if grammar is not None and grammar.stopped:  # nothing may follow: the answer is complete
            self.scheduler.finish(req, "stop")
            return
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            self.scheduler.finish(req, "length")

    def _output(self, req: Request) -> RequestOutput:
        sent = self._sent.get(req.request_id, 0)
        text = req.text
        if not req.finished:
            # Hold back what could still become a stop string, and half-decoded UTF-8.
            hold = max((len(s) - 1 for s in req.params.stop), default=0)
            safe = len(text) - hold
            while safe > sent and text[safe - 1] == "\ufffd":
                safe -= 1
            text = text[:max(sent, safe)]
        out = RequestOutput(req.request_id, len(req.prompt_token_ids), list(req.output_token_ids), req.text,
                            text[sent:], req.finished, req.finish_reason, req.num_cached_tokens,
                            list(req.logprobs) if req.params.logprobs is not None else None)
        self._sent[req.request_id] = len(text)
        if req.choice is not None and req.finished:
            out.choice, out.choice_prob = req.choice.label, req.choice.path_prob
            out.choice_scores = list(req.choice.scores)
        grammar = self._grammars.get(req.request_id)
        if grammar is not None:
            out.cumulative_logprob = grammar.logprob
        if req.finished:
            self.requests.pop(req.request_id, None)
            self._sent.pop(req.request_id, None)
            self._grammars.pop(req.request_id, None)
        return out

    # --- offline helpers -------------------------------------------------------------------

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion (all admitted at once; continuous batching does the rest)."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, SamplingParams(**vars(sp)) if sp else None) for p, sp in zip(prompts, plist)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def classify(self, prompts: list[str], choices: list[str]) -> list[RequestOutput]:
        """Constrained to `choices`: each output has `choice`, `choice_prob` and `choice_scores`."""
        return self.generate(prompts, SamplingParams(max_tokens=1, choices=list(choices)))

    def stats(self) -> dict:
        """KV accounting: blocks allocated vs tokens held (at the peak), prefix-cache hits; which
        attention path runs ("kernel": the C kernel, "torch")."""
        bs = self.kv.block_size
        peak_alloc = self.peak_kv["blocks"] * bs
        return {
            "num_blocks": self.num_blocks,
            "block_size": bs,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "peak_blocks": self.peak_kv["blocks"],
            "peak_tokens": self.peak_kv["tokens"],
            "kv_waste_pct": 100.0 * (peak_alloc - self.peak_kv["tokens"]) / peak_alloc if peak_alloc else 0.0,
            "prefix_hit_rate": self.kv.prefix_hits_tokens / max(1, self.kv.prefix_queries_tokens),
            "preemptions": self.scheduler.num_preemptions,
            "steps": self.steps,
            "attention": "kernel" if self.runner.attention_kernel else "torch",
        }
