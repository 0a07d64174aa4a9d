"""The large model served: OpenAI-compatible routes (official client, streaming), the backends
behind one interface, and the large-model tier of the cascade."""

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")

from cascade.config import parse_config  # noqa: E402
from serving.app import create_llm_app  # noqa: E402
from serving.backends import build_backend  # noqa: E402
from serving.backends.base import distribution_from_logprobs  # noqa: E402
from serving.backends.openai_http import BackendError, OpenAIBackend  # noqa: E402
from serving.engine.async_engine import AsyncEngine  # noqa: E402
from serving.engine.config import EngineConfig  # noqa: E402
from serving.engine.engine import LLMEngine, RequestError  # noqa: E402
from serving.engine.sampling import SamplingParams  # noqa: E402
from tests.test_engine import id_tokenizer  # noqa: E402
from training.hf_io import save_hf  # noqa: E402
from training.model import build_model  # noqa: E402
from training.task import TaskFormat, add_label_tokens, resize_for_labels  # noqa: E402

LABELS = ["alpha", "beta", "gamma", "delta"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random GQA model fine-tuned-style: one added token per label, cascade.json."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("llm")
    model = build_model("debug")
    tok = id_tokenizer()
    ids = add_label_tokens(tok, LABELS)
    resize_for_labels(model, tok, LABELS, ids)
    with torch.no_grad():  # make the label logits differ clearly between prompts
        model.embed_tokens.weight[256:] += torch.randn(len(LABELS), model.cfg.dim)
    tok.save(str(d / "tokenizer.json"))
    save_hf(model, d, cascade_meta=TaskFormat(LABELS, ids, prompt_template="{text} 9").to_json())
    return d


def small_engine(model_dir) -> LLMEngine:
    return LLMEngine.from_model_dir(model_dir, EngineConfig.default(dtype="fp32", num_blocks=128, block_size=4))


PROMPTS = ["5 6 7", "100 101 102 103 104", "17", "33 34 35 36"]


def test_openai_client_against_the_app(model_dir, serve_app):
    engine = small_engine(model_dir)
    expected = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=6, ignore_eos=True))[0].text
    app = create_llm_app(model_dir, "tiny", engine=AsyncEngine(small_engine(model_dir)))
    with serve_app(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]

        done = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0)
        assert done.choices[0].text == expected and done.usage.completion_tokens == 6
        assert done.choices[0].finish_reason == "length"

        stream = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0, stream=True)
        chunks = [c.choices[0].text for c in stream]
        assert "".join(chunks) == expected and len([c for c in chunks if c]) > 1

        batch = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=3, temperature=0, logprobs=2)
        assert len(batch.choices) == 4 and all(len(c.logprobs.top_logprobs[0]) == 2 for c in batch.choices)

        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "5 6"}],
                                              max_tokens=4, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("length", "stop")
        streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "5 6"}],
                                                  max_tokens=4, temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == chat.choices[0].message.content

        with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
            client.completions.create(model="tiny", prompt="5", temperature=7)
        with pytest.raises(openai.NotFoundError, match="not served here"):
            client.completions.create(model="gpt-4", prompt="5")
        with pytest.raises(openai.BadRequestError, match="exceeds the model's length"):
            client.completions.create(model="tiny", prompt=" ".join(["5"] * 250), max_tokens=20)


def test_openai_backend_against_the_app_matches_the_engine(model_dir, serve_app):
    choices = [f"<|{lab}|>" for lab in LABELS]
    direct = small_engine(model_dir).classify(PROMPTS, choices)
    app = create_llm_app(model_dir, "tiny", engine=AsyncEngine(small_engine(model_dir)))
    with serve_app(app) as url:
        backend = build_backend("openai", url=url, model="tiny", batch_size=3)
        remote = backend.choose(PROMPTS, choices)
        backend.close()
    for d, r in zip(direct, remote):
        assert r.index == d.choice
        assert r.prob == pytest.approx(d.choice_prob, abs=1e-5)
        assert r.scores == pytest.approx(d.choice_scores, abs=1e-5)


def test_openai_backend_retries_then_names_the_failure():
    backend = OpenAIBackend("http://127.0.0.1:9", "m", retries=2, backoff_s=0.01, timeout_s=1)
    with pytest.raises(BackendError, match="3 tries"):
        backend.choose(["x"], [" a", " b"])


def test_builtin_backend_and_llm_tier_from_config(model_dir, tmp_path):
    config = parse_config({"task": {"name": "t"}, "tiers": [{
        "name": "llm", "kind": "llm", "path": str(model_dir),
        "options": {"backend": "builtin", "dtype": "fp32", "num_blocks": 64, "block_size": 4}}]}, "test")
    from cascade.config import build_cascade

    cascade = build_cascade(config, tmp_path)
    tier = cascade.tiers[0]
    preds = tier.predict_batch(PROMPTS)
    direct = small_engine(model_dir).classify([p + " 9" for p in PROMPTS], [f"<|{lab}|>" for lab in LABELS])
    for p, d in zip(preds, direct):
        assert p.label == LABELS[d.choice] and p.tier == "llm"
        assert p.confidence == pytest.approx(max(p.scores.values()))
        assert sum(p.scores.values()) == pytest.approx(1.0)
    assert tier.cost > 0
    tier.close()


def test_llm_tier_rejects_unknown_options(model_dir, tmp_path):
    """At load, naming the file, the tier and every bad key (before any backend is built)."""
    from cascade.config import ConfigError

    with pytest.raises(ConfigError, match=r"cfg.toml: tiers\[0\] \('llm'\)\.options\.urll: unknown key") as err:
        parse_config({"task": {"name": "t"}, "tiers": [{
            "name": "llm", "kind": "llm", "path": str(model_dir), "options": {"backend": "openai", "urll": "x"}}]},
            "cfg.toml")
    assert "options.model: Field required" in str(err.value)  # an openai backend without `model`


def test_distribution_from_logprobs():
    r = distribution_from_logprobs("<|b|>", {"<|a|>": -2.0, "<|b|>": -0.5, "x": -0.1}, ["<|a|>", "<|b|>", "<|c|>"])
    assert r.index == 1 and sum(r.scores) == pytest.approx(1) and r.scores[2] == 0
    with pytest.raises(ValueError, match="not one of"):
        distribution_from_logprobs("zzz", {}, ["a"])


def test_openai_backend_and_tier_import_no_torch():
    code = ("import sys, serving.llm_tier, serving.backends.openai_http, serving.backends; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_vllm_backend_on_gpu(model_dir):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM backend needs a CUDA device")
    choices = [f"<|{lab}|>" for lab in LABELS]
    backend = build_backend("vllm", model_dir=model_dir, gpu_memory_utilization=0.3, max_model_len=256)
    results = backend.choose(PROMPTS, choices)
    direct = small_engine(model_dir).classify(PROMPTS, choices)
    assert [r.index for r in results] == [d.choice for d in direct]


def test_cascade_llm_serve_command(model_dir):
    """The real command in its own process: it serves /v1/models and a completion on loopback."""
    import socket
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cascade", "llm", "serve", "--model", str(model_dir),
                             "--name", "tiny", "--port", str(port), "--dtype", "fp32", "--kv-memory-gb", "0.01"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 60
        while True:  # the port opens at once; /health says 200 once the model is loaded
            try:
                if httpx.get(url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                    models = httpx.get(url + "/models", timeout=2).json()
                    break
                assert time.monotonic() < deadline, "never healthy"
                time.sleep(0.2)
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert models["data"][0]["id"] == "tiny"
        r = httpx.post(url + "/completions", json={"model": "tiny", "prompt": "5 6", "max_tokens": 3,
                                                   "temperature": 0}, timeout=30).json()
        assert r["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_async_engine_timeout_aborts_step_failure_recovers_and_shutdown_answers(model_dir):
    import time

    engine = small_engine(model_dir)
    runner = AsyncEngine(engine)
    long = SamplingParams(max_tokens=100, ignore_eos=True)
    with pytest.raises(TimeoutError):
        runner.run_sync(["5 6 7"], [long], timeout=0.001)
    deadline = time.monotonic() + 10
    while engine.has_unfinished():  # the timed-out request is aborted, its blocks freed
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert engine.kv.num_free_blocks == engine.num_blocks

    real = engine.runner.execute
    calls = {"n": 0}

    def failing(seqs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return real(seqs)

    engine.runner.execute = failing
    with pytest.raises(RequestError, match="simulated kernel failure"):  # alone in its step: blamed
        runner.run_sync(["5 6 7 8"], [SamplingParams(max_tokens=3)], timeout=10)
    assert not engine.kv.pool.cached  # half-written blocks are not served to anyone later
    ok = runner.run_sync(["5 6 7 8"], [SamplingParams(max_tokens=3, ignore_eos=True)], timeout=10)[0]
    assert len(ok.token_ids) == 3

    got = []
    runner.submit("5 6", long, got.append)
    runner.shutdown()
    assert got and isinstance(got[-1], RuntimeError) and "shut down" in str(got[-1])


def test_cascade_serve_mounts_the_openai_routes_on_its_builtin_engine(model_dir, tmp_path, serve_app):
    """An llm tier on the built-in engine shares it with the OpenAI routes of `cascade serve`."""
    import httpx

    from serving.app import create_app

    cfg = tmp_path / "cascade.toml"
    cfg.write_text(f'[task]\nname = "t"\n\n[[tiers]]\nname = "llm"\nkind = "llm"\npath = "{model_dir}"\n'
                   'options = { backend = "builtin", dtype = "fp32", num_blocks = 64, block_size = 4 }\n')
    with serve_app(create_app(cfg)) as url:
        label = httpx.post(url + "/v1/classify", json={"text": "5 6 7"}, timeout=30).json()["results"][0]
        assert label["tier"] == "llm" and label["label"] in LABELS
        done = httpx.post(url + "/v1/completions", json={"prompt": "5 6", "max_tokens": 2}, timeout=30)
        assert done.status_code == 200 and done.json()["model"] == model_dir.name
