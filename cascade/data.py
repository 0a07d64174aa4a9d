"""Dataset readers and the dataset dir of DESIGN.md (train/val/test JSONL + labels.json).

Sources: CLINC150 (`data_full.json`, with its out-of-scope `oos` rows), Banking77
(`train.csv`/`test.csv`), SNIPS (intents with slot spans: a `joint` task), and any CSV/JSONL
with text and label columns and, for extraction, a `fields` column (a JSON object of
name -> [values]; every value must occur in its text). Every reader reports
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

from cascade.fields import Fields, as_fields, check_fields, order_by_text

SPLITS = ("train", "val", "test")
CLINC_OOS_LABEL = "oos"


class DataError(ValueError):
    """Input data that cannot be used; the message says which file and line."""


TASK_KINDS = ("classify", "extract", "joint")


@dataclass
class Example:
    id: str
    text: str
    label: str | None
    fields: Fields | None = None  # extraction tasks: name -> [values], each a span of `text`

    def to_json(self) -> dict:
        row = {"id": self.id, "text": self.text, "label": self.label}
        if self.fields is not None:
            row["fields"] = self.fields
        return row


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
    """labels.json: the label names, and for `extract`/`joint` tasks the field names."""

    labels: list[str]
    oos_label: str | None = None
    task: str = "classify"
    fields: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {"labels": self.labels, "oos_label": self.oos_label, "task": self.task}
        if self.task != "classify":
            out["fields"] = self.fields
        return out


def _check_row(text, label, where: str, bad: list[BadRow], require_label: bool = True) -> bool:
    if not isinstance(text, str) or not text.strip():
        bad.append(BadRow(where, "empty or missing text"))
        return False
    if not require_label:
        return True
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


def _read_fields(text: str, raw, where: str, bad: list[BadRow]) -> tuple[bool, Fields | None]:
    """(ok, fields) of one row's `fields` cell: absent is None; a CSV cell holds JSON."""
    if raw is None or raw == "":
        return True, None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            bad.append(BadRow(where, f"fields: not a JSON object ({exc.msg})"))
            return False, None
    problem = check_fields(text, raw)
    if problem:
        bad.append(BadRow(where, problem))
        return False, None
    return True, order_by_text(text, as_fields(raw))


def read_table(file: str | Path, text_field: str = "text", label_field: str = "label",
               id_field: str = "id", id_prefix: str = "", fields_field: str = "fields",
               require_label: bool = True) -> tuple[list[Example], list[BadRow]]:
    """Read a CSV (header row) or JSONL file of labelled texts.

    A missing `id` column gets ids `{id_prefix}{row:05d}`. Line numbers in bad-row reports are
    the file's physical lines (1 = CSV header or first JSONL line). A `fields` column (JSON
    object; in CSV a JSON string) is read and checked: every value must occur in its text.
    `require_label=False` reads an extraction-only table (no label column needed).
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
            for col in (text_field, label_field) if require_label else (text_field,):
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
                if _check_row(text, label, where, bad, require_label):
                    ok, fields = _read_fields(text.strip(), row.get(fields_field), where, bad)
                    if ok:
                        rid = row.get(id_field) or f"{id_prefix}{len(examples):05d}"
                        examples.append(Example(str(rid), text.strip(), label.strip() if label else None, fields))
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
                if _check_row(text, label, where, bad, require_label):
                    ok, fields = _read_fields(text.strip(), row.get(fields_field), where, bad)
                    if ok:
                        rid = row.get(id_field)
                        rid = f"{id_prefix}{len(examples):05d}" if rid is None else str(rid)
                        examples.append(Example(rid, text.strip(), label.strip() if label else None, fields))
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


SNIPS_INTENTS = ("AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook",
                 "SearchCreativeWork", "SearchScreeningEvent")


def read_snips(path: str | Path) -> RawDataset:
    """SNIPS 2017 (sonos/nlu-benchmark): per intent `train_<I>_full.json` and `validate_<I>.json`
    (the test split here). An utterance is its segments joined; a segment with an `entity` is a
    value of that field. One train file is Latin-1, not UTF-8 (the data README): read as such.
    Train comes in a seeded shuffled order (the files are one per intent), so its first N rows
    are a fair sample."""
    path = Path(path)
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    bad: list[BadRow] = []
    for split, pattern in (("train", "train_{}_full.json"), ("test", "validate_{}.json")):
        for intent in SNIPS_INTENTS:
            file = path / intent / pattern.format(intent)
            if not file.exists():
                layout = f"<Intent>/{pattern.format('<Intent>')}"
                raise DataError(f"{file}: not found (expected the SNIPS 2017 layout {layout})")
            blob = file.read_bytes()
            try:
                raw = json.loads(blob.decode("utf-8"))
            except UnicodeDecodeError:
                raw = json.loads(blob.decode("latin-1"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
            for i, utt in enumerate(raw.get(intent, [])):
                where = f"{file}:{intent}[{i}]"
                segments = utt.get("data") if isinstance(utt, dict) else None
                if not isinstance(segments, list):
                    bad.append(BadRow(where, "expected {\"data\": [segments]}"))
                    continue
                text, fields = "", {}
                for seg in segments:
                    piece = seg.get("text", "")
                    if "entity" in seg and piece.strip():
                        lead = len(text) + len(piece) - len(piece.lstrip())
                        fields.setdefault(seg["entity"], []).append((lead, piece.strip()))
                    text += piece
                stripped = text.strip()
                if not _check_row(stripped, intent, where, bad):
                    continue
                fields = {k: [v for _, v in sorted(vs)] for k, vs in fields.items()}  # in text order
                splits[split].append(Example(f"{split}-{len(splits[split]):05d}", stripped, intent, fields))
    random.Random(0).shuffle(splits["train"])
    splits["train"] = _renumber(splits["train"], "train")
    return RawDataset(splits, bad, source=str(path))


def read_files(path: str | Path, kind: str, text_field: str, label_field: str,
               require_label: bool = True) -> RawDataset:
    """Generic CSV/JSONL: a single file, or a dir with `train`, optional `val`, `test` files."""
    path = Path(path)
    ext = ".csv" if kind == "csv" else ".jsonl"
    splits: dict[str, list[Example]] = {}
    bad: list[BadRow] = []
    if path.is_dir():
        for split in SPLITS:
            file = path / f"{split}{ext}"
            if file.exists():
                rows, bad_rows = read_table(file, text_field, label_field, id_prefix=f"{split}-",
                                            require_label=require_label)
                splits[split], bad = rows, bad + bad_rows
        if "train" not in splits:
            raise DataError(f"{path}: no train{ext} in this directory")
    else:
        rows, bad = read_table(path, text_field, label_field, id_prefix="row-", require_label=require_label)
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
    return [Example(f"{split}-{i:05d}", ex.text, ex.label, ex.fields) for i, ex in enumerate(examples)]


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


def infer_task(splits: dict[str, list[Example]]) -> str:
    """classify without fields; joint with fields and labels; extract with fields alone."""
    rows = [ex for part in splits.values() for ex in part]
    if not any(ex.fields is not None for ex in rows):
        return "classify"
    return "joint" if any(ex.label for ex in rows) else "extract"


def write_dataset(out: str | Path, splits: dict[str, list[Example]], oos_label: str | None = None,
                  task: str | None = None) -> LabelSet:
    """Write the dataset dir: {train,val,test}.jsonl and labels.json (sorted label names, the
    task kind, and for extraction the sorted field names)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = task or infer_task(splits)
    if task not in TASK_KINDS:
        raise DataError(f"task: {task!r} is not one of {', '.join(TASK_KINDS)}")
    labels = sorted({ex.label for rows in splits.values() for ex in rows if ex.label is not None})
    names = sorted({n for rows in splits.values() for ex in rows for n in (ex.fields or {})})
    label_set = LabelSet(labels, oos_label if oos_label in labels else None, task,
                         names if task != "classify" else [])
    for split in SPLITS:
        tmp = out / f"{split}.jsonl.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            for ex in splits[split]:
                row = ex.to_json()
                if task != "classify":
                    row.setdefault("fields", {})
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(out / f"{split}.jsonl")
    (out / "labels.json").write_text(json.dumps(label_set.to_json(), indent=1) + "\n", encoding="utf-8")
    return label_set


@dataclass
class PrepareReport:
    out: Path
    counts: dict[str, int]
    labels: int
    skipped: list[BadRow]
    task: str = "classify"
    fields: int = 0


def prepare(dataset: str, path: str | Path, out: str | Path, *, skip_bad: bool = False,
            text_field: str = "text", label_field: str = "label", val_fraction: float = 0.1,
            test_fraction: float = 0.1, seed: int = 0, task: str | None = None) -> PrepareReport:
    """Turn a source into a dataset dir; raises DataError listing bad rows unless `skip_bad`.
    `task` (classify | extract | joint) defaults to what the rows carry (`infer_task`)."""
    if dataset == "clinc150":
        raw = read_clinc150(path)
    elif dataset == "banking77":
        raw = read_banking77(path)
    elif dataset == "snips":
        raw = read_snips(path)
    elif dataset in ("csv", "jsonl"):
        raw = read_files(path, dataset, text_field, label_field, require_label=task != "extract")
    else:
        raise DataError(f"unknown dataset {dataset!r}; expected clinc150, banking77, snips, csv or jsonl")
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
    label_set = write_dataset(out, splits, raw.oos_label, task)
    return PrepareReport(Path(out), {s: len(splits[s]) for s in SPLITS}, len(label_set.labels), raw.bad_rows,
                         label_set.task, len(label_set.fields))


# --- reading a prepared dataset dir ---------------------------------------------------------


def load_labels(dataset_dir: str | Path) -> LabelSet:
    file = Path(dataset_dir) / "labels.json"
    if not file.exists():
        raise DataError(f"{file}: not found; is {dataset_dir} a dataset dir made by `cascade data prepare`?")
    raw = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not isinstance(raw.get("labels"), list):
        raise DataError(f"{file}: expected {{\"labels\": [...], \"oos_label\": ...}}")
    task = raw.get("task", "classify")
    if task not in TASK_KINDS:
        raise DataError(f"{file}: task: {task!r} is not one of {', '.join(TASK_KINDS)}")
    fields = raw.get("fields", [])
    if task != "classify" and (not isinstance(fields, list) or not all(isinstance(f, str) for f in fields)):
        raise DataError(f"{file}: fields: expected a list of field names for a {task} task")
    return LabelSet([str(x) for x in raw["labels"]], raw.get("oos_label"), task, list(fields))


def seeded_sample(items: list, limit: int | None, seed: int = 0) -> list:
    """At most `limit` of `items`, a seeded uniform sample kept in their order: not the head,
    because split files are often grouped by label (CLINC150's first 1,000 val rows hold 50 of
    its 151 labels)."""
    if limit is None or limit >= len(items):
        return list(items)
    import numpy as np

    return [items[i] for i in np.sort(np.random.default_rng(seed).choice(len(items), limit, replace=False))]


def load_split(dataset_dir: str | Path, split: str) -> list[Example]:
    """Read one split of a dataset dir; any bad row is an error naming its line."""
    file = Path(dataset_dir) / f"{split}.jsonl"
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    labels_file = Path(dataset_dir) / "labels.json"
    task = load_labels(dataset_dir).task if labels_file.exists() else "classify"
    examples, bad = read_table(file, id_prefix=f"{split}-", require_label=task != "extract")
    if bad:
        raise DataError(f"{len(bad)} bad rows in {file}, first: {bad[0]}")
    return examples
