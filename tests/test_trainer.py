"""The training loop: schedule, weight-decay groups, spike guard, data order, resume, sharding."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from training.model import build_model  # noqa: E402
from training.trainer import (  # noqa: E402
    IGNORE,
    Hooks,
    Sequence,
    SpikeGuard,
    TrainConfig,
    Trainer,
    epoch_batches,
    list_checkpoints,
    lr_at,
    param_groups,
)

REPO = Path(__file__).resolve().parents[1]


def test_warmup_then_cosine_to_ten_percent():
    cfg = TrainConfig(lr=1.0, warmup_steps=10)
    lrs = [lr_at(s, cfg, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.45)  # halfway through the cosine
    assert lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_no_weight_decay_on_norms_biases_embeddings():
    model = build_model("debug")  # tied head: lm_head.weight is the embedding
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "layers.0.self_attn.q_proj.weight" in decayed and "layers.1.mlp.down_proj.weight" in decayed
    assert "embed_tokens.weight" in skipped and "norm.weight" in skipped
    assert "layers.0.input_layernorm.weight" in skipped
    assert no_decay["weight_decay"] == 0.0


def test_spike_guard_skips_then_rolls_back():
    guard = SpikeGuard(factor=3.0, window=5, min_history=3, max_consecutive=2)
    assert [guard.check(x) for x in (2.0, 2.1, 1.9)] == ["ok"] * 3
    assert guard.check(float("nan")) == "skip"
    assert guard.check(2.0) == "ok"  # a good step resets the run of skips
    assert guard.check(7.0) == "skip"  # > 3 x mean(2.0)
    assert guard.check(float("inf")) == "rollback"
    assert guard.skipped == 3 and len(guard.history) == 4


def test_spike_guard_lets_a_hard_batch_through_when_the_loss_is_near_zero():
    """Late in a fine-tune: mean 0.01, a 0.3 batch is 30x it but no spike; a jump of nats is."""
    guard = SpikeGuard(factor=3.0, window=5, min_history=3, max_consecutive=2, min_delta=1.0)
    assert [guard.check(x) for x in (0.01, 0.012, 0.008, 0.3, 0.25, 0.4)] == ["ok"] * 6
    assert guard.check(5.0) == "skip" and guard.check(float("nan")) == "rollback"
    assert SpikeGuard(factor=3.0, min_history=3).check(0.3) == "ok"  # too little history to judge


def test_epoch_order_is_a_function_of_seed_and_epoch():
    lengths = [i % 7 + 1 for i in range(100)]
    a = epoch_batches(lengths, 8, seed=1, epoch=0, bucket=4)
    assert a == epoch_batches(lengths, 8, seed=1, epoch=0, bucket=4)
    assert a != epoch_batches(lengths, 8, seed=1, epoch=1, bucket=4)
    flat = [i for b in a for i in b]
    assert len(flat) == len(set(flat)) == 96 and all(len(b) == 8 for b in a)


def toy_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 200, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        label = 250 + ids[0] % 4  # a learnable rule: the first token decides the answer token
        out.append(Sequence(ids + [label], [IGNORE] * (len(ids) - 1) + [label, IGNORE]))
    return out


def make_trainer(tmp_path, data, loss_hook=None, **cfg):
    torch.manual_seed(0)
    model = build_model("debug")
    defaults = dict(lr=3e-3, warmup_steps=2, batch_size=8, precision="fp32", log_every=1, keep_last=3)
    config = TrainConfig(**{**defaults, **cfg})
    return Trainer(model, data, config, tmp_path, Hooks(), pad_id=0, n_params=model.num_params(),
                   loss_hook=loss_hook)


def test_training_on_a_fixed_batch_lowers_the_loss(tmp_path):
    trainer = make_trainer(tmp_path, toy_data(8), max_steps=15, warmup_steps=0)
    result = trainer.fit(progress=False)
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "step-0000015"


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    data = toy_data(40)
    straight = make_trainer(tmp_path / "a", data, max_steps=12, ckpt_every=4).fit(progress=False).losses

    def crash(cursor, loss):
        if cursor == 7:
            raise KeyboardInterrupt("simulated crash after the step-4 checkpoint")
        return loss

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "b", data, loss_hook=crash, max_steps=12, ckpt_every=4).fit(progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-0000004"]
    resumed = make_trainer(tmp_path / "b", data, max_steps=12, ckpt_every=4)
    result = resumed.fit(resume=True, progress=False)
    assert len(result.losses) == len(straight) == 12
    assert max(abs(a - b) for a, b in zip(result.losses, straight)) <= 1e-6
    # checkpoints are written whole: no temp dirs left, at most keep_last kept
    ckpts = list((tmp_path / "b" / "checkpoints").iterdir())
    assert not [p for p in ckpts if p.name.startswith(".tmp")] and len(ckpts) <= 3


def test_spikes_are_skipped_and_repeated_spikes_roll_back(tmp_path):
    def spike(cursor, loss):
        return loss * 1000 if cursor in (9, 13, 14, 15) else loss

    # A skipped step still counts as a step (data and schedule move on); its update is dropped.
    trainer = make_trainer(tmp_path, toy_data(40), loss_hook=spike, max_steps=20, ckpt_every=5,
                           spike_min_history=3, max_consecutive_skips=3)
    result = trainer.fit(progress=False)
    assert trainer.guard.skipped == 4
    rollbacks = [e for e in result.log if "rollback_to" in e]
    assert rollbacks == [{"step": 10, "rollback_to": "step-0000010", "cursor": 15}]
    assert result.steps == 20 and len(result.losses) == 20
    assert sum(x > 100 for x in result.losses) == 1  # the skip at batch 9; 13-15 were rolled back
    assert all(math.isfinite(x) for x in result.losses)


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="precision='fp8'"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)


@pytest.mark.slow
def test_two_rank_fsdp_matches_one_process_and_shards_state(tmp_path, clinc_dir):
    args = ["--data", str(clinc_dir), "--size", "debug", "--max-steps", "3", "--precision", "fp32",
            "--limit-train", "96", "--eval-limit", "8", "--batch-size", "8", "--vocab-size", "300",
            "--no-progress", "--ckpt-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    one = subprocess.run([sys.executable, "-m", "cascade", "train", "large", "--out", str(tmp_path / "one"), *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    # --standalone: rendezvous on a free port (the default 29500 can be taken or in TIME_WAIT)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "cascade", "train", "large", "--out", str(tmp_path / "two"), *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    single = json.loads((tmp_path / "one" / "train_summary.json").read_text())
    ranks = [json.loads((tmp_path / "two" / "shards" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert len(single["losses"]) == 3
    for rank in ranks:
        assert max(abs(a - b) for a, b in zip(rank["losses"], single["losses"])) <= 1e-4
    total = single["local_params"]
    for rank in ranks:
        assert abs(rank["local_params"] / total - 0.5) < 0.05
        assert abs(rank["local_optimizer_numel"] / (2 * total) - 0.5) < 0.05  # exp_avg + exp_avg_sq
    # the sharded run saves one full model that loads like the single-process one
    from training.hf_io import load_hf

    a, b = load_hf(tmp_path / "one"), load_hf(tmp_path / "two")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name
