"""`cascade batch INPUT --config cascade.toml --out OUT.jsonl [--resume]`: a file through the cascade.

Streams: rows are read, routed and written a chunk at a time, so memory stays flat whatever the
file size. Output rows keep the input order and carry the input line number. Malformed rows
(bad JSON, no text, text that is not valid Unicode: `cascade.textcheck`) and rows that a
tier failed on alone go to `OUT.errors.jsonl` with their line and the reason; the run goes on.

Resumable without loss or duplicates: after each chunk both files are flushed and fsynced, then
`OUT.progress.json` records the last input line they cover. `--resume` cuts both files back to
that line (dropping whatever a killed run wrote after its last checkpoint) and continues from
the next input line.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cascade.data import DataError
from cascade.progress import Progress
from cascade.textcheck import TextError, clean_text
from cascade.types import ItemFailure


@dataclass
class Row:
    line: int
    id: str
    text: str
    label: str | None


@dataclass
class Malformed:
    line: int
    reason: str


def iter_rows(path: Path, text_field: str = "text", id_field: str = "id",
              label_field: str = "label") -> Iterator[Row | Malformed]:
    """JSONL (one object per line) or CSV (header row), by extension; line numbers are 1-based."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or text_field not in reader.fieldnames:
                raise DataError(f"{path}:1: no {text_field!r} column (columns: {reader.fieldnames})")
            while True:
                try:
                    rec = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    yield Malformed(reader.line_num, f"CSV: {exc}")
                    continue
                yield _row(rec, reader.line_num, text_field, id_field, label_field)
    else:
        with path.open(encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield Malformed(n, f"not JSON: {exc.msg} at column {exc.colno}")
                    continue
                if not isinstance(rec, dict):
                    yield Malformed(n, f"a JSON {type(rec).__name__}, not an object with {text_field!r}")
                    continue
                yield _row(rec, n, text_field, id_field, label_field)


def _row(rec: dict, line: int, text_field: str, id_field: str, label_field: str) -> Row | Malformed:
    text = rec.get(text_field)
    if text is None:
        return Malformed(line, f"field {text_field!r} is missing")
    try:
        text = clean_text(text, f"field {text_field!r}")
    except TextError as exc:
        return Malformed(line, str(exc))
    label = rec.get(label_field)
    return Row(line, str(rec.get(id_field) or line), text, None if label in (None, "") else str(label))


def _cut_back(path: Path, last_line: int) -> int:
    """Keep the rows of `path` whose `line` <= last_line (and drop a torn final line)."""
    if not path.exists():
        return 0
    kept = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with path.open(encoding="utf-8") as src, tmp.open("w", encoding="utf-8") as dst:
        for line in src:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn by the kill: it was past the checkpoint anyway
            if rec.get("line", 0) <= last_line:
                dst.write(line if line.endswith("\n") else line + "\n")
                kept += 1
    tmp.replace(path)
    return kept


def run_batch(input_path: str | Path, config_path: str | Path, out_path: str | Path, resume: bool = False,
              batch_size: int = 256, text_field: str = "text", id_field: str = "id", label_field: str = "label",
              progress: bool = True) -> dict:
    from cascade.config import build_cascade, load_config
    from cascade.evaluate import LLM_KINDS

    input_path, out_path, config_path = Path(input_path), Path(out_path), Path(config_path)
    if not input_path.exists():
        raise FileNotFoundError(f"{input_path}: not found")
    errors_path = out_path.with_name(out_path.name.removesuffix(".jsonl") + ".errors.jsonl")
    progress_path = out_path.with_name(out_path.name.removesuffix(".jsonl") + ".progress.json")
    done_line, done_rows = _resume_point(out_path, errors_path, progress_path, resume)
    config = load_config(config_path)
    cascade = build_cascade(config, config_path.parent)
    log = llm_name = version = None
    if config.traffic_log is not None:  # the same log `cascade serve` writes
        from serving.traffic_log import TrafficLog, version_id

        log, version = TrafficLog.from_config(config.traffic_log, config_path.parent), version_id(config_path)
        llm_name = config.tiers[-1].name if config.tiers[-1].kind in LLM_KINDS else None
    bar = Progress(None, "cascade batch", "item", enabled=progress, initial=done_rows)
    t0 = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with out_path.open("a", encoding="utf-8") as out, errors_path.open("a", encoding="utf-8") as errs:
            job = _BatchJob(cascade, input_path, out, errs, progress_path, bar, log, llm_name, version)
            rows: list[Row] = []
            bad: list[Malformed] = []
            last = done_line
            for item in iter_rows(input_path, text_field, id_field, label_field):
                if item.line <= done_line:
                    continue
                (rows if isinstance(item, Row) else bad).append(item)
                last = item.line
                if len(rows) + len(bad) >= batch_size:  # bad rows count too: a run of them still checkpoints
                    job.flush(rows, bad, last)
                    rows, bad = [], []
            if rows or bad:
                job.flush(rows, bad, last)
    finally:  # also on errors: engine threads and HTTP pools are released, the bar closed, the log written
        cascade.close()
        bar.close()
        if log is not None:
            log.close()
    seconds = time.perf_counter() - t0
    total = sum(job.shares.values())
    counters = cascade.counters
    ms = {name: c.mean_ms for name, c in counters.items()}
    spent = sum(c.seconds for c in counters.values()) * 1000.0
    llm_tiers = {spec.name for spec in config.tiers if spec.kind in LLM_KINDS}
    llm_ms = max((ms[n] for n in llm_tiers if counters[n].seen), default=None)
    summary = {
        "input": str(input_path), "out": str(out_path), "errors_file": str(errors_path),
        "rows": job.n_rows, "malformed": job.n_bad, "resumed_after_line": done_line or None,
        "shares": {k: v / total for k, v in job.shares.items()} if total else {},
        "degraded": job.n_degraded, "items_per_s": job.n_rows / seconds if seconds else 0.0,
        "accuracy": job.n_right / job.n_gold if job.n_gold else None, "labelled": job.n_gold,
        "cost_ms": spent,
        "traffic_log": log.stats() if log is not None else None,
        # what the same rows would have cost at the large model's measured ms per item
        "all_llm_cost_ms": llm_ms * job.n_rows if llm_ms is not None else None,
    }
    return summary


def _resume_point(out_path: Path, errors_path: Path, progress_path: Path, resume: bool) -> tuple[int, int]:
    """(the last input line already done, the answers already written); cuts the output files
    back to the checkpoint, or refuses to overwrite a finished file without --resume."""
    if resume and progress_path.exists():
        done_line = json.loads(progress_path.read_text())["line"]
        done_rows = _cut_back(out_path, done_line)
        _cut_back(errors_path, done_line)
        return done_line, done_rows
    if out_path.exists() and not resume:
        raise DataError(f"{out_path}: exists; pass --resume to continue it, or remove it")
    if resume:  # nothing checkpointed yet: start clean
        out_path.unlink(missing_ok=True)
        errors_path.unlink(missing_ok=True)
    return 0, 0


class _BatchJob:
    """One run's open files and tallies; `flush` answers a chunk of rows, writes it, then checkpoints."""

    def __init__(self, cascade, input_path: Path, out, errs, progress_path: Path, bar, log, llm_name: str | None,
                 version: str | None = None):
        self.cascade, self.input_path, self.out, self.errs = cascade, input_path, out, errs
        self.progress_path, self.bar, self.log, self.llm_name = progress_path, bar, log, llm_name
        self.version = version  # serving.traffic_log.version_id: which version answered, in the log
        self.shares: Counter = Counter()
        self.n_rows = self.n_bad = self.n_gold = self.n_right = self.n_degraded = 0

    def flush(self, rows: list[Row], bad: list[Malformed], last_line: int) -> None:
        answers = self.cascade.answer_batch([r.text for r in rows], explain=self.log is not None) if rows else []
        failed = [(r, a) for r, a in zip(rows, answers) if isinstance(a, ItemFailure)]
        for r, p in zip(rows, answers):
            if not isinstance(p, ItemFailure):  # a failed row alone goes to the errors file, the run goes on
                self._write_answer(r, p)
        for b in bad:
            self.errs.write(json.dumps({"line": b.line, "error": b.reason, "file": str(self.input_path)}) + "\n")
        for r, f in failed:
            self.errs.write(json.dumps({"line": r.line, "id": r.id, "error": f.message, "code": f.code,
                                        "file": str(self.input_path)}) + "\n")
        for f in (self.out, self.errs):
            f.flush()
            os.fsync(f.fileno())
        tmp = self.progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"line": last_line}))
        tmp.replace(self.progress_path)  # the checkpoint moves only after the rows are on disk
        if self.log is not None:  # after the checkpoint: a resumed run does not log these rows again
            from serving.traffic_log import entry_of

            for r, a in zip(rows, answers):
                if not isinstance(a, ItemFailure):
                    self.log.put(entry_of(a, r.text, r.id, r.line, self.llm_name, self.log.text, self.version,
                                          self.log.llm_top_k),
                                 block=True)
        self.n_rows += len(rows) - len(failed)
        self.n_bad += len(bad) + len(failed)
        total = sum(self.shares.values()) or 1
        self.bar.update(len(rows) - len(failed), **{k: f"{v / total:.0%}" for k, v in self.shares.items()},
                        bad=self.n_bad)

    def _write_answer(self, r: Row, p) -> None:
        rec = {"id": r.id, "line": r.line, "label": p.label, "confidence": p.confidence, "tier": p.tier,
               "degraded": p.degraded, "latency_ms": p.latency_ms}
        if p.fields is not None:  # an extraction task's answer (name -> spans of the text)
            rec["fields"] = p.fields
        if r.label is not None:
            rec["gold"] = r.label
            self.n_gold += 1
            self.n_right += r.label == p.label
        self.out.write(json.dumps(rec) + "\n")
        self.shares[p.tier] += 1
        self.n_degraded += p.degraded
