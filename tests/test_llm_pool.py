"""A pool of large-model servers: two real `cascade llm serve` processes behind the `openai`
backend. Kill one under load: no request fails and answers move to the other; bring it back:
traffic returns."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cascade.deadline import deadline_scope
from serving.backends.openai_http import OpenAIBackend
from tests.test_isolation import free_port
from tests.test_llm_serving import LABELS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.test_llm_serving import model_dir as make

    return make.__wrapped__(tmp_path_factory)


def serve(model_dir: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "cascade", "llm", "serve", "--model", str(model_dir), "--port",
                             str(port), "--dtype", "fp32", "--kv-memory-gb", "0.05", "--threads", "1",
                             "--log-level", "warning"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "never healthy"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)


class Load:
    """Two client threads calling the backend back to back; every outcome recorded."""

    def __init__(self, backend, prompts, choices):
        self.backend, self.prompts, self.choices = backend, prompts, choices
        self.answers, self.errors = [], []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(2)]
        for t in self.threads:
            t.start()

    def _run(self, offset):
        i = offset
        while not self.stop.is_set():
            prompt = self.prompts[i % len(self.prompts)]
            try:
                with deadline_scope(time.monotonic() + 10):
                    (r,) = self.backend.choose([prompt], self.choices)
                self.answers.append((prompt, r.index))
            except Exception as exc:  # noqa: BLE001  recorded: the test asserts there are none
                self.errors.append(f"{type(exc).__name__}: {exc}")
            i += 1

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def served(backend) -> list[int]:
    return [e["served"] for e in backend.stats()["endpoints"]]


def wait_until(cond, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_kill_one_replica_under_load_then_bring_it_back(model_dir):
    ports = [free_port(), free_port()]
    procs = [serve(model_dir, p) for p in ports]
    backend = OpenAIBackend([f"http://127.0.0.1:{p}" for p in ports], model_dir.name, retries=3, backoff_s=0.05,
                            cooldown_s=0.5, health_interval_s=0.2)
    prompts = [f"{t} 9" for t in ("5 6 7", "100 101 102", "17", "33 34 35 36")]
    choices = [f"<|{lab}|>" for lab in LABELS]
    load = Load(backend, prompts, choices)
    try:
        wait_until(lambda: min(served(backend)) >= 5)  # both replicas take traffic
        procs[0].send_signal(signal.SIGKILL)  # no drain: in-flight requests see a reset
        procs[0].wait(timeout=10)
        at_kill = served(backend)
        wait_until(lambda: served(backend)[1] >= at_kill[1] + 20)
        assert served(backend)[0] - at_kill[0] <= 2  # at most what was in flight as it died
        assert backend.stats()["endpoints"][0]["state"] != "closed"
        procs[0] = serve(model_dir, ports[0])  # back on the same port
        back = served(backend)
        wait_until(lambda: served(backend)[0] >= back[0] + 5)  # traffic returns to it
    finally:
        load.close()
        backend.close()
        for p in procs:
            p.kill()
            p.wait(timeout=10)
    assert load.errors == [], load.errors[:5]
    answers = {}
    for prompt, index in load.answers:  # the same answer for a prompt whichever replica gave it
        answers.setdefault(prompt, set()).add(index)
    assert all(len(v) == 1 for v in answers.values()), answers
    assert len(load.answers) >= 40
