"""The report figures: the confusion matrix of the most-confused labels, a reliability diagram
per tier (`cascade eval`), and the loss curve beside a training run's `train_log.jsonl`.

matplotlib is an optional extra (`cascade[plots]`; `train`, `dev` and `bench` bring it): it is
imported inside the functions, never at module level, and without it every plot function
prints one line saying so and returns None, so the JSON and Markdown reports are still written.
Figures are `matplotlib.figure.Figure` objects saved with the Agg canvas: no pyplot state, no
display needed. Each function takes plain data (what `cascade.metrics` computes) and a path,
and returns the path it wrote.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

MISSING = "plots skipped: matplotlib is not installed (pip install 'cascade[plots]')"


@functools.cache
def _have_matplotlib() -> bool:
    """Whether matplotlib imports; says so once per process when it does not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(MISSING, file=sys.stderr, flush=True)
        return False
    return True


def pyplot():
    """`matplotlib.pyplot` on the Agg backend, or None (after the one-line note) without
    matplotlib. For callers that draw with pyplot (`cascade.calibrate`'s frontier)."""
    if not _have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(**kwargs):
    if not _have_matplotlib():
        return None
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def confusion_png(confusion: dict, path: str | Path, title: str) -> Path | None:
    """The confusion matrix of `cascade.metrics.confusion_summary` (labels, matrix, support):
    rows gold, columns predicted, each cell's count written in it and coloured by its share of
    the gold label's items, so the errors of a small label show as well as a large one's.

    Returns:
        The path written; None without matplotlib or without a single error to show.
    """
    labels, matrix, support = confusion["labels"], confusion["matrix"], confusion["support"]
    if not labels:
        return None
    size = max(4.5, 0.45 * len(labels) + 2.5)
    fig = _figure(figsize=(size + 1.0, size))
    if fig is None:
        return None
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    share = counts / np.maximum(np.asarray(support, dtype=float)[:, None], 1.0)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the gold label's items")
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(ticks, [f"{lab} ({n})" for lab, n in zip(labels, support)], fontsize=8)
    for (r, c), n in np.ndenumerate(counts):
        if n:
            ax.text(c, r, f"{int(n)}", ha="center", va="center", fontsize=7,
                    color="white" if share[r, c] > 0.5 else "black")
    ax.set_xlabel("predicted label")
    ax.set_ylabel("gold label (items in the split)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def reliability_png(tiers: Sequence[dict], path: str | Path, title: str) -> Path | None:
    """One reliability diagram per tier that answered anything: per confidence bin the accuracy
    of the tier's answers (bars; the dot sits at the bin's mean confidence, so its distance from
    the diagonal is the miscalibration), the ECE in the panel's title, and the items per bin in
    a strip below.

    Args:
        tiers: rows of the eval report's `tiers` (`name`, `answered`, `reliability`, `ece`).
    """
    shown = [t for t in tiers if t.get("answered") and t.get("reliability")]
    if not shown:
        return None
    fig = _figure(figsize=(4.0 * len(shown), 5.2))
    if fig is None:
        return None
    from matplotlib.ticker import MaxNLocator

    axes = fig.subplots(2, len(shown), squeeze=False, sharex="col", gridspec_kw={"height_ratios": [3, 1]})
    for (ax, count), tier in zip(axes.T, shown):
        bins = [b for b in tier["reliability"] if b["n"]]
        width = tier["reliability"][0]["hi"] - tier["reliability"][0]["lo"]
        ax.bar([b["lo"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
               color="tab:blue", edgecolor="white", alpha=0.8, label="accuracy in the bin")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", ms=4, c="tab:red",
                label="at its mean confidence")
        ax.plot([0, 1], [0, 1], "--", c="0.4", lw=1, label="calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{tier['name']}: ECE {tier['ece']:.3f}, n={tier['answered']}", fontsize=10)
        ax.grid(alpha=0.3)
        count.bar([b["lo"] for b in bins], [b["n"] for b in bins], width=width, align="edge", color="0.55")
        count.yaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
        count.set_xlabel("confidence")
        count.set_ylabel("items")
        count.grid(alpha=0.3)
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def read_log(path: str | Path) -> list[dict]:
    """The entries of a `train_log.jsonl`; a step logged twice (a resumed run repeats the steps
    after its last checkpoint) keeps its last entry of each kind (same keys)."""
    latest: dict[tuple[int, frozenset], dict] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            latest[(entry.get("step", 0), frozenset(entry))] = entry
    return sorted(latest.values(), key=lambda e: e.get("step", 0))


def loss_curve_png(log_path: str | Path, path: str | Path | None = None, title: str | None = None
                   ) -> Path | None:
    """Training loss by step from a `train_log.jsonl` (beside it, as `train_loss.png`, unless
    `path` says otherwise), any logged `val_loss`/`eval_loss` with it, and `val_accuracy` on a
    second axis when the run logged it. The loss axis is log-scale when it spans over 10x.

    Returns:
        The path written; None without matplotlib or without a logged loss.
    """
    log_path = Path(log_path)
    entries = read_log(log_path)
    train = [(e["step"], e["loss"]) for e in entries if "loss" in e and math.isfinite(e["loss"])]
    if not train:
        return None
    fig = _figure(figsize=(7.5, 4.2))
    if fig is None:
        return None
    ax = fig.subplots()
    ax.plot(*zip(*train), lw=1.2, marker="." if len(train) < 50 else None, label="train loss")
    losses = [y for _, y in train]
    for key in ("val_loss", "eval_loss"):
        points = [(e["step"], e[key]) for e in entries if key in e]
        if points:
            ax.plot(*zip(*points), "o-", ms=4, label=key.replace("_", " "))
            losses += [y for _, y in points]
    if min(losses) > 0 and max(losses) / min(losses) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    handles, names = ax.get_legend_handles_labels()
    accuracy = [(e["step"], e["val_accuracy"]) for e in entries if e.get("val_accuracy") is not None]
    if accuracy:
        acc_ax = ax.twinx()
        line = acc_ax.plot(*zip(*accuracy), "s--", ms=4, c="tab:green", label="val accuracy")
        acc_ax.set_ylabel("val accuracy")
        acc_ax.set_ylim(0, 1.02)
        handles, names = handles + line, names + ["val accuracy"]
    ax.legend(handles, names, loc="upper right", fontsize=8)
    ax.set_title(title or f"{log_path.parent.name}: training loss over {train[-1][0]} steps", fontsize=10)
    fig.tight_layout()
    return _save(fig, path or log_path.with_name("train_loss.png"))
