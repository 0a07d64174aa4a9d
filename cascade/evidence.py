"""Label-free calibration evidence: items where the large model's answer is known but no gold
label is, with every tier's prediction on them, as calibration's `TierRun`s
(`cascade.certify`, "label-free evidence"; docs/calibration.md "Evidence sources").

One file format, written by `cascade train crossfit` (`training.crossfit`: out-of-fold tiers on
the train split, the large model's cached answers) and read by `cascade calibrate --label-free
FILE`. Texts are named by digest so calibration can leave out the ones it learns its path on:
the path must be independent of the items that test it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from cascade.thresholds import CalibrationError, TierRun

EVIDENCE_FORMAT = "cascade-label-free-evidence/1"
# A flywheel version's file of the traffic texts its student learnt (written by training/flywheel.py):
# calibration leaves them out of label-free evidence.
CARRIED_TRAFFIC = "flywheel_data.jsonl"


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_evidence(path: str | Path, tier_names: list[str]) -> tuple[list[TierRun], list[str], dict]:
    """(the runs in the cascade's tier order, the items' text digests, the file's other fields).
    An error names the file and what does not fit the cascade being calibrated."""
    path = Path(path)
    try:
        ev = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"--label-free {path}: not a readable evidence file ({exc})") from exc
    if not isinstance(ev, dict) or ev.get("format") != EVIDENCE_FORMAT:
        raise CalibrationError(f"--label-free {path}: format {ev.get('format') if isinstance(ev, dict) else None!r}, "
                               f"expected {EVIDENCE_FORMAT!r} (written by `cascade train crossfit`)")
    names = [r["name"] for r in ev["runs"]]
    if names != tier_names:
        raise CalibrationError(f"--label-free {path}: its tiers {names} are not the cascade's {tier_names}")
    n = len(ev["text_digests"])
    for r in ev["runs"]:
        if len(r["labels"]) != n or len(r["confidence"]) != n:
            raise CalibrationError(f"--label-free {path}: tier {r['name']!r} has {len(r['labels'])} labels and "
                                   f"{len(r['confidence'])} confidences for {n} items")
    if any(lab is None for lab in ev["runs"][-1]["labels"]):
        raise CalibrationError(f"--label-free {path}: the large model ({names[-1]!r}) must answer every item")
    runs = [TierRun(r["name"], list(r["labels"]), np.array(r["confidence"], dtype=float), 0.0, i == len(names) - 1)
            for i, r in enumerate(ev["runs"])]
    meta = {k: v for k, v in ev.items() if k not in ("runs", "text_digests")}
    return runs, list(ev["text_digests"]), meta


def drop_items(runs: list[TierRun], keep: np.ndarray) -> list[TierRun]:
    """The runs on the items where `keep` is True."""
    idx = np.flatnonzero(keep)
    return [TierRun(r.name, [r.labels[i] for i in idx], r.confidences[idx], r.mean_ms, r.is_llm) for r in runs]
