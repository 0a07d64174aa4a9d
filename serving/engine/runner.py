"""The model runner: one forward pass over a scheduled step, reading and writing the paged KV cache.

All scheduled tokens of the step (prefill chunks and single decode tokens) are flattened into
one (N, C) batch, so every linear layer is one big matmul. Attention is per kind of sequence:
- decodes (one new token each) are batched: their K/V are gathered through the block tables
  into a padded (B, n_kv_heads, L, D) view and one SDPA call serves them all (GQA heads shared);
- a prefill with nothing cached attends to its own fresh K/V with a causal SDPA (no gather);
- a prefill chunk after cached tokens (a later chunk, or a prefix-cache hit) gathers its
  context from the cache and attends with an offset causal mask.
The weights are the plain `training.model.Transformer`'s; nothing in the model is edited.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serving.engine.scheduler import ScheduledSeq
from training.model import Transformer, rope_tables


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, D); cos/sin: (N, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class ModelRunner:
    def __init__(self, model: Transformer, kv: list[tuple[torch.Tensor, torch.Tensor]], block_size: int):
        self.model = model.eval()
        self.cfg = model.cfg
        self.kv = kv
        self.block_size = block_size
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    def _gather(self, cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
        """(B, n_blocks) block ids -> (B, K, length, D) K or V through the block tables."""
        B = tables.shape[0]
        g = cache[tables]  # (B, nb, bs, K, D)
        g = g.view(B, -1, self.cfg.n_kv_heads, self.cfg.head_dim)[:, :length]
        return g.transpose(1, 2)

    @torch.inference_mode()
    def execute(self, seqs: list[ScheduledSeq]) -> torch.Tensor:
        """Run one step. Returns fp32 logits (S, vocab) for the sequences whose `samples` is
        True, in the order given."""
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
        slot_t = torch.tensor(slots, device=dev)
        cos, sin = rope_tables(D, pos_t, cfg.rope_theta)
        cos, sin = cos.to(self.dtype), sin.to(self.dtype)

        # Offsets of each sequence in the flat batch; decodes are served together.
        offsets, o = [], 0
        for s in seqs:
            offsets.append(o)
            o += s.num_new
        decode = [i for i, s in enumerate(seqs) if s.num_new == 1 and s.start > 0]
        prefill = [i for i, s in enumerate(seqs) if not (s.num_new == 1 and s.start > 0)]
        if decode:
            d_idx = torch.tensor([offsets[i] for i in decode], device=dev)
            d_len = torch.tensor([seqs[i].start + 1 for i in decode], device=dev)
            d_max = int(d_len.max())
            nb = -(-d_max // bs)
            d_tables = torch.zeros((len(decode), nb), dtype=torch.long, device=dev)
            for r, i in enumerate(decode):
                t = seqs[i].block_table[:nb]
                d_tables[r, : len(t)] = torch.tensor(t)
            d_mask = (torch.arange(d_max, device=dev)[None, :] < d_len[:, None])[:, None, None, :]  # (B,1,1,L)

        x = self.model.embed_tokens(tok)  # (N, C)
        for layer, (k_cache, v_cache) in zip(self.model.layers, self.kv):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(-1, H, D)
            k = attn.k_proj(h).view(-1, K, D)
            v = attn.v_proj(h).view(-1, K, D)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            k_cache.view(-1, K, D).index_copy_(0, slot_t, k)
            v_cache.view(-1, K, D).index_copy_(0, slot_t, v)

            out = torch.empty_like(q)  # (N, H, D)
            if decode:
                qd = q[d_idx][:, :, None, :]  # (B, H, 1, D)
                kd = self._gather(k_cache, d_tables, d_max)
                vd = self._gather(v_cache, d_tables, d_max)
                yd = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=d_mask, enable_gqa=True)
                out[d_idx] = yd[:, :, 0, :]
            for i in prefill:
                s, a = seqs[i], offsets[i]
                qs = q[a:a + s.num_new].transpose(0, 1)[None]  # (1, H, T, D)
                if s.start == 0:
                    ks = k[a:a + s.num_new].transpose(0, 1)[None]
                    vs = v[a:a + s.num_new].transpose(0, 1)[None]
                    y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                else:
                    ctx = s.start + s.num_new
                    table = torch.tensor(s.block_table[: -(-ctx // bs)], device=dev)[None]
                    ks, vs = self._gather(k_cache, table, ctx), self._gather(v_cache, table, ctx)
                    # query i (at position start + i) sees keys 0..start + i
                    mask = (torch.arange(ctx, device=dev)[None, :]
                            <= (s.start + torch.arange(s.num_new, device=dev))[:, None])
                    y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[None, None], enable_gqa=True)
                out[a:a + s.num_new] = y[0].transpose(0, 1)
            x = x + attn.o_proj(out.view(-1, H * D))
            x = x + layer.mlp(layer.post_attention_layernorm(x))

        last = [offsets[i] + s.num_new - 1 for i, s in enumerate(seqs) if s.samples]
        if not last:
            return torch.empty(0, cfg.vocab_size)
        h = self.model.norm(x[torch.tensor(last, device=dev)])
        return self.model.lm_head(h).float()
