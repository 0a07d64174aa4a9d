"""The traffic log: every answered item, off the request path, for the flywheel to learn from.

    [traffic_log]
    dir = "traffic"        # relative to cascade.toml
    text = "keep"          # keep | hash (sha256 of the text) | drop

One JSON object per line (JSONL), in segments `traffic-<unix ms>-<seq>.jsonl` that rotate at
`segment_mb`; past `max_total_mb` the oldest segments are deleted. JSONL because it appends a
line at a time (a kill tears at most the last line, which the reader skips), and jq, pandas
(`read_json(lines=True)`), DuckDB and Spark open it as it is; Parquet cannot be appended to,
and SQLite would put a lock and a transaction on the writer for what is an append-only stream.

Logging never fails or slows a request: `put` hands the entry to a bounded queue and returns;
a background thread writes, fsyncs every `fsync_s` and rotates. A full queue, a full disk or a
broken writer drops entries — counted (`cascade_traffic_log_dropped_total{reason}`), never a
request. Each entry: time, request id, item index, the text (or its hash), the answer (label,
confidence, tier, degraded), every tier's prediction on the way (`trail`), and the large
model's answer where it gave one (`llm`), with its `llm_top_k` most probable labels (`top`,
[[label, probability], ...]): the soft label the flywheel distils from.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from cascade.config import TrafficLogConfig


def version_id(config_path: str | Path) -> str:
    """Which cascade version answers: its config's dir name and the first 10 hex digits of the
    config's sha256 (`v002@3f9c0a1b2c`), so two versions never share an id even when their dirs
    do. Each log entry records it, and `cascade serve` sends it as `X-Cascade-Version`."""
    path = Path(config_path).resolve()
    return f"{path.parent.name}@{hashlib.sha256(path.read_bytes()).hexdigest()[:10]}"


def _answer(t) -> dict:
    """A tier's answer in the log: label, confidence, and fields if it extracts."""
    a = {"label": t.label, "confidence": round(float(t.confidence), 6)}
    if t.fields is not None:
        a["fields"] = t.fields
    return a


def llm_answer(pred, top_k: int) -> dict:
    """The large model's answer in the log: `_answer` plus its `top_k` most probable labels with
    their probabilities (`top`, most probable first) when it gave a distribution. The flywheel
    learns escalated texts from it; the top label alone would teach a one-hot-like target."""
    a = {"tier": pred.tier, **_answer(pred)}
    if top_k and pred.scores:
        best = sorted(pred.scores.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        a["top"] = [[label, round(float(p), 6)] for label, p in best]
    return a


def entry_of(pred, text: str, request_id: str | None, index: int, llm_tier: str | None, text_mode: str,
             version: str | None = None, llm_top_k: int = 5) -> dict:
    """The log line for one answered item (a Prediction whose trail was asked for), with the
    version that answered it (`version_id`)."""
    out: dict = {"ts": round(time.time(), 3), "request_id": request_id, "index": index}
    if version is not None:
        out["version"] = version
    if text_mode == "keep":
        out["text"] = text
    elif text_mode == "hash":
        out["text_sha256"] = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    out.update({"label": pred.label, "confidence": round(float(pred.confidence), 6), "tier": pred.tier,
                "degraded": pred.degraded, "latency_ms": round(pred.latency_ms, 3)})
    if pred.fields is not None:
        out["fields"] = pred.fields
    trail = pred.trail or []
    out["trail"] = [{"tier": t.tier, **_answer(t)} for t in trail]
    llm = next((t for t in trail if t.tier == llm_tier), None)
    if llm is None and pred.tier == llm_tier and not pred.degraded:
        llm = pred
    if llm is not None:
        out["llm"] = llm_answer(llm, llm_top_k)
    return out


class TrafficLog:
    """The background writer. `put` never blocks and never raises."""

    def __init__(self, directory: str | Path, segment_mb: float = 64.0, max_total_mb: float = 4096.0,
                 fsync_s: float = 1.0, queue_items: int = 100_000, text: str = "keep", llm_top_k: int = 5):
        self.dir = Path(directory)
        self.segment_bytes = int(segment_mb * 2**20)
        self.max_total_bytes = int(max_total_mb * 2**20)
        self.fsync_s = fsync_s
        self.text = text
        self.llm_top_k = llm_top_k
        self.queue: queue.Queue = queue.Queue(maxsize=queue_items)
        self.written = 0
        self.dropped: Counter = Counter()  # reason -> entries
        self.segments_deleted = 0
        self._seq = 0
        self._file = None
        self._size = 0
        self._last_sync = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cascade-traffic-log", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: TrafficLogConfig, base_dir: Path) -> TrafficLog:
        d = Path(cfg.dir)
        return cls(d if d.is_absolute() else base_dir / d, cfg.segment_mb, cfg.max_total_mb, cfg.fsync_s,
                   cfg.queue_items, cfg.text, cfg.llm_top_k)

    def put(self, entry: dict, block: bool = False) -> None:
        """Queue an entry; a full queue drops it (counted) — or, with `block` (`cascade batch`,
        where no request waits), waits for room while the writer runs."""
        if self._stop.is_set():
            self.dropped["closed"] += 1
            return
        try:
            if block and self._thread.is_alive():
                self.queue.put(entry, timeout=60)
            else:
                self.queue.put_nowait(entry)
        except queue.Full:
            self.dropped["queue_full"] += 1

    # --- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        while not (self._stop.is_set() and self.queue.empty()):
            try:
                entry = self.queue.get(timeout=min(0.2, self.fsync_s or 0.2))
            except queue.Empty:
                self._sync_if_due()
                continue
            batch = [entry]
            while len(batch) < 1024:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)
            self._sync_if_due()
        self._close_segment()

    def _write(self, batch: list[dict]) -> None:
        try:
            data = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in batch).encode("utf-8", "surrogatepass")
            if self._file is None or self._size + len(data) > self.segment_bytes and self._size:
                self._rotate()
            self._file.write(data)
            self._size += len(data)
            self.written += len(batch)
        except Exception:  # a full disk, a removed dir, a bad entry: these entries are lost, counted
            self.dropped["write_error"] += len(batch)
            self._close_segment()  # the next batch starts a fresh segment

    def _rotate(self) -> None:
        self._close_segment()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        path = self.dir / f"traffic-{int(time.time() * 1000):013d}-{self._seq:06d}.jsonl"
        self._file = path.open("ab", buffering=1 << 16)
        self._size = 0
        self._enforce_cap()

    def _enforce_cap(self) -> None:
        segments = sorted(self.dir.glob("traffic-*.jsonl"))
        total = sum(p.stat().st_size for p in segments)
        for old in segments[:-1]:  # never the one being written
            if total <= self.max_total_bytes:
                break
            total -= old.stat().st_size
            old.unlink()
            self.segments_deleted += 1

    def _sync_if_due(self) -> None:
        if self._file is not None and time.monotonic() - self._last_sync >= self.fsync_s:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except Exception:
                self._close_segment()
            self._last_sync = time.monotonic()

    def _close_segment(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.flush()
                os.fsync(f.fileno())
                f.close()
            except Exception:  # noqa: S110  already lost: nothing more to do with it
                pass

    def close(self, timeout_s: float = 60.0) -> None:
        """Write what is queued, fsync, stop; what the writer could not write by `timeout_s` is
        counted dropped."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.dropped["not_written_at_close"] += self.queue.qsize()

    def stats(self) -> dict:
        return {"written": self.written, "dropped": dict(self.dropped), "queued": self.queue.qsize(),
                "segments_deleted": self.segments_deleted}


def read_log(directory: str | Path, since: dict | None = None, end: dict | None = None) -> Iterator[dict]:
    """Every entry of every segment, oldest first; a torn line (a writer killed mid-line) is
    skipped, not fatal. `since`: a cursor `{"segment", "offset"}` (the entries before it are skipped);
    `end`: if a dict, filled with the cursor just past the last entry read (pass it as `since`
    next time to read only what came after). The newest segment may be being written: its
    unfinished last line (no newline yet) is neither read nor passed, so it is read next time."""
    segments = sorted(Path(directory).glob("traffic-*.jsonl"))
    start_seg, start_off = (since["segment"], int(since["offset"])) if since else ("", 0)
    if end is not None and since:
        end.update(since)  # nothing new: the cursor stays
    for n, path in enumerate(segments):
        if path.name < start_seg:
            continue  # read before (or deleted by the size cap: then the next one starts)
        newest = n == len(segments) - 1
        offset = start_off if path.name == start_seg else 0
        with path.open("rb") as f:
            f.seek(offset)
            for raw in f:
                if newest and not raw.endswith(b"\n"):
                    break  # being written: next time
                offset += len(raw)
                if end is not None:
                    end.update(segment=path.name, offset=offset)
                try:
                    yield json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
        if end is not None and not end:  # an empty first segment
            end.update(segment=path.name, offset=offset)


def audited_sample(directory: str | Path, llm_tier: str, seed: int = 0,
                   since: dict | None = None) -> tuple[list[str], list[dict], dict]:
    """Logged items whose large-model answer is known, as a uniform sample of all traffic: every
    audited item (the cheap tiers' answers, each audited at random with the [audit] share) plus
    the escalated items, each kept at the realised audit rate (audits / cheap-tier answers;
    seeded), so the escalated part is not over-represented. Audits skipped for budget or load
    lower that rate; they depend on when, not on what, so the sample stays uniform over texts.
    Returns (texts, the large model's answers {"label", "fields"?}, counts); items logged
    hashed or without text are skipped and counted. `since`: only the entries after this cursor
    (`read_log`)."""
    import random

    counts = {"entries": 0, "cheap_answers": 0, "audits": 0, "escalated": 0, "escalated_kept": 0,
              "no_text_skipped": 0}
    audits, escalated = [], []
    for entry in read_log(directory, since):
        counts["entries"] += 1
        llm = entry.get("llm")
        if entry.get("audit"):
            counts["audits"] += 1
            audits.append(entry)
        elif entry.get("tier") == llm_tier:
            if isinstance(llm, dict) and not entry.get("degraded"):
                counts["escalated"] += 1
                escalated.append(entry)
        elif not entry.get("degraded"):
            counts["cheap_answers"] += 1
    rate = counts["audits"] / counts["cheap_answers"] if counts["cheap_answers"] else 0.0
    rng = random.Random(seed)
    kept = [e for e in escalated if rng.random() < rate]
    counts["escalated_kept"], counts["audit_rate"] = len(kept), rate
    texts, answers = [], []
    for entry in audits + kept:
        text, llm = entry.get("text"), entry.get("llm")
        if not isinstance(text, str) or not isinstance(llm, dict) or "label" not in llm:
            counts["no_text_skipped"] += 1
            continue
        texts.append(text)
        answers.append({"label": llm["label"], "fields": llm.get("fields")})
    return texts, answers, counts
