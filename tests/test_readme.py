"""README's commands work as written: every shell command in its ```bash blocks is either run
here (in a scratch dir, against a served smoke cascade for the curl lines) or named below with
why it is not, so a command added to the README without a thought about it fails this test."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.test_isolation import free_port

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Commands run by this test, by prefix, in README order.
RUN = ("cascade data prepare --dataset clinc150", "cascade data prepare --dataset snips",
       "cascade rules mine", "cascade rules check", "cascade plan",
       "cascade serve", "curl -s localhost:8000/")
# Commands not run here, by prefix, and why.
NOT_RUN = {
    "python3 -m venv": "the install: .ci/run runs the test command on a clean clone",
    "pip install": "installs",
    "cascade quickstart": "tests/test_cli.py runs `cascade quickstart --smoke`; the full one takes minutes",
    "cascade data prepare --dataset csv": "needs the reader's own my.csv (tests/test_data.py covers csv)",
    "cascade models import": "tests/test_large.py imports SmolLM2",
    "cascade train large": "fine-tuning takes minutes; tests/test_large.py runs it at toy scale",
    "torchrun": "tests/test_trainer.py runs FSDP2 on 2 gloo ranks",
    "cascade train student": "needs a trained large model; tests/test_distill.py",
    "cascade export": "needs a trained student; tests/test_student.py",
    "cascade llm serve": "needs a trained large model; tests/test_llm_serving.py serves a tiny one",
    "curl -s localhost:8001/": "against `cascade llm serve` (above)",
    "cascade calibrate": "needs trained models; tests/test_calibrate.py",
    "cascade eval": "reads runs/quickstart; tests/test_reports.py",
    "python bench/e2e.py": "a benchmark (tens of minutes), never a test",
}

SMOKE_CONFIG = f'''[task]
name = "clinc150"

[[tiers]]
name = "rules"
kind = "rules"
path = "{REPO / 'rules' / 'clinc150.toml'}"
threshold = 0.5

[[tiers]]
name = "fallback"
kind = "majority"
path = "data/clinc150"
'''


def readme_commands() -> list[str]:
    """Every command of README's ```bash blocks: continuations joined, comments dropped."""
    out, block, inside = [], [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.strip().startswith("```"):
            if inside:
                out += _commands(block)
            inside, block = line.strip() == "```bash", []
        elif inside:
            block.append(line)
    return out


def _commands(lines: list[str]) -> list[str]:
    cmds, pending = [], ""
    for line in lines:
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        cmd = _without_comment(pending).strip()
        if cmd:
            cmds.append(" ".join(cmd.split()) if "'" not in cmd and '"' not in cmd else cmd)
        pending = ""
    return cmds


def _without_comment(line: str) -> str:
    """The line up to a `#` that starts a shell comment (outside quotes, after a blank)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def test_every_readme_command_is_run_or_named():
    cmds = readme_commands()
    assert len(cmds) >= 15, cmds
    unknown = [c for c in cmds if not c.startswith(RUN) and not c.startswith(tuple(NOT_RUN))]
    assert not unknown, f"README commands this test neither runs nor names in NOT_RUN: {unknown}"
    for prefix in RUN:
        assert any(c.startswith(prefix) for c in cmds), f"README no longer has {prefix!r}"


def test_readme_commands_run_as_written(tmp_path):
    """The runnable ones, in order, in a scratch dir: `../shared` is the real one, `rules/` a copy
    of the shipped packs, port 8000 a free port."""
    import shutil

    shutil.copytree(REPO / "rules", tmp_path / "rules")
    (tmp_path / "cascade.toml").write_text(SMOKE_CONFIG)
    port = str(free_port())
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path)}
    server = None
    try:
        for cmd in readme_commands():
            if not cmd.startswith(RUN):
                continue
            cmd = cmd.replace("../shared", str(SHARED)).replace("localhost:8000", f"127.0.0.1:{port}")
            cmd = cmd.replace("--port 8000", f"--port {port}")
            if cmd.startswith("cascade serve"):
                server = subprocess.Popen("exec " + cmd, shell=True, cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                                          text=True)
                _wait_ready(f"http://127.0.0.1:{port}", server)
                continue
            done = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=300)
            if cmd.startswith("curl") and "/readyz" not in cmd:  # curl -s exits 0 on a 4xx too
                assert done.returncode == 0 and '"error"' not in done.stdout, (cmd, done.stdout, done.stderr)
            assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-2000:])
            if "/v1/classify" in cmd:
                import json

                body = json.loads(done.stdout)
                assert [r["index"] for r in body["results"]] == [0, 1] and body["usage"]["items"] == 2
            if "/metrics" in cmd:
                assert "cascade_answers_total" in done.stdout
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.communicate(timeout=30)
    assert (tmp_path / "data" / "clinc150" / "train.jsonl").exists() and (tmp_path / "check.json").exists()
    assert (tmp_path / "rules" / "mine.toml").exists()


def _wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "cascade serve never ready"
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def test_readme_config_example_is_a_valid_config(tmp_path):
    from cascade.config import load_config

    text = (REPO / "README.md").read_text()
    start = text.index("```toml\n[task]") + len("```toml\n")
    example = text[start:text.index("```", start)]
    (tmp_path / "cascade.toml").write_text(example)
    config = load_config(tmp_path / "cascade.toml")
    assert [t.kind for t in config.tiers] == ["rules", "student", "llm"]
