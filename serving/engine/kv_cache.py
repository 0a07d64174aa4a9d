"""The paged KV cache: a pool of fixed-size blocks per layer, and the manager that hands them out.

Memory: every layer owns one preallocated K tensor and one V tensor of shape
(num_blocks, n_kv_heads, block_size, head_dim) (each head's tokens contiguous inside a block,
so attention reads a block as one (block_size, head_dim) matrix): GQA models store their `n_kv_heads`, not
`n_heads`, so SmolLM2-135M (9 query heads, 3 KV heads) keeps a third of what MHA would.

Bookkeeping (`BlockPool`, `KVCacheManager`) never touches those tensors: it deals in block ids.
A sequence's blocks are listed in its block table; a block's `ref_cnt` counts the sequences
using it. Full blocks are hashed by (parent block's hash, their tokens) so a block's hash names
its whole prefix: a later request whose prompt starts with the same tokens finds them and skips
their computation (prefix caching). A block whose count falls to zero goes to the free queue
but keeps its contents and hash until it is reused: free blocks are evicted least recently
used first. The scheduler sees none of this; it gets a `KVCacheBlocks` back, or None when the
pool is out of blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V, every layer: 2 * layers * n_kv_heads * head_dim * bytes per element."""
    return 2 * n_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def allocate_kv_tensors(n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                        dtype: torch.dtype,
                        device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (K, V) pair per layer, each (num_blocks, n_kv_heads, block_size, head_dim), zeroed."""
    shape = (num_blocks, n_kv_heads, block_size, head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(n_layers)]


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set once the block is full and registered for prefix reuse
    tokens: tuple[int, ...] = ()  # the tokens of a hashed block, checked on every hit


class BlockPool:
    """Block ids with reference counts, an LRU free queue and the prefix-hash index."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks: {num_blocks} < 1")
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: the first is the least recently freed. Blocks freed with
        # a hash stay findable until popped from here.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.enable_caching = enable_caching
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self, n: int) -> list[Block]:
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            block = self.blocks[self.free_queue.popitem(last=False)[0]]
            if block.block_hash is not None:  # evict: its contents are about to be overwritten
                if self.cached.get(block.block_hash) == block.block_id:
                    del self.cached[block.block_hash]
                block.block_hash, block.tokens = None, ()
                self.evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[Block]) -> None:
        """Take a reference on cached blocks (a prefix hit); a free one leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: list[Block]) -> None:
        """Drop one reference each; blocks reaching zero join the free queue's recent end."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} released more often than taken")
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = None

    def lookup(self, block_hash: int, tokens: tuple[int, ...]) -> Block | None:
        block_id = self.cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        return block if block.tokens == tokens else None  # a hash collision is a miss, not wrong K/V

    def register(self, block: Block, block_hash: int, tokens: tuple[int, ...]) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return  # an identical block is already indexed (computed twice in one step); keep that one
        block.block_hash, block.tokens = block_hash, tokens
        self.cached[block_hash] = block.block_id


@dataclass
class KVCacheBlocks:
    """What the scheduler gets from `allocate_slots`: the block ids added for a request."""

    block_ids: list[int] = field(default_factory=list)


class KVCacheManager:
    """Per-request block tables over one `BlockPool`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_hashes: dict[str, list[int]] = {}
        self.prefix_hits_tokens = 0
        self.prefix_queries_tokens = 0

    # --- lookups ---------------------------------------------------------------------------

    def get_computed_blocks(self, tokens: list[int]) -> tuple[list[Block], int]:
        """Cached full blocks that start `tokens`, and how many tokens they cover. At least the
        last token is always left to compute: its logits are what the request needs next."""
        if not self.enable_prefix_caching:
            return [], 0
        hits: list[Block] = []
        parent = None
        max_blocks = (len(tokens) - 1) // self.block_size
        for b in range(max_blocks):
            chunk = tuple(tokens[b * self.block_size:(b + 1) * self.block_size])
            parent = hash((parent, chunk))
            block = self.pool.lookup(parent, chunk)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_lookup(self, num_tokens: int, num_cached: int) -> None:
        """Count an admitted request's lookup (not every retry while it waits for blocks)."""
        self.prefix_queries_tokens += num_tokens
        self.prefix_hits_tokens += num_cached

    def reset_prefix_cache(self) -> None:
        """Forget every cached block's contents (after a failed step wrote some K/V partially)."""
        self.pool.cached.clear()
        for block in self.pool.blocks:
            block.block_hash, block.tokens = None, ()
        for hashes in self.req_hashes.values():
            hashes.clear()

    def block_table(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(req_id, [])]

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return len(self.pool.blocks) - self.pool.num_free

    # --- allocation ------------------------------------------------------------------------

    def allocate_slots(self, req_id: str, tokens: list[int], num_computed: int, num_new: int,
                       computed_blocks: list[Block] | None = None) -> KVCacheBlocks | None:
        """Make room for `num_new` more tokens of a request that has `num_computed` in cache.

        Args:
            req_id: the request.
            tokens: all of its tokens known so far (prompt + output), for hashing full blocks.
            num_computed: tokens already in its blocks (including `computed_blocks`).
            num_new: tokens this step computes.
            computed_blocks: prefix-cache hits to attach (first allocation only).

        Returns:
            The new block ids, or None if the pool cannot supply them (nothing is changed then).
        """
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.setdefault(req_id, [])
        total = -(-(num_computed + num_new) // self.block_size)
        need = total - len(blocks) - len(computed_blocks)
        # Hits sitting in the free queue are taken out of it by `touch`: they are not free for us.
        reclaimed = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if need > self.pool.num_free - reclaimed:
            if not blocks:
                del self.req_blocks[req_id]
            return None
        self.pool.touch(computed_blocks)
        blocks.extend(computed_blocks)
        new = self.pool.allocate(max(0, need))
        blocks.extend(new)
        self._register_full_blocks(req_id, tokens, num_computed + num_new)
        return KVCacheBlocks([b.block_id for b in computed_blocks + new])

    def _register_full_blocks(self, req_id: str, tokens: list[int], num_tokens: int) -> None:
        """Index the blocks that this step fills, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        hashes = self.req_hashes.setdefault(req_id, [])
        full = min(num_tokens, len(tokens)) // self.block_size
        parent = hashes[-1] if hashes else None
        blocks = self.req_blocks[req_id]
        for b in range(len(hashes), full):
            chunk = tuple(tokens[b * self.block_size:(b + 1) * self.block_size])
            parent = hash((parent, chunk))
            hashes.append(parent)
            self.pool.register(blocks[b], parent, chunk)

    def free(self, req_id: str) -> None:
        """Release a finished or preempted request's blocks, tail first, so that under memory
        pressure the ends of sequences are evicted before the prefixes others may share."""
        blocks = self.req_blocks.pop(req_id, [])
        self.req_hashes.pop(req_id, None)
        self.pool.release(list(reversed(blocks)))
