"""Structured output (JSON schema / regex, through llguidance): the engine, the OpenAI routes,
the backends. A tiny random model with a byte-level BPE tokenizer (it can write any text, as a
real model's can) and a vocabulary padded past the tokenizer's, as a fine-tuned model's is.

    python -m tests.test_structured_output   # the mask cost per step (docs/engine.md)
"""

from __future__ import annotations

import json
import math
import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llguidance")

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

from serving.engine.config import EngineConfig  # noqa: E402
from serving.engine.engine import LLMEngine, RequestError  # noqa: E402
from serving.engine.sampling import SamplingParams  # noqa: E402
from training.hf_io import save_hf  # noqa: E402
from training.model import build_model  # noqa: E402

MERGES = [("t", "h"), ("th", "e"), ("Ġ", "the"), ("p", "l"), ("pl", "a"), ("pla", "y")]
EOS = 256 + len(MERGES)  # "<eos>", after the bytes and the merges
VOCAB = 272  # model rows past the tokenizer's 263: padding the grammar must never allow
TEXTS = ["play the song yesterday by the beatles", "wake me up at seven", "turn the lights off in the kitchen",
         "remind me to call mum tomorrow", "play jazz", "what is the weather in paris"]


def byte_tokenizer() -> Tokenizer:
    """GPT-2's byte-level BPE over the 256 bytes (token b is byte b), a few merges, an eos."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    char = dict(zip(bs, map(chr, cs)))
    vocab = {char[b]: b for b in range(256)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<eos>", special=True)])
    assert tok.token_to_id("<eos>") == EOS
    return tok


def fields_schema(text: str, fields=("artist", "track"), required: bool = False) -> dict:
    """The extraction tier's schema: each field an array of spans of the text (keys optional;
    at most 3 spans of at most 3 words here, to keep a random model's answers short).
    `required`: every field present with one or two spans (greedy decoding of a random model
    answers `{}` to the optional form)."""
    w = text.split()
    spans = [" ".join(w[i:j]) for i in range(len(w)) for j in range(i + 1, min(len(w), i + 3) + 1)]
    array = {"type": "array", "items": {"enum": spans}, "minItems": int(required), "maxItems": 2 if required else 3}
    schema = {"type": "object", "properties": {f: array for f in fields}, "additionalProperties": False}
    return {**schema, "required": list(fields)} if required else schema


def assert_valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    props = schema["properties"]
    assert isinstance(value, dict) and set(schema.get("required", [])) <= set(value) <= set(props), text
    for key, spans in value.items():
        assert isinstance(spans, list) and all(s in props[key]["items"]["enum"] for s in spans), text
        assert props[key]["minItems"] <= len(spans) <= props[key]["maxItems"], text
    return value


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: this model's ops are far too small to share, and on a shared 2-core
    machine a two-thread op waits for its second thread (its decode steps measured 40x slower:
    48 ms against 1.2 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("debug", vocab_size=VOCAB, eos_token_id=EOS, bos_token_id=None).eval()
    return model, byte_tokenizer()


@pytest.fixture
def make_engine(tiny):
    def make(**overrides) -> LLMEngine:
        overrides = {"dtype": "fp32", "block_size": 4, "num_blocks": 512, **overrides}
        return LLMEngine(tiny[0], tiny[1], EngineConfig.default(**overrides), eos_token_id=EOS)

    return make


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("json-llm")
    save_hf(tiny[0], d)
    tiny[1].save(str(d / "tokenizer.json"))
    return d


def json_requests(n: int, sampled: bool):
    """n field-extraction requests over TEXTS in turn, every other one with required fields;
    greedy, or sampled with seed i."""
    prompts, params = [], []
    for i in range(n):
        text = TEXTS[i % len(TEXTS)]
        prompts.append(f"Request: {text}\nFields:")
        params.append(SamplingParams(max_tokens=160, json_schema=fields_schema(text, required=i % 2 == 0),
                                     temperature=1.0 if sampled else 0.0, seed=i if sampled else None))
    return prompts, params


# --- the engine --------------------------------------------------------------------------------


@pytest.mark.parametrize("sampled", [False, True])
def test_json_output_is_always_valid_and_batch_mates_are_unaffected(make_engine, sampled):
    engine = make_engine()
    plain = ["Request: play jazz", "the song", "wake me up"]
    plain_params = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = [engine.generate([p], plain_params)[0].token_ids for p in plain]
    prompts, params = json_requests(10, sampled)
    json_alone = [engine.generate([p], sp)[0] for p, sp in zip(prompts[:3], params[:3])]
    json_alone += engine.generate(prompts[3:], params[3:])  # without the unconstrained ones

    label = SamplingParams(choices=[" play", " stop", " the beatles"])
    label_alone = engine.generate([plain[0]], label)[0]

    outs = engine.generate(plain + prompts + [plain[0]], [plain_params] * len(plain) + params + [label])
    outs, labelled = outs[:-1], outs[-1]
    assert [o.token_ids for o in outs[:3]] == alone  # unconstrained requests: as if alone
    assert labelled.choice == label_alone.choice  # and a label-constrained one
    assert labelled.choice_prob == pytest.approx(label_alone.choice_prob, abs=1e-5)
    assert all(o.cumulative_logprob is None for o in outs[:3] + [labelled])
    assert sum(len(o.token_ids) > 20 for o in outs[3:]) >= 5  # answers with fields, not only {}
    for out, sp, solo in zip(outs[3:], params, json_alone):
        assert out.finish_reason == "stop"
        assert_valid(out.text, sp.json_schema)
        assert math.isfinite(out.cumulative_logprob) and out.cumulative_logprob <= 0
        assert out.text == solo.text  # greedy, or the same seed: batching changes nothing
        assert out.cumulative_logprob == pytest.approx(solo.cumulative_logprob, abs=1e-4)
        assert all(t < EOS for t in out.token_ids)  # never a padding row, never the eos inside


def test_json_under_chunked_prefill_preemption_and_prefix_caching(make_engine):
    prompts, params = json_requests(8, sampled=False)
    roomy = make_engine().generate(prompts, params)
    # Too small for all: preempted and recomputed; prompts in chunks of 7 beside the decodes.
    tight = make_engine(num_blocks=56, max_num_seqs=8, long_prefill_chunk=7, max_num_batched_tokens=16)
    first = tight.generate(prompts, params)
    again = tight.generate(prompts, params)  # the shared "Request: " prefixes now from the cache
    assert tight.stats()["preemptions"] > 0 and tight.kv.prefix_hits_tokens > 0
    assert [o.text for o in first] == [o.text for o in again] == [o.text for o in roomy]


def test_logprob_is_the_sum_of_renormalised_logprobs(tiny, make_engine):
    """Enum of two one-byte strings: the text is `"a"` or `"b"`; the quotes are forced (log 1 =
    0), so the answer's logprob is the softmax over {a, b} at the second position."""
    model, tok = tiny
    prompt = "Answer a or b:"
    schema = {"enum": ["a", "b"]}
    out = make_engine().generate([prompt], SamplingParams(max_tokens=8, json_schema=schema, logprobs=2))[0]
    assert out.text in ('"a"', '"b"') and out.finish_reason == "stop" and len(out.token_ids) == 3
    ids = tok.encode(prompt + '"').ids
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1]
    a, b = tok.token_to_id("a"), tok.token_to_id("b")
    pair = torch.log_softmax(logits[[a, b]], -1)
    expected = float(pair[0] if out.text == '"a"' else pair[1])
    assert out.cumulative_logprob == pytest.approx(expected, abs=1e-4)
    assert out.text == ('"a"' if pair[0] >= pair[1] else '"b"')  # greedy over the allowed pair
    # The returned per-token logprobs are the constrained ones: they sum to the same figure, and
    # the choice position's two alternatives are a distribution.
    assert sum(lp for lp, _ in out.logprobs) == pytest.approx(out.cumulative_logprob, abs=1e-5)
    assert [lp for lp, _ in out.logprobs][0] == pytest.approx(0.0, abs=1e-6)
    assert sum(math.exp(v) for v in out.logprobs[1][1].values()) == pytest.approx(1.0, abs=1e-5)


def test_regex_ends_on_eos_or_length(make_engine):
    engine = make_engine()
    outs = engine.generate([f"{i} say ab:" for i in range(6)],
                           [SamplingParams(max_tokens=6, regex="(ab)+", temperature=1.0, seed=i) for i in range(6)])
    for out in outs:
        assert re.fullmatch("(ab)*a?b?", out.text), out.text
        assert EOS not in out.token_ids[:-1]
        if out.finish_reason == "stop":  # only where the grammar accepted: a whole match
            assert re.fullmatch("(ab)+", out.text) and out.token_ids[-1] == EOS
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == 6


def test_without_an_eos_a_grammar_ends_when_it_stops(tiny):
    """An engine with no EOS: llguidance gets a stand-in the model can never emit (its id is a
    padding row of this model), so an answer ends only where nothing may follow, or at length."""
    engine = LLMEngine(tiny[0], tiny[1], EngineConfig.default(dtype="fp32", block_size=4, num_blocks=256),
                       eos_token_id=None)
    schema = fields_schema(TEXTS[0], required=True)
    outs = engine.generate(["Request: x", "Request: y"], [SamplingParams(max_tokens=120, json_schema=schema),
                                                          SamplingParams(max_tokens=6, regex="(ab)+")])
    assert outs[0].finish_reason == "stop" and assert_valid(outs[0].text, schema)
    assert outs[1].finish_reason == "length" and outs[1].text == "ababab"
    assert all(t < EOS for o in outs for t in o.token_ids)


@pytest.mark.parametrize("params, field", [
    (SamplingParams(json_schema={"type": "frobnicate"}), "json_schema"),
    (SamplingParams(json_schema={"type": "string", "minLength": 3, "maxLength": 1}), "json_schema"),
    (SamplingParams(regex="a{3,1}"), "regex"),
])
def test_a_bad_grammar_is_a_request_error_naming_the_field(make_engine, params, field):
    engine = make_engine()
    with pytest.raises(RequestError, match=f"^{field}: "):
        engine.add_request("Request: x", params)
    assert not engine.requests and not engine._grammars


def test_bad_grammars_and_a_failing_matcher_fail_alone(make_engine):
    engine = make_engine()
    plain = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts, params = json_requests(2, sampled=False)
    alone = engine.generate(["the song"], plain)[0].token_ids
    json_alone = [o.text for o in engine.generate(prompts, params)]

    good = [engine.add_request("the song", plain)] + [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    for bad in ({"json_schema": "not a dict"}, {"json_schema": {"enum": []}},
                {"choices": ["a", "b"], "json_schema": {"type": "object"}}):
        with pytest.raises((RequestError, ValueError), match="json_schema"):
            engine.add_request("the song", SamplingParams(**bad))
    victim = engine.add_request(prompts[0], params[0])

    class Broken:  # a matcher that goes wrong mid-generation (llguidance's limits, a bug)
        def __init__(self, real):
            self.real, self.steps = real, 0

        def __getattr__(self, name):
            return getattr(self.real, name)

        def consume_token(self, token):
            self.steps += 1
            return self.steps < 3 and self.real.consume_token(token)

    engine._grammars[victim].matcher = Broken(engine._grammars[victim].matcher)
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert final[victim].finish_reason == "error" and "json_schema: the grammar refused" in final[victim].error
    assert final[good[0]].token_ids == alone
    assert [final[r].text for r in good[1:]] == json_alone


# --- the OpenAI routes ---------------------------------------------------------------------------


def test_openai_routes_serve_response_format(model_dir, make_engine, serve_app):
    openai = pytest.importorskip("openai")
    import httpx

    from serving.app import create_llm_app
    from serving.engine.async_engine import AsyncEngine

    text = TEXTS[0]
    schema = fields_schema(text, required=True)
    prompt = f"Request: {text}\nFields:"
    direct = make_engine().generate([prompt], SamplingParams(max_tokens=120, json_schema=schema))[0]
    fmt = {"type": "json_schema", "json_schema": {"name": "fields", "schema": schema, "strict": True}}
    app = create_llm_app(model_dir, "tiny", engine=AsyncEngine(make_engine()))
    with serve_app(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        done = client.completions.create(model="tiny", prompt=prompt, max_tokens=120, temperature=0, logprobs=1,
                                         extra_body={"response_format": fmt})
        c = done.choices[0]
        assert c.text == direct.text and c.finish_reason == "stop"
        assert_valid(c.text, schema)
        assert sum(c.logprobs.token_logprobs) == pytest.approx(direct.cumulative_logprob, abs=1e-4)

        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=120, temperature=0, stream=True,
                                           extra_body={"response_format": fmt})
        assert "".join(ch.choices[0].text for ch in stream) == direct.text

        guided = client.completions.create(model="tiny", prompt=prompt, max_tokens=120, temperature=0,
                                           extra_body={"guided_json": schema})
        assert guided.choices[0].text == direct.text

        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                              max_tokens=120, temperature=0.8, seed=3, response_format=fmt)
        assert_valid(chat.choices[0].message.content, schema)
        streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                                  max_tokens=120, temperature=0.8, seed=3, response_format=fmt,
                                                  stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == \
            chat.choices[0].message.content
        any_object = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                                    max_tokens=120, temperature=0,
                                                    response_format={"type": "json_object"})
        if any_object.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(any_object.choices[0].message.content), dict)
        plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0,
                                          extra_body={"response_format": {"type": "text"}})
        assert plain.choices[0].finish_reason in ("length", "stop")

        # Refusals: in the one error shape, naming the field; the server goes on serving.
        with pytest.raises(openai.BadRequestError, match=r"response_format\.json_schema\.schema: Invalid type"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "x", "schema": {"type": "frob"}}})
        with pytest.raises(openai.UnprocessableEntityError, match="response_format"):
            client.completions.create(model="tiny", prompt=prompt,
                                      extra_body={"response_format": {"type": "json_schema"}})
        with pytest.raises(openai.UnprocessableEntityError, match="response_format"):
            client.completions.create(model="tiny", prompt=prompt, extra_body={"response_format": {"type": "yaml"}})
        with pytest.raises(openai.UnprocessableEntityError, match="guided_json: give at most one"):
            client.completions.create(model="tiny", prompt=prompt, extra_body={"response_format": fmt,
                                                                               "guided_json": schema})
        r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "stream": True, "guided_regex": "a{3,1}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"  # before the stream starts
        assert set(r.json()["error"]) == {"message", "type", "code", "param"}
        r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_response_format"
        again = client.completions.create(model="tiny", prompt=prompt, max_tokens=120, temperature=0,
                                          extra_body={"response_format": fmt})
        assert again.choices[0].text == direct.text


# --- the backends --------------------------------------------------------------------------------


def test_openai_and_builtin_backends_generate_json(model_dir, make_engine, serve_app):
    pytest.importorskip("openai")
    from serving.app import create_llm_app
    from serving.backends import build_backend
    from serving.backends.openai_http import BackendError
    from serving.engine.async_engine import AsyncEngine

    prompts = [f"Request: {t}\nFields:" for t in TEXTS[:4]]
    schemas = [fields_schema(t, required=i % 2 == 0) for i, t in enumerate(TEXTS[:4])]
    builtin = build_backend("builtin", model_dir=model_dir, dtype="fp32", num_blocks=256, block_size=4)
    try:
        local = builtin.generate_json(prompts, schemas, max_tokens=120)
    finally:
        builtin.close()
    app = create_llm_app(model_dir, "tiny", engine=AsyncEngine(make_engine()))
    with serve_app(app) as url:
        backend = build_backend("openai", url=url, model="tiny", max_connections=2)
        try:
            remote = backend.generate_json(prompts, schemas, max_tokens=120)
            cut = backend.generate_json(prompts[:1], schemas[:1], max_tokens=3)[0]
            with pytest.raises(BackendError, match="400"):
                backend.generate_json(prompts[:1], [{"type": "frob"}], max_tokens=8)
        finally:
            backend.close()
    for lo, re_, schema in zip(local, remote, schemas):
        assert lo.finish_reason == re_.finish_reason == "stop" and lo.complete
        assert lo.value == assert_valid(lo.text, schema) and re_.text == lo.text
        assert math.isfinite(lo.logprob) and lo.logprob <= 0
        assert re_.logprob == pytest.approx(lo.logprob, abs=1e-4)
    assert cut.finish_reason == "length" and cut.value is None and not cut.complete


# --- the mask cost, for docs/engine.md ---------------------------------------------------------------


def measure_mask_cost(vocab_tokenizer: str | None = None, batch: int = 16, steps: int = 40, threads: int = 1) -> dict:
    """Per decode step of `batch` sampled JSON sequences: the step's wall time and the part of
    it spent computing and unpacking the grammar masks (medians over the steps where all
    `batch` run), and the same step unconstrained. With `vocab_tokenizer` (a tokenizer.json), a
    random debug model of that vocabulary instead of the test tokenizer's."""
    import statistics
    import time

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = Tokenizer.from_file(vocab_tokenizer) if vocab_tokenizer else byte_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True) if vocab_tokenizer else VOCAB
    model = build_model("debug", vocab_size=vocab, eos_token_id=None, bos_token_id=None, max_seq_len=512).eval()
    engine = LLMEngine(model, tok, EngineConfig.default(dtype="fp32", block_size=16, num_blocks=1024), None)
    prompts, params = json_requests(batch, sampled=True)
    for i, sp in enumerate(params):  # every field with six spans: all `batch` answers outlast `steps`
        sp.json_schema = fields_schema(TEXTS[i % len(TEXTS)], required=True)
        for prop in sp.json_schema["properties"].values():
            prop["minItems"] = prop["maxItems"] = 6
    mask_s: list[float] = []
    masks = None

    def timed_masks(*a):
        t = time.perf_counter()
        try:
            return masks(*a)
        finally:
            mask_s.append(time.perf_counter() - t)

    def run(params) -> list[float]:
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(p, SamplingParams(**{**vars(sp), "max_tokens": steps}))
        engine.step()  # the prefill (and, the first time, the llguidance tokenizer)
        out = []
        while engine.has_unfinished() and len(engine.scheduler.running) == batch:
            t = time.perf_counter()
            engine.step()
            out.append(time.perf_counter() - t)
        while engine.has_unfinished():
            engine.step()
        return out

    run(params)  # warm: kernels built, tokenizer built
    masks = engine._structured.masks
    engine._structured.masks = timed_masks
    constrained = run(params)
    mask_s = mask_s[1:len(constrained) + 1]  # the decode steps' (the first call was the prefill's)
    plain = run([SamplingParams(temperature=1.0, seed=i, ignore_eos=True) for i in range(batch)])
    ms = lambda xs: round(1e3 * statistics.median(xs), 2)  # noqa: E731
    return {"vocab": vocab, "batch": batch, "steps": len(constrained), "threads": torch.get_num_threads(),
            "step_ms": ms(constrained), "mask_ms": ms(mask_s), "unconstrained_step_ms": ms(plain)}


if __name__ == "__main__":
    import sys

    for n in (1, 2):  # threads
        print(measure_mask_cost(threads=n))
        if len(sys.argv) > 1:  # a real vocabulary, e.g. ~/.cache/cascade/models/smollm2-135m/tokenizer.json
            print(measure_mask_cost(sys.argv[1], threads=n))
