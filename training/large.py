"""`cascade train large`: fine-tune a pre-trained decoder (or pretrain one) as the task's large model.

Fine-tuning (`--init smollm2-135m | HF_DIR`) reuses the init model's tokenizer, adds one token
per label and trains on the label token only. From scratch, a byte-level BPE tokenizer is trained
on the task's texts, the model is sized by name or by the planner (`--size auto`), and the loss
covers every token. The result is a Hugging Face model dir with `cascade.json` (the task format).

Layout: OUT holds what is served and nothing else (weights in `--save-dtype`, configs, tokenizer,
`cascade.json`, the run's summary and log); the training checkpoints live beside it, in
`OUT.checkpoints/` (or `--checkpoint-dir`), which `--resume` reads. A run that started before
this layout resumes from `OUT/checkpoints/` and keeps writing there.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer

from cascade.data import load_labels, load_split
from training.hf_io import SAVE_DTYPES, load_hf, make_world_readable, save_hf, write_tokenizer_config
from training.model import SIZES, Transformer, build_model
from training.recipes import LARGE
from training.task import (
    FIELDS_CUE,
    TaskFormat,
    add_label_tokens,
    encode_prompts,
    fields_json,
    label_distribution,
    resize_for_labels,
)
from training.trainer import IGNORE, Hooks, Sequence, TrainConfig, Trainer, list_checkpoints, resolve_precision


def cascade_home() -> Path:
    """`$CASCADE_HOME`, default `~/.cache/cascade`: imported models and the teacher-label cache."""
    return Path(os.environ.get("CASCADE_HOME", Path.home() / ".cache" / "cascade"))


def models_home() -> Path:
    return cascade_home() / "models"


def checkpoint_dir_for(out: str | Path) -> Path:
    """Where a model dir's training checkpoints go: the sibling `OUT.checkpoints/`."""
    out = Path(out).resolve()
    return out.with_name(out.name + ".checkpoints")


def resolve_checkpoint_dir(out: Path, checkpoint_dir: str | Path | None, resume: bool) -> Path:
    """The checkpoint dir of this run; a resumed run of the old layout keeps `OUT/checkpoints`."""
    if checkpoint_dir is not None:
        return Path(checkpoint_dir)
    new, old = checkpoint_dir_for(out), out / "checkpoints"
    if resume and not list_checkpoints(new) and list_checkpoints(old):
        print(f"note: resuming from {old}, the old in-dir location (deprecated; new runs write {new})",
              file=sys.stderr)
        return old
    return new


def resolve_init(init: str) -> Path:
    """A known name is imported once into CASCADE_HOME (offline: from an installed package)."""
    from training.importer import KNOWN_MODELS, import_model

    if init in KNOWN_MODELS:
        target = models_home() / init
        if not (target / "model.safetensors").exists():
            print(f"importing {init} into {target} (once)", file=sys.stderr)
            import_model(init, target)
        return target
    path = Path(init)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--init {init!r}: not a known model ({', '.join(KNOWN_MODELS)}) nor a model dir")
    return path


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE on the task corpus, with the end-of-text token at id 0."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def pick_size(n_tokens: int, inference_tokens: float) -> tuple[str, dict]:
    """The named size closest (in log params) to the planner's inference-aware optimum."""
    from training.planner import nearest_size, plan

    p = plan(tokens=float(n_tokens), inference_tokens=inference_tokens)
    sizes = {name: _estimate(cfg) for name, cfg in SIZES.items()}
    name = nearest_size(sizes, p.inference_aware.params)
    return name, {"plan": p.to_json(), "chosen_size": name, "chosen_params": sizes[name]}


def _estimate(cfg) -> int:
    """Non-embedding parameters of a size, without building it."""
    kv = cfg.n_kv_heads * cfg.head_dim
    per_layer = cfg.dim * cfg.dim * 2 + cfg.dim * kv * 2 + 3 * cfg.dim * cfg.hidden_dim + 2 * cfg.dim
    return cfg.n_layers * per_layer + cfg.dim


def build_sequences(tokenizer: Tokenizer, fmt: TaskFormat, texts: list[str], labels: list[str],
                    label_only: bool, eos_id: int, fields: list[dict] | None = None) -> list[Sequence]:
    """One training sequence per text: the prompt, the label token (the loss), and for an
    extraction task the fields cue and the fields' JSON line and the end token (loss on those
    too: the model learns to write them; the prompt itself is never a target)."""
    label_index = {lab: i for i, lab in enumerate(fmt.labels)}
    cue = tokenizer.encode(FIELDS_CUE).ids
    out = []
    for k, (prompt, label) in enumerate(zip(encode_prompts(tokenizer, fmt, texts), labels)):
        if fields is not None:
            answer = cue + tokenizer.encode(fields_json(fields[k], fmt.fields)).ids + [eos_id]
            head = [fmt.label_token_ids[label_index[label]]] if fmt.task_kind == "joint" else []
            ids = prompt + head + answer
            targets = [IGNORE] * (len(prompt) - 1) + head + answer + [IGNORE]
            out.append(Sequence(ids, targets))
            continue
        lid = fmt.label_token_ids[label_index[label]]
        if label_only:
            ids = prompt + [lid]
            targets = [IGNORE] * (len(prompt) - 1) + [lid, IGNORE]
        else:
            ids = prompt + [lid, eos_id]
            targets = ids[1:] + [IGNORE]
        out.append(Sequence(ids, targets))
    return out


@dataclass
class LargeRun:
    out: Path
    summary: dict


def train_large(data_dir: str | Path, out_dir: str | Path, *, init: str | None = None, size: str = "auto",
                cfg: TrainConfig | None = None, resume: bool = False, limit_train: int | None = None,
                eval_limit: int = 300, vocab_size: int = 4096, inference_tokens: float = 0.0,
                template: str | None = None, progress: bool = True, save_dtype: str = "fp32",
                checkpoint_dir: str | Path | None = None) -> LargeRun:
    """Train and write the model dir `out_dir` (weights in `save_dtype`: fp32 or bf16);
    checkpoints go to `checkpoint_dir`, default `OUT.checkpoints/` beside it.

    The steps: read the task's examples, make the base model (`--init` or from scratch), add the
    label tokens and build the task's sequences, fit (sharded under torchrun), write the model
    dir on rank 0."""
    from training.parallelize import apply_fsdp, full_state_hooks, init_distributed, shutdown_distributed

    cfg = cfg or TrainConfig(**LARGE)
    rank, world_size, device = init_distributed()
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"--save-dtype {save_dtype!r}: known are {', '.join(SAVE_DTYPES)}")
    torch.manual_seed(cfg.seed)
    out = Path(out_dir)
    ckpt_dir = resolve_checkpoint_dir(out, checkpoint_dir, resume)
    label_set, train, val, n_train = _task_examples(data_dir, limit_train, eval_limit, cfg.seed)
    base = _base_model(init, size, train, vocab_size, inference_tokens, announce=rank == 0)
    fmt, data = _task_sequences(base, label_set, train, template, Path(data_dir).name)
    n_params, model_cfg = base.model.num_params(), base.model.cfg
    model = base.model.to(device)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))  # once; the caller's stays as given
    param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    if world_size > 1:
        apply_fsdp(model, device, param_dtype)

    def evaluate() -> dict:
        probs = label_distribution(model, base.tokenizer, fmt, [ex.text for ex in val], batch_size=32,
                                   dtype=None if world_size > 1 else param_dtype)
        pred = probs.argmax(-1).tolist()
        acc = sum(fmt.labels[p] == ex.label for p, ex in zip(pred, val)) / max(1, len(val))
        return {"val_accuracy": acc, "val_n": len(val)}

    trainer = Trainer(model, data, cfg, out, Hooks(evaluate=evaluate), pad_id=_eos_id(model_cfg), n_params=n_params,
                      device=device, state_hooks=full_state_hooks if world_size > 1 else None, ckpt_dir=ckpt_dir)
    result = trainer.fit(resume=resume, progress=progress)
    state = trainer.model_state()  # collective under FSDP
    summary = _large_summary(trainer, result, state if rank == 0 else None, model_cfg, n_params, cfg, world_size,
                             save_dtype, os.path.relpath(ckpt_dir.resolve(), out.resolve()), base.extra)
    # which texts it learnt: its answers there are its training labels, not how it answers traffic
    # (training/crossfit.py scores only the other rows; `learnt_train_rows` names them again)
    summary["train_rows"] = len(train)
    summary["train_sample"] = {"of": n_train, "seed": cfg.seed}
    if world_size > 1:
        _write_shard_record(out, rank, trainer, result)
    if rank == 0:
        _write_model_dir(out, state, model_cfg, fmt, base, save_dtype, summary)
    if world_size > 1:
        shutdown_distributed()
    return LargeRun(out, summary)


@dataclass
class _BaseModel:
    """What training starts from: the model, its tokenizer, and how it learns the task."""

    model: Transformer
    tokenizer: Tokenizer
    tokenizer_dir: Path | None  # a pre-trained model's dir: its tokenizer files are carried over
    label_only: bool  # a pre-trained model learns only the answer; from scratch, the text too
    extra: dict  # recorded in the summary and cascade.json: the init, or the size plan


def learnt_train_rows(n_train: int, limit: int | None, seed: int) -> list[int]:
    """Indices of the train rows a large model learns with `--limit-train limit`: a seeded uniform
    sample in file order (all rows without a limit). Not the head: split files are often grouped
    by label (CLINC150's first 6,000 rows hold 60 of its 151 labels)."""
    if limit is None or limit >= n_train:
        return list(range(n_train))
    if limit < 1:
        raise ValueError(f"--limit-train {limit}: need at least 1 row")
    return sorted(random.Random(seed).sample(range(n_train), limit))


def _task_examples(data_dir, limit_train: int | None, eval_limit: int, seed: int):
    """(labels, the learnt train rows, a seeded val sample of `eval_limit`, the train split's size),
    refusing labels not in labels.json."""
    label_set = load_labels(data_dir)
    all_train = load_split(data_dir, "train")
    train = [all_train[i] for i in learnt_train_rows(len(all_train), limit_train, seed)]
    val = load_split(data_dir, "val")
    # A seeded sample, not the head: split files are often grouped by label.
    val = random.Random(seed).sample(val, min(eval_limit, len(val)))
    unknown = {ex.label for ex in train + val} - set(label_set.labels)
    if unknown:
        raise ValueError(f"{data_dir}: labels {sorted(unknown)[:5]} are not in labels.json")
    return label_set, train, val, len(all_train)


def _base_model(init: str | None, size: str, train: list, vocab_size: int, inference_tokens: float,
                announce: bool) -> _BaseModel:
    """The pre-trained model `init`, or a fresh one of `size` (auto: the planner's pick for the
    train tokens) over a BPE tokenizer of the train texts."""
    if init:
        base = resolve_init(init)
        return _BaseModel(load_hf(base), Tokenizer.from_file(str(base / "tokenizer.json")), base, True,
                          {"init": str(init)})
    tokenizer = train_bpe([ex.text for ex in train], vocab_size)
    extra: dict = {}
    if size == "auto":
        n_tokens = sum(len(tokenizer.encode(ex.text).ids) + 4 for ex in train)
        size, extra = pick_size(n_tokens, inference_tokens)
        if announce:
            from training.planner import Plan, SizePoint, format_plan

            p = extra["plan"]
            print(format_plan(Plan(*(SizePoint(**p[k]) for k in ("compute_optimal", "fit_optimal", "inference_aware")),
                                   p["inference_tokens"])), file=sys.stderr)
            print(f"--size auto: {size} ({extra['chosen_params']:,} non-embedding params) for "
                  f"{n_tokens:,} training tokens", file=sys.stderr)
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: known sizes are {', '.join(SIZES)} or auto")
    model = build_model(size, vocab_size=tokenizer.get_vocab_size(), bos_token_id=None, eos_token_id=0)
    return _BaseModel(model, tokenizer, None, False, extra)


def _eos_id(model_cfg) -> int:
    return model_cfg.eos_token_id if model_cfg.eos_token_id is not None else 0


def _task_sequences(base: _BaseModel, label_set, train: list, template: str | None,
                    task_name: str) -> tuple[TaskFormat, list[Sequence]]:
    """Add the label tokens to `base` (in place) and build its task format and training sequences."""
    label_ids = add_label_tokens(base.tokenizer, label_set.labels)
    resize_for_labels(base.model, base.tokenizer, label_set.labels, label_ids)
    label_fields: dict[str, set] = {}
    for ex in train:
        label_fields.setdefault(ex.label or "", set()).update(ex.fields or {})
    fmt = TaskFormat(label_set.labels, label_ids,
                     template or TaskFormat.__dataclass_fields__["prompt_template"].default,
                     task=task_name, oos_label=label_set.oos_label, extra=base.extra,
                     task_kind=label_set.task, fields=list(label_set.fields),
                     label_fields=({k: sorted(v) for k, v in sorted(label_fields.items())}
                                   if label_set.task == "joint" else {}))
    gold_fields = [ex.fields or {} for ex in train] if label_set.task != "classify" else None
    data = build_sequences(base.tokenizer, fmt, [ex.text for ex in train], [ex.label for ex in train],
                           base.label_only, _eos_id(base.model.cfg), gold_fields)
    return fmt, data


def _large_summary(trainer: Trainer, result, state: dict | None, model_cfg, n_params: int, cfg: TrainConfig,
                   world_size: int, save_dtype: str, ckpt_rel: str, extra: dict) -> dict:
    """train_summary.json; `state` (the full weights, rank 0 only) counts the embeddings."""
    from training.parallelize import local_numel

    return {
        "steps": result.steps, "wall_s": result.wall_s, "tokens_per_s": result.tokens_per_s,
        "precision": cfg.precision, "params": n_params,
        "params_with_embeddings": (sum(v.numel() for k, v in state.items()
                                       if k != "lm_head.weight" or not model_cfg.tie_embeddings)
                                   if state is not None else None),
        "final_loss": result.losses[-1] if result.losses else None,
        "losses": result.losses,
        "val_accuracy": next((e["val_accuracy"] for e in reversed(trainer.log) if "val_accuracy" in e), None),
        "world_size": world_size, "local_params": local_numel(trainer.model), "config": asdict(cfg),
        "save_dtype": save_dtype, "checkpoint_dir": ckpt_rel, **extra,
    }


def _write_shard_record(out: Path, rank: int, trainer: Trainer, result) -> None:
    """What each rank holds: the evidence that parameters and optimizer state are sharded."""
    from training.parallelize import local_numel

    optim_numel = sum((t.to_local() if hasattr(t, "to_local") else t).numel()
                      for st in trainer.optimizer.state.values() for t in st.values()
                      if torch.is_tensor(t) and t.ndim > 0)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    (shard_dir / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "local_params": local_numel(trainer.model), "local_optimizer_numel": optim_numel,
         "losses": result.losses}))


def _write_model_dir(out: Path, state: dict, model_cfg, fmt: TaskFormat, base: _BaseModel, save_dtype: str,
                     summary: dict) -> None:
    """The HF model dir: weights, cascade.json, tokenizer files, train_summary.json."""
    final = Transformer(model_cfg)
    final.load_state_dict(state, strict=False)
    if model_cfg.tie_embeddings:
        final.lm_head.weight = final.embed_tokens.weight
    save_hf(final, out, dtype=SAVE_DTYPES[save_dtype], cascade_meta=fmt.to_json())
    base.tokenizer.save(str(out / "tokenizer.json"))
    base_config = None
    if base.tokenizer_dir is not None:
        for name in ("special_tokens_map.json", "chat_template.jinja"):
            if (base.tokenizer_dir / name).exists():
                (out / name).write_bytes((base.tokenizer_dir / name).read_bytes())
        if (base.tokenizer_dir / "tokenizer_config.json").exists():
            base_config = json.loads((base.tokenizer_dir / "tokenizer_config.json").read_text())
    # so that transformers (4.x and 5), vLLM and llama.cpp's converter load the tokenizer
    write_tokenizer_config(out, out / "tokenizer.json", model_cfg, base_config)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    make_world_readable(out)


def load_large(model_dir: str | Path, device: str = "cpu") -> tuple[Transformer, Tokenizer, TaskFormat]:
    model_dir = Path(model_dir)
    model = load_hf(model_dir).to(device).eval()
    return model, Tokenizer.from_file(str(model_dir / "tokenizer.json")), TaskFormat.load(model_dir)
