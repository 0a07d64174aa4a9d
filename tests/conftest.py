"""Shared fixtures: the real datasets from ../shared/data, prepared once per session, and
factories for small hand-made dataset dirs and tiers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cascade.data import prepare
from cascade.types import Prediction

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: tests read the real datasets from ../shared/data")
    return path


@pytest.fixture(scope="session")
def clinc_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clinc150")
    prepare("clinc150", shared("clinc150"), out)
    return out


@pytest.fixture(scope="session")
def banking_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("banking77")
    prepare("banking77", shared("banking77"), out)
    return out


@pytest.fixture
def make_dataset(tmp_path):
    """Write a dataset dir from {split: [(text, label), ...]}; returns its path."""

    def make(splits: dict[str, list[tuple[str, str]]], oos_label: str | None = None, name: str = "ds") -> Path:
        out = tmp_path / name
        out.mkdir()
        labels = sorted({lab for rows in splits.values() for _, lab in rows})
        for split, rows in splits.items():
            with (out / f"{split}.jsonl").open("w") as f:
                for i, (text, label) in enumerate(rows):
                    f.write(json.dumps({"id": f"{split}-{i}", "text": text, "label": label}) + "\n")
        (out / "labels.json").write_text(json.dumps({"labels": labels, "oos_label": oos_label}))
        return out

    return make


class TableTier:
    """A tier with fake capacity: answers from a text -> (label, confidence) table, abstains on
    texts it does not know, and records every batch it was sent."""

    def __init__(self, name: str, table: dict[str, tuple[str, float]], fail: bool = False):
        self.name = name
        self.table = table
        self.fail = fail
        self.batches: list[list[str]] = []

    def predict_batch(self, texts):
        self.batches.append(list(texts))
        if self.fail:
            raise RuntimeError(f"{self.name} is down")
        out = []
        for t in texts:
            if t in self.table:
                label, conf = self.table[t]
                out.append(Prediction(label, conf, self.name))
            else:
                out.append(None)
        return out

    @property
    def cost(self) -> float:
        return 0.0


@pytest.fixture
def table_tier():
    return TableTier


@pytest.fixture
def serve_app():
    """Run an ASGI app with a real uvicorn server on a free loopback port; yields its base URL."""
    import contextlib
    import socket
    import threading
    import time

    servers = []

    @contextlib.contextmanager
    def serve(app, ready: bool = True):
        """`ready`: also wait until the app's readiness probe says 200 (its models loaded)."""
        import httpx
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append(server)
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        paths = {getattr(r, "path", "") for r in getattr(app, "routes", [])}
        probe = next((p for p in ("/readyz", "/health") if p in paths), None)
        while ready and probe and httpx.get(url + probe).status_code != 200:
            if time.monotonic() > deadline + 100 or not thread.is_alive():
                raise RuntimeError(f"{probe} never said ready: {httpx.get(url + probe).text}")
            time.sleep(0.05)
        try:
            yield url
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()

    return serve


def rules_cascade_config(directory: Path, data_dir: Path | str, threshold: float = 0.5, **serving) -> Path:
    """Write `directory/cascade.toml`: the shipped CLINC150 rule pack, then a one-label fallback
    (the majority tier reading `data_dir`); `serving` fills the [serving] table."""
    lines = "\n".join(f"{k} = {v}" for k, v in serving.items())
    cfg = Path(directory) / "cascade.toml"
    cfg.write_text(f'''[task]
name = "clinc150"

[[tiers]]
name = "rules"
kind = "rules"
path = "{REPO / 'rules' / 'clinc150.toml'}"
threshold = {threshold}

[[tiers]]
name = "fallback"
kind = "majority"
path = "{data_dir}"
options = {{ label = "oos" }}

[serving]
{lines}
''')
    return cfg
