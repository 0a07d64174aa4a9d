"""`cascade train crossfit`: label-free calibration evidence on the train split, cross-fitted.

Calibration's labelled evidence is val (about 1,000 items on a new dataset), so its bound is
wide. On items a cheap tier answers, the loss against the large model is at most their
disagreement, which needs no gold (`cascade.certify`, "label-free evidence"), and the
teacher-label cache holds the large model's answer on every train text. Two biases stand in the
way. The large model's answers on the texts it was fine-tuned on are its training labels, not
its behaviour on traffic, so only the train rows it did not learn are scored (a model that
learnt all of train is refused; docs/calibration.md has the measurement that shows why). And
the deployed cheap tiers were fit to all of train, so train is cut into K folds: for each, the
rules are mined and the student distilled on the other K - 1 folds, with the deployed student's
recipe and teacher, exported as it was (ONNX, int8), and run on the held-out fold through the
same tier kinds and options. Each scored text then has predictions from tiers that never saw it
and the large model's answer (the argmax of its cached distribution: the same label scoring its
tier answers with).

The out-of-fold tiers stand for the deployed ones: they use 1 - 1/K of the data, so they are a
little weaker (the evidence is conservative there), and their thresholds are assumed to mean
what the deployed tiers' do (same recipe, temperature fitted on val the same way). Written as
one JSON file (`cascade.evidence`) that `cascade calibrate --label-free FILE` reads; classify
tasks only (the cache holds labels, not fields).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from cascade.evidence import EVIDENCE_FORMAT, text_digest

REFITTABLE = ("rules", "student")  # cheap tier kinds that can be fit again out of fold


def folds_of(n: int, k: int, seed: int) -> list[np.ndarray]:
    """K disjoint folds of range(n), seeded, sizes within one of each other."""
    if not 2 <= k <= n:
        raise ValueError(f"--folds {k}: need 2 <= K <= {n} (the train rows)")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(f) for f in np.array_split(order, k)]


def _teacher_unseen_rows(teacher: Path, n_train: int) -> np.ndarray:
    """The train rows the large model did not learn from (`training.large.learnt_train_rows` names
    the ones it did).

    Its answers on the texts it was fine-tuned on are its training labels, near-gold, not how it
    answers traffic: on the quickstart demo its out-of-fold students agreed with it on 99.2% of
    train but the deployed student on only 91.6% of val, and the evidence certified a point that
    lost 0.7 pt (bench/results/calibration_check-label-free-quickstart.json). Those rows cannot be
    evidence whatever the students do."""
    from training.large import learnt_train_rows

    summary_file = teacher / "train_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    seen, sample = summary.get("train_rows"), summary.get("train_sample")
    if seen is None:
        raise ValueError(f"{teacher}: its train_summary.json does not say which train rows it learnt from (a model "
                         f"trained before this was recorded): its answers on its own training texts would stand for "
                         f"its answers on traffic, which they are not. Train it again, or use audited traffic "
                         f"(`cascade calibrate --label-free LOG_DIR`)")
    if seen >= n_train:
        raise ValueError(f"{teacher} learnt from all {n_train} train rows: there its answers are its training labels, "
                         f"not evidence of how it answers traffic. Cross-fitted evidence needs train rows the large "
                         f"model did not see (`cascade train large --limit-train N` leaves the rest), or use audited "
                         f"traffic (`cascade calibrate --label-free LOG_DIR`)")
    if sample is None:  # trained before the sample was recorded: it learnt the first `train_rows`
        return np.arange(seen, n_train)
    if sample["of"] != n_train:
        raise ValueError(f"{teacher} sampled its {seen} train rows from {sample['of']} rows, but this data dir's "
                         f"train split has {n_train}: not the data it was trained on, so which rows it saw is unknown")
    learnt = set(learnt_train_rows(n_train, seen, sample["seed"]))
    return np.array([i for i in range(n_train) if i not in learnt], dtype=np.int64)


def _student_recipe(student_dir: Path, overrides: dict | None = None):
    """(TrainConfig, distillation kwargs) of the deployed student, from its train_summary.json,
    with `overrides` (TrainConfig fields) on top."""
    from training.recipes import STUDENT
    from training.trainer import TrainConfig

    summary = json.loads((student_dir / "train_summary.json").read_text())
    if summary.get("task", "classify") != "classify":
        raise ValueError(f"{student_dir}: cross-fitting covers classify tasks (the teacher cache holds labels)")
    if summary.get("config") is None and not overrides:
        print(f"note: {student_dir}/train_summary.json has no recipe (an older student): out-of-fold students "
              f"use the STUDENT recipe (give --lr/--epochs/--warmup-steps if it was trained otherwise)",
              file=sys.stderr)
    known = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in {**(summary.get("config") or STUDENT), **(overrides or {})}.items()
                         if k in known})
    kwargs = {"size": summary["size"], "from_teacher": summary.get("from_teacher_layers") is not None,
              "temperature": summary.get("temperature_kd", 2.0), "alpha": summary.get("alpha", 0.5),
              "max_len": summary.get("max_len", 64)}
    return cfg, kwargs


def crossfit(config_path: str | Path, data_dir: str | Path, out_dir: str | Path, *, folds: int = 3, seed: int = 0,
             limit: int | None = None, toy_rules: bool = False, progress: bool = True,
             recipe: dict | None = None) -> dict:
    """Write OUT/evidence.json: every cheap tier of the cascade at `config_path` re-fit on K - 1
    folds of train and run on the held-out fold, and the large model's cached answers, for
    `limit` train rows at most (a seeded sample; the rest of train still trains the students).
    Fold dirs (OUT/fold-J/) keep the out-of-fold models; a fold whose predictions exist is not
    redone. `recipe`: TrainConfig fields replacing the deployed student's recorded ones.
    Returns the evidence's summary."""
    from cascade.config import load_config
    from cascade.data import load_labels, load_split
    from cascade.evaluate import LLM_KINDS
    from training.distill import teacher_distributions
    from training.flywheel import teacher_dir_of

    config_path, data_dir, out = Path(config_path), Path(data_dir), Path(out_dir)
    config = load_config(config_path)
    base = config_path.parent
    label_set = load_labels(data_dir)
    if label_set.task != "classify":
        raise ValueError(f"{data_dir}: cross-fitted evidence covers classify tasks; this one is {label_set.task!r}")
    specs, last = config.tiers[:-1], config.tiers[-1]
    if last.kind not in LLM_KINDS:
        raise ValueError(f"{config_path}: the last tier {last.name!r} is not the large model (kind {last.kind!r})")
    for spec in specs:
        if spec.kind not in REFITTABLE:
            raise ValueError(f"{config_path}: tier {spec.name!r} is of kind {spec.kind!r}; cross-fitting can fit "
                             f"again {', '.join(REFITTABLE)} tiers only")
    students = [s for s in specs if s.kind == "student"]
    if not students:
        raise ValueError(f"{config_path}: no student tier; the teacher's answers come from the student's teacher")
    teacher = teacher_dir_of(students[0].resolve_path(base))
    if teacher is None:
        raise ValueError(f"{students[0].resolve_path(base)}: its teacher is not a local model dir (cascade.json "
                         f"`teacher`), so its answers on train are not cached")
    train, val = load_split(data_dir, "train"), load_split(data_dir, "val")
    texts = [ex.text for ex in train]
    unseen = _teacher_unseen_rows(teacher, len(train))
    probs, _ = teacher_distributions(teacher, texts, progress=progress)  # the cache the student filled
    probs = probs.float().numpy()
    folds_idx = folds_of(len(train), folds, seed)
    scored = (np.sort(np.random.default_rng(seed + 1).choice(unseen, limit, replace=False))
              if limit is not None and limit < len(unseen) else unseen)
    out.mkdir(parents=True, exist_ok=True)
    n_cheap = len(specs)
    labels_by_tier: list[list] = [[None] * len(train) for _ in specs]
    conf_by_tier = [np.zeros(len(train)) for _ in specs]
    fold_records = []
    for j, held in enumerate(folds_idx):
        fold_dir = out / f"fold-{j}"
        held_scored = np.intersect1d(held, scored)
        record = _fold(j, fold_dir, held, held_scored, train, val, texts, specs, base, label_set, data_dir,
                       toy_rules, progress, recipe)
        for t in range(n_cheap):
            for i, lab, c in zip(held_scored, record["labels"][t], record["confidence"][t]):
                labels_by_tier[t][i], conf_by_tier[t][i] = lab, c
        fold_records.append({k: v for k, v in record.items() if k not in ("labels", "confidence")})
    llm_labels = [label_set.labels[int(i)] for i in probs.argmax(-1)]
    runs = [{"name": s.name, "kind": s.kind, "labels": [labels_by_tier[t][i] for i in scored],
             "confidence": [float(conf_by_tier[t][i]) for i in scored]} for t, s in enumerate(specs)]
    runs.append({"name": last.name, "kind": last.kind, "labels": [llm_labels[i] for i in scored],
                 "confidence": [float(probs[i].max()) for i in scored]})
    evidence = {
        "format": EVIDENCE_FORMAT, "source": "crossfit", "config": str(config_path.resolve()),
        "data": str(data_dir.resolve()), "split": "train", "folds": folds, "seed": seed, "n": int(len(scored)),
        "teacher": str(teacher), "text_digests": [text_digest(texts[i]) for i in scored], "runs": runs,
        "fold_records": fold_records,
    }
    # the figure a user reads first: how often each out-of-fold tier's top answer matches the large model's
    agreement = {}
    for r in runs[:-1]:
        answered = np.array([lab is not None for lab in r["labels"]])
        same = np.array([a == b for a, b in zip(r["labels"], runs[-1]["labels"])])
        agreement[r["name"]] = float(same[answered].mean()) if answered.any() else None
    evidence["agreement_with_llm"] = agreement
    tmp = out / "evidence.json.tmp"
    tmp.write_text(json.dumps(evidence) + "\n")
    tmp.replace(out / "evidence.json")
    return {k: evidence[k] for k in ("n", "folds", "agreement_with_llm", "fold_records")} | {
        "path": str(out / "evidence.json")}


def _fold(j: int, fold_dir: Path, held: np.ndarray, held_scored: np.ndarray, train: list, val: list,
          texts: list[str], specs: list, base: Path, label_set, data_dir: Path, toy_rules: bool, progress: bool,
          recipe: dict | None) -> dict:
    """One fold: the cheap tiers fit on train minus `held`, run on `held_scored`; cached in
    FOLD/predictions.json."""
    done = fold_dir / "predictions.json"
    if done.exists():
        record = json.loads(done.read_text())
        if record.get("held_scored") == held_scored.tolist():
            return record
    from cascade.calibrate import measure_tiers
    from cascade.router import Cascade
    from cascade.rules.mine import mine_for_task, write_pack
    from cascade.tiers import build_tier
    from training.distill import train_student
    from training.flywheel import export_student, teacher_dir_of

    fold_dir.mkdir(parents=True, exist_ok=True)
    held_set = set(held.tolist())
    rest = [i for i in range(len(train)) if i not in held_set]
    fold_specs = []
    for spec in specs:
        if spec.kind == "rules":
            pack_path = fold_dir / f"{spec.name}.toml"
            pack = mine_for_task([train[i] for i in rest], val, f"{spec.name}-fold{j}", label_set.task,
                                 label_set.oos_label, toy=toy_rules)
            write_pack(pack, pack_path)
            fold_specs.append(spec.model_copy(update={"path": str(pack_path.resolve())}))
        else:  # student: the deployed recipe on the other folds, exported the same way
            deployed = spec.resolve_path(base)
            cfg, kwargs = _student_recipe(deployed, recipe)
            student_dir = fold_dir / spec.name
            if student_dir.exists() and not (student_dir / "model.int8.onnx").exists():
                shutil.rmtree(student_dir)  # an unfinished fold student: train it again
            if not student_dir.exists():
                print(f"fold {j}: distilling {spec.name} on {len(rest)} of {len(train)} train rows", file=sys.stderr)
                train_student(data_dir, teacher_dir_of(deployed), student_dir, cfg=cfg, train_rows=rest,
                              progress=progress, **kwargs)
                export_student(student_dir, data_dir, min_agreement=0.99 if (deployed / "model.int8.onnx").exists()
                               else None)
            fold_specs.append(spec.model_copy(update={"path": str(student_dir.resolve())}))
    fold_cascade = Cascade([build_tier(s, base) for s in fold_specs], [s.threshold for s in fold_specs])
    try:
        runs = measure_tiers(fold_cascade, [False] * len(fold_specs), [texts[i] for i in held_scored])
    finally:
        fold_cascade.close()
    record = {"fold": j, "train_rows": len(rest), "held_out": int(len(held)), "held_scored": held_scored.tolist(),
              "labels": [r.labels for r in runs], "confidence": [r.confidences.tolist() for r in runs],
              "answered_share": {r.name: float(np.mean([x is not None for x in r.labels])) for r in runs}}
    done.write_text(json.dumps(record) + "\n")
    return record
