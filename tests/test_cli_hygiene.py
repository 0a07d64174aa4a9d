"""The command line as a user meets it: --version, defaults in every --help, one meaning of
--json, progress as plain lines off a terminal, and no third-party noise."""

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cascade.app.cli import build_parser, main
from cascade.progress import Progress

REPO = Path(__file__).resolve().parents[1]


def test_version():
    from cascade import __version__

    out = subprocess.run([sys.executable, "-m", "cascade", "--version"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == f"cascade {__version__}"


def _parsers(parser):
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _parsers(child)


def test_every_option_with_a_default_shows_it_in_help():
    missing = []
    for parser in _parsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            d = action.default
            if not action.option_strings or d is None or d is False or action.nargs == 0 or d == "==SUPPRESS==":
                continue
            if "(default:" not in (action.help or ""):
                missing.append(f"{parser.prog} {action.option_strings[0]}")
        assert "%(default)" not in text
    assert not missing, missing
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "--port PORT" in help_text and "(default: 8000)" in help_text


def test_json_means_the_same_everywhere(tmp_path, capsys, clinc_dir):
    assert main(["plan", "--tokens", "2M", "--json"]) == 0  # alone: JSON on stdout, no table
    plan = json.loads(capsys.readouterr().out)
    assert main(["plan", "--tokens", "2M", "--json", str(tmp_path / "plan.json")]) == 0  # FILE: table + file
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "plan.json").read_text()) == plan and "wrote" in out and not out.startswith("{")
    assert main(["rules", "check", str(REPO / "rules" / "clinc150.toml"), "--data", str(clinc_dir),
                 "--split", "val", "--json", "-"]) == 0
    assert "rules" in json.loads(capsys.readouterr().out)


def test_progress_is_plain_lines_off_a_terminal():
    stream = io.StringIO()  # not a TTY: no bar, no carriage returns
    with Progress(100, "eval", "item", stream=stream, every_s=0.0) as bar:
        for _ in range(4):
            bar.update(25, loss="0.5")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 5  # every update (every_s=0), then the close
    assert lines[-1].startswith("eval: 100/100 item (100%)") and "loss=0.5" in lines[-1]
    quiet = io.StringIO()
    with Progress(10, "eval", stream=quiet, enabled=False, every_s=0.0) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("noise", ["Please consider to run pre-processing before quantization. Refer to ..."])
def test_third_party_noise_is_dropped_and_the_rest_kept(noise, caplog):
    from cascade.app.quiet import quiet_third_party

    quiet_third_party()
    with caplog.at_level(logging.WARNING):
        logging.warning(noise)
        logging.getLogger("torch.onnx._internal.exporter._registration").warning(
            "torchvision is not installed. Skipping torchvision::nms")
        logging.warning("a warning a user should see")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["a warning a user should see"]


def test_eval_prints_progress_lines_and_no_progress_silences_them(tmp_path, clinc_dir):
    from tests.conftest import rules_cascade_config

    cfg = rules_cascade_config(tmp_path, clinc_dir)
    run = [sys.executable, "-m", "cascade", "eval", "--config", str(cfg), "--data", str(clinc_dir), "--split", "val"]
    loud = subprocess.run(run, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert loud.returncode == 0 and "eval val: " in loud.stderr and "\r" not in loud.stderr
    silent = subprocess.run(run + ["--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert silent.returncode == 0 and "eval val:" not in silent.stderr
