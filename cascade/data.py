"""Dataset readers and the dataset dir of DESIGN.md (train/val/test JSONL + labels.json).

Sources: CLINC150 (`data_full.json`, with its out-of-scope `oos` rows), Banking77
(`train.csv`/`test.csv`), and any CSV/JSONL with text and label columns. Every reader reports
bad rows (empty text, missing label, malformed line) with the place they came from, so the
caller can refuse the input or skip them knowingly: no row is dropped silently.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")
CLINC_OOS_LABEL = "oos"


class DataError(ValueError):
    """Input data that cannot be used; the message says which file and line."""


@dataclass
class Example:
    id: str
    text: str
    label: str | None


@dataclass
class BadRow:
    where: str  # "file:line" or "file:split[index]"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class RawDataset:
    """What a reader found: examples per split (some splits may be missing) and bad rows."""

    splits: dict[str, list[Example]]
    bad_rows: list[BadRow] = field(default_factory=list)
    oos_label: str | None = None
    source: str = ""


@dataclass
class LabelSet:
    labels: list[str]
    oos_label: str | None = None

    def to_json(self) -> dict:
        return {"labels": self.labels, "oos_label": self.oos_label}


def _check_row(text, label, where: str, bad: list[BadRow]) -> bool:
    if not isinstance(text, str) or not text.strip():
        bad.append(BadRow(where, "empty or missing text"))
        return False
    if label is None or (isinstance(label, str) and not label.strip()):
        bad.append(BadRow(where, "missing label"))
        return False
    return True


# --- readers -------------------------------------------------------------------------------


def read_clinc150(path: str | Path) -> RawDataset:
    """CLINC150 "full": train/val/test plus the oos_* splits merged in with label `oos`."""
    path = Path(path)
    file = path / "data_full.json" if path.is_dir() else path
    if not file.exists():
        raise DataError(f"{file}: not found (expected CLINC150's data_full.json)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    splits: dict[str, list[Example]] = {}
    bad: list[BadRow] = []
    for split in SPLITS:
        rows: list[Example] = []
        for part in (split, f"oos_{split}"):
            if part not in raw:
                raise DataError(f"{file}: has no {part!r} list (keys: {sorted(raw)})")
            for i, pair in enumerate(raw[part]):
                where = f"{file}:{part}[{i}]"
                if not isinstance(pair, list) or len(pair) != 2:
                    bad.append(BadRow(where, f"expected [text, intent], got {pair!r:.80}"))
                    continue
                text, label = pair
                if _check_row(text, label, where, bad):
                    rows.append(Example(f"{split}-{len(rows):05d}", text.strip(), str(label)))
        splits[split] = rows
    return RawDataset(splits, bad, oos_label=CLINC_OOS_LABEL, source=str(file))


def read_table(file: str | Path, text_field: str = "text", label_field: str = "label",
               id_field: str = "id", id_prefix: str = "") -> tuple[list[Example], list[BadRow]]:
    """Read a CSV (header row) or JSONL file of labelled texts.

    A missing `id` column gets ids `{id_prefix}{row:05d}`. Line numbers in bad-row reports are
    the file's physical lines (1 = CSV header or first JSONL line).
    """
    file = Path(file)
    if not file.exists():
        raise DataError(f"{file}: not found")
    suffix = file.suffix.lower()
    examples: list[Example] = []
    bad: list[BadRow] = []
    if suffix == ".csv":
        with file.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise DataError(f"{file}:1: empty file, expected a header row")
            for col in (text_field, label_field):
                if col not in reader.fieldnames:
                    raise DataError(
                        f"{file}:1: no column {col!r} in header {reader.fieldnames}; "
                        "name the columns with --text-field/--label-field"
                    )
            for row in reader:
                where = f"{file}:{reader.line_num}"
                if None in row:  # more cells than header columns
                    bad.append(BadRow(where, f"{len(reader.fieldnames) + len(row[None])} cells, "
                                             f"header has {len(reader.fieldnames)}"))
                    continue
                text, label = row.get(text_field), row.get(label_field)
                if _check_row(text, label, where, bad):
                    rid = row.get(id_field) or f"{id_prefix}{len(examples):05d}"
                    examples.append(Example(str(rid), text.strip(), label.strip()))
    elif suffix in (".jsonl", ".ndjson"):
        with file.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                where = f"{file}:{lineno}"
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    bad.append(BadRow(where, f"not valid JSON ({exc.msg})"))
                    continue
                if not isinstance(row, dict):
                    bad.append(BadRow(where, "expected a JSON object per line"))
                    continue
                text, label = row.get(text_field), row.get(label_field)
                if label is not None and not isinstance(label, str):
                    label = str(label)
                if _check_row(text, label, where, bad):
                    rid = row.get(id_field)
                    rid = f"{id_prefix}{len(examples):05d}" if rid is None else str(rid)
                    examples.append(Example(rid, text.strip(), label.strip()))
    else:
        raise DataError(f"{file}: unknown file type {suffix!r}; expected .csv or .jsonl")
    return examples, bad


def read_banking77(path: str | Path) -> RawDataset:
    """Banking77: `train.csv` and `test.csv` with columns text,category; no validation split."""
    path = Path(path)
    splits: dict[str, list[Example]] = {}
    bad: list[BadRow] = []
    for split in ("train", "test"):
        rows, bad_rows = read_table(path / f"{split}.csv", "text", "category", id_prefix=f"{split}-")
        splits[split] = rows
        bad.extend(bad_rows)
    return RawDataset(splits, bad, source=str(path))


def read_files(path: str | Path, kind: str, text_field: str, label_field: str) -> RawDataset:
    """Generic CSV/JSONL: a single file, or a dir with `train`, optional `val`, `test` files."""
    path = Path(path)
    ext = ".csv" if kind == "csv" else ".jsonl"
    splits: dict[str, list[Example]] = {}
    bad: list[BadRow] = []
    if path.is_dir():
        for split in SPLITS:
            file = path / f"{split}{ext}"
            if file.exists():
                rows, bad_rows = read_table(file, text_field, label_field, id_prefix=f"{split}-")
                splits[split], bad = rows, bad + bad_rows
        if "train" not in splits:
            raise DataError(f"{path}: no train{ext} in this directory")
    else:
        rows, bad = read_table(path, text_field, label_field, id_prefix="row-")
        splits["train"] = rows
    return RawDataset(splits, bad, source=str(path))


# --- splitting and writing -----------------------------------------------------------------


def stratified_split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Carve `fraction` of each label out of `examples`, seeded; returns (rest, carved).

    A label with one example stays in the rest. Order inside each part follows the input.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_label[ex.label].append(i)
    rng = random.Random(seed)
    carved: set[int] = set()
    for label in sorted(by_label):
        idx = by_label[label]
        if len(idx) < 2:
            continue
        take = min(len(idx) - 1, max(1, round(len(idx) * fraction)))
        carved.update(rng.sample(idx, take))
    rest = [ex for i, ex in enumerate(examples) if i not in carved]
    out = [ex for i, ex in enumerate(examples) if i in carved]
    return rest, out


def _renumber(examples: list[Example], split: str) -> list[Example]:
    return [Example(f"{split}-{i:05d}", ex.text, ex.label) for i, ex in enumerate(examples)]


def complete_splits(raw: RawDataset, val_fraction: float = 0.1, test_fraction: float = 0.1,
                    seed: int = 0) -> dict[str, list[Example]]:
    """Fill in missing val/test splits by stratified, seeded carving from train."""
    splits = dict(raw.splits)
    if "test" not in splits:
        splits["train"], test = stratified_split(splits["train"], test_fraction, seed)
        splits["test"] = _renumber(test, "test")
    if "val" not in splits:
        splits["train"], val = stratified_split(splits["train"], val_fraction, seed + 1)
        splits["val"] = _renumber(val, "val")
    return splits


def write_dataset(out: str | Path, splits: dict[str, list[Example]], oos_label: str | None = None) -> LabelSet:
    """Write the dataset dir: {train,val,test}.jsonl and labels.json (sorted label names)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = sorted({ex.label for rows in splits.values() for ex in rows if ex.label is not None})
    label_set = LabelSet(labels, oos_label if oos_label in labels else None)
    for split in SPLITS:
        tmp = out / f"{split}.jsonl.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            for ex in splits[split]:
                f.write(json.dumps({"id": ex.id, "text": ex.text, "label": ex.label}, ensure_ascii=False) + "\n")
        tmp.replace(out / f"{split}.jsonl")
    (out / "labels.json").write_text(json.dumps(label_set.to_json(), indent=1) + "\n", encoding="utf-8")
    return label_set


@dataclass
class PrepareReport:
    out: Path
    counts: dict[str, int]
    labels: int
    skipped: list[BadRow]


def prepare(dataset: str, path: str | Path, out: str | Path, *, skip_bad: bool = False,
            text_field: str = "text", label_field: str = "label", val_fraction: float = 0.1,
            test_fraction: float = 0.1, seed: int = 0) -> PrepareReport:
    """Turn a source into a dataset dir; raises DataError listing bad rows unless `skip_bad`."""
    if dataset == "clinc150":
        raw = read_clinc150(path)
    elif dataset == "banking77":
        raw = read_banking77(path)
    elif dataset in ("csv", "jsonl"):
        raw = read_files(path, dataset, text_field, label_field)
    else:
        raise DataError(f"unknown dataset {dataset!r}; expected clinc150, banking77, csv or jsonl")
    if raw.bad_rows and not skip_bad:
        shown = "\n  ".join(str(b) for b in raw.bad_rows[:20])
        more = f"\n  ... and {len(raw.bad_rows) - 20} more" if len(raw.bad_rows) > 20 else ""
        raise DataError(
            f"{len(raw.bad_rows)} bad rows (fix them or pass --skip-bad to skip them):\n  {shown}{more}"
        )
    splits = complete_splits(raw, val_fraction, test_fraction, seed)
    for split in SPLITS:
        if not splits[split]:
            raise DataError(f"{raw.source}: split {split!r} is empty after reading")
    label_set = write_dataset(out, splits, raw.oos_label)
    return PrepareReport(Path(out), {s: len(splits[s]) for s in SPLITS}, len(label_set.labels), raw.bad_rows)


# --- reading a prepared dataset dir ---------------------------------------------------------


def load_labels(dataset_dir: str | Path) -> LabelSet:
    file = Path(dataset_dir) / "labels.json"
    if not file.exists():
        raise DataError(f"{file}: not found; is {dataset_dir} a dataset dir made by `cascade data prepare`?")
    raw = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not isinstance(raw.get("labels"), list):
        raise DataError(f"{file}: expected {{\"labels\": [...], \"oos_label\": ...}}")
    return LabelSet([str(x) for x in raw["labels"]], raw.get("oos_label"))


def load_split(dataset_dir: str | Path, split: str) -> list[Example]:
    """Read one split of a dataset dir; any bad row is an error naming its line."""
    file = Path(dataset_dir) / f"{split}.jsonl"
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    examples, bad = read_table(file, id_prefix=f"{split}-")
    if bad:
        raise DataError(f"{len(bad)} bad rows in {file}, first: {bad[0]}")
    return examples
