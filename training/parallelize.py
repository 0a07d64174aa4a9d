"""Parallelism applied to a plain model from outside (torchtitan style): model.py never changes.

FSDP2 (`fully_shard`, ZeRO-3): every transformer block is its own unit, so only one block's full
parameters exist at a time during forward/backward; the root unit holds embeddings, final norm
and head. Parameters compute in `param_dtype` and gradients reduce in fp32. The same code runs
gloo ranks on CPU (tests) and NCCL ranks on GPUs. Checkpoints of a sharded run are sharded too
and load on any number of ranks (`training/checkpoint.py`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun set up (if any); returns (rank, world size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world_size, torch.device("cuda", local)
    return rank, world_size, torch.device("cpu")


def shutdown_distributed() -> None:
    """Leave the process group together: every rank waits at a barrier (rank 0 may still be
    writing the model), then destroys the group, instead of exiting while its peers still hold
    gloo connections: the likely cause of an intermittent SIGABRT of rank 1 in the two-rank
    test (not reproduced in isolation, so not proven)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def apply_fsdp(model: torch.nn.Module, device: torch.device, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype
          else MixedPrecisionPolicy())
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def full_state_hooks(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full (unsharded) model state on rank 0's CPU, for the final model dir; a collective:
    call on every rank. Checkpoints do not gather: `training/checkpoint.py` writes each rank's
    shards with torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model_state": lambda: get_model_state_dict(model, options=full)}


def local_numel(model: torch.nn.Module) -> int:
    """Parameter elements this rank holds (its shards under FSDP)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel()
    return total
