"""Training checkpoints: the one owner of their formats on disk. Either format loads on any
number of ranks, so a run can stop on 2 ranks and go on in 1 process, or the other way round.

A checkpoint is a folder `step-NNNNNNN/` in the run's checkpoint dir, written whole into
`.tmp-step-NNNNNNN/` and renamed (it exists complete or not at all); the last K are kept.
The format follows how the run was launched:

- "full" (one process, no torch.distributed), unchanged from before sharding came:
  `train_model.safetensors` (the model; a tied weight stored once), `optimizer.safetensors`
  (AdamW moments keyed `param_index/name`, plus `rng/torch` and, on GPU, `rng/cuda`) and
  `trainer_state.json` (the rest, with the python RNG and the optimizer's param groups).
- "sharded" (torchrun, world > 1): `sharded/` is a torch.distributed.checkpoint (DCP) folder,
  one `__R_0.distcp` per rank with that rank's FSDP2 shards of {"model", "optim"} (FQN keys,
  the optimizer flattened as torchtitan does) and `.metadata`, DCP's index of which bytes hold
  which slice of which tensor; `rng/rank-RRRRR.safetensors` per rank (torch, CUDA, python
  generator states); `trainer_state.json` from rank 0. No rank holds the full state at any time.
  (DCP's `.metadata` and the few non-tensor values in `.distcp` are pickled by DCP itself;
  the model dir a run ends with is always plain safetensors.)

Loading reshards:
- sharded -> any world: `dcp.load` into this run's own state dict (DTensor shards under FSDP,
  whole tensors in one process, without a process group), each rank reading only the bytes of
  its slices, then `set_state_dict`.
- full -> world > 1: every rank reads the safetensors (memory-mapped); `set_state_dict` with
  `full_state_dict=True` keeps its slice. The optimizer's param-index keys become FQNs by
  parameter order (the same `param_groups(model)` order on both sides).
- full -> one process: `load_state_dict`, as always.

RNG: a rank restores its own generator states, saved rank r -> rank r; a rank the saved run
did not have takes rank 0's (all ranks of a run start from the same seed). Which random
numbers a rank draws depends on the samples it holds, so random streams (dropout, sampling)
cannot repeat across rank counts; the Llama here draws none during training.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

FULL, SHARDED = "full", "sharded"
STATE_FILE = "trainer_state.json"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints in `ckpt_dir`, oldest first."""
    return sorted(p for p in Path(ckpt_dir).glob("step-*") if p.is_dir() and (p / STATE_FILE).exists())


def read_state(path: Path) -> dict:
    """The JSON part of a checkpoint (step, data position, spike guard, losses, config, format)."""
    state = json.loads((Path(path) / STATE_FILE).read_text())
    state.setdefault("format", FULL)  # written before sharded checkpoints existed
    state.setdefault("world_size", 1)
    return state


# --- save ----------------------------------------------------------------------------------


def save(ckpt_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         keep_last: int) -> Path | None:
    """Write `step-NNNNNNN/` (a collective under torch.distributed: call on every rank).

    Args:
        state: JSON-able trainer state (step, cursor, ...); the format's own keys are added.
        keep_last: older complete checkpoints beyond this many are removed.
    Returns:
        The checkpoint's path on rank 0, None on the other ranks.
    """
    rank, world_size = _world()
    ckpt_dir = Path(ckpt_dir)
    final, tmp = ckpt_dir / f"step-{step:07d}", ckpt_dir / f".tmp-step-{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = {**state, "world_size": world_size}
    if world_size == 1:
        state.update(_save_full(tmp, model, optimizer), format=FULL)
    else:
        _save_sharded(tmp, model, optimizer, rank)
        state["format"] = SHARDED
    _barrier()  # every rank's files are on disk before the checkpoint is declared whole
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # the atomic step
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old)
    _barrier()
    return final if rank == 0 else None


def _save_full(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    # Tied weights are one tensor under two names; safetensors wants each stored once.
    unique, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen or v.numel() == 0:
            unique[k] = v.detach().cpu().contiguous()
            seen.add(v.data_ptr())
    save_file(unique, str(tmp / "train_model.safetensors"))
    tensors, meta = _flatten_optim(optimizer.state_dict())
    tensors.update({f"rng/{k}": v for k, v in _rng_tensors().items() if k != "python"})
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    return {"optimizer": meta, "python_rng": list(random.getstate()[1])}


def _save_sharded(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd = _sharded_state(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "sharded"))
    (tmp / "rng").mkdir(exist_ok=True)
    save_file(_rng_tensors(), str(tmp / "rng" / f"rank-{rank:05d}.safetensors"))


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """This rank's state dicts (DTensor shards under FSDP): what DCP writes and reads into."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_flat_options())


def _flat_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _flatten_optim(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state dict -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for key, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{key}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{key}/{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        key, name = flat.rsplit("/", 1)
        key = int(key) if key.isdigit() else key
        state.setdefault(key, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# --- RNG -----------------------------------------------------------------------------------


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state(), "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _restore_rng(torch_state: torch.Tensor, python_state: list[int], cuda_state: torch.Tensor | None) -> None:
    torch.set_rng_state(torch_state)
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)
    py = random.getstate()
    random.setstate((py[0], tuple(int(x) for x in python_state), py[2]))


# --- load ----------------------------------------------------------------------------------


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG from `path`, whatever rank count wrote it
    (a collective under torch.distributed). Returns the JSON state (see `read_state`)."""
    path = Path(path)
    state = read_state(path)
    rank, world_size = _world()
    if state["format"] == SHARDED:
        _load_sharded(path, model, optimizer, world_size)
        rng_dir = path / "rng"
        mine = rng_dir / f"rank-{rank:05d}.safetensors"
        rng = load_file(str(mine if mine.exists() else rng_dir / "rank-00000.safetensors"))
        _restore_rng(rng["torch"], rng["python"].tolist(), rng.get("cuda"))
    else:
        tensors = load_file(str(path / "optimizer.safetensors"))
        rng_torch, rng_cuda = tensors.pop("rng/torch"), tensors.pop("rng/cuda", None)
        _load_full(path, model, optimizer, _unflatten_optim(tensors, state["optimizer"]), world_size)
        _restore_rng(rng_torch, state["python_rng"], rng_cuda)
    return state


def _load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_sd, optim_sd = _sharded_state(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():  # one process on purpose: DCP warns that it has no process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=str(path / "sharded"), no_dist=world_size == 1)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=_flat_options())


def _load_full(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, optim_sd: dict,
               world_size: int) -> None:
    model_sd = _with_tied_names(load_file(str(path / "train_model.safetensors")), model)
    if world_size == 1:
        try:
            model.load_state_dict(model_sd)
        except RuntimeError as exc:
            raise RuntimeError(f"{path}: checkpoint does not fit the model: {exc}") from exc
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=full)
    set_optimizer_state_dict(model, optimizer, _fqn_keyed(optim_sd, model, optimizer), options=full)


def _with_tied_names(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Put back the names of a tied weight stored once (the tied head: `lm_head.weight`)."""
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    for names in names_of.values():
        stored = [n for n in names if n in state]
        for name in names:
            if stored and name not in state:
                state[name] = state[stored[0]]
    return state


def _fqn_keyed(optim_sd: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Param-index keys (torch's `optimizer.state_dict()`) -> parameter names, which is what
    `set_optimizer_state_dict` matches on; index i is the i-th parameter of `param_groups`.
    (A full checkpoint from a sharded run of the older code is keyed by name already.)"""
    if not all(isinstance(k, int) for k in optim_sd["state"]):
        return optim_sd
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {names[int(k)]: v for k, v in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_sd["param_groups"]]}
