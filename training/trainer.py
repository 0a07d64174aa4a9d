"""The training loop shared by the large model and (later) the students.

One explicit step: forward under autocast (bf16 on CPU and GPU; fp16 + GradScaler on GPU),
loss on the target positions only, backward, global-norm clipping, AdamW with decoupled weight
decay (none on norms, biases, embeddings), linear warmup then cosine decay to 10% of peak.
A spike guard skips steps whose loss is non-finite or far above the running mean and, when
that repeats, rolls back to the last checkpoint. Checkpoints (`training/checkpoint.py`:
safetensors + JSON in one process, DCP shards under torchrun; written to a temp dir and renamed,
the last K kept) restore model, optimizer, schedule position, data position and RNG, so a resumed
run repeats the uninterrupted one, and they load on another number of ranks (docs/large-model.md).

Data parallel and FSDP2 come from outside (`training/parallelize.py`): the loop only needs
`dist` helpers that are no-ops in a single process.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from cascade.cpu import has_fast_bf16
from cascade.progress import Progress
from training import checkpoint
from training.checkpoint import list_checkpoints

IGNORE = -100


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping knobs; every field is validated in __post_init__.

    Every caller in the project starts from a recipe (`TrainConfig(**LARGE)`, `**STUDENT`,
    `**SMOKE_*` in training/recipes.py: the CLI flags, `train_large`, `train_student`, the
    quickstart, the benchmarks); the field defaults below are the bare loop's, for tests that
    build a Trainer directly, and are not a recipe."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr
    warmup_steps: int = 20
    max_steps: int | None = None  # default: epochs x batches per epoch
    epochs: float = 1.0
    batch_size: int = 16  # sequences per optimizer step (over all ranks and micro-batches)
    grad_accum: int = 1  # micro-batches per step
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip_norm: float = 1.0
    precision: str = "auto"  # auto | bf16 | fp16 (GPU) | fp32; see default_precision
    eval_every: int = 0  # steps; 0 = only at the end
    ckpt_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 2
    seed: int = 0
    spike_factor: float = 3.0  # loss above factor x running mean is a spike ...
    # ... and at least this many nats above it: near the end of a fine-tune the mean is ~0.01
    # and an ordinary hard batch (0.3) is 30x it; a relative test alone rolled a Banking77 run
    # back to the same checkpoint again and again (measured, 3 epochs)
    spike_min_delta: float = 1.0
    spike_window: int = 20
    spike_min_history: int = 10
    max_consecutive_skips: int = 3  # then roll back to the last checkpoint
    log_every: int = 10
    peak_flops: float = 0.0  # for MFU / fraction-of-bound; 0 = pick by device
    bucket_batches: int = 50  # length-sort within this many batches to cut padding

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0, "min_lr_ratio": 0 <= self.min_lr_ratio <= 1, "warmup_steps": self.warmup_steps >= 0,
            "epochs": self.epochs > 0, "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
            "weight_decay": self.weight_decay >= 0, "clip_norm": self.clip_norm > 0,
            "precision": self.precision in ("auto", "bf16", "fp16", "fp32"), "keep_last": self.keep_last >= 1,
            "spike_factor": self.spike_factor > 1, "spike_min_delta": self.spike_min_delta >= 0,
            "max_consecutive_skips": self.max_consecutive_skips >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid training config: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"invalid training config: max_steps={self.max_steps}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 (cascade.cpu, the one probe): where bf16 beats fp32 on the CPU."""
    return has_fast_bf16()


def default_precision(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" made concrete for `device`; a concrete value as it is."""
    return default_precision(device) if precision == "auto" else precision


def matmul_peak(precision: str, size: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of a square matmul in the training dtype on this CPU: the bound that
    `fraction_of_peak` is measured against (a fraction of a number measured here, not a spec)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - t0)


def matmul_peaks() -> dict[str, float]:
    """fp32 and bf16 peaks, as benchmarks record them beside their figures."""
    return {"matmul_flops_fp32": matmul_peak("fp32", size=1024, repeats=5),
            "matmul_flops_bf16": matmul_peak("bf16", size=1024, repeats=5)}


# --- pure pieces (unit-tested) -------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at total_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of Linear layers only: not norms, biases or embeddings (tied head included)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and id(p) not in embedding_ids and "norm" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class SpikeGuard:
    """Decides, per step, whether a loss is sane enough to apply the update."""

    factor: float = 3.0
    window: int = 20
    min_history: int = 10
    max_consecutive: int = 3
    min_delta: float = 0.0  # nats above the mean a spike must also reach
    history: deque = field(default_factory=deque)
    consecutive: int = 0
    skipped: int = 0

    def check(self, loss: float) -> str:
        """Returns "ok", "skip" (don't apply this update) or "rollback" (too many skips in a row)."""
        mean = sum(self.history) / len(self.history) if self.history else 0.0
        spike = not math.isfinite(loss) or (
            len(self.history) >= self.min_history and loss > self.factor * mean and loss - mean >= self.min_delta
        )
        if not spike:
            self.consecutive = 0
            self.history.append(loss)
            while len(self.history) > self.window:
                self.history.popleft()
            return "ok"
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            self.consecutive = 0
            return "rollback"
        return "skip"

    def state(self) -> dict:
        return {"history": list(self.history), "consecutive": self.consecutive, "skipped": self.skipped}

    def load(self, state: dict) -> None:
        self.history = deque(state["history"])
        self.consecutive, self.skipped = state["consecutive"], state["skipped"]


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, bucket: int) -> list[list[int]]:
    """The batches of one epoch, a pure function of (seed, epoch): what makes resume exact.

    Shuffle, length-sort inside windows of `bucket` batches (less padding), shuffle batch order.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    batches = []
    window = batch_size * max(1, bucket)
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]  # equal steps; the rest is next epoch's
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


# --- data ---------------------------------------------------------------------------------


@dataclass
class Sequence:
    ids: list[int]
    targets: list[int]  # next-token target per position, IGNORE where no loss


def collate(seqs: list[Sequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad: tokens (B, T), attention mask (B, T), targets (B, T) with IGNORE on padding."""
    width = max(len(s.ids) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    targets = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.ids)
        tokens[i, :n] = torch.tensor(s.ids)
        mask[i, :n] = 1
        targets[i, :n] = torch.tensor(s.targets)
    return tokens, mask, targets


# --- distributed helpers (no-ops in one process) ------------------------------------------


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


# --- hooks --------------------------------------------------------------------------------


@dataclass
class Hooks:
    """How the loop reaches outside: evaluating the model and, under FSDP, the full model state."""

    evaluate: Callable[[], dict] | None = None  # -> {"val_accuracy": ...}
    model_state: Callable[[], dict[str, torch.Tensor]] | None = None  # full (unsharded) state


# The data position and the sampling fields it depends on: a checkpoint resumes only where the
# global batches are the same ones (any rank count or grad accumulation makes them the same way).
DATA_ORDER_FIELDS = ("batch_size", "seed", "bucket_batches")


# --- the loop ------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # per optimizer step (skipped steps included, as measured)
    log: list[dict]
    tokens_per_s: float
    wall_s: float


class Trainer:
    """Runs `cfg` over `data` for `model`; see the module docstring for what it guarantees."""

    def __init__(self, model: torch.nn.Module, data: list[Sequence], cfg: TrainConfig, out_dir: str | Path,
                 hooks: Hooks, pad_id: int, n_params: int, device: torch.device | None = None,
                 loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 batch_loss: Callable[[torch.nn.Module, list], tuple[torch.Tensor, int]] | None = None,
                 count_targets: Callable[[Sequence], int] | None = None,
                 state_hooks: Callable[[torch.nn.Module, torch.optim.Optimizer], dict] | None = None,
                 ckpt_dir: str | Path | None = None):
        """`state_hooks(model, optimizer)` returns Hooks fields for full-state access (under
        FSDP: `training.parallelize.full_state_hooks`); it is called once the optimizer exists.
        Checkpoints go to `ckpt_dir`, default `out_dir/checkpoints`."""
        self.model, self.data, self.cfg, self.hooks, self.pad_id = model, data, cfg, hooks, pad_id
        self.out = Path(out_dir)
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else self.out / "checkpoints"
        self.device = device or torch.device("cpu")
        self.rank, self.world_size = world()
        if cfg.batch_size % (self.world_size * cfg.grad_accum):
            raise ValueError(f"batch_size {cfg.batch_size} must divide by ranks x grad_accum "
                             f"({self.world_size} x {cfg.grad_accum})")
        self.micro = cfg.batch_size // (self.world_size * cfg.grad_accum)
        self.lengths = [len(s.ids) for s in data]
        self.batches_per_epoch = len(data) // cfg.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(data)} training sequences are fewer than one batch of {cfg.batch_size}")
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * self.batches_per_epoch))
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                           fused=False)
        if state_hooks is not None:
            self.hooks = replace(hooks, **state_hooks(model, self.optimizer))
        # resolved once into the trainer's own copy; the caller's config is not changed
        self.cfg = cfg = replace(cfg, precision=resolve_precision(cfg.precision, self.device))
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 + GradScaler is a GPU option; use bf16 on CPU")
        self.guard = SpikeGuard(cfg.spike_factor, cfg.spike_window, cfg.spike_min_history, cfg.max_consecutive_skips,
                                cfg.spike_min_delta)
        self.step = 0
        self.resumed_from: dict | None = None  # the JSON state of the last checkpoint loaded
        self.cursor = 0  # global batches consumed, all epochs: (epoch, index) = divmod(cursor, per epoch)
        self.n_params = n_params
        self.loss_hook = loss_hook  # (batches consumed, loss) -> loss; tests inject spikes through it
        # The objective: by default next-token loss on the target positions; students plug in
        # distillation (summed over the batch) and how many targets each example carries.
        self.batch_loss = batch_loss or self.lm_batch_loss
        self.count_targets = count_targets or (lambda s: sum(t != IGNORE for t in s.targets))
        self.log: list[dict] = []
        self.losses: list[float] = []

    # -- checkpointing --

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full model state on CPU (a collective under FSDP: call on every rank)."""
        if self.hooks.model_state:
            return self.hooks.model_state()
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def save_checkpoint(self) -> Path | None:
        """`step-NNNNNNN/` in the checkpoint dir (`training/checkpoint.py`: safetensors in one
        process, DCP shards under torchrun); a collective: call on every rank."""
        state = {"step": self.step, "cursor": self.cursor, "samples": self.cursor * self.cfg.batch_size,
                 "sequences": len(self.data), "guard": self.guard.state(), "config": asdict(self.cfg),
                 "losses": self.losses, "scaler": self.scaler.state_dict() if self.scaler else None}
        return checkpoint.save(self.ckpt_dir, self.step, self.model, self.optimizer, state, self.cfg.keep_last)

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything `save_checkpoint` wrote, from a checkpoint of any rank count.

        The data position is the cursor: global batches of `batch_size` sequences consumed, each
        rank taking its slice of every global batch, so it means the same samples on 1 or N ranks
        as long as the global batch, seed, bucketing and data are the same (checked here)."""
        state = checkpoint.read_state(path)
        saved = state.get("config", {})
        bad = [f"{k}={saved[k]!r} (now {getattr(self.cfg, k)!r})" for k in DATA_ORDER_FIELDS
               if k in saved and saved[k] != getattr(self.cfg, k)]
        if state.get("sequences", len(self.data)) != len(self.data):
            bad.append(f"{state['sequences']} training sequences (now {len(self.data)})")
        if bad:
            raise ValueError(f"{path}: written with {', '.join(bad)}; its data position (global batches "
                             f"consumed) means other samples in this run; resume with the same global "
                             f"--batch-size, seed and data (any number of ranks)")
        checkpoint.load(path, self.model, self.optimizer)
        self.step, self.cursor = state["step"], state["cursor"]
        self.guard.load(state["guard"])
        self.losses = state["losses"]
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.resumed_from = state

    def resume_latest(self) -> bool:
        ckpts = list_checkpoints(self.ckpt_dir)
        if not ckpts:
            return False
        self.load_checkpoint(ckpts[-1])
        return True

    # -- one step --

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def _next_batch(self) -> list[int]:
        epoch, index = divmod(self.cursor, self.batches_per_epoch)
        batches = self._epoch_cache.get(epoch)
        if batches is None:
            batches = epoch_batches(self.lengths, self.cfg.batch_size, self.cfg.seed, epoch, self.cfg.bucket_batches)
            self._epoch_cache = {epoch: batches}
        self.cursor += 1
        return batches[index]

    def lm_batch_loss(self, model, seqs: list[Sequence]) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over the target positions, and the real tokens seen."""
        tok, mask, tgt = collate(seqs, self.pad_id)
        tok, mask, tgt = tok.to(self.device), mask.to(self.device), tgt.to(self.device)
        sel = tgt != IGNORE
        logits = model(tok, attention_mask=mask, logits_at=sel)
        return torch.nn.functional.cross_entropy(logits.float(), tgt[sel], reduction="sum"), int(mask.sum())

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step; returns (loss, grad norm, real tokens processed on this rank)."""
        batch = self._next_batch()
        # This rank's share of the global batch, then split into micro-batches.
        mine = batch[self.rank * self.cfg.batch_size // self.world_size:
                     (self.rank + 1) * self.cfg.batch_size // self.world_size]
        seqs = [self.data[i] for i in mine]
        n_targets = torch.tensor(float(sum(self.count_targets(s) for s in seqs)))
        global_targets = all_reduce_sum(n_targets.clone()).item()
        loss_sum = torch.zeros(())
        tokens = 0
        self.model.train()
        for m in range(self.cfg.grad_accum):
            with self._autocast():
                loss, n_tokens = self.batch_loss(self.model, seqs[m * self.micro:(m + 1) * self.micro])
            if self.loss_hook is not None:
                loss = self.loss_hook(self.cursor, loss)
            # Normalise by the global target count (not per rank), times world size because the
            # gradient reduction averages over ranks: the same update as one process would make.
            scaled = loss * self.world_size / max(global_targets, 1.0)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach().cpu()
            tokens += n_tokens
        total_loss = all_reduce_sum(loss_sum).item() / max(global_targets, 1.0)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        return total_loss, grad_norm, tokens

    # -- the loop --

    def fit(self, resume: bool = False, progress: bool = True) -> TrainResult:
        self._epoch_cache: dict[int, list[list[int]]] = {}
        if resume and self.resume_latest() and self.rank == 0:
            saved = self.resumed_from["world_size"]
            moved = f" (written by {saved} rank(s), now {self.world_size})" if saved != self.world_size else ""
            print(f"resumed from step {self.step}{moved}", file=sys.stderr)
        peak = self.cfg.peak_flops or (989e12 if self.device.type == "cuda" else matmul_peak(self.cfg.precision))
        bar = Progress(self.total_steps, "train", "step", enabled=progress and self.rank == 0, initial=self.step)
        t_start = time.perf_counter()
        window_tokens, window_t0 = 0, time.perf_counter()
        all_tokens = 0
        while self.step < self.total_steps:
            lr = lr_at(self.step, self.cfg, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm, tokens = self.train_step()
            tokens = int(all_reduce_sum(torch.tensor(float(tokens))).item())
            window_tokens += tokens
            all_tokens += tokens
            verdict = self.guard.check(loss)
            if verdict == "ok":
                if self.scaler:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if verdict == "rollback":
                ckpts = list_checkpoints(self.ckpt_dir)
                if not ckpts:
                    raise RuntimeError(f"loss spiked {self.cfg.max_consecutive_skips} steps in a row at step "
                                       f"{self.step} and there is no checkpoint to roll back to")
                cursor = self.cursor  # keep moving through the data: the batches that spiked stay skipped
                skipped = self.guard.skipped  # and keep counting every skip, across rollbacks
                self.load_checkpoint(ckpts[-1])
                self.cursor, self.guard.skipped = cursor, skipped
                self._log({"step": self.step, "rollback_to": ckpts[-1].name, "cursor": cursor})
                if self.rank == 0:
                    print(f"rolled back to {ckpts[-1].name} after repeated loss spikes", file=sys.stderr)
                continue
            self.losses.append(loss)
            self.step += 1
            bar.update(1, loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                dt = time.perf_counter() - window_t0
                tps = window_tokens / dt if dt > 0 else 0.0
                flops = 6.0 * self.n_params * tps
                entry = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                         "model_flops_per_s": flops, "fraction_of_peak": flops / peak, "skipped": self.guard.skipped,
                         "epoch": self.cursor / self.batches_per_epoch}
                self._log(entry)
                window_tokens, window_t0 = 0, time.perf_counter()
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.total_steps:
                self._evaluate()
            if self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        wall = time.perf_counter() - t_start
        self._evaluate()
        self.save_checkpoint()
        self._plot_loss()
        return TrainResult(self.step, self.losses, self.log, all_tokens / wall if wall > 0 else 0.0, wall)

    def _evaluate(self) -> None:
        if self.hooks.evaluate is None:
            return
        result = self.hooks.evaluate()
        self._log({"step": self.step, **result})

    def _plot_loss(self) -> None:
        """`train_loss.png` beside `train_log.jsonl` (the whole log, resumed runs included)."""
        log_path = self.out / "train_log.jsonl"
        if self.rank != 0 or not log_path.exists():
            return
        from cascade.plots import loss_curve_png

        try:
            loss_curve_png(log_path)
        except Exception as exc:  # a figure is not worth failing a finished run over
            print(f"loss curve not drawn: {exc}", file=sys.stderr)

    def _log(self, entry: dict) -> None:
        self.log.append(entry)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / "train_log.jsonl").open("a") as f:
                f.write(json.dumps(entry) + "\n")
