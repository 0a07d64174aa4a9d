"""Engine configuration: the KV cache and the scheduler, each a validated dataclass.

Every field has a bound checked at construction, so a bad value fails where it is set, with
the field's name, not three layers down in a tensor shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{field}: {msg}")


@dataclass
class CacheConfig:
    """The paged KV cache.

    Attributes:
        block_size: tokens per KV block (vLLM's default 16). Smaller wastes less of the last
            block per sequence; larger means fewer block-table entries to gather.
        num_blocks: blocks in the pool of every layer; None sizes the pool from `memory_gb`.
        memory_gb: KV memory budget (all layers, K and V) used when `num_blocks` is None.
        enable_prefix_caching: reuse full blocks across requests whose token prefix matches.
    """

    block_size: int = 16
    num_blocks: int | None = None
    memory_gb: float = 2.0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check(1 <= self.block_size <= 1024, "block_size", f"{self.block_size} is not in 1..1024")
        _check(self.num_blocks is None or self.num_blocks >= 1, "num_blocks", f"{self.num_blocks} < 1")
        _check(0 < self.memory_gb <= 4096, "memory_gb", f"{self.memory_gb} is not in (0, 4096]")


@dataclass
class SchedulerConfig:
    """Continuous batching.

    Attributes:
        max_num_seqs: most sequences in the running batch.
        max_num_batched_tokens: token budget of one step (prefill chunks + one per decode).
        long_prefill_chunk: a prompt longer than this is prefilled in chunks of this many
            tokens, so one long prompt cannot stall the decodes of the running batch.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    long_prefill_chunk: int = 512

    def __post_init__(self) -> None:
        _check(1 <= self.max_num_seqs <= 4096, "max_num_seqs", f"{self.max_num_seqs} is not in 1..4096")
        _check(1 <= self.max_num_batched_tokens <= 1 << 20, "max_num_batched_tokens",
               f"{self.max_num_batched_tokens} is not in 1..1048576")
        _check(1 <= self.long_prefill_chunk <= self.max_num_batched_tokens, "long_prefill_chunk",
               f"{self.long_prefill_chunk} must be in 1..max_num_batched_tokens ({self.max_num_batched_tokens})")


@dataclass
class EngineConfig:
    """Everything the engine needs besides the model dir.

    Attributes:
        dtype: "auto" (bf16 where the CPU/GPU runs it fast, else fp32), "bf16" or "fp32".
        device: where `from_model_dir` puts the model, and so the KV cache: "cpu" or "cuda"
            ("cuda:N"). On a GPU the runner attends with the torch path (the C kernel is
            CPU-only); logits come back to the CPU for sampling, where the per-request
            generators live.
        threads: torch intra-op threads (0 keeps torch's default).
        max_model_len: longest prompt + output accepted; None takes the model's max_seq_len.
        attention: how the engine attends on the CPU. "kernel": the C kernel that reads K/V in
            place through the block tables (serving/engine/paged_attention.c, built at first
            use; an error if it cannot be built); "torch": gather the blocks, then matmuls;
            "auto": the kernel where it builds, else torch.
        kernel_chunk: query positions per kernel work item; a long prefill chunk is cut into
            pieces of this many so the kernel's threads share it (docs/engine.md).
        group_prefill_max: torch path: prefill chunks up to this many tokens attend in padded
            groups; longer ones alone, with chunked causal attention.
        prefill_max_padding: torch path: a padded group's attention work may be at most this
            multiple of its real work (ops, not FLOPs, bound short prompts).
    """

    cache: CacheConfig
    scheduler: SchedulerConfig
    dtype: str = "auto"
    device: str = "cpu"
    threads: int = 0
    max_model_len: int | None = None
    attention: str = "auto"
    kernel_chunk: int = 128
    group_prefill_max: int = 64
    prefill_max_padding: float = 2.0

    def __post_init__(self) -> None:
        _check(self.dtype in ("auto", "bf16", "fp32"), "dtype", f"{self.dtype!r} is not auto, bf16 or fp32")
        _check(re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None, "device",
               f"{self.device!r} is not cpu, cuda or cuda:N")
        _check(self.threads >= 0, "threads", f"{self.threads} < 0")
        _check(self.attention in ("auto", "kernel", "torch"), "attention",
               f"{self.attention!r} is not auto, kernel or torch")
        _check(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", f"{self.max_model_len} < 2")
        _check(1 <= self.kernel_chunk <= 65536, "kernel_chunk", f"{self.kernel_chunk} is not in 1..65536")
        _check(0 <= self.group_prefill_max <= 65536, "group_prefill_max",
               f"{self.group_prefill_max} is not in 0..65536")
        _check(1.0 <= self.prefill_max_padding <= 1000.0, "prefill_max_padding",
               f"{self.prefill_max_padding} is not in 1..1000")

    @classmethod
    def default(cls, **overrides) -> EngineConfig:
        cache = {k: overrides.pop(k) for k in list(overrides) if k in CacheConfig.__dataclass_fields__}
        sched = {k: overrides.pop(k) for k in list(overrides) if k in SchedulerConfig.__dataclass_fields__}
        return cls(CacheConfig(**cache), SchedulerConfig(**sched), **overrides)
