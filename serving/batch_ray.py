"""`cascade batch INPUT --config cascade.toml --out OUT --ray [ADDRESS]`: the batch on Ray Data.

The driver reads the input (JSONL, CSV or Parquet) with the same row reader as the local
command, so every row keeps its input line number (a Parquet row its 1-based row number) and a
malformed row is named the same way. Rows are cut into shards of `shard_rows` consecutive input
items. The pending shards' rows become a Ray dataset routed by `map_batches` over a pool of
`workers` actors (`CascadeWorker`), each holding the cascade: the rules and students run in
the actor's process; the large-model tier, when it runs a model itself (`builtin`, `vllm`),
lives in its own actor (`LLMWorker`, with a GPU when the cluster has them) that the workers
call, and an `openai` backend calls its servers (or pool of them) directly.

Output, resumable without loss or duplicates: `OUT/part-00007.jsonl` holds shard 7's answers
in input order, `OUT/part-00007.errors.jsonl` its malformed rows and the rows a tier failed on
alone. Each file is written to a temporary name and renamed when its shard is complete, the
part file last, so a part file that exists is whole; `OUT/manifest.json` records the run's
input, config and shard size (a resume with other ones is refused) and the shards done. After a
kill, `--resume` redoes only the shards without a part file.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

from cascade.data import DataError
from cascade.progress import Progress
from cascade.textcheck import TextError, clean_text
from serving.batch_job import Malformed, Row, iter_rows

MODEL_BACKENDS = ("builtin", "vllm")  # llm backends that load a model: their own actor


def read_items(path: Path, text_field: str, id_field: str, label_field: str) -> list[Row | Malformed]:
    if path.suffix.lower() != ".parquet":
        return list(iter_rows(path, text_field, id_field, label_field))
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise DataError(f"{path}: no {text_field!r} column (columns: {table.column_names})")
    out: list[Row | Malformed] = []
    for n, rec in enumerate(table.to_pylist(), 1):
        text = rec.get(text_field)
        if not isinstance(text, str):
            out.append(Malformed(n, f"field {text_field!r} is missing" if text is None else
                                 f"field {text_field!r} is a {type(text).__name__}, not a string"))
            continue
        try:
            text = clean_text(text, f"field {text_field!r}")
        except TextError as exc:
            out.append(Malformed(n, str(exc)))
            continue
        label = rec.get(label_field)
        out.append(Row(n, str(rec.get(id_field) or n), text, None if label in (None, "") else str(label)))
    return out


# --- the actors ------------------------------------------------------------------------------


class RemoteTier:
    """A tier that lives in another actor (the large model in `LLMWorker`)."""

    def __init__(self, name: str, actor):
        self.name, self.actor = name, actor

    def predict_batch(self, texts: list[str]):
        import ray

        return ray.get(self.actor.predict_batch.remote(texts))

    @property
    def cost(self) -> float:
        return 0.0


class LLMWorker:
    """The large-model tier alone, shared by the cascade workers."""

    def __init__(self, config_path: str, tier_index: int):
        from cascade.config import load_config
        from cascade.tiers import build_tier

        config = load_config(config_path)
        self.tier = build_tier(config.tiers[tier_index], Path(config_path).parent)

    def predict_batch(self, texts: list[str]):
        return self.tier.predict_batch(texts)


class CascadeWorker:
    """One pool actor: the cascade, applied to a batch of rows (a dict of numpy columns)."""

    def __init__(self, config_path: str, llm_actors: dict):
        from cascade.config import build_cascade, load_config
        from cascade.tiers import build_tier

        config = load_config(config_path)
        base = Path(config_path).parent

        def make_tier(spec, base_dir):
            return RemoteTier(spec.name, llm_actors[spec.name]) if spec.name in llm_actors else \
                build_tier(spec, base_dir)

        self.cascade = build_cascade(config, base, make_tier=make_tier)

    def __call__(self, batch: dict) -> dict:
        from cascade.types import ItemFailure

        answers = self.cascade.answer_batch([str(t) for t in batch["text"]])
        cols = {k: [] for k in ("label", "confidence", "tier", "degraded", "latency_ms", "error", "code")}
        for a in answers:
            failed = isinstance(a, ItemFailure)
            cols["label"].append("" if failed else a.label)
            cols["confidence"].append(0.0 if failed else float(a.confidence))
            cols["tier"].append("" if failed else a.tier)
            cols["degraded"].append(False if failed else bool(a.degraded))
            cols["latency_ms"].append(0.0 if failed else float(a.latency_ms))
            cols["error"].append(a.message if failed else "")
            cols["code"].append(a.code if failed else "")
        return {"shard": batch["shard"], "line": batch["line"], "id": batch["id"], "gold": batch["gold"], **cols}


# --- the driver ------------------------------------------------------------------------------


def _write_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _part(out_dir: Path, k: int) -> Path:
    return out_dir / f"part-{k:05d}.jsonl"


def _errors_part(out_dir: Path, k: int) -> Path:
    return out_dir / f"part-{k:05d}.errors.jsonl"


def run_batch_ray(input_path: str | Path, config_path: str | Path, out_dir: str | Path, address: str | None = None,
                  workers: int = 2, resume: bool = False, batch_size: int = 256, shard_rows: int = 1000,
                  text_field: str = "text", id_field: str = "id", label_field: str = "label",
                  progress: bool = True) -> dict:
    import ray

    from cascade.config import load_config
    from serving.llm_tier import parse_options

    input_path, config_path, out_dir = Path(input_path), Path(config_path).resolve(), Path(out_dir)
    if not input_path.exists():
        raise FileNotFoundError(f"{input_path}: not found")
    config = load_config(config_path)
    manifest_path = out_dir / "manifest.json"
    stat = input_path.stat()
    run = {"input": str(input_path.resolve()), "input_bytes": stat.st_size, "input_mtime_ns": stat.st_mtime_ns,
           "config": str(config_path), "shard_rows": shard_rows, "text_field": text_field, "id_field": id_field,
           "label_field": label_field}
    if manifest_path.exists():
        if not resume:
            raise DataError(f"{out_dir}: holds a run already; pass --resume to continue it, or remove it")
        old = json.loads(manifest_path.read_text())
        differs = [k for k in run if old.get(k) != run[k]]
        if differs:
            raise DataError(f"{manifest_path}: the run there had other {', '.join(differs)} "
                            f"({', '.join(f'{k}={old.get(k)!r}' for k in differs)}); resume it with those")
    out_dir.mkdir(parents=True, exist_ok=True)

    items = read_items(input_path, text_field, id_field, label_field)
    shards = [items[i:i + shard_rows] for i in range(0, len(items), shard_rows)]
    done = {k for k in range(len(shards)) if _part(out_dir, k).exists()}
    pending = [k for k in range(len(shards)) if k not in done]
    want = {k: {x.line for x in shards[k] if isinstance(x, Row)} for k in pending}  # the lines each shard needs

    def manifest(done_now: set[int]) -> None:
        _write_atomic(manifest_path, [json.dumps({**run, "shards": len(shards), "done": sorted(done_now)}) + "\n"])

    manifest(done)
    t0 = time.perf_counter()
    got: dict[int, list[dict]] = {k: [] for k in pending}
    seen: dict[int, set[int]] = {k: set() for k in pending}
    rows_done = 0
    bar = Progress(sum(len(v) for v in want.values()), "cascade batch (ray)", "row", enabled=progress)

    def finish(k: int) -> None:
        bad = [{"line": b.line, "error": b.reason, "file": str(input_path)} for b in shards[k]
               if isinstance(b, Malformed)]
        rows, failed = [], []
        for r in sorted(got.pop(k), key=lambda r: r["line"]):
            if r["code"]:
                failed.append({"line": r["line"], "id": r["id"], "error": r["error"], "code": r["code"],
                               "file": str(input_path)})
                continue
            rec = {"id": r["id"], "line": r["line"], "label": r["label"], "confidence": r["confidence"],
                   "tier": r["tier"], "degraded": r["degraded"], "latency_ms": r["latency_ms"]}
            if r["gold"]:
                rec["gold"] = r["gold"]
            rows.append(json.dumps(rec) + "\n")
        errors = sorted(bad + failed, key=lambda e: e["line"])
        _write_atomic(_errors_part(out_dir, k), [json.dumps(e) + "\n" for e in errors])
        _write_atomic(_part(out_dir, k), rows)  # last: its existence says the shard is whole
        done.add(k)
        manifest(done)

    for k in [k for k in pending if not want[k]]:  # nothing to route (all malformed, or empty)
        finish(k)
    todo = [k for k in pending if want[k]]
    llm_actors = {}
    if todo:
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        gpus = ray.cluster_resources().get("GPU", 0)
        for i, spec in enumerate(config.tiers):
            if spec.kind == "llm" and parse_options(spec.options)[0].backend in MODEL_BACKENDS:
                llm_actors[spec.name] = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(LLMWorker).remote(
                    str(config_path), i)
        ds = ray.data.from_items([{"shard": k, "line": r.line, "id": r.id, "text": r.text, "gold": r.label or ""}
                                  for k in todo for r in shards[k] if isinstance(r, Row)])
        routed = ds.map_batches(CascadeWorker, fn_constructor_kwargs={"config_path": str(config_path),
                                                                      "llm_actors": llm_actors},
                                batch_size=batch_size, batch_format="numpy", num_cpus=1,
                                compute=ray.data.ActorPoolStrategy(size=workers))
        for batch in routed.iter_batches(batch_size=None, batch_format="numpy"):
            n = len(batch["line"])
            touched = set()
            for i in range(n):
                r = {k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in batch.items()}
                k = int(r["shard"])
                if r["line"] in seen[k]:
                    continue  # a row delivered twice (a retried task): kept once
                seen[k].add(r["line"])
                got[k].append(r)
                touched.add(k)
                rows_done += 1
                bar.update(1)
            for k in touched:
                if seen[k] == want[k]:  # every line the shard needs, each once
                    finish(k)
    bar.close()
    if got:
        raise RuntimeError(f"shards {sorted(got)} came back incomplete (rows got/needed): "
                           f"{ {k: (len(v), len(want[k])) for k, v in got.items()} }")
    return {**_summary(out_dir, len(shards), rows_done, time.perf_counter() - t0), "own_actors": sorted(llm_actors)}


def _summary(out_dir: Path, n_shards: int, routed: int, seconds: float) -> dict:
    shares: Counter = Counter()
    rows = malformed = gold = right = degraded = 0
    for k in range(n_shards):
        for line in _part(out_dir, k).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            rows += 1
            shares[rec["tier"]] += 1
            degraded += rec["degraded"]
            if "gold" in rec:
                gold += 1
                right += rec["gold"] == rec["label"]
        malformed += len(_errors_part(out_dir, k).read_text(encoding="utf-8").splitlines())
    return {"out": str(out_dir), "shards": n_shards, "rows": rows, "malformed": malformed,
            "routed_now": routed, "rows_per_s": routed / seconds if seconds and routed else 0.0,
            "shares": {k: v / rows for k, v in shares.items()} if rows else {}, "degraded": degraded,
            "accuracy": right / gold if gold else None, "labelled": gold,
            "errors_file": str(out_dir / "part-*.errors.jsonl")}
