"""`cascade flywheel`: one round of the cascade learning from its own traffic.

    read the log -> pick texts to label -> label them with the large model -> prune the
    distillation set -> distil the student again (warm start) -> export + int8 -> recalibrate
    on val -> gate against the current version -> write VERSIONS/vNNN -> (--promote) point
    VERSIONS/current at it

1. `read_traffic`: every text logged since the parent round's cursor (the whole log for a first
   round, another log, or `--from-start`), deduplicated after `training.selection.normalize_text`.
   Texts the large model already answered (escalated, or audited) are free labels; the rest,
   answered by the cheap tiers, are the pool a labelling budget picks from. Texts in the val or
   test split are dropped (training on them would void the calibration's certificate and the
   gate), and so are texts already in train or learnt by an earlier round; hashed or dropped
   texts cannot be trained on and are counted. With `--calibrate-on-audits`, `audit_evidence`
   first takes the log's audited sample (`serving.traffic_log.audited_sample`) out of the free
   labels and the pool: those texts are never trained on, so they can test the new version.
   The parent version's unpicked pool texts (`flywheel_pool.jsonl`, `--carry-pool` at most) join
   the pool, so a text the cursor passed stays a candidate until a budget picks it.
2. `pick_budget`: `--budget N` texts of the pool by a strategy of `training/selection.py`, on
   the current student's probabilities (its serving tier) and embeddings (`student_embeddings`).
3. `label_texts`: the config's large-model tier, built from its spec with `build_tier` (builtin
   engine, vLLM or a remote OpenAI-compatible server alike), answers the picks; its full label
   distribution (`Prediction.scores`) is the soft target. Appended to `labels.jsonl` a chunk at a
   time, so a killed run does not pay for them twice.
4. `train_rows` + `read_carried` + `prune`: train (gold + the local teacher's cached distribution) plus
   every traffic text labelled so far (this round's and the parent version's
   `flywheel_data.jsonl`), pruned to `--max-train` by `selection.prune_easy`.
5. `distil_warm`: `training/distill.py`'s loss and trainer, started from the current student's
   weights instead of a fresh or teacher-initialised model (train_student has no such option;
   this is the one hook, here rather than there). Then export, int8 and a new temperature.
6. `write_version_config` + `recalibrate`: the version's cascade.toml (paths relative to it;
   the other tiers' models referenced, not copied; rule packs copied), thresholds chosen by
   `cascade.calibrate.run_calibration` ("llm" target, `--max-loss`, `--confidence`), on val and,
   with `--calibrate-on-audits`, the held-out audited sample as label-free evidence.
7. `gate_verdict`: on val, measured for both versions by the same code (`measure`: `cascade
   eval`'s `evaluate`), the new one must be certified and reach the large model's accuracy minus
   `--max-loss`, and must not raise the large-model share. `point_current` swaps the `current`
   symlink atomically.

A round is built in `VERSIONS/.vNNN.partial/`, each step leaving its file; `--resume` continues
one killed mid-way from the last finished step (the trainer from its checkpoint). Finished, the
dir is renamed `vNNN`, promoted or not; versions are never deleted (rollback: docs/flywheel.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cascade.evidence import CARRIED_TRAFFIC
from training.selection import STRATEGIES, el2n, normalize_text, prune_easy, select

MANIFEST = "manifest.json"
CARRIED = CARRIED_TRAFFIC  # every traffic text learnt so far, with its soft label
POOL = "flywheel_pool.jsonl"  # the pool texts a round did not pick: the next round's candidates too
VERSION_RE = re.compile(r"^\.?v(\d{3,})(\.partial)?$")
NEVER = 1.000001  # a threshold no confidence reaches (cascade.calibrate's NEVER)
# the log's counts a manifest keeps as they are
COUNTED = ("entries", "audit_entries", "unique_texts", "duplicates", "hashed_texts_skipped", "dropped_texts_skipped",
           "held_out_skipped", "known_skipped", "unknown_label_skipped", "pool")
IGNORE = -100  # no gold label: the row learns from its target alone (training.trainer.IGNORE)


class FlywheelError(ValueError):
    """A round that cannot run as asked; the message says why and what to do."""


@dataclass
class FlywheelConfig:
    """One round's knobs; validated in __post_init__, errors name the flag."""

    budget: int = 0  # texts of the cheap-tier pool to have labelled by the large model
    strategy: str = "uncertainty"  # training.selection.STRATEGIES
    measure: str = "margin"  # uncertainty's measure: margin | entropy
    seed: int = 0
    max_train: int | None = None  # distillation rows after pruning (None: all)
    max_loss: float = 0.005  # the accuracy target: the large model's minus this, on val
    confidence: float = 0.9  # ... certified with this probability (docs/calibration.md)
    label_batch: int = 64  # texts per call to the large-model tier
    min_agreement: float | None = 0.99  # int8 vs fp32 top-1 agreement target on val (None: no fallback)
    kd_temperature: float = 2.0
    alpha: float = 0.5  # train rows: weight of the teacher term (1 - alpha on gold)
    diversity_train_centres: int = 2000  # train texts (seeded sample) counted as covered
    max_pool: int = 10_000  # candidates scored at most (a seeded uniform sample of a larger pool):
    # importance's density is O(pool^2 x dim), diversity O(budget x pool x dim)
    # the log's audited sample (a uniform sample of traffic with the large model's answers) held
    # out of training and added to val as label-free calibration evidence (docs/flywheel.md)
    audit_evidence: bool = False
    from_start: bool = False  # read the whole log, not only what came after the parent round's cursor
    # unpicked pool texts a version hands to the next round (the newest; 0: none): without it, a
    # text the cursor passed and the budget did not pick is never a candidate again
    carry_pool: int = 20_000

    def __post_init__(self) -> None:
        checks = {
            "--budget": self.budget >= 0, "--strategy": self.strategy in STRATEGIES,
            "--uncertainty": self.measure in ("margin", "entropy"),
            "--max-train": self.max_train is None or self.max_train >= 1,
            "--max-loss": 0.0 <= self.max_loss < 1.0, "--confidence": 0.0 < self.confidence < 1.0,
            "--label-batch": self.label_batch >= 1,
            "--min-agreement": self.min_agreement is None or 0.0 < self.min_agreement <= 1.0,
            "kd_temperature": self.kd_temperature > 0,
            "alpha": 0.0 <= self.alpha <= 1.0, "diversity_train_centres": self.diversity_train_centres >= 0,
            "--max-pool": self.max_pool >= 1, "--carry-pool": self.carry_pool >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise FlywheelError(f"out of range: {', '.join(bad)} ({asdict(self)})")


@dataclass
class Row:
    """One distillation row: the text, its target distribution over the labels, the gold label
    index (or IGNORE), and where it came from (train, escalated, audit, budget, carried)."""

    text: str
    target: np.ndarray  # (L,)
    gold: int
    source: str


@dataclass
class Traffic:
    free: list[Row]  # texts the large model already answered in the log
    pool: list[str]  # texts only the cheap tiers answered: the budget's candidates
    segments: list[str]
    counts: dict = field(default_factory=dict)
    cursor: dict = field(default_factory=dict)  # just past the last entry read (`read_log`'s `end`)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def answer_distribution(label: str, confidence: float, labels: list[str],
                        top: list | None = None) -> np.ndarray:
    """A logged answer as a distribution: its `top` labels' probabilities (the log's `llm.top`,
    [[label, p], ...]) and the top label's, the rest of the mass spread evenly over the other
    labels. Without `top` (a log written before it, or `llm_top_k = 0`), the top label alone.
    A `top` label outside the task's is left out, its mass spread with the rest."""
    index = {lab: i for i, lab in enumerate(labels)}
    confidence = min(1.0, max(0.0, confidence))
    known = {str(pair[0]): float(pair[1]) for pair in (top or [])
             if isinstance(pair, list | tuple) and len(pair) == 2 and str(pair[0]) in index
             and isinstance(pair[1], int | float) and 0.0 <= pair[1] <= 1.0}
    known.setdefault(label, confidence)
    others = len(labels) - len(known)
    p = np.full(len(labels), max(0.0, 1.0 - sum(known.values())) / max(1, others))
    for lab, q in known.items():
        p[index[lab]] = q
    if p.sum() <= 0.0:  # nothing to go by but the label itself
        p[index[label]] = 1.0
    return p / p.sum()


# --- 1. the log ----------------------------------------------------------------------------


def read_traffic(log_dir: Path, labels: list[str], held_out: set[str], known: set[str],
                 since: dict | None = None) -> Traffic:
    """Group the log's entries by normalised text: free labels and the budget's pool.

    Args:
        log_dir: the traffic log's dir (`serving.traffic_log.read_log`).
        labels: the task's labels (a large-model answer outside them is skipped, counted).
        held_out: normalised val and test texts: never trained on.
        known: normalised texts already learnt (train, earlier rounds): skipped.
        since: a log cursor (the parent round's): only the entries after it.
    """
    from serving.traffic_log import read_log

    if not log_dir.is_dir():
        raise FileNotFoundError(f"--log {log_dir}: not a directory (the traffic log's `dir`)")
    counts = {"entries": 0, "audit_entries": 0, "hashed_texts_skipped": 0, "dropped_texts_skipped": 0,
              "duplicates": 0, "held_out_skipped": 0, "known_skipped": 0, "unknown_label_skipped": 0}
    by_key: dict[str, dict] = {}
    cursor: dict = {}
    for entry in read_log(log_dir, since, cursor):
        counts["entries"] += 1
        counts["audit_entries"] += bool(entry.get("audit"))
        text = entry.get("text")
        if not isinstance(text, str) or not text.strip():
            counts["hashed_texts_skipped" if "text_sha256" in entry else "dropped_texts_skipped"] += 1
            continue
        key = normalize_text(text)
        rec = by_key.get(key)
        if rec is None:
            rec = by_key[key] = {"text": text, "llm": None, "source": None}
        else:
            counts["duplicates"] += 1
        llm = entry.get("llm")
        if isinstance(llm, dict) and "label" in llm:  # the latest answer wins
            rec["llm"], rec["source"] = llm, "audit" if entry.get("audit") else "escalated"
    free, pool = [], []
    for key, rec in by_key.items():
        if key in held_out:
            counts["held_out_skipped"] += 1
        elif key in known:
            counts["known_skipped"] += 1
        elif rec["llm"] is None:
            pool.append(rec["text"])
        elif rec["llm"]["label"] not in labels:
            counts["unknown_label_skipped"] += 1
        else:
            llm = rec["llm"]
            conf = llm.get("confidence", 1.0)
            conf = float(conf) if isinstance(conf, int | float) else 1.0  # a hand-written line's null
            target = answer_distribution(llm["label"], conf, labels, llm.get("top"))
            free.append(Row(rec["text"], target, IGNORE, rec["source"]))
    counts["unique_texts"] = len(by_key)
    return recount(Traffic(free, pool, sorted(p.name for p in log_dir.glob("traffic-*.jsonl")), counts, cursor))


def recount(traffic: Traffic) -> Traffic:
    """Its counts of free labels by source and of pool texts, from what it holds now."""
    traffic.counts["escalated_labels"] = sum(r.source == "escalated" for r in traffic.free)
    traffic.counts["audit_labels"] = sum(r.source == "audit" for r in traffic.free)
    traffic.counts["pool"] = len(traffic.pool)
    return traffic


def read_pool(config_dir: Path) -> list[str]:
    """The pool texts the parent version's round did not pick (its `flywheel_pool.jsonl`)."""
    path = config_dir / POOL
    if not path.exists():
        return []
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            texts.append(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FlywheelError(f"{path}:{n}: not a pool line ({{\"text\": ...}}): {exc}") from None
    return texts


def add_carried_pool(traffic: Traffic, carried: list[str], skip: set[str]) -> Traffic:
    """Put the parent round's unpicked texts in front of this round's pool, leaving out those
    the new log section holds (its answer is newer) and the normalised texts of `skip` (val,
    test, and what is learnt by now); counted as `pool_carried`."""
    seen = skip | {normalize_text(t) for t in traffic.pool} | {normalize_text(r.text) for r in traffic.free}
    added = []
    for text in carried:
        key = normalize_text(text)
        if key not in seen:
            seen.add(key)
            added.append(text)
    traffic.pool = added + traffic.pool
    traffic.counts["pool_carried"] = len(added)
    return recount(traffic)


def write_pool(path: Path, texts: list[str], round_name: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "round": round_name}) + "\n")


# --- 2. the budget -------------------------------------------------------------------------


def student_embeddings(student_dir: Path, texts: list[str], batch: int = 256) -> np.ndarray | None:
    """(N, D) the pooled hidden state the student's label head reads, from its PyTorch weights
    (a forward hook on `head`, applied from outside the model); None when the dir has no
    `model.safetensors` (an ONNX-only student: callers fall back to `logit_embeddings`)."""
    if not (student_dir / "model.safetensors").exists():
        return None
    import torch
    from tokenizers import Tokenizer

    from training.export import encode
    from training.student import load_student

    model = load_student(student_dir)
    tokenizer = Tokenizer.from_file(str(student_dir / "tokenizer.json"))
    pooled: list[torch.Tensor] = []
    hook = model.head.register_forward_pre_hook(lambda _m, args: pooled.append(args[0].detach().float()))
    try:
        with torch.no_grad():
            for s in range(0, len(texts), batch):
                ids, mask = encode(tokenizer, texts[s:s + batch], model.cfg.max_seq_len)
                model(torch.from_numpy(ids), torch.from_numpy(mask))
    finally:
        hook.remove()
    return torch.cat(pooled).numpy() if pooled else np.zeros((0, model.cfg.dim), dtype=np.float32)


def logit_embeddings(probs: np.ndarray) -> np.ndarray:
    """Centred log-probabilities: the graph's logits / T up to the per-row shift softmax ignores."""
    logp = np.log(np.clip(probs, 1e-12, 1.0))
    return logp - logp.mean(1, keepdims=True)


def pick_budget(pool: list[str], student, student_dir: Path, cfg: FlywheelConfig, covered: list[str]) -> dict:
    """Choose `cfg.budget` texts of `pool` with `cfg.strategy`.

    Args:
        pool: candidate texts. student: the current student tier (`probabilities`).
        covered: texts already labelled (diversity's starting centres; the other strategies ignore it).

    Returns: {"texts", "indices" (into the scored pool), "embedding": what the embeddings were,
    "pool_mean_confidence", "picked_mean_confidence", "pool_scored": the candidates scored (a
    seeded sample of `cfg.max_pool` when the pool is larger)}.
    """
    k = min(cfg.budget, len(pool))
    out = {"texts": [], "indices": [], "embedding": None, "pool_mean_confidence": None,
           "picked_mean_confidence": None, "pool_scored": 0}
    if k == 0:
        return out
    if len(pool) > cfg.max_pool:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(pool), cfg.max_pool, replace=False))
        pool = [pool[i] for i in keep]
    out["pool_scored"] = len(pool)
    probs = student.probabilities(pool)
    emb = centres = None
    if cfg.strategy in ("diversity", "importance"):
        covered = covered if cfg.strategy == "diversity" else []
        emb = student_embeddings(student_dir, pool + covered)
        out["embedding"] = "pooled hidden state" if emb is not None else "centred log-probabilities"
        if emb is None:
            emb = logit_embeddings(np.concatenate([probs, student.probabilities(covered)]) if covered else probs)
        emb, centres = emb[:len(pool)], emb[len(pool):]
    idx = select(cfg.strategy, k, probs, emb, seed=cfg.seed, centres=centres, measure=cfg.measure)
    out.update(texts=[pool[i] for i in idx], indices=[int(i) for i in idx],
               pool_mean_confidence=float(probs.max(1).mean()),
               picked_mean_confidence=float(probs[idx].max(1).mean()))
    return out


# --- 3. labelling ----------------------------------------------------------------------------


def llm_spec(config):
    """The config's last large-model tier spec (the labeller)."""
    from cascade.evaluate import LLM_KINDS

    specs = [t for t in config.tiers if t.kind in LLM_KINDS]
    if not specs:
        raise FlywheelError("the config has no large-model tier (kind 'llm') to label with")
    return specs[-1]


def label_texts(spec, base_dir: Path, texts: list[str], labels: list[str], out_file: Path, batch: int = 64,
                log=print) -> list[np.ndarray | None]:
    """The large-model tier's distribution for each text (None where it abstained), appended to
    `out_file` (JSONL) a batch at a time; texts already there (a killed run's) are not asked again."""
    from cascade.tiers import build_tier
    from cascade.types import TierUnavailable

    done: dict[int, np.ndarray | None] = {}
    if out_file.exists():
        for line in out_file.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn by a kill: asked again
            done[rec["i"]] = None if rec.get("scores") is None else np.array(rec["scores"])
    todo = [i for i in range(len(texts)) if i not in done]
    if done:
        log(f"      {len(done)} labels already in {out_file.name} (resumed); {len(todo)} to ask")
    if todo:
        tier = build_tier(spec, base_dir)
        try:
            with out_file.open("a", encoding="utf-8") as f:
                for s in range(0, len(todo), batch):
                    chunk = todo[s:s + batch]
                    try:
                        preds = tier.predict_batch([texts[i] for i in chunk])
                    except TierUnavailable as exc:
                        raise FlywheelError(f"the large-model tier {spec.name!r} is unavailable ({exc}); the "
                                            f"{len(done)} labels so far are kept in {out_file}: rerun with "
                                            "--resume") from None
                    for i, p in zip(chunk, preds):
                        scores = None
                        if p is not None:
                            got = p.scores or {p.label: p.confidence}
                            scores = [float(got.get(lab, 0.0)) for lab in labels]
                            if sum(scores) <= 0:  # a backend without this task's labels
                                scores = None
                        done[i] = None if scores is None else np.array(scores)
                        f.write(json.dumps({"i": i, "text": texts[i], "scores": scores}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            close = getattr(tier, "close", None)
            if close is not None:
                close()
    return [None if done[i] is None else done[i] / done[i].sum() for i in range(len(texts))]


# --- 4. the distillation set -----------------------------------------------------------------


def teacher_dir_of(student_dir: Path) -> Path | None:
    """The local teacher the student was distilled from (its cascade.json `teacher`), if present."""
    meta = json.loads((student_dir / "cascade.json").read_text())
    if not meta.get("teacher"):
        return None
    d = (student_dir / meta["teacher"]).resolve()
    return d if (d / "model.safetensors").exists() and (d / "cascade.json").exists() else None


def train_rows(data_dir: Path, labels: list[str], teacher: Path | None, progress: bool = True) -> list[Row]:
    """The train split: gold labels plus the teacher's distribution (the cache the first
    distillation filled, same texts in the same order) when the teacher is a local model dir;
    without one (a remote large model), the gold label as a one-hot target."""
    from cascade.data import load_split

    train = load_split(data_dir, "train")
    gold = [labels.index(ex.label) for ex in train]
    if teacher is not None:
        from training.distill import teacher_distributions

        probs, _ = teacher_distributions(teacher, [ex.text for ex in train], progress=progress)
        targets = probs.float().numpy()
    else:
        targets = np.eye(len(labels))[gold]
    return [Row(ex.text, t, g, "train") for ex, t, g in zip(train, targets, gold)]


def read_carried(config_dir: Path, labels: list[str]) -> list[Row]:
    """The traffic texts earlier rounds learnt (the parent version's `flywheel_data.jsonl`)."""
    path = config_dir / CARRIED
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["labels"] != labels:
            raise FlywheelError(f"{path}: written for other labels than the dataset's")
        rows.append(Row(rec["text"], np.array(rec["target"]), IGNORE, "carried"))
    return rows


def write_carried(path: Path, rows: list[Row], labels: list[str], round_name: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": r.text, "source": r.source, "round": round_name, "labels": labels,
                                "target": [round(float(x), 6) for x in r.target]}) + "\n")


def prune(rows: list[Row], student, max_train: int | None) -> tuple[list[Row], dict]:
    """`selection.prune_easy` on the rows, with the current student's probabilities; returns
    (kept rows, a report of what went)."""
    report = {"before": len(rows), "max_train": max_train, "pruned": 0, "pruned_by_source": {},
              "pruned_mean_student_confidence": None, "pruned_agree_with_target": None, "el2n_mean": None}
    if max_train is None or max_train >= len(rows):
        report["after"] = len(rows)
        return rows, report
    probs, targets = student.probabilities([r.text for r in rows]), np.stack([r.target for r in rows])
    kept = set(prune_easy(probs, targets, max_train).tolist())
    gone = [i for i in range(len(rows)) if i not in kept]
    for i in gone:
        report["pruned_by_source"][rows[i].source] = report["pruned_by_source"].get(rows[i].source, 0) + 1
    hardness = el2n(probs, targets)
    report.update(pruned=len(gone), after=len(kept),
                  pruned_mean_student_confidence=float(probs[gone].max(1).mean()) if gone else None,
                  pruned_agree_with_target=float((probs[gone].argmax(1) == targets[gone].argmax(1)).mean())
                  if gone else None,
                  el2n_mean={"pruned": float(hardness[gone].mean()) if gone else None,
                             "kept": float(hardness[sorted(kept)].mean())})
    return [rows[i] for i in sorted(kept)], report


# --- 5. distillation, warm-started -----------------------------------------------------------


def distil_warm(init_dir: Path, rows: list[Row], data_dir: Path, out_dir: Path, train_cfg, *,
                temperature: float = 2.0, alpha: float = 0.5, resume: bool = False, progress: bool = True,
                extra_meta: dict | None = None) -> dict:
    """Distil again from the student in `init_dir` (its weights, size, tokenizer and labels) on
    `rows`: distill.py's `kd_batch_loss` with each row's target as the teacher distribution (gold rows
    also take the CE term), the same Trainer, a temperature refitted on val. Checkpoints go to
    `OUT.checkpoints` (`resume` continues from them) and are removed once the student is saved."""
    import torch
    from tokenizers import Tokenizer

    from cascade.data import load_labels, load_split
    from training.distill import batched_logits, kd_batch_loss
    from training.export import encode
    from training.student import load_student, save_student
    from training.temperature import calibration_report
    from training.trainer import Hooks, Sequence, Trainer

    torch.manual_seed(train_cfg.seed)
    labels = json.loads((init_dir / "cascade.json").read_text())["labels"]
    model = load_student(init_dir).train()
    tokenizer = Tokenizer.from_file(str(init_dir / "tokenizer.json"))
    max_len = model.cfg.max_seq_len
    ids, mask = encode(tokenizer, [r.text for r in rows], max_len)
    data = [Sequence([int(x) for x, m in zip(row, mrow) if m], [r.gold]) for row, mrow, r in zip(ids, mask, rows)]
    targets = torch.tensor(np.stack([r.target for r in rows]), dtype=torch.float32)
    batch_loss = kd_batch_loss(data, targets, temperature, alpha)

    val = load_split(data_dir, "val")
    val_ids, val_mask = encode(tokenizer, [ex.text for ex in val], max_len)
    val_gold = torch.tensor([labels.index(ex.label) for ex in val])

    def val_logits() -> torch.Tensor:
        return batched_logits(model, val_ids, val_mask)

    def evaluate() -> dict:
        return {"val_accuracy": (val_logits().argmax(-1) == val_gold).float().mean().item()}

    ckpt = out_dir.with_name(out_dir.name + ".checkpoints")
    trainer = Trainer(model, data, train_cfg, out_dir, Hooks(evaluate=evaluate), pad_id=0, n_params=model.num_params(),
                      batch_loss=batch_loss, count_targets=lambda s: 1, ckpt_dir=ckpt)
    result = trainer.fit(resume=resume, progress=progress)
    model.eval()
    logits = val_logits()
    calib = calibration_report(logits, val_gold)
    teacher = teacher_dir_of(init_dir)
    save_student(model, out_dir, init_dir / "tokenizer.json", labels,
                 {"data": str(data_dir.resolve()), "teacher": str(teacher) if teacher else None,
                  "oos_label": load_labels(data_dir).oos_label, **(extra_meta or {})},
                 temperature=calib["temperature"])
    summary = {"warm_start": str(init_dir.resolve()), "steps": result.steps, "wall_s": result.wall_s,
               "rows": len(rows), "val_accuracy": (logits.argmax(-1) == val_gold).float().mean().item(),
               "calibration": calib, "temperature_kd": temperature, "alpha": alpha}
    (out_dir / "calibration.json").write_text(json.dumps(calib, indent=1) + "\n")
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)
    return summary


def export_student(student_dir: Path, data_dir: Path, min_agreement: float | None = 0.99) -> dict:
    """ONNX (parity-checked) and int8 (agreement-checked on val), as `cascade export --int8` does."""
    from cascade.data import load_split
    from training.export import export_onnx, quantize_int8

    texts = [ex.text for ex in load_split(data_dir, "val")]
    report = export_onnx(student_dir, texts[:256])
    # as `cascade export --int8`: scales calibrated on train texts, agreement checked on val
    report["int8"] = quantize_int8(student_dir, texts, calibration=[ex.text for ex in load_split(data_dir, "train")],
                                   min_agreement=min_agreement)
    (student_dir / "export.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


# --- 6. the version and its thresholds -------------------------------------------------------


def write_version_config(config_path: Path, version_dir: Path, student_tier: str) -> Path:
    """The version's cascade.toml: the student tier at `student/`, rule packs (files) copied in,
    every other path (model dirs, the traffic log) rewritten relative to the version dir; the
    cheap tiers' thresholds at "never" until `recalibrate` sets them (a calibration that fails
    leaves a version that sends everything to the large model, never stale thresholds)."""
    from cascade.config import dump_config, load_config, parse_config

    config = load_config(config_path)
    base = config_path.parent
    data = config.model_dump(exclude_none=True)
    copied = {"student", "cascade.toml"}
    for spec, tier in zip(config.tiers, data["tiers"]):
        if spec is not config.tiers[-1]:
            tier["threshold"], tier["label_thresholds"] = NEVER, {}
        if spec.name == student_tier:
            tier["path"] = "student"
        elif spec.path is not None:
            src = spec.resolve_path(base).resolve()
            if src.is_file():
                name = src.name if src.name not in copied else f"{spec.name}-{src.name}"
                copied.add(name)
                shutil.copyfile(src, version_dir / name)
                tier["path"] = name
            else:
                tier["path"] = os.path.relpath(src, version_dir.resolve())
    if config.traffic_log is not None:
        d = Path(config.traffic_log.dir)
        data["traffic_log"]["dir"] = os.path.relpath((d if d.is_absolute() else base / d).resolve(),
                                                     version_dir.resolve())
    out = version_dir / "cascade.toml"
    dump_config(parse_config(data, str(out)), out)
    return out


def recalibrate(config_path: Path, data_dir: Path, cfg: FlywheelConfig, progress: bool = True,
                evidence: tuple[list[str], list[dict]] | None = None) -> dict:
    """`run_calibration` on val for "within max_loss of the large model at confidence"; its
    thresholds go into the version's cascade.toml, its frontier beside it. `evidence`: label-free
    items (texts, the large model's answers) the new version never learnt. Returns the figures
    the manifest keeps, `certified` False with the `error` when no thresholds could be chosen."""
    from cascade.calibrate import CalibrationError, run_calibration
    from cascade.progress import per_name

    try:
        report = run_calibration(config_path, data_dir, "llm", max_loss=cfg.max_loss, confidence=cfg.confidence,
                                 progress=per_name("measuring", enabled=progress), seed=cfg.seed,
                                 label_free_items=evidence if evidence and evidence[0] else None)
    except CalibrationError as exc:
        return {"certified": False, "error": str(exc)}
    g = report.get("guarantee") or {}
    return {"certified": bool(report.get("guarantee")), "chosen": report["chosen"],
            "last_tier_accuracy": report["last_tier_accuracy"], "n": report["n"],
            "guarantee": {k: g.get(k) for k in ("goal", "level", "confidence", "method", "test_n", "path_from")},
            "evidence": report.get("evidence"), "frontier": "cascade.frontier.json", "table": report["table"]}


def audit_evidence(log_dir: Path, llm_tier: str, held_out: set[str], seed: int,
                   since: dict | None = None) -> tuple[list[str], list[dict], dict]:
    """The log's audited sample (a uniform sample of traffic with the large model's answers;
    `serving.traffic_log.audited_sample`), deduplicated by normalised text, less val and test
    texts (val is the other, independent evidence). Returns (texts, answers, counts); the round
    must not train on these texts, or they would not test the version it builds."""
    from serving.traffic_log import audited_sample

    texts, answers, counts = audited_sample(log_dir, llm_tier, seed=seed, since=since)
    keep_t, keep_a, seen = [], [], set()
    for t, a in zip(texts, answers):
        key = normalize_text(t)
        if key not in held_out and key not in seen:
            seen.add(key)
            keep_t.append(t)
            keep_a.append(a)
    return keep_t, keep_a, {**counts, "evidence_texts": len(keep_t)}


def measure(config_path: Path, data_dir: Path, llm_alone: bool = False) -> dict:
    """The gate's measurement, the same code for both versions: `cascade eval`'s `evaluate` on
    val (the cascade closed afterwards: a round measures three times in one process). With
    `llm_alone`, the config's large-model tier alone."""
    from cascade.config import build_cascade, load_config
    from cascade.data import load_labels, load_split
    from cascade.evaluate import evaluate

    config = load_config(config_path)
    if llm_alone:
        config = config.model_copy(update={"tiers": [llm_spec(config)]})
    val = load_split(data_dir, "val")
    cascade = build_cascade(config, config_path.parent)
    try:
        report, _ = evaluate(cascade, config, [ex.text for ex in val], [ex.label for ex in val],
                             load_labels(data_dir).oos_label)
    finally:
        cascade.close()
    return {"accuracy": report["accuracy"], "llm_share": report["llm_share"], "n": report["n"]}


# --- 7. the gate and the pointer ----------------------------------------------------------


def gate_verdict(new: dict, current: dict, llm_accuracy: float, max_loss: float, certified: bool
                 ) -> tuple[bool, list[str]]:
    """Promote only a version that (1) calibration certified for the target, (2) reaches the
    large model's val accuracy minus `max_loss` on val, and (3) sends no larger share of val to
    the large model than the current version. Returns (passed, one line per check with numbers)."""
    target = llm_accuracy - max_loss
    checks = [
        (certified, f"thresholds certified: within {max_loss:g} of the large model at the stated confidence"
         if certified else "no certified thresholds (calibration failed)"),
        (new["accuracy"] >= target - 1e-12,
         f"val accuracy {new['accuracy']:.4f} vs target {target:.4f} (the large model's {llm_accuracy:.4f} "
         f"- {max_loss:g}); the current version: {current['accuracy']:.4f}"),
        (new["llm_share"] <= current["llm_share"] + 1e-12,
         f"large-model share on val {new['llm_share']:.3f} vs the current version's {current['llm_share']:.3f}"),
    ]
    return all(ok for ok, _ in checks), [("ok    " if ok else "FAIL  ") + line for ok, line in checks]


def point_current(versions_dir: Path, name: str) -> None:
    """Point `versions_dir/current` at `name` (a relative symlink) atomically: a temp link
    renamed over it (os.replace), so a reader sees the old version or the new, never neither."""
    link = versions_dir / "current"
    if link.exists() and not link.is_symlink():
        raise FlywheelError(f"{link}: exists and is not a symlink; move it away to let the flywheel manage it")
    tmp = versions_dir / f".current.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)
    os.replace(tmp, link)


def version_numbers(versions_dir: Path) -> list[tuple[int, Path]]:
    """(number, path) of every version dir and unfinished round (`.vNNN.partial`), sorted."""
    if not versions_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in versions_dir.iterdir() if p.is_dir() and not p.is_symlink()
             and (m := VERSION_RE.match(p.name))]
    return sorted(found)


def parent_cursor(config_path: Path, log_dir: Path) -> dict | None:
    """Where the round that built `config_path` stopped reading `log_dir` (its manifest's log
    cursor), so this round reads only what came after; None for another log or no such round."""
    manifest = config_path.resolve().parent / MANIFEST
    if not manifest.exists():
        return None
    log = json.loads(manifest.read_text()).get("log") or {}
    same = log.get("dir") == str(log_dir.resolve())
    return log.get("cursor") or None if same else None


def parent_version(config_path: Path, versions_dir: Path) -> str | None:
    """The version name when the config is one of `versions_dir`'s (e.g. `current/cascade.toml`)."""
    d = config_path.resolve().parent
    return d.name if d.parent == versions_dir.resolve() and VERSION_RE.match(d.name) else None


# --- the round ------------------------------------------------------------------------------


def _inputs(config_path: Path, log_dir: Path, data_dir: Path, cfg: FlywheelConfig, train_cfg) -> dict:
    return {"config": str(config_path.resolve()), "log": str(log_dir.resolve()), "data": str(data_dir.resolve()),
            "flywheel": asdict(cfg), "train": {k: v for k, v in asdict(train_cfg).items() if k != "betas"}}


def _work_dir(versions_dir: Path, inputs: dict, resume: bool) -> Path:
    partial = [p for _, p in version_numbers(versions_dir) if p.name.endswith(".partial")]
    if partial and not resume:
        raise FlywheelError(f"{partial[-1]}: an unfinished round; pass --resume to continue it, or remove it")
    if partial:
        saved = json.loads((partial[-1] / "inputs.json").read_text())
        if saved != inputs:
            diff = sorted(k for k in inputs if saved.get(k) != inputs[k])
            raise FlywheelError(f"--resume: {partial[-1]} was started with other inputs ({', '.join(diff)}); "
                                "run with the same flags, or remove it")
        return partial[-1]
    numbers = version_numbers(versions_dir)
    work = versions_dir / f".v{(numbers[-1][0] + 1) if numbers else 1:03d}.partial"
    work.mkdir(parents=True)
    _write_json(work / "inputs.json", inputs)
    return work


def run_flywheel(config_path, log_dir, data_dir, versions_dir, cfg: FlywheelConfig | None = None, train_cfg=None, *,
                 promote: bool = False, dry_run: bool = False, resume: bool = False, progress: bool = True,
                 log=print) -> dict:
    """One round (module docstring). Returns the manifest (with `dry_run`: the selection only,
    nothing written, no large-model call)."""
    from cascade.config import load_config
    from cascade.data import load_labels, load_split
    from cascade.tiers import build_tier
    from training.recipes import STUDENT
    from training.trainer import TrainConfig

    config_path, log_dir, data_dir, versions_dir = map(Path, (config_path, log_dir, data_dir, versions_dir))
    cfg = cfg or FlywheelConfig()
    train_cfg = train_cfg or TrainConfig(**STUDENT)
    t0, timings, began = time.perf_counter(), {}, {}

    def step(name: str, what: str) -> None:  # timings: seconds each step took
        now = time.perf_counter()
        for prev in began:
            timings.setdefault(prev, round(now - began[prev], 2))
        began[name] = now
        log(f"[flywheel] {what}   ({now - t0:.0f}s so far)")

    config = load_config(config_path)
    if config.task.kind != "classify":  # its targets are label distributions: fields would be lost
        raise FlywheelError(f"{config_path}: task.kind is {config.task.kind!r}; the flywheel learns labels only "
                            "so far (an extraction cascade's fields would not reach its student): "
                            "retrain with `cascade train student --teacher-fields` instead")
    ensembles = [t.name for t in config.tiers if t.kind == "ensemble"]
    if ensembles:  # it retrains one student dir; an ensemble holding that student would go on averaging the old one
        raise FlywheelError(f"{config_path}: tier {ensembles[0]!r} is of kind 'ensemble'; the flywheel retrains one "
                            "`student` tier and cannot keep an ensemble's members in step with it: use a config "
                            "with student tiers only")
    labels = load_labels(data_dir).labels
    students = [t for t in config.tiers if t.kind == "student"]
    if not students:
        raise FlywheelError(f"{config_path}: no student tier; the flywheel retrains the config's student")
    student_spec = students[-1]
    student_dir = student_spec.resolve_path(config_path.parent)
    student = build_tier(student_spec, config_path.parent)
    if list(student.labels) != labels:
        raise FlywheelError(f"{student_dir}: its labels are not {data_dir}'s")

    step("read", f"read the log {log_dir}")
    held_out = {normalize_text(ex.text) for s in ("val", "test") if (data_dir / f"{s}.jsonl").exists()
                for ex in load_split(data_dir, s)}
    train = load_split(data_dir, "train")
    carried = read_carried(config_path.resolve().parent, labels)
    known = {normalize_text(ex.text) for ex in train} | {normalize_text(r.text) for r in carried}
    since = None if cfg.from_start else parent_cursor(config_path, log_dir)
    if since:
        log(f"      from the parent round's cursor: {since['segment']} at byte {since['offset']} (--from-start: all)")
    traffic = read_traffic(log_dir, labels, held_out, known, since)
    if cfg.carry_pool:
        add_carried_pool(traffic, read_pool(config_path.resolve().parent), held_out | known)
    evidence = None
    if cfg.audit_evidence:
        ev_texts, ev_answers, ev_counts = audit_evidence(log_dir, llm_spec(config).name, held_out, cfg.seed, since)
        keys = {normalize_text(t) for t in ev_texts}
        before = len(traffic.free), len(traffic.pool)
        traffic.free = [r for r in traffic.free if normalize_text(r.text) not in keys]
        traffic.pool = [t for t in traffic.pool if normalize_text(t) not in keys]
        evidence = {"texts": ev_texts, "answers": ev_answers, "counts": {
            **ev_counts, "free_labels_held_out": before[0] - len(traffic.free),
            "pool_held_out": before[1] - len(traffic.pool)}}
        recount(traffic)
        log(f"      audited sample: {len(ev_texts)} texts held out of training as calibration evidence "
            f"(audit rate {ev_counts['audit_rate']:.3f}; {evidence['counts']['free_labels_held_out']} free labels "
            f"and {evidence['counts']['pool_held_out']} pool texts among them)")
    c = traffic.counts
    log(f"      {c['entries']} entries, {c['unique_texts']} texts: {c['escalated_labels']} escalated and "
        f"{c['audit_labels']} audited answers (free labels), {c['pool']} answered by the cheap tiers; skipped "
        f"{c['hashed_texts_skipped']} hashed, {c['dropped_texts_skipped']} without text, {c['duplicates']} "
        f"duplicates, {c['held_out_skipped']} in val/test, {c['known_skipped']} already learnt"
        + (f"; {c['pool_carried']} unpicked texts of the parent round added to the pool" if c.get("pool_carried")
           else ""))

    step("select", f"pick {min(cfg.budget, len(traffic.pool))} of {len(traffic.pool)} texts by {cfg.strategy}")
    covered = [r.text for r in traffic.free]
    if cfg.strategy == "diversity" and cfg.diversity_train_centres:
        sample = np.random.default_rng(cfg.seed).permutation(len(train))[:cfg.diversity_train_centres]
        covered += [train[i].text for i in sorted(sample)]
    picks = pick_budget(traffic.pool, student, student_dir, cfg, covered)
    if picks["texts"]:
        log(f"      student confidence: picked {picks['picked_mean_confidence']:.3f} vs pool "
            f"{picks['pool_mean_confidence']:.3f} on average"
            + (f"; embeddings: {picks['embedding']}" if picks["embedding"] else ""))
    selection = {"counts": c, "segments": traffic.segments, "since": since, "cursor": traffic.cursor, "picks": picks,
                 "free": [{"text": r.text, "source": r.source, "target": r.target.round(6).tolist()}
                          for r in traffic.free], "evidence": evidence}
    if dry_run:
        log("      --dry-run: no labels asked, nothing trained or written")
        return {"dry_run": True, **selection}
    if not traffic.free and not picks["texts"]:
        raise FlywheelError(f"--log {log_dir}: no new text to learn from (no escalated answer, and no budget "
                            "or no cheap-tier text left to label); no version written")

    inputs = _inputs(config_path, log_dir, data_dir, cfg, train_cfg)
    work = _work_dir(versions_dir, inputs, resume)
    name = work.name.removeprefix(".").removesuffix(".partial")
    log(f"      building {name} in {work}")
    if not (work / "selection.json").exists():
        picked = set(picks["texts"])
        unpicked = [t for t in traffic.pool if t not in picked]
        write_pool(work / POOL, unpicked[max(0, len(unpicked) - cfg.carry_pool):] if cfg.carry_pool else [], name)
        _write_json(work / "selection.json", selection)
    else:  # resumed: the texts of the interrupted round, not a new read of a log that may have grown
        saved = json.loads((work / "selection.json").read_text())
        picks, c, traffic.segments = saved["picks"], saved["counts"], saved["segments"]
        evidence = saved.get("evidence")
        since, traffic.cursor = saved.get("since"), saved.get("cursor") or {}
        traffic.free = [Row(r["text"], np.array(r["target"]), IGNORE, r["source"]) for r in saved["free"]]

    step("label", f"label {len(picks['texts'])} texts with the large-model tier {llm_spec(config).name!r}")
    answers = label_texts(llm_spec(config), config_path.parent, picks["texts"], labels, work / "labels.jsonl",
                          cfg.label_batch, log)
    bought = [Row(t, a, IGNORE, "budget") for t, a in zip(picks["texts"], answers) if a is not None]
    abstained = sum(a is None for a in answers)

    step("prune", "build the distillation set and prune it")
    new_rows = traffic.free + bought
    teacher = teacher_dir_of(student_dir)
    rows = train_rows(data_dir, labels, teacher, progress) + carried + new_rows
    rows, prune_report = prune(rows, student, cfg.max_train)
    log(f"      {prune_report['before']} rows (train {len(train)}, carried {len(carried)}, new {len(new_rows)}); "
        f"pruned {prune_report['pruned']} -> {prune_report['after']}"
        + (f" ({prune_report['pruned_by_source']})" if prune_report["pruned"] else ""))
    with (work / "texts.sha256").open("w") as f:
        for r in rows:
            f.write(f"{_sha(r.text)} {r.source}\n")
    write_carried(work / CARRIED, carried + new_rows, labels, name)

    step("distil", f"distil the student again, warm-started from {student_dir}")
    out = work / "student"
    if (out / "train_summary.json").exists():
        training = json.loads((out / "train_summary.json").read_text())
    else:
        training = distil_warm(student_dir, rows, data_dir, out, train_cfg, temperature=cfg.kd_temperature,
                               alpha=cfg.alpha, resume=resume, progress=progress, extra_meta={"flywheel": name})
    log(f"      {training['steps']} steps, val accuracy {training['val_accuracy']:.4f}, "
        f"temperature {training['calibration']['temperature']:.3f}")

    step("export", "export to ONNX (parity-checked) and int8 (agreement-checked)")
    if (out / "export.json").exists() and (out / "model.int8.onnx").exists():
        export = json.loads((out / "export.json").read_text())
    else:
        export = export_student(out, data_dir, cfg.min_agreement)
    log(f"      parity {export['parity_max_abs_diff']:.1e}; int8 agreement {export['int8']['top1_agreement']:.4f}")

    from serving.llm_tier import remembered_answers

    # calibration asks the large model about every val text, the gate's measurements again:
    # asked once (the same model and prompt give the same answer), charged at what it cost
    with remembered_answers():
        step("calibrate", "write the version's cascade.toml and recalibrate on val"
             + (f" and {len(evidence['texts'])} audited texts" if evidence else ""))
        version_config = write_version_config(config_path, work, student_spec.name)
        calibration = recalibrate(version_config, data_dir, cfg, progress,
                                  (evidence["texts"], evidence["answers"]) if evidence else None)
        if calibration["certified"]:
            log(calibration.pop("table"))
        else:
            log(f"      calibration failed: {calibration['error']}")

        step("gate", "gate: measure both versions on val")
        new_m, cur_m = measure(version_config, data_dir), measure(config_path, data_dir)
        llm_acc = calibration.get("last_tier_accuracy")
        if llm_acc is None:  # calibration failed before measuring: the large model alone, the same way
            llm_acc = measure(config_path, data_dir, llm_alone=True)["accuracy"]
        passed, reasons = gate_verdict(new_m, cur_m, llm_acc, cfg.max_loss, calibration["certified"])

    step("write", f"write {versions_dir / name}")
    final = versions_dir / name
    timings["total"] = round(time.perf_counter() - t0, 2)
    counts = {**{k: c[k] for k in COUNTED}, "escalated_labels_used": c["escalated_labels"],
              "audit_labels_used": c["audit_labels"], "budget_labels": len(bought), "budget_abstained": abstained,
              "carried": len(carried), "train": len(train), "pruned": prune_report["pruned"],
              "distillation_rows": len(rows), "pool_carried": c.get("pool_carried", 0),
              "pool_handed_on": len((work / POOL).read_text(encoding="utf-8").splitlines())}
    if evidence:
        counts["audit_evidence"] = evidence["counts"]
    manifest = {
        "version": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parent": {"version": parent_version(config_path, versions_dir), "config": str(config_path.resolve())},
        "log": {"dir": str(log_dir.resolve()), "segments": traffic.segments, "since": since,
                "cursor": traffic.cursor},
        "data": str(data_dir.resolve()), "strategy": cfg.strategy, "budget": cfg.budget, "flywheel": asdict(cfg),
        "counts": counts, "selection": {k: v for k, v in picks.items() if k not in ("texts", "indices")},
        "prune": prune_report, "data_texts": "texts.sha256", "traffic_texts": CARRIED, "pool_texts": POOL,
        "training": training,
        "export": {"parity_max_abs_diff": export["parity_max_abs_diff"],
                   "int8_top1_agreement": export["int8"]["top1_agreement"]},
        "calibration": calibration,
        "gate": {"passed": passed, "reasons": reasons, "new": new_m, "current": cur_m, "llm_accuracy": llm_acc,
                 "max_loss": cfg.max_loss, "confidence": cfg.confidence},
        "promoted": False, "timings_s": timings,
    }
    _write_json(work / MANIFEST, manifest)
    os.replace(work, final)  # the round is a version from here on, whatever the gate says
    if passed and promote:
        point_current(versions_dir, name)
        manifest["promoted"] = True
        _write_json(final / MANIFEST, manifest)
    manifest["path"] = str(final)
    return manifest
