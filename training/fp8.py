"""FP8 inference, the Llama 3 recipe, applied to a plain model from outside (a converter).

Row-wise e4m3 weights (one scale per output row), dynamic row-wise activation scales (one per
token, computed at run time) with the activation amax capped at 1200 so a rare outlier token
cannot crush the resolution of the rest, feed-forward layers only (attention stays in
bf16/fp32), and the first and last transformer blocks left unconverted: they are the most
sensitive (Llama 3 paper, section 6.2). The matmul is `torch._scaled_mm`, which runs on CUDA
(Hopper) and, in torch 2.13, on CPU; torchao's float8 training converter is not used because
this is inference-only and the row-wise `_scaled_mm` path is all it needs.

Works on the large model and on students (both are built from `training.model.Block`).
"""

from __future__ import annotations

import torch
from torch import nn

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
ACTIVATION_AMAX_CAP = 1200.0


def quantize_rowwise(t: torch.Tensor, amax_cap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) -> (e4m3 values, fp32 scale per row) with t ≈ values * scale."""
    amax = t.abs().amax(dim=-1, keepdim=True).float()
    if amax_cap is not None:
        amax = amax.clamp(max=amax_cap)
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    q = (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


class Fp8Linear(nn.Module):
    """A bias-free Linear whose weight lives in e4m3 with row-wise scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Fp8Linear converts bias-free Linear layers only")
        q, scale = quantize_rowwise(linear.weight.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_fp8", q)  # (out, in)
        self.register_buffer("weight_scale", scale)  # (out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        xq, xs = quantize_rowwise(x2, ACTIVATION_AMAX_CAP)  # dynamic: one scale per token
        out_dtype = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale.t(), out_dtype=out_dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def convert_to_fp8(model: nn.Module) -> list[str]:
    """Swap the MLP Linears of every block but the first and last; returns the converted names."""
    layers = model.layers
    converted = []
    for i, block in enumerate(layers):
        if i == 0 or i == len(layers) - 1:
            continue
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(block.mlp, name, Fp8Linear(getattr(block.mlp, name)))
            converted.append(f"layers.{i}.mlp.{name}")
    return converted


def fp8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The converted weights and scales, for safetensors (which stores float8_e4m3fn)."""
    return {k: v.contiguous() for k, v in model.state_dict().items() if "weight_fp8" in k or "weight_scale" in k}
