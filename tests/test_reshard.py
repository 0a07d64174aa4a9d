"""Checkpoints that reshard: a run checkpointed on 2 ranks goes on in 1 process and the other way
round, continuing the uninterrupted run's loss curve (docs/large-model.md, "Checkpoints that
reshard"). Real `torchrun --nproc_per_node=2` subprocesses on gloo, the debug model, fp32.

The interrupted run is the reference run itself: its mid-run checkpoint (step N/2, written with
--max-steps N so the schedule is the same) is copied to a fresh checkpoint dir and resumed there,
which is what a run that crashed right after that checkpoint leaves behind.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from training.model import build_model  # noqa: E402
from training.trainer import Hooks, TrainConfig, Trainer, list_checkpoints  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N = 8  # steps; the checkpoint to resume from is step N/2
# Across rank counts the same update is summed in another order (per-rank partial gradients
# and losses, per-rank padding): measured 2.3e-7 at most (relative, fp32), the same as between
# the two uninterrupted runs themselves (1.7e-7). Same rank count: bit-exact.
RESHARD_RTOL = 1e-5


def train(data: Path, out: Path, ckpt: Path, ranks: int, resume: bool = False) -> tuple[list[float], str]:
    """`cascade train large` on `ranks` processes; returns (per-step losses, stderr)."""
    args = ["--data", str(data), "--out", str(out), "--checkpoint-dir", str(ckpt), "--size", "debug",
            "--max-steps", str(N), "--ckpt-every", str(N // 2), "--keep-last", "3", "--precision", "fp32",
            "--limit-train", "96", "--eval-limit", "8", "--batch-size", "8", "--vocab-size", "300",
            "--lr", "3e-3", "--warmup-steps", "2", "--no-progress", *(["--resume"] if resume else [])]
    # --standalone: rendezvous on a free port (the default 29500 can be taken or in TIME_WAIT)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([*launcher, "-m", "cascade", "train", "large", *args], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "train_summary.json").read_text())["losses"], run.stderr


@dataclass
class Reference:
    losses: list[float]  # per step, uninterrupted
    half: Path  # its step-N/2 checkpoint


@pytest.fixture(scope="module")
def references(clinc_dir, tmp_path_factory) -> dict[int, Reference]:
    """Uninterrupted N-step runs on 2 ranks and on 1 process, each checkpointing at N/2."""
    root = tmp_path_factory.mktemp("reshard")
    runs = {}
    for ranks in (2, 1):
        losses, _ = train(clinc_dir, root / f"ref{ranks}", root / f"ref{ranks}.ckpt", ranks)
        runs[ranks] = Reference(losses, root / f"ref{ranks}.ckpt" / f"step-{N // 2:07d}")
    return runs


def resume_from_half(data: Path, reference: Reference, tmp_path: Path, ranks: int) -> tuple[list[float], str]:
    """Resume `reference`'s step-N/2 checkpoint, alone in a fresh dir, on `ranks`; returns
    (the resumed run's losses, stderr)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference.half, ckpt / reference.half.name)
    losses, err = train(data, tmp_path / "out", ckpt, ranks, resume=True)
    assert f"resumed from step {N // 2}" in err, err[-2000:]
    # the first half comes from the checkpoint
    assert len(losses) == N and losses[:N // 2] == reference.losses[:N // 2]
    return losses, err


def rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.slow
def test_two_rank_checkpoint_is_sharded_and_resumes_on_two_ranks_bit_exact(clinc_dir, references, tmp_path):
    ckpt = references[2].half
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-00000.safetensors", "rank-00001.safetensors"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["format"], state["world_size"], state["cursor"], state["samples"]) == ("sharded", 2, N // 2, 32)
    reference = references[2].losses
    losses, _ = resume_from_half(clinc_dir, references[2], tmp_path, ranks=2)
    assert losses == reference, f"resumed {losses[N // 2:]} vs uninterrupted {reference[N // 2:]}"
    # the model dir a sharded run ends with is plain HF safetensors, no DCP files in it
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and not list(out.rglob("*.distcp"))


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_process(clinc_dir, references, tmp_path):
    reference = references[2].losses
    losses, err = resume_from_half(clinc_dir, references[2], tmp_path, ranks=1)
    assert "written by 2 rank(s), now 1" in err
    diff = rel_diff(losses[N // 2:], reference[N // 2:])
    assert diff <= RESHARD_RTOL, f"rel diff {diff:.2e}: 1 process {losses[N // 2:]} vs 2 ranks {reference[N // 2:]}"


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_ranks(clinc_dir, references, tmp_path):
    ckpt = references[1].half
    assert (ckpt / "train_model.safetensors").exists() and not (ckpt / "sharded").exists()  # unchanged format
    reference = references[1].losses
    losses, err = resume_from_half(clinc_dir, references[1], tmp_path, ranks=2)
    assert "written by 1 rank(s), now 2" in err
    diff = rel_diff(losses[N // 2:], reference[N // 2:])
    assert diff <= RESHARD_RTOL, f"rel diff {diff:.2e}: 2 ranks {losses[N // 2:]} vs 1 process {reference[N // 2:]}"


def test_resume_refuses_another_global_batch(tmp_path):
    """The data position is global batches consumed: it means other samples under another
    global batch size, so resuming with one is refused, naming the field."""
    from tests.test_trainer import toy_data

    def trainer(batch_size):
        torch.manual_seed(0)
        model = build_model("debug")
        cfg = TrainConfig(lr=3e-3, warmup_steps=0, batch_size=batch_size, precision="fp32", max_steps=2)
        return Trainer(model, toy_data(32), cfg, tmp_path, Hooks(), pad_id=0, n_params=model.num_params())

    path = trainer(8).save_checkpoint()
    assert list_checkpoints(tmp_path / "checkpoints") == [path]
    with pytest.raises(ValueError, match=r"batch_size=8 \(now 4\)"):
        trainer(4).load_checkpoint(path)


def test_a_checkpoint_restores_the_random_streams(tmp_path):
    """torch and python generators come back as they were at save time (one process here; under
    torchrun each rank's own, in `rng/rank-RRRRR.safetensors`)."""
    import random

    from training import checkpoint
    from training.trainer import param_groups

    model = build_model("debug")
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    path = checkpoint.save(tmp_path, 3, model, optimizer, {"step": 3}, keep_last=2)
    expected_torch, expected_python = torch.rand(4), random.random()
    torch.rand(100), random.random()  # the run goes on drawing
    assert checkpoint.load(path, model, optimizer)["format"] == "full"
    assert torch.equal(torch.rand(4), expected_torch) and random.random() == expected_python
