"""`cascade train student`: distil the large model into a compact student.

The teacher labels every training text once (its label distribution, one forward pass per text
through `training.task.label_distribution`) and the result is cached beside the teacher's dir,
in `TEACHER.labels/` (the teacher's dir stays what is served; `$CASCADE_HOME/teacher-labels/`
when the teacher's parent is not ours to write), keyed by the teacher's weights and the texts,
so a second run reuses it. The student learns from

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)

(Hinton et al. 2015; T^2 keeps the soft term's gradient scale independent of T). Texts without
a label (`--unlabeled FILE`, extra traffic; `--augment N`, perturbed copies of the training
texts, `training/augment.py`) learn from the teacher's term alone. Afterwards a
temperature is fitted on the validation split (`calibration.json`) so the student tier reports
calibrated confidence. Same trainer as the large model (AdamW, warmup+cosine, clipping,
checkpoints, resume, spike guard).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cascade.data import load_labels, load_split
from cascade.progress import Progress
from training.export import encode
from training.recipes import STUDENT
from training.student import STUDENT_SIZES, build_student, init_from_teacher, save_student
from training.task import label_distribution
from training.temperature import calibration_report
from training.trainer import IGNORE, Hooks, Sequence, TrainConfig, Trainer, default_precision


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor,
            temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """Summed (not averaged) distillation loss over the batch.

    Args:
        student_logits: (B, L) raw student logits.
        teacher_probs: (B, L) teacher probabilities at temperature 1.
        labels: (B,) gold label index, or -100 (IGNORE) for unlabeled rows: those get the
            teacher term with weight 1 instead of alpha.
    """
    t = temperature
    # Teacher at temperature T: re-temper its probabilities (log p / T, renormalised).
    teacher_t = torch.softmax(torch.log(teacher_probs.clamp_min(1e-12)) / t, dim=-1)
    log_student_t = torch.log_softmax(student_logits.float() / t, dim=-1)
    kl = (teacher_t * (torch.log(teacher_t.clamp_min(1e-12)) - log_student_t)).sum(-1) * t * t  # (B,)
    labelled = labels != IGNORE
    ce = torch.zeros_like(kl)
    if labelled.any():
        ce[labelled] = torch.nn.functional.cross_entropy(student_logits.float()[labelled], labels[labelled],
                                                         reduction="none")
    weight_kl = torch.where(labelled, torch.full_like(kl, alpha), torch.ones_like(kl))
    return (weight_kl * kl + torch.where(labelled, (1 - alpha) * ce, torch.zeros_like(ce))).sum()


def _fingerprint(teacher_dir: Path, texts: list[str]) -> str:
    h = hashlib.sha256()
    stat = (teacher_dir / "model.safetensors").stat()
    h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    h.update((teacher_dir / "cascade.json").read_bytes())
    for text in texts:
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def label_cache_dir(teacher_dir: str | Path) -> Path:
    """Where new teacher labels go: `TEACHER.labels/` beside the teacher's dir, or
    `$CASCADE_HOME/teacher-labels/` when that is not ours to write (a shared, read-only teacher)."""
    from training.large import cascade_home

    teacher = Path(teacher_dir).resolve()
    sibling = teacher.with_name(teacher.name + ".labels")
    writable = os.access(sibling, os.W_OK) if sibling.exists() else os.access(teacher.parent, os.W_OK)
    return sibling if writable else cascade_home() / "teacher-labels"


def teacher_distributions(teacher_dir: str | Path, texts: list[str], cache_dir: str | Path | None = None,
                          batch_size: int = 64, progress: bool = True) -> tuple[torch.Tensor, bool]:
    """The teacher's (N, L) label distribution for `texts`, from the cache when it has them.

    `cache_dir` defaults to `label_cache_dir(teacher_dir)`; an entry an older version left in
    `TEACHER/label_cache/` is still read. Returns (probabilities, whether the cache was used).
    """
    from training.large import load_large

    teacher_dir = Path(teacher_dir)
    name = f"teacher-{_fingerprint(teacher_dir, texts)}.safetensors"
    old = teacher_dir / "label_cache" / name
    if cache_dir is None and old.exists():
        print(f"note: teacher labels read from {old}, the old in-dir cache (deprecated; new entries go to "
              f"{label_cache_dir(teacher_dir)})", file=sys.stderr)
        return load_file(str(old))["probs"], True
    cache_dir = Path(cache_dir) if cache_dir is not None else label_cache_dir(teacher_dir)
    path = cache_dir / name
    if path.exists():
        return load_file(str(path))["probs"], True
    model, tokenizer, fmt = load_large(teacher_dir)
    precision = default_precision(torch.device("cpu"))
    print(f"labelling {len(texts)} texts with the teacher (cached in {path})", file=sys.stderr)
    with Progress(len(texts), "teacher labels", "text", enabled=progress) as bar:
        probs = label_distribution(model, tokenizer, fmt, texts, batch_size=batch_size,
                                   dtype=torch.bfloat16 if precision == "bf16" else None, progress=bar)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"probs": probs.contiguous()}, str(tmp))
    tmp.replace(path)
    return probs, False


def kd_batch_loss(data: list, targets: torch.Tensor, temperature: float, alpha: float):
    """The Trainer's `batch_loss` for distillation: a batch of `data`'s Sequences (right-padded
    here) against their rows of `targets` (the teacher's distributions) and their gold labels."""
    index = {id(s): i for i, s in enumerate(data)}

    def batch_loss(model, seqs):
        rows = [index[id(s)] for s in seqs]
        width = max(len(s.ids) for s in seqs)
        tok = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            tok[i, : len(s.ids)] = torch.tensor(s.ids)
            mask[i, : len(s.ids)] = 1
        y = torch.tensor([s.targets[0] for s in seqs])
        return kd_loss(model(tok, mask), targets[rows], y, temperature, alpha), int(mask.sum())

    return batch_loss


def batched_logits(model, ids, mask, batch: int = 256) -> torch.Tensor:
    """The student's logits over encoded texts (numpy ids/mask), in eval mode and back."""
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(torch.from_numpy(ids[i:i + batch]), torch.from_numpy(mask[i:i + batch]))
                         for i in range(0, len(ids), batch)])
    model.train()
    return out


@dataclass
class StudentRun:
    out: Path
    summary: dict


def train_student(data_dir: str | Path, teacher_dir: str | Path, out_dir: str | Path, *, size: str = "small",
                  from_teacher: bool = False, temperature: float = 2.0, alpha: float = 0.5,
                  unlabeled: str | Path | None = None, augment: int = 0, cfg: TrainConfig | None = None,
                  resume: bool = False, limit_train: int | None = None, max_len: int = 64,
                  inference_tokens: float = 1e9, progress: bool = True) -> StudentRun:
    from tokenizers import Tokenizer

    from training.large import load_large

    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0, got alpha={alpha}, temperature={temperature}")
    cfg = cfg or TrainConfig(**STUDENT)
    torch.manual_seed(cfg.seed)
    teacher_dir, out = Path(teacher_dir), Path(out_dir)
    teacher_meta = json.loads((teacher_dir / "cascade.json").read_text())
    labels = teacher_meta["labels"]
    label_set = load_labels(data_dir)
    if labels != label_set.labels:
        raise ValueError(f"teacher {teacher_dir} was trained on other labels than {data_dir}")
    train = load_split(data_dir, "train")[:limit_train]
    texts = [ex.text for ex in train]
    gold = [labels.index(ex.label) for ex in train]
    extra = _read_unlabeled(Path(unlabeled)) if unlabeled else []
    if augment:
        from training.augment import augment_texts

        extra += augment_texts(texts, augment, seed=cfg.seed)
    texts += extra
    gold += [IGNORE] * len(extra)
    # Keyed by the teacher's weights: any student of this teacher on these texts reuses it.
    teacher_probs, cached = teacher_distributions(teacher_dir, texts, progress=progress)
    tokenizer = Tokenizer.from_file(str(teacher_dir / "tokenizer.json"))
    # The student reads the teacher's tokenizer: ids line up for initialising from the teacher.
    vocab = tokenizer.get_vocab_size()
    ids, mask = encode(tokenizer, texts, max_len)
    id_rows = [[int(x) for x, m in zip(row, mrow) if m] for row, mrow in zip(ids, mask)]
    plan_info = None
    if size == "auto":
        size, plan_info = pick_student_size(sum(len(r) for r in id_rows), inference_tokens, vocab, len(labels))
        print(f"--size auto: student {size} ({plan_info['chosen_params']:,} non-embedding params)", file=sys.stderr)
    if size not in STUDENT_SIZES:
        raise ValueError(f"--size {size!r}: known student sizes are {', '.join(STUDENT_SIZES)}")
    student = build_student(size, vocab, len(labels), max_seq_len=max_len)
    layers = None
    if from_teacher:
        teacher, _, _ = load_large(teacher_dir)
        layers = init_from_teacher(student, teacher)
        del teacher
    data = [Sequence(r, [g]) for r, g in zip(id_rows, gold)]
    batch_loss = kd_batch_loss(data, teacher_probs, temperature, alpha)

    val = load_split(data_dir, "val")
    val_ids, val_mask = encode(tokenizer, [ex.text for ex in val], max_len)
    val_gold = torch.tensor([labels.index(ex.label) for ex in val])

    def val_logits(model) -> torch.Tensor:
        return batched_logits(model, val_ids, val_mask)

    def evaluate() -> dict:
        return {"val_accuracy": (val_logits(student).argmax(-1) == val_gold).float().mean().item()}

    trainer = Trainer(student, data, cfg, out, Hooks(evaluate=evaluate), pad_id=0,
                      n_params=student.num_params(), batch_loss=batch_loss, count_targets=lambda s: 1)
    result = trainer.fit(resume=resume, progress=progress)
    student.eval()
    final_logits = val_logits(student)
    calib = calibration_report(final_logits, val_gold)
    summary = {
        "size": size, "from_teacher_layers": layers, "temperature_kd": temperature, "alpha": alpha,
        "non_embedding_params": student.num_params(), "params": student.num_params(non_embedding=False),
        "steps": result.steps, "wall_s": result.wall_s, "tokens_per_s": result.tokens_per_s,
        "val_accuracy": (final_logits.argmax(-1) == val_gold).float().mean().item(),
        "teacher_cache_used": cached, "train_texts": len(train), "unlabeled_texts": len(texts) - len(train),
        "augment": augment,
        "calibration": calib, "plan": plan_info,
    }
    save_student(student, out, teacher_dir / "tokenizer.json", labels,
                 {"data": str(Path(data_dir).resolve()), "teacher": str(teacher_dir.resolve()),
                  "oos_label": label_set.oos_label}, temperature=calib["temperature"])
    (out / "calibration.json").write_text(json.dumps(calib, indent=1) + "\n")
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return StudentRun(out, summary)


def pick_student_size(train_tokens: int, inference_tokens: float, vocab: int, n_labels: int) -> tuple[str, dict]:
    """The named student size nearest (in log params) to the inference-aware optimum for the
    distillation token budget and the traffic it will serve (students answer most requests)."""
    from training.planner import nearest_size, plan

    p = plan(tokens=float(train_tokens), inference_tokens=inference_tokens)
    sizes = {name: build_student(name, 8, n_labels).num_params() for name in STUDENT_SIZES}
    name = nearest_size(sizes, p.inference_aware.params)
    return name, {"plan": p.to_json(), "chosen_size": name, "chosen_params": sizes[name]}


def _read_unlabeled(path: Path) -> list[str]:
    """Extra traffic without labels: JSONL rows with "text", or a text file, one text a line."""
    texts = []
    if path.suffix in (".jsonl", ".ndjson"):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not str(row.get("text", "")).strip():
                raise ValueError(f"{path}:{lineno}: expected an object with a non-empty \"text\"")
            texts.append(str(row["text"]).strip())
    else:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                texts.append(line.strip())
    return texts
