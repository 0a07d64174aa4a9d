"""The distillation loss's temperature T and teacher weight alpha, chosen on val
(`cascade train student --kd-search`; docs/students.md "Choosing T and alpha").

loss = alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE(labels) (`training.distill`). Which
T and alpha serve a task best depends on how sure its teacher is and how right: a teacher that
is rarely wrong and spreads mass over near-miss labels teaches most at high alpha and T; one
that is confidently wrong on a slice of train is better diluted by the gold labels. Rather than
fix 2 and 0.5 everywhere, one short student per grid point is distilled (the same recipe for
`search_epochs`, the teacher's labels read from its cache, so each costs only training), and
the point with the best val accuracy is kept; ties go to the earlier grid point.

The trials live beside the student dir, in OUT.kd-search/, never in it: each trial's figures
go into OUT.kd-search/kd_search.json as soon as it is done and its model is deleted (a
distil-smollm2 trial is 145 MB), so a stopped search resumes at the next point and nothing but
the record is left. The chosen point and every trial's val accuracy go into the final
student's train_summary.json (`kd_search`).

Choosing on val means val has been looked at before calibration certifies on it; with a few
grid points this is a mild selection, of the same kind as fitting the student's temperature
there (docs/calibration.md).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

# T in {1, 2, 4} x alpha in {0.5, 0.9}: 0.5 weighs the gold labels as much as the teacher, 0.9
# all but drops them; the historical default (2, 0.5) is first, so it wins ties.
DEFAULT_GRID = ((2.0, 0.5), (1.0, 0.5), (4.0, 0.5), (2.0, 0.9), (1.0, 0.9), (4.0, 0.9))
RECORD = "kd_search.json"


def parse_grid(text: str) -> tuple[tuple[float, float], ...]:
    """'T:alpha,T:alpha,...' -> ((T, alpha), ...); an error names the entry that is wrong."""
    grid = []
    for i, entry in enumerate(text.split(",")):
        parts = entry.strip().split(":")
        try:
            t, a = (float(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            t = a = None
        if t is None or not (math.isfinite(t) and t > 0 and 0.0 <= a <= 1.0):
            raise ValueError(f"--kd-grid entry {i} ({entry.strip()!r}): need T:alpha with T > 0 and 0 <= alpha <= 1, "
                             "e.g. 2:0.5")
        grid.append((t, a))
    if len(set(grid)) != len(grid):
        raise ValueError(f"--kd-grid {text!r}: a point appears twice")
    return tuple(grid)


def search_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    return out.parent / f"{out.name}.kd-search"


def search_kd(data_dir: str | Path, teacher_dir: str | Path, out_dir: str | Path, cfg, search_epochs: float,
              grid: tuple[tuple[float, float], ...] = DEFAULT_GRID, progress: bool = True, **student_kwargs) -> dict:
    """Distil one student per (T, alpha) of `grid` for `search_epochs` (else `cfg`'s recipe),
    each judged by its val accuracy; returns {"grid": [{temperature, alpha, val_accuracy,
    steps, wall_s}], "chosen": {temperature, alpha, val_accuracy}, "search_epochs", "dir"}.
    `student_kwargs` go to `train_student` as they will for the final student."""
    from cascade.data import load_labels
    from training.distill import train_student

    if load_labels(data_dir).task == "extract":  # no label term: T and alpha weigh nothing
        raise ValueError(f"--kd-search: {data_dir} is an extract task; its students learn fields alone, so T and "
                         "alpha change nothing")
    if not search_epochs > 0:
        raise ValueError(f"--kd-search-epochs {search_epochs}: must be > 0")
    where = search_dir(out_dir)
    where.mkdir(parents=True, exist_ok=True)
    record_file = where / RECORD
    trial_cfg = replace(cfg, epochs=search_epochs)
    key = {"data": str(Path(data_dir).resolve()), "teacher": str(Path(teacher_dir).resolve()),
           "search_epochs": search_epochs, "recipe": {k: v for k, v in vars(trial_cfg).items() if k != "epochs"},
           "student": {k: str(v) for k, v in sorted(student_kwargs.items())}}
    key = json.loads(json.dumps(key))  # as the record reads back (tuples become lists)
    done: list[dict] = []
    if record_file.exists():
        old = json.loads(record_file.read_text())
        if old.get("key") == key:  # the same search stopped part way: keep what it measured
            done = old["grid"]
    for t, a in grid:
        if any(d["temperature"] == t and d["alpha"] == a for d in done):
            continue
        trial = where / f"T{t:g}-alpha{a:g}"
        shutil.rmtree(trial, ignore_errors=True)  # a trial a kill interrupted starts again
        if progress:
            print(f"--kd-search: T={t:g}, alpha={a:g} for {search_epochs:g} epochs", flush=True)
        run = train_student(data_dir, teacher_dir, trial, temperature=t, alpha=a, cfg=trial_cfg, progress=progress,
                            **student_kwargs)
        done.append({"temperature": t, "alpha": a, "val_accuracy": run.summary["val_accuracy"],
                     "steps": run.summary["steps"], "wall_s": run.summary["wall_s"]})
        record_file.write_text(json.dumps({"key": key, "grid": done}, indent=1) + "\n")
        shutil.rmtree(trial)
    measured = [next(d for d in done if (d["temperature"], d["alpha"]) == p) for p in grid]
    best = max(measured, key=lambda d: d["val_accuracy"])  # max keeps the first of equals: the grid's order
    return {"grid": measured, "search_epochs": search_epochs, "dir": str(where),
            "chosen": {k: best[k] for k in ("temperature", "alpha", "val_accuracy")}}
