"""Checkpoints in Hugging Face layout, so `transformers` and vLLM load ours and we load theirs.

A model dir: `config.json` (model_type llama, with num_key_value_heads, `torch_dtype`/`dtype`
naming the saved weights' dtype), `model.safetensors`, `generation_config.json`, and, when
given, `tokenizer.json` and `cascade.json`. With a task (`cascade_meta` holding labels),
config.json also carries `id2label`/`label2id` and the task under `cascade`, and generation
stops after the label token. Our parameter names are HF's without the `model.` prefix, so the
mapping is a prefix, not a table. Files are 0644 and dirs 0755 whatever the umask: a model dir
is meant to be served by another user (a vLLM container, a shared cache).
"""

from __future__ import annotations

import json
import os
import stat
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
        # transformers 4.x, vLLM and llama.cpp's converter read torch_dtype; transformers 5 reads dtype
        "torch_dtype": dtype_name(dtype),
        "dtype": dtype_name(dtype),
    }


SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def task_fields(cascade_meta: dict) -> dict:
    """config.json's view of the task: HF's id2label/label2id and the prompt under `cascade`
    (cascade.json stays what our code reads; this copy is for tools that read config.json)."""
    labels = cascade_meta["labels"]
    keys = ("task", "prompt_template", "labels", "label_token_ids", "oos_label", "max_prompt_tokens")
    return {"id2label": {str(i): lab for i, lab in enumerate(labels)},
            "label2id": {lab: i for i, lab in enumerate(labels)},
            "cascade": {k: cascade_meta[k] for k in keys if k in cascade_meta}}


def generation_config(cfg: ModelConfig, label_token_ids: list[int] | None = None) -> dict:
    """Greedy generation ends at eos or, for a classifier, right after its label token.

    The model's own eos stays first: our engine (and HF's single-eos readers) take the first."""
    eos = cfg.eos_token_id
    if eos is not None and label_token_ids:
        eos = [eos, *label_token_ids]
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.eos_token_id}


def write_tokenizer_config(out_dir: str | Path, tokenizer_json: str | Path, cfg: ModelConfig,
                           base: dict | None = None) -> Path:
    """`tokenizer_config.json` naming `PreTrainedTokenizerFast` (a class transformers 4.x and 5,
    vLLM and llama.cpp's converter all accept; transformers 5 writes its own
    `TokenizersBackend`, which older readers reject), the special tokens and model_max_length.
    Other keys of `base` (the init model's file: chat_template, ...) are kept."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))

    def name(token_id: int | None) -> str | None:
        return tok.id_to_token(token_id) if token_id is not None else None

    out = dict(base or {})
    out.pop("auto_map", None)  # remote-code tokenizer classes do not apply to our file
    out.update({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(cfg.bos_token_id),
                "eos_token": name(cfg.eos_token_id), "model_max_length": cfg.max_seq_len})
    out["pad_token"] = out.get("pad_token") or name(cfg.eos_token_id)
    path = Path(out_dir) / "tokenizer_config.json"
    _write_json(path, out)
    return path


def make_world_readable(root: str | Path) -> None:
    """Files 0644, dirs 0755 under `root` (links left alone), whatever the umask was."""
    root = Path(root)
    root.chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                path.chmod(0o755)
            elif stat.S_ISREG(mode):
                path.chmod(0o644)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


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
    """Write the model dir, weights in `dtype` (fp32 or bf16; config.json says which); files
    are written to temp names and renamed, so a crash leaves either the old file or the new one,
    never half of one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype) for k, v in hf_state_dict(model).items()}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    config = to_hf_config(model.cfg, dtype)
    label_ids = None
    if cascade_meta is not None and "labels" in cascade_meta:
        config.update(task_fields(cascade_meta))
        label_ids = cascade_meta.get("label_token_ids")
    files = {"config.json": config, "generation_config.json": generation_config(model.cfg, label_ids)}
    if cascade_meta is not None:
        files["cascade.json"] = cascade_meta
    for name, obj in files.items():
        _write_json(out / name, obj)
    if tokenizer_json is not None and Path(tokenizer_json) != out / "tokenizer.json":
        (out / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    make_world_readable(out)
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
