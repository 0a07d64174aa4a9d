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

Extraction tasks (`extract`/`joint`) train a tagging student: the loss adds, per text, the mean
token cross-entropy of its BIO tags (gold fields, or the large model's extractions from
`--teacher-fields` for texts without gold), and training ends by fitting a tag temperature and
choosing the item confidence estimate by val AUROC (docs/extraction.md, "Student tagger").
`--teacher none` trains from gold alone, with a BPE tokenizer of the train texts.

`--size minilm-l6` starts from a pre-trained encoder (training/student.py `EncoderStudent`) and
reads texts with its own WordPiece tokenizer, not the teacher's: the teacher's labels are keyed
by text, so the loss and the cache are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from cascade.data import load_labels, load_split
from cascade.fields import same_fields
from cascade.metrics import span_scores
from cascade.progress import Progress
from cascade.tagging import tag_set
from training.export import encode
from training.recipes import STUDENT
from training.student import (
    PRETRAINED_STUDENTS,
    STUDENT_SIZES,
    build_student,
    check_student_size,
    init_from_teacher,
    pretrained_student,
    save_student,
    student_tokenizer_file,
)
from training.tagging import confidence_report, fit_tag_temperature, tag_rows, tagger_answers
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


def kd_batch_loss(data: list, targets: torch.Tensor | None, temperature: float, alpha: float,
                  tag_targets: list[list[int] | None] | None = None, tag_weights: list[float] | None = None,
                  tag_weight: float = 1.0):
    """The Trainer's `batch_loss` for distillation: a batch of `data`'s Sequences (right-padded
    here) against their rows of `targets` (the teacher's distributions) and their gold labels.

    `targets` None: no teacher for the labels, plain cross-entropy on the labelled rows. A
    tagging student (`tag_targets`: per row its tokens' tag ids, or None for no tag target) adds
    `tag_weight` x the row's mean token cross-entropy x `tag_weights[row]`
    (`training.tagging.tag_loss`)."""
    from training.tagging import tag_loss

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
        out = model(tok, mask)
        logits, tag_logits = out if tag_targets is not None else (out, None)
        if targets is not None:
            loss = kd_loss(logits, targets[rows], y, temperature, alpha)
        else:
            labelled = y != IGNORE
            loss = (torch.nn.functional.cross_entropy(logits.float()[labelled], y[labelled], reduction="sum")
                     if labelled.any() else logits.sum() * 0.0)
        if tag_logits is not None:
            tgt = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
            for i, r in enumerate(rows):
                if tag_targets[r] is not None:
                    tgt[i, : len(tag_targets[r])] = torch.tensor(tag_targets[r])
            w = torch.tensor([tag_weights[r] for r in rows], dtype=torch.float32)
            loss = loss + tag_weight * tag_loss(tag_logits, tgt, w)
        return loss, int(mask.sum())

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


def train_student(data_dir: str | Path, teacher_dir: str | Path | None, out_dir: str | Path, *, size: str = "small",
                  from_teacher: bool = False, temperature: float = 2.0, alpha: float = 0.5,
                  unlabeled: str | Path | None = None, augment: int = 0, cfg: TrainConfig | None = None,
                  resume: bool = False, limit_train: int | None = None, max_len: int = 64,
                  inference_tokens: float = 1e9, progress: bool = True,
                  teacher_fields: str | Path | None = None, teacher_fields_weight: float = 1.0,
                  tag_weight: float = 1.0, vocab_size: int = 4096,
                  train_rows: list[int] | None = None, kd_search: dict | None = None) -> StudentRun:
    """Distil (or, with `teacher_dir` None, train from gold alone) a student for `data_dir`.

    A classify task trains the classifier. An `extract`/`joint` task trains a tagging student
    (`training.student.StudentTagger`, docs/extraction.md "Student tagger"): BIO tags per token
    from the gold fields, plus `teacher_fields` (JSONL rows {"text", "fields"}: the large
    model's extractions) for texts without gold, with weight `teacher_fields_weight` per row
    (gold rows 1); `tag_weight` scales the whole tag term against the label term. The label term
    is the KD loss when there is a teacher and the task has labels, else gold cross-entropy
    (joint) or nothing (extract: the one label ""). Without a teacher the tokenizer is a
    byte-level BPE of `vocab_size` trained on the train texts, and `unlabeled`/`augment` texts
    need the teacher's labels, so they are refused. `train_rows`: learn from only these rows of
    train (indices; an out-of-fold student, `training.crossfit`), the teacher still labelling
    all of train, so the cache the full student filled is reused. `kd_search`: how `temperature`
    and `alpha` were chosen (`training.kd_search`), recorded in the summary.

    The steps: gather the distillation set (train, unlabelled and augmented texts, the teacher's
    extractions), label it with the teacher (cached), tokenize and make the tag targets, build
    the student (optionally from the teacher's layers), fit, then calibrate and write the dir.
    """
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0, got alpha={alpha}, temperature={temperature}")
    if teacher_fields_weight < 0 or tag_weight < 0:
        raise ValueError(f"need teacher_fields_weight >= 0 and tag_weight >= 0, got {teacher_fields_weight}, "
                         f"{tag_weight}")
    cfg = cfg or TrainConfig(**STUDENT)
    torch.manual_seed(cfg.seed)
    out = Path(out_dir)
    teacher_dir = Path(teacher_dir) if teacher_dir is not None else None
    label_set = load_labels(data_dir)
    task = label_set.task
    tagger = task != "classify"
    check_student_size(size, from_teacher, tagger)  # before the teacher labels anything
    if teacher_fields is not None and not tagger:
        raise ValueError(f"--teacher-fields: {data_dir} is a classify task (labels.json has no fields)")
    labels = label_set.labels if task != "extract" else [""]  # extract: one label the head never learns
    use_kd = teacher_dir is not None and task != "extract"
    if use_kd:
        teacher_meta = json.loads((teacher_dir / "cascade.json").read_text())
        if teacher_meta["labels"] != label_set.labels:
            raise ValueError(f"teacher {teacher_dir} was trained on other labels than {data_dir}")
    if from_teacher and teacher_dir is None:
        raise ValueError("--from-teacher needs a teacher")
    if not use_kd and (unlabeled or augment):
        raise ValueError("--unlabeled/--augment texts learn from the teacher's labels: give a teacher "
                         "(use --teacher-fields for the large model's extractions)")
    train = load_split(data_dir, "train")[:limit_train]
    dset = _distillation_set(train, labels, task, unlabeled, augment, cfg.seed, teacher_fields, label_set.fields,
                             teacher_fields_weight)
    # Keyed by the teacher's weights: any student of this teacher on these texts reuses it.
    teacher_probs, cached = (teacher_distributions(teacher_dir, dset.texts, progress=progress) if use_kd
                             else (None, False))
    if train_rows is not None:
        keep = _keep_rows(train_rows, len(train), len(dset.texts))
        dset = _DistillationSet(*([getattr(dset, f)[i] for i in keep] for f in ("texts", "gold", "row_fields",
                                                                                   "row_weight")), dset.fields_info)
        teacher_probs = teacher_probs[keep] if teacher_probs is not None else None
        train = [train[i] for i in keep if i < len(train)]
    tokenizer_file = _student_tokenizer(teacher_dir, out, dset.texts, resume, vocab_size, size)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    ids, mask = encode(tokenizer, dset.texts, max_len)
    id_rows = [[int(x) for x, m in zip(row, mrow) if m] for row, mrow in zip(ids, mask)]
    tags = tag_set(label_set.fields) if tagger else None
    tag_targets, missing_values = (_tag_targets(tokenizer, dset, tags, max_len) if tagger else (None, 0))
    plan_info = None
    if size == "auto":
        size, plan_info = pick_student_size(sum(len(r) for r in id_rows), inference_tokens,
                                            tokenizer.get_vocab_size(), len(labels))
        print(f"--size auto: student {size} ({plan_info['chosen_params']:,} non-embedding params)", file=sys.stderr)
    student, layers = _build_student(size, tokenizer.get_vocab_size(), len(labels), max_len, tags,
                                     teacher_dir if from_teacher else None)
    data = [Sequence(r, [g]) for r, g in zip(id_rows, dset.gold)]
    batch_loss = kd_batch_loss(data, teacher_probs, temperature, alpha, tag_targets, dset.row_weight, tag_weight)
    val = load_split(data_dir, "val")
    evaluate = _val_evaluator(student, tokenizer, val, labels, task, tags, label_set.fields, max_len)
    trainer = Trainer(student, data, cfg, out, Hooks(evaluate=evaluate), pad_id=0,
                      n_params=student.num_params(), batch_loss=batch_loss, count_targets=lambda s: 1)
    result = trainer.fit(resume=resume, progress=progress)
    student.eval()
    summary = {
        "size": size, "from_teacher_layers": layers, "temperature_kd": temperature, "alpha": alpha,
        "non_embedding_params": student.num_params(), "params": student.num_params(non_embedding=False),
        "steps": result.steps, "wall_s": result.wall_s, "tokens_per_s": result.tokens_per_s,
        "teacher_cache_used": cached, "train_texts": len(train), "unlabeled_texts": len(dset.texts) - len(train),
        "augment": augment, "task": task, "teacher": str(teacher_dir) if teacher_dir is not None else None,
        "plan": plan_info, "max_len": max_len, "config": asdict(cfg),  # the recipe, for out-of-fold copies
    }
    if kd_search is not None:
        summary["kd_search"] = kd_search
    if tagger:
        summary.update({"teacher_fields": dset.fields_info, "values_not_found": missing_values,
                        "tag_weight": tag_weight})
    _calibrate_and_save(student, tokenizer, tokenizer_file, out, data_dir, teacher_dir, label_set, labels, tags,
                        val, max_len, summary)
    return StudentRun(out, summary)


def _keep_rows(train_rows: list[int], n_train: int, n_rows: int) -> list[int]:
    """The distillation rows to keep: the given train rows (checked), then every non-train row."""
    bad = [i for i in train_rows if not 0 <= i < n_train]
    if bad:
        raise ValueError(f"train_rows: {bad[:5]} out of range for {n_train} train rows")
    return sorted(set(train_rows)) + list(range(n_train, n_rows))


@dataclass
class _DistillationSet:
    """The texts a student learns from, row-aligned: the train texts first, then the others."""

    texts: list[str]
    gold: list[int]  # label index, or IGNORE for a text without gold
    row_fields: list[dict | None]  # the tag target's fields (gold, or the teacher's), None: no tag target
    row_weight: list[float]  # the tag term's weight per row
    fields_info: dict | None  # what --teacher-fields contributed


def _distillation_set(train: list, labels: list[str], task: str, unlabeled, augment: int, seed: int,
                      teacher_fields, fields: list[str], teacher_fields_weight: float) -> _DistillationSet:
    texts = [ex.text for ex in train]
    gold = [labels.index(ex.label) if task != "extract" else IGNORE for ex in train]
    extra = _read_unlabeled(Path(unlabeled)) if unlabeled else []
    if augment:
        from training.augment import augment_texts

        extra += augment_texts(texts, augment, seed=seed)
    texts += extra
    gold += [IGNORE] * len(extra)
    # Tag targets: gold for train rows (a row without fields has none: all O), the teacher's
    # extractions for every other text; a teacher row for a text with gold is not used.
    row_fields: list[dict | None] = [ex.fields or {} for ex in train] + [None] * len(extra)
    row_weight = [1.0] * len(train) + [teacher_fields_weight] * len(extra)
    fields_info = None
    if teacher_fields is not None:
        teacher_rows = read_teacher_fields(Path(teacher_fields), fields)
        gold_texts = {ex.text for ex in train}
        where = {t: i for i, t in enumerate(texts) if i >= len(train)}
        used = overridden = 0
        for text, f in teacher_rows.items():
            if text in gold_texts:
                overridden += 1
                continue
            used += 1
            if text in where:
                row_fields[where[text]] = f
            else:
                texts.append(text)
                gold.append(IGNORE)
                row_fields.append(f)
                row_weight.append(teacher_fields_weight)
        fields_info = {"file": str(teacher_fields), "rows": len(teacher_rows), "used": used,
                       "gold_won": overridden, "weight": teacher_fields_weight}
    return _DistillationSet(texts, gold, row_fields, row_weight, fields_info)


def _student_tokenizer(teacher_dir: Path | None, out: Path, texts: list[str], resume: bool,
                       vocab_size: int, size: str = "small") -> Path:
    """A pre-trained size's own tokenizer; else the teacher's (ids line up for initialising from
    the teacher), or without a teacher a byte-level BPE of the train texts, kept in the student dir."""
    from training.large import train_bpe

    own = student_tokenizer_file(size, teacher_dir)
    if own is not None:
        return own
    if teacher_dir is not None:
        return teacher_dir / "tokenizer.json"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_file = out / "tokenizer.json"
    if not (resume and tokenizer_file.exists()):
        train_bpe(texts, vocab_size).save(str(tokenizer_file))
    return tokenizer_file


def _tag_targets(tokenizer, dset: _DistillationSet, tags: list[str], max_len: int) -> tuple[list, int]:
    """Per row its tokens' tag ids (None: no tag target), and how many values no token span found."""
    have = [i for i, f in enumerate(dset.row_fields) if f is not None]
    found, missing_values = tag_rows(tokenizer, [dset.texts[i] for i in have], [dset.row_fields[i] for i in have],
                                     tags, max_len)
    targets: list = [None] * len(dset.texts)
    for i, r in zip(have, found):
        targets[i] = r
    return targets, missing_values


def _build_student(size: str, vocab: int, n_labels: int, max_len: int, tags: list[str] | None,
                   init_teacher: Path | None):
    """The student of `size`; with `init_teacher`, its layers copied from the teacher's. A
    pre-trained size (checked by `check_student_size`: no teacher layers, no tags) loads its weights."""
    from training.large import load_large

    if size in PRETRAINED_STUDENTS:
        return pretrained_student(size, n_labels, max_len), None
    student = build_student(size, vocab, n_labels, max_seq_len=max_len, **({"n_tags": len(tags)} if tags else {}))
    layers = None
    if init_teacher is not None:
        teacher, _, _ = load_large(init_teacher)
        layers = init_from_teacher(student, teacher)
        del teacher
    return student, layers


def _val_evaluator(student, tokenizer, val: list, labels: list[str], task: str, tags: list[str] | None,
                   fields: list[str], max_len: int):
    """The trainer's evaluate hook: val accuracy (classify), span F1 / exact match (+ accuracy: joint)."""
    val_texts = [ex.text for ex in val]
    val_ids, val_mask = encode(tokenizer, val_texts, max_len)
    val_gold = torch.tensor([labels.index(ex.label) if task != "extract" else 0 for ex in val])

    def evaluate() -> dict:
        if tags is None:
            return {"val_accuracy": (batched_logits(student, val_ids, val_mask).argmax(-1) == val_gold)
                    .float().mean().item()}
        answers = tagger_answers(student, tokenizer, val_texts, max_len)
        scores = span_scores([ex.fields for ex in val], answers.fields(val_texts, tags), fields)
        res = {"val_span_f1": scores["span_f1"], "val_exact_match": scores["exact_match"]}
        if task == "joint":
            res["val_accuracy"] = float((answers.label_probs.argmax(-1) == val_gold.numpy()).mean())
        return res

    return evaluate


def _calibrate_and_save(student, tokenizer, tokenizer_file: Path, out: Path, data_dir, teacher_dir: Path | None,
                        label_set, labels: list[str], tags: list[str] | None, val: list, max_len: int,
                        summary: dict) -> None:
    """Fit the confidence temperature(s) on val, add the figures to `summary` (in place), write
    the student dir, calibration.json and train_summary.json."""
    tagging = None
    if tags is None:
        val_ids, val_mask = encode(tokenizer, [ex.text for ex in val], max_len)
        val_gold = torch.tensor([labels.index(ex.label) for ex in val])
        final_logits = batched_logits(student, val_ids, val_mask)
        calib = calibration_report(final_logits, val_gold)
        summary["val_accuracy"] = (final_logits.argmax(-1) == val_gold).float().mean().item()
    else:
        calib, report = _tagger_report(student, tokenizer, data_dir, label_set, labels, tags, max_len)
        summary.update(report)
        tagging = {"task": label_set.task, "fields": label_set.fields, "tags": tags}
    summary["calibration"] = calib
    save_student(student, out, tokenizer_file, labels,
                 {"data": str(Path(data_dir).resolve()),
                  "teacher": str(teacher_dir.resolve()) if teacher_dir is not None else None,
                  "oos_label": label_set.oos_label}, temperature=calib["temperature"], tagging=tagging)
    (out / "calibration.json").write_text(json.dumps(calib, indent=1) + "\n")
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def _tagger_report(student, tokenizer, data_dir, label_set, labels: list[str], tags: list[str],
                   max_len: int) -> tuple[dict, dict]:
    """(calibration.json, summary figures) of a trained tagger: the label temperature (joint),
    the tag temperature (token NLL on val), the item confidence chosen by val AUROC, and val
    (and test, when there is one) span F1, exact match, label and joint accuracy."""
    joint = label_set.task == "joint"
    val = load_split(data_dir, "val")
    texts = [ex.text for ex in val]
    answers = tagger_answers(student, tokenizer, texts, max_len)
    if joint:
        gold = torch.tensor([labels.index(ex.label) for ex in val])
        calib = calibration_report(torch.log(torch.from_numpy(answers.label_probs).clamp_min(1e-30)), gold)
    else:
        calib = {"temperature": 1.0, "note": "extract task: one label, no label calibration"}
    gold_rows, _ = tag_rows(tokenizer, texts, [ex.fields or {} for ex in val], tags, max_len)
    calib["tag_temperature"] = fit_tag_temperature(answers.tag_logits, gold_rows)
    calib["confidence"] = confidence_report(answers, texts, tags, labels, [ex.label for ex in val],
                                            [ex.fields for ex in val], joint, calib["temperature"],
                                            calib["tag_temperature"])
    report = {"confidence_auroc": {m: e["auroc"] for m, e in calib["confidence"]["estimates"].items()},
              "confidence_method": calib["confidence"]["method"]}
    splits = ["val"] + (["test"] if (Path(data_dir) / "test.jsonl").exists() else [])
    for split in splits:
        rows = val if split == "val" else load_split(data_dir, split)
        if split != "val":
            answers = tagger_answers(student, tokenizer, [ex.text for ex in rows], max_len)
        pred = answers.fields([ex.text for ex in rows], tags)
        scores = span_scores([ex.fields for ex in rows], pred, label_set.fields)
        report[f"{split}_span_f1"] = scores["span_f1"]
        report[f"{split}_exact_match"] = scores["exact_match"]
        if joint:
            pl = [labels[i] for i in answers.label_probs.argmax(-1)]
            report[f"{split}_accuracy"] = float(np.mean([p == ex.label for p, ex in zip(pl, rows)]))
            report[f"{split}_joint_accuracy"] = float(np.mean([p == ex.label and same_fields(f, ex.fields)
                                                               for p, f, ex in zip(pl, pred, rows)]))
    return calib, report


def read_teacher_fields(path: Path, schema: list[str]) -> dict[str, dict]:
    """The large model's extractions: JSONL rows {"text": ..., "fields": {name: [values]}}.

    Returns text -> fields (a later row for the same text replaces an earlier one). A row whose
    fields are not a valid answer for its text (cascade.fields.check_fields: a value not in the
    text, a name outside the schema) is an error naming its line."""
    from cascade.fields import as_fields, check_fields

    out: dict[str, dict] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{lineno}: expected an object with a non-empty \"text\"")
        text = text.strip()
        problem = check_fields(text, row.get("fields", {}), schema)
        if problem:
            raise ValueError(f"{path}:{lineno}: {problem}")
        out[text] = as_fields(row.get("fields", {}))
    return out


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
