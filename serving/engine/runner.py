"""The model runner: one forward pass over a scheduled step, reading and writing the paged KV cache.

All scheduled tokens of the step (prefill chunks and single decode tokens) are flattened into
one (N, C) batch, so every linear layer is one big matmul (q/k/v and gate/up fused in bf16).

Attention, on the CPU, is the C kernel of serving/engine/paged_attention.c (`attention="auto"`
where it builds, or "kernel"): every sequence of the step, decode or prefill chunk, in one call
per layer that reads K/V in place through the block tables — no gather copy, one K/V read per
GQA group, an online softmax, the masked triangle of a prefill skipped.

The torch path (no C compiler, `attention="torch"`, GPUs):
- decodes are grouped by length; their K/V are gathered through the block tables into a padded
  (B, n_kv_heads, L, D) view and two batched matmuls serve a group (GQA heads stacked as rows);
- a prefill with nothing cached attends to its own fresh K/V in causal query chunks (no gather);
- a long chunk after cached tokens gathers its context; short chunks attend in padded groups.
The weights are the plain `training.model.Transformer`'s; nothing in the model is edited.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from serving.engine import kernels
from serving.engine.scheduler import ScheduledSeq
from training.model import Transformer, rope_tables


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, D); cos/sin: (N, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large tensors from the heap and keep freed memory.

    By default every activation above the mmap threshold is a fresh mmap, and its first touch
    page-faults: measured here, a 2048-token prefill step of SmolLM2-135M took 1.9 s, half of
    it in element-wise ops (silu 7.6 ms per call instead of 0.6), and 1.0 s with this. (What
    jemalloc/tcmalloc preloading does for PyTorch on CPU, without a preload.)
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 31))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (H, T, D), k/v (K, L, D), mask (T, L) bool -> (H, T, D); scores in fp32. The query heads
    of one KV group are stacked as rows against that head's K/V, never copied per query head."""
    H, T, D = q.shape
    K = k.shape[0]
    qg = q.reshape(K, H // K * T, D)  # (K, G*T, D): heads h = kv * G + g, rows g*T + t
    scores = torch.matmul(qg, k.transpose(-1, -2)).float().view(K, H // K, T, -1) * (D ** -0.5)
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, -1).to(v.dtype).view(K, H // K * T, -1)
    return torch.matmul(p, v).view(H, T, D)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, chunk: int = 128) -> torch.Tensor:
    """Causal attention of T new queries at positions start.. over keys 0..start + T - 1 with GQA:
    q (H, T, D), k/v (K, start + T, D) -> (H, T, D).

    Queries go in chunks of `chunk`, each against only the keys it can see, so the masked upper
    triangle is mostly not computed (a 512-token prompt does 5/8 of the full T x T work). On this
    CPU this is faster than SDPA's flash kernel with GQA (3.5 ms vs 2.4 ms unchunked at T=512).
    """
    T = q.shape[1]
    outs = []
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        ctx = start + b
        mask = torch.arange(ctx, device=q.device)[None, :] <= (start + torch.arange(a, b, device=q.device))[:, None]
        outs.append(_attend(q[:, a:b], k[:, :ctx], v[:, :ctx], mask))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def pack_linear_weights(model: Transformer) -> dict[int | tuple[str, int], torch.Tensor]:
    """oneDNN's prepacked layout of every Linear weight, for bf16 on CPU (else empty).

    `F.linear` re-lays out the weight on every call; packed once, the same products (bit for
    bit) ran 1.65x faster at 64 rows (decode) and 1.2x at 2048 (prefill) here. fp32 is left
    alone: its packed path rounds differently, and fp32 is the exact-parity mode.
    """
    p = next(model.parameters())
    if p.dtype != torch.bfloat16 or p.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return {}
    try:
        packed = {id(m): torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None)
                  for m in model.modules() if isinstance(m, torch.nn.Linear)}
        # Linears that read the same input run as one GEMM: q/k/v, and gate/up. One call
        # instead of three (two) per layer, and a wider N that keeps the cores busier.
        for layer in model.layers:
            a, m = layer.self_attn, layer.mlp
            fusions = ((("qkv", id(a)), (a.q_proj, a.k_proj, a.v_proj)), (("gate_up", id(m)), (m.gate_proj, m.up_proj)))
            for key, parts in fusions:
                if all(p.bias is None for p in parts):
                    w = torch.cat([p.weight.detach() for p in parts])
                    packed[key] = torch.ops.mkldnn._reorder_linear_weight(w, None)
        return packed
    except (RuntimeError, AttributeError):  # a torch build without the op: plain F.linear
        return {}


def use_attention_kernel(attention: str, device: torch.device) -> bool:
    """Whether the runner attends with the C kernel: `attention` is EngineConfig.attention."""
    if attention == "torch" or device.type != "cpu":
        return False
    if attention == "kernel":
        kernels.load()  # raises KernelUnavailable with the compiler's message
        return True
    return kernels.paged_attention_available()


# One layer's attention for a step: (q, k, v, k_cache, v_cache, out) -> None, filling `out`.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class ModelRunner:
    def __init__(self, model: Transformer, kv: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 attention: str = "auto", kernel_chunk: int = 128, group_prefill_max: int = 64,
                 prefill_max_padding: float = 2.0):
        """The tunables are EngineConfig's (serving/engine/config.py documents them)."""
        keep_freed_memory()
        self.model = model.eval()
        self.cfg = model.cfg
        self.kv = kv
        self.block_size = block_size
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.packed = pack_linear_weights(model)
        self.group_prefill_max = group_prefill_max
        self.prefill_max_padding = prefill_max_padding
        self.attention_kernel = use_attention_kernel(attention, self.device)
        self.kernel_chunk = kernel_chunk

    def _linear(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        w = self.packed.get(id(module))
        if w is None:
            return module(x)
        return self._packed_linear(x, w)

    @staticmethod
    def _packed_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    def _gather(self, cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
        """(1, n_blocks) -> (K, length, D) contiguous context of one sequence."""
        g = cache.index_select(0, tables[0])  # (nb, K, bs, D)
        return g.transpose(0, 1).reshape(self.cfg.n_kv_heads, -1, self.cfg.head_dim)[:, :length]

    def _decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          group: dict[str, torch.Tensor]) -> torch.Tensor:
        """One query per sequence for a group of decoding sequences of similar length:
        q (B, H, D) -> (B, H, D).

        One gather through the block tables lands K (and V) directly as (B, K, L, D) — the
        cache is head-major inside a block, so indexing its (num_blocks * K) rows by
        `block * K + head` needs no transposed copy afterwards — then two batched matmuls with
        the query heads of a KV group stacked as rows, so each K/V head is read once for its
        whole group (GQA). Sequences are grouped by length before this, so the padding to the
        group's longest is small. (SDPA's CPU flash kernel spent ~3 ms per call on a one-token
        query here; a block-by-block variant spent its time in thousands of tiny GEMMs.)
        """
        B, H, D = q.shape
        K = self.cfg.n_kv_heads
        rows = group["rows"]  # (B, K, nb): row of (block, head) in the cache viewed as (num_blocks * K, bs, D)
        # index_select, not advanced indexing: much faster for this row gather on CPU (docs/engine.md)
        kb = k_cache.view(-1, self.block_size, D).index_select(0, rows.view(-1)).view(B, K, -1, D)  # (B, K, L, D)
        vb = v_cache.view(-1, self.block_size, D).index_select(0, rows.view(-1)).view(B, K, -1, D)
        qg = q.view(B, K, H // K, D)  # heads h = kv * G + g, as repeat_interleave pairs them
        scores = torch.matmul(qg, kb.transpose(-1, -2)).float() * (D ** -0.5)  # (B, K, G, L)
        scores = scores.masked_fill(~group["mask"][:, None, None, :], float("-inf"))
        p = torch.softmax(scores, -1).to(vb.dtype)
        return torch.matmul(p, vb).view(B, H, D)

    def _decode_groups(self, seqs: list[ScheduledSeq], decode: list[int], offsets: list[int],
                       group_size: int = 16) -> list[dict[str, torch.Tensor]]:
        """Decoding sequences sorted by length and cut into groups, each padded to its longest."""
        bs, dev, K = self.block_size, self.device, self.cfg.n_kv_heads
        order = sorted(decode, key=lambda i: seqs[i].start)
        groups = []
        for g in range(0, len(order), group_size):
            members = order[g:g + group_size]
            lengths = [seqs[i].start + 1 for i in members]
            nb = -(-max(lengths) // bs)
            tables = torch.zeros((len(members), nb), dtype=torch.long)
            for r, i in enumerate(members):
                t = seqs[i].block_table[: -(-lengths[r] // bs)]
                tables[r, : len(t)] = torch.tensor(t)
            rows = tables[:, None, :] * K + torch.arange(K)[None, :, None]  # (B, K, nb)
            groups.append({
                "idx": torch.tensor([offsets[i] for i in members], device=dev),
                "rows": rows.to(dev),
                "mask": (torch.arange(nb * bs)[None, :] < torch.tensor(lengths)[:, None]).to(dev),
            })
        return groups

    def _kernel_batch(self, seqs: list[ScheduledSeq], offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's block tables and per-sequence rows (see kernels.paged_attention), built
        once per step for all layers."""
        bs, piece = self.block_size, self.kernel_chunk
        tables: list[int] = []
        info = []
        for s, offset in zip(seqs, offsets):
            # A long chunk is cut into pieces of query positions, each its own work item over
            # the same block table: the kernel's threads share (sequence, KV head) items, and a
            # lone long prompt has only n_kv_heads of them (measured in docs/engine.md).
            for a in range(0, s.num_new, piece):
                info.append((offset + a, min(piece, s.num_new - a), s.start + a, len(tables)))
            tables.extend(s.block_table[: -(-(s.start + s.num_new) // bs)])
        batch = torch.tensor(tables, dtype=torch.long), torch.tensor(info, dtype=torch.long)
        kernels.check_batch(sum(s.num_new for s in seqs), self.kv[0][0].shape[0], bs, *batch)
        return batch

    def _prefill_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           group: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """Short prefill chunks of several sequences in one padded batch: the decode path's
        gather and grouped-GQA matmuls with T query rows per sequence instead of one. Writes the
        real rows into `out` (N, H, D). Padded query rows repeat their sequence's last row (so
        no row is fully masked) and are dropped at the end."""
        H, D = q.shape[1], q.shape[2]
        K = self.cfg.n_kv_heads
        B, T, L = group["mask"].shape
        rows = group["rows"]
        kb = k_cache.view(-1, self.block_size, D).index_select(0, rows.view(-1)).view(B, K, -1, D)[:, :, :L]
        vb = v_cache.view(-1, self.block_size, D).index_select(0, rows.view(-1)).view(B, K, -1, D)[:, :, :L]
        qb = q.index_select(0, group["q_idx"]).view(B, T, K, H // K, D).permute(0, 2, 3, 1, 4)  # (B, K, G, T, D)
        scores = torch.matmul(qb.reshape(B, K, -1, D), kb.transpose(-1, -2)).float().view(B, K, H // K, T, L)
        scores = scores.mul_(D ** -0.5).masked_fill_(~group["mask"][:, None, None], float("-inf"))
        p = torch.softmax(scores, -1).to(vb.dtype).view(B, K, -1, L)
        o = torch.matmul(p, vb).view(B, H, T, D).transpose(1, 2).reshape(B * T, H, D)
        out.index_copy_(0, group["out_idx"], o.index_select(0, group["valid"]))

    def _prefill_groups(self, seqs: list[ScheduledSeq], prefill: list[int], offsets: list[int],
                        max_members: int = 64) -> list[dict[str, torch.Tensor]]:
        """Prefill chunks sorted by context length and cut into groups whose padded work
        (members x longest chunk x longest context) stays within `prefill_max_padding` of their
        real work. Per-sequence attention costs ~8 small torch calls per layer, which for a batch of
        64 short classification prompts was most of the step (measured); one group costs 8."""
        bs, dev, K = self.block_size, self.device, self.cfg.n_kv_heads
        order = sorted(prefill, key=lambda i: seqs[i].start + seqs[i].num_new)
        cut: list[list[int]] = []
        for i in order:
            group = cut[-1] if cut else None
            if group is not None and len(group) < max_members:
                members = group + [i]
                ctx = [seqs[j].start + seqs[j].num_new for j in members]
                real = sum(seqs[j].num_new * c for j, c in zip(members, ctx))
                if len(members) * max(seqs[j].num_new for j in members) * max(ctx) <= self.prefill_max_padding * real:
                    group.append(i)
                    continue
            cut.append([i])
        groups = []
        for members in cut:
            news = [seqs[i].num_new for i in members]
            ctxs = [seqs[i].start + n for i, n in zip(members, news)]
            B, T, L = len(members), max(news), max(ctxs)
            nb = -(-L // bs)
            tables = torch.zeros((B, nb), dtype=torch.long)
            q_idx = torch.empty((B, T), dtype=torch.long)
            limit = torch.empty((B, T), dtype=torch.long)  # last key position each query row sees
            for r, i in enumerate(members):
                t = seqs[i].block_table[: -(-ctxs[r] // bs)]
                tables[r, : len(t)] = torch.tensor(t)
                row = torch.arange(T).clamp(max=news[r] - 1)
                q_idx[r] = offsets[i] + row
                limit[r] = seqs[i].start + row
            real = torch.arange(T)[None, :] < torch.tensor(news)[:, None]  # (B, T)
            groups.append({
                "rows": (tables[:, None, :] * K + torch.arange(K)[None, :, None]).to(dev),  # (B, K, nb)
                "q_idx": q_idx.view(-1).to(dev),
                "mask": (torch.arange(L)[None, None, :] <= limit[:, :, None]).to(dev),  # (B, T, L)
                "valid": real.view(-1).nonzero().squeeze(1).to(dev),
                "out_idx": q_idx.view(-1)[real.view(-1)].to(dev),
            })
        return groups

    def _plan_attention(self, seqs: list[ScheduledSeq], offsets: list[int]) -> Attend:
        """How this step attends, decided once for all layers: a function
        `attend(q, k, v, k_cache, v_cache, out)` that fills `out` (N, H, D) for one layer from its
        queries, the step's fresh K/V and the layer's cache (already holding this step's K/V).

        The C kernel takes every sequence in one call. The torch path serves decodes in groups
        by length, short prefill chunks in padded groups, and long chunks alone (chunked causal
        attention skips most of the masked triangle; with nothing cached, over their own K/V)."""
        if self.attention_kernel:
            paged = self._kernel_batch(seqs, offsets)

            def attend_kernel(q, k, v, k_cache, v_cache, out):
                kernels.paged_attention(q, k_cache, v_cache, *paged, out=out, checked=True)

            return attend_kernel
        bs, dev = self.block_size, self.device
        decode = [i for i, s in enumerate(seqs) if s.num_new == 1 and s.start > 0]
        prefill = [i for i, s in enumerate(seqs) if not (s.num_new == 1 and s.start > 0)]
        groups = self._decode_groups(seqs, decode, offsets) if decode else []
        short = [i for i in prefill if seqs[i].num_new <= self.group_prefill_max]
        long = [i for i in prefill if seqs[i].num_new > self.group_prefill_max]
        prefill_groups = self._prefill_groups(seqs, short, offsets) if short else []
        # Block tables of long chunks that attend to cached context.
        tables = {i: torch.tensor(seqs[i].block_table[: -(-(seqs[i].start + seqs[i].num_new) // bs)],
                                  device=dev)[None] for i in long if seqs[i].start > 0}

        def attend_torch(q, k, v, k_cache, v_cache, out):
            for group in groups:
                out.index_copy_(0, group["idx"], self._decode_attention(q.index_select(0, group["idx"]), k_cache,
                                                                         v_cache, group))
            for group in prefill_groups:
                self._prefill_attention(q, k_cache, v_cache, group, out)
            for i in long:
                s, a = seqs[i], offsets[i]
                qs = q[a:a + s.num_new].transpose(0, 1)  # (H, T, D)
                if s.start == 0:  # nothing cached: its own fresh K/V, no gather
                    ks, vs = k[a:a + s.num_new].transpose(0, 1), v[a:a + s.num_new].transpose(0, 1)
                else:
                    ctx = s.start + s.num_new
                    ks, vs = self._gather(k_cache, tables[i], ctx), self._gather(v_cache, tables[i], ctx)
                out[a:a + s.num_new] = causal_attention(qs, ks, vs, s.start).transpose(0, 1)

        return attend_torch

    @torch.inference_mode()
    def execute(self, seqs: list[ScheduledSeq]) -> torch.Tensor:
        """Run one step. Returns fp32 logits (S, vocab), on the CPU, for the sequences whose
        `samples` is True, in the order given."""
        cfg, bs, dev = self.cfg, self.block_size, self.device
        H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        tokens, positions, slots = [], [], []
        for s in seqs:
            tokens.extend(s.request.all_token_ids[s.start:s.start + s.num_new])
            pos = range(s.start, s.start + s.num_new)
            positions.extend(pos)
            slots.extend(s.block_table[p // bs] * bs + p % bs for p in pos)
        tok = torch.tensor(tokens, device=dev)
        pos_t = torch.tensor(positions, device=dev)
        # Row of each (token, kv head) in a layer's cache viewed as (num_blocks * K * bs, D).
        slot_t = torch.tensor(slots, device=dev)
        heads = torch.arange(K, device=dev)
        rows = ((slot_t // bs)[:, None] * K + heads[None, :]) * bs + (slot_t % bs)[:, None]  # (N, K)
        rows = rows.reshape(-1)
        cos, sin = rope_tables(D, pos_t, cfg.rope_theta)
        cos, sin = cos.to(self.dtype), sin.to(self.dtype)

        # Offsets of each sequence in the flat batch.
        offsets, o = [], 0
        for s in seqs:
            offsets.append(o)
            o += s.num_new
        attend = self._plan_attention(seqs, offsets)  # built once, used by every layer

        x = self.model.embed_tokens(tok)  # (N, C)
        for layer, (k_cache, v_cache) in zip(self.model.layers, self.kv):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            fused = self.packed.get(("qkv", id(attn)))
            if fused is not None:
                q, k, v = self._packed_linear(h, fused).split([H * D, K * D, K * D], dim=-1)
                q, k, v = q.view(-1, H, D), k.view(-1, K, D), v.view(-1, K, D)
            else:
                q = self._linear(attn.q_proj, h).view(-1, H, D)
                k = self._linear(attn.k_proj, h).view(-1, K, D)
                v = self._linear(attn.v_proj, h).view(-1, K, D)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            k_cache.view(-1, D).index_copy_(0, rows, k.reshape(-1, D))
            v_cache.view(-1, D).index_copy_(0, rows, v.reshape(-1, D))

            out = torch.empty_like(q)  # (N, H, D)
            attend(q, k, v, k_cache, v_cache, out)
            x = x + self._linear(attn.o_proj, out.view(-1, H * D))
            h = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            fused = self.packed.get(("gate_up", id(mlp)))
            if fused is not None:
                gate, up = self._packed_linear(h, fused).chunk(2, dim=-1)
            else:
                gate, up = self._linear(mlp.gate_proj, h), self._linear(mlp.up_proj, h)
            x = x + self._linear(mlp.down_proj, F.silu(gate) * up)

        last = [offsets[i] + s.num_new - 1 for i, s in enumerate(seqs) if s.samples]
        if not last:
            return torch.empty(0, cfg.vocab_size)
        h = self.model.norm(x[torch.tensor(last, device=dev)])
        # Sampling runs on the CPU (its per-request generators live there); a no-op on the CPU.
        return self._linear(self.model.lm_head, h).float().cpu()
