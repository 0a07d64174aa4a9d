"""Checkpoints in Hugging Face layout, so `transformers` and vLLM load ours and we load theirs.

A model dir: `config.json` (model_type llama, with num_key_value_heads), `model.safetensors`,
`generation_config.json`, and, when given, `tokenizer.json` and `cascade.json`. Our parameter
names are HF's without the `model.` prefix, so the mapping is a prefix, not a table.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.model import ModelConfig, Transformer


class CheckpointError(ValueError):
    """A model dir we cannot load; the message names the file and the field."""


def to_hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def from_hf_config(raw: dict, where: str = "config.json") -> ModelConfig:
    """Read any HF Llama-family config (Llama, SmolLM, Mistral without sliding window...)."""
    if raw.get("model_type") not in ("llama", "mistral", "qwen2"):
        raise CheckpointError(f"{where}: model_type {raw.get('model_type')!r} is not a Llama-family decoder")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in raw:
            raise CheckpointError(f"{where}: missing {key!r}")
    if raw.get("attention_bias") or raw.get("mlp_bias") or raw.get("model_type") == "qwen2":
        raise CheckpointError(f"{where}: attention/MLP biases are not supported by training/model.py")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise CheckpointError(f"{where}: rope scaling {rope_type!r} is not supported (only plain RoPE)")
    theta = raw.get("rope_theta", (rope or {}).get("rope_theta", 10000.0))
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    if head_dim * raw["num_attention_heads"] != raw["hidden_size"]:
        raise CheckpointError(f"{where}: head_dim {head_dim} x heads != hidden_size (not supported)")
    eos = raw.get("eos_token_id")
    return ModelConfig(
        vocab_size=raw["vocab_size"], dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
        n_heads=raw["num_attention_heads"], n_kv_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
        hidden_dim=raw["intermediate_size"], max_seq_len=raw.get("max_position_embeddings", 2048),
        rope_theta=float(theta), norm_eps=raw.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)), bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if model.cfg.tie_embeddings:
                continue  # tied: HF re-ties it from embed_tokens on load
            out[name] = tensor
        else:
            out["model." + name] = tensor
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_hf(model: Transformer, out_dir: str | Path, dtype: torch.dtype = torch.float32,
            tokenizer_json: str | Path | None = None, cascade_meta: dict | None = None) -> Path:
    """Write the model dir; files are written to temp names and renamed, so a crash leaves
    either the old file or the new one, never half of one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype) for k, v in hf_state_dict(model).items()}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    files = {
        "config.json": to_hf_config(model.cfg, dtype),
        "generation_config.json": {"bos_token_id": model.cfg.bos_token_id, "eos_token_id": model.cfg.eos_token_id},
    }
    if cascade_meta is not None:
        files["cascade.json"] = cascade_meta
    for name, obj in files.items():
        (out / f"{name}.tmp").write_text(json.dumps(obj, indent=1) + "\n")
        (out / f"{name}.tmp").replace(out / name)
    if tokenizer_json is not None and Path(tokenizer_json) != out / "tokenizer.json":
        (out / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    return out


def load_hf(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Load our checkpoint or any HF Llama-family dir (single or sharded safetensors)."""
    d = Path(model_dir)
    config_file = d / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{config_file}: not found; is {d} a Hugging Face model dir?")
    cfg = from_hf_config(json.loads(config_file.read_text()), str(config_file))
    # model.safetensors, or HF's shards model-00001-of-00003.safetensors; not our side files
    # such as model.fp8.safetensors.
    files = ([d / "model.safetensors"] if (d / "model.safetensors").exists()
             else sorted(d.glob("model-*-of-*.safetensors")))
    if not files:
        raise CheckpointError(f"{d}: no model.safetensors (pickle checkpoints are not loaded)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    ours = {}
    for name, tensor in state.items():
        if name.startswith("model."):
            ours[name.removeprefix("model.")] = tensor
        elif name == "lm_head.weight":
            ours[name] = tensor
        elif "rotary_emb" in name:
            continue  # old HF dumps carry the inv_freq buffer; we recompute it
        else:
            raise CheckpointError(f"{files[0].parent}: unexpected tensor {name!r}")
    if cfg.tie_embeddings:
        ours.pop("lm_head.weight", None)
    model = Transformer(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, extra = expected - set(ours), set(ours) - expected
    if missing or extra:
        raise CheckpointError(f"{d}: tensors missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    model.load_state_dict(ours, strict=False)
    return model.to(dtype)
