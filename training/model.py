"""The large model: a Llama-architecture decoder with grouped-query attention, in one file.

RMSNorm -> attention (RoPE, GQA: `n_kv_heads` K/V heads shared by groups of query heads) ->
RMSNorm -> SwiGLU MLP, with residuals; optional tied input/output embeddings. Weight names follow
Hugging Face's `LlamaForCausalLM` one for one (see `training/hf_io.py`), so checkpoints move
between the two without renaming tricks.

Shapes: B batch, T sequence, C = dim, H query heads, K kv heads, D = head_dim = C / H.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    hidden_dim: int = 1536  # SwiGLU inner width
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


# Named sizes. "debug" is for tests; "smollm2-135m" matches SmolLM2-135M's shape (the
# pre-trained starting point); the larger ones are for GPUs.
SIZES: dict[str, ModelConfig] = {
    "debug": ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                         max_seq_len=256),
    "tiny": ModelConfig(vocab_size=8192, dim=256, n_layers=6, n_heads=8, n_kv_heads=2, hidden_dim=704,
                        max_seq_len=1024),
    "smollm2-135m": ModelConfig(),
    "smollm2-360m": ModelConfig(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560),
    "1b": ModelConfig(vocab_size=49152, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                      rope_theta=500000.0, max_seq_len=4096),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 variance loses too much), cast back before the scale, as HF does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (T, D) for the given positions (the "rotate half" layout HF uses)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, D); rotate pairs (i, i + D/2) by the position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.o_proj._is_residual_out = True

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA: each K/V head serves H/K query heads. SDPA's enable_gqa avoids materialising copies.
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.down_proj._is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Decoder-only LM. `forward(tokens)` -> logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 style: N(0, 0.02); output projections scaled down by depth so residuals stay O(1).
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "_is_residual_out", False):
                std /= math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            tokens: (B, T) token ids.
            attention_mask: optional (B, T) 1 for real tokens, 0 for padding (left or right).
            positions: optional (T,) positions; default 0..T-1. With a padding mask and no
                positions, each row's positions count its real tokens only (as HF does).
            logits_at: optional (B, T) bool mask: compute logits only there. The vocabulary
                projection is the costliest matmul of a small model; training on label tokens
                and scoring the answer position need it at a few positions only.
        Returns:
            logits (B, T, vocab), or (N, vocab) for the N positions of `logits_at`.
        """
        B, T = tokens.shape
        x = self.embed_tokens(tokens)
        mask = None
        if attention_mask is None:
            pos = positions if positions is not None else torch.arange(T, device=tokens.device)
            cos, sin = rope_tables(self.cfg.head_dim, pos, self.cfg.rope_theta)  # (T, D)
        else:
            am = attention_mask.bool()
            pos = (am.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            cos, sin = rope_tables(self.cfg.head_dim, pos.reshape(-1), self.cfg.rope_theta)
            cos, sin = cos.view(B, 1, T, -1), sin.view(B, 1, T, -1)
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
            mask = causal[None, None] & am[:, None, None, :]  # (B, 1, T, T)
            # A fully padded query row would give NaN; let it see itself (its output is unused).
            mask = mask | torch.eye(T, dtype=torch.bool, device=tokens.device)[None, None]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        x = self.norm(x)
        if logits_at is not None:
            x = x[logits_at]  # (N, C)
        return self.lm_head(x)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n


def build_model(size: str | ModelConfig, **overrides) -> Transformer:
    cfg = size if isinstance(size, ModelConfig) else SIZES[size]
    # Always a copy: the model owns its config (resizing for label tokens edits vocab_size),
    # and the named sizes must stay as they are for the next model.
    cfg = ModelConfig(**{**cfg.to_dict(), **overrides})
    model = Transformer(cfg)
    return model
