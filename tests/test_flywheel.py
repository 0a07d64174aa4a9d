"""The flywheel (`cascade flywheel`, training/flywheel.py) and its selection strategies
(training/selection.py): each strategy on a constructed case, dedupe and the log's accounting,
pruning, the gate, the `current` pointer, and one round end to end on the quickstart's smoke
cascade (a traffic log written by `cascade batch`, a killed round resumed, a worse version
refused with `current` kept)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from training.selection import (
    knn_density,
    margin,
    normalize_text,
    pick_diversity,
    pick_importance,
    pick_random,
    pick_uncertainty,
    prune_easy,
)

# --- the strategies ------------------------------------------------------------------------


def test_random_is_seeded_and_uniform():
    assert pick_random(20, 5, seed=3).tolist() == pick_random(20, 5, seed=3).tolist()
    assert pick_random(20, 5, seed=3).tolist() != pick_random(20, 5, seed=4).tolist()
    assert len(set(pick_random(20, 20, seed=0).tolist())) == 20 and len(pick_random(5, 9)) == 5
    counts = np.bincount(np.concatenate([pick_random(20, 5, seed=s) for s in range(2000)]), minlength=20)
    # each index is picked with probability 5/20: 500 of 2000 draws, sd ~19.4
    assert np.abs(counts - 500).max() < 5 * 19.4, counts


def test_uncertainty_picks_the_smallest_margins():
    probs = np.array([[0.9, 0.05, 0.05],     # margin 0.85
                      [0.45, 0.44, 0.11],    # 0.01
                      [0.6, 0.3, 0.1],       # 0.30
                      [0.375, 0.375, 0.25],  # 0: a tie, and the flattest row
                      [0.5, 0.1, 0.4]])      # 0.10
    assert np.allclose(margin(probs), [0.85, 0.01, 0.30, 0.0, 0.10])
    assert pick_uncertainty(probs, 3).tolist() == [3, 1, 4]
    assert pick_uncertainty(probs, 2, "entropy").tolist() == [3, 1]  # entropies 1.08, 0.96, then 0.94
    assert pick_uncertainty(np.array([[0.5, 0.5], [0.9, 0.1], [0.5, 0.5]]), 2).tolist() == [0, 2]  # stable
    with pytest.raises(ValueError):
        pick_uncertainty(probs, 1, "nope")


def blobs(sizes=(50, 30, 5), dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[: len(sizes)] * 10.0
    x = np.concatenate([c + rng.normal(0, 0.3, (n, dim)) for c, n in zip(centres, sizes)])
    return x, np.repeat(np.arange(len(sizes)), sizes)


def test_diversity_covers_the_clusters():
    x, blob = blobs()
    for seed in range(5):  # whichever point it starts from
        assert sorted(blob[pick_diversity(x, 3, seed=seed)].tolist()) == [0, 1, 2]
    # blob 0 already labelled: the two picks go to the other two blobs, the small one included
    covered = x[blob == 0][:3]
    assert sorted(blob[pick_diversity(x, 2, centres=covered)].tolist()) == [1, 2]
    assert len(set(pick_diversity(x, len(x)).tolist())) == len(x)  # never a point twice


def test_importance_ranks_uncertain_and_dense_first():
    """score = (1 - max p) x density: an uncertain text in a dense region outranks a slightly
    more uncertain outlier; confident texts come last; beta = 0 is plain least confidence."""
    x, blob = blobs(sizes=(10, 10, 1))
    probs = np.where(blob[:, None] == 0, [0.4, 0.3, 0.3],             # dense and uncertain
                     np.where(blob[:, None] == 1, [0.95, 0.03, 0.02],  # dense and sure
                              [0.35, 0.35, 0.3]))                      # the outlier, least sure
    density = knn_density(x, neighbours=5)
    assert density[blob == 0].min() > density[blob == 2].max()
    order = pick_importance(probs, x, len(x), neighbours=5)
    assert set(order[:10].tolist()) == set(np.flatnonzero(blob == 0).tolist())
    assert order[10] == np.flatnonzero(blob == 2)[0] and set(order[11:].tolist()) == set(np.flatnonzero(blob == 1))
    assert pick_importance(probs, x, 1, neighbours=5, beta=0.0)[0] == np.flatnonzero(blob == 2)[0]


def test_prune_drops_the_easy_agreeing_rows_and_keeps_a_floor_per_label():
    target = np.eye(3)[[0, 0, 0, 0, 1, 1, 2, 2]]
    student = np.array([[0.99, 0.005, 0.005], [0.9, 0.05, 0.05], [0.6, 0.2, 0.2], [0.2, 0.7, 0.1],  # last: wrong
                        [0.02, 0.97, 0.01], [0.1, 0.8, 0.1], [0.01, 0.01, 0.98], [0.05, 0.05, 0.9]])
    assert prune_easy(student, target, 8).tolist() == list(range(8))
    # per label its hardest row is kept (3: the student is wrong there; 5; 7), then the least
    # sure of the rest (2 at 0.6, 1 at 0.9); 0, 4 and 6, answered at >= 0.97 and right, go
    assert prune_easy(student, target, 5, floor=1).tolist() == [1, 2, 3, 5, 7]
    assert prune_easy(student, target, 3, floor=1).tolist() == [3, 5, 7]  # the floor holds every label


def test_normalize_text():
    assert normalize_text("  Where's\tMY  refund? ") == normalize_text("where's my refund?") == "where's my refund?"
    assert normalize_text("ｒｅｆｕｎｄ") == "refund"  # NFKC
    assert normalize_text("refund!") != normalize_text("refund")


# --- reading the log: free labels, the pool, what cannot be used -----------------------------


def write_segment(d: Path, entries: list[dict], name: str = "traffic-0000000000001-000001.jsonl") -> None:
    d.mkdir(parents=True, exist_ok=True)
    with (d / name).open("w") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")
        f.write('{"torn": ')  # a killed writer's last line: skipped


def test_read_traffic_dedupes_and_counts_what_it_cannot_use(tmp_path):
    from training.flywheel import read_traffic

    labels = ["a", "b", "c"]
    cheap = {"tier": "student", "label": "a", "confidence": 0.9}
    entries = [
        {"text": "Refund  please", **cheap},
        {"text": "refund please", **cheap},  # a duplicate after normalisation
        {"text": "refund please", **cheap, "audit": True, "llm": {"label": "b", "confidence": 0.8}},
        {"text": "hello", "tier": "llm", "label": "c", "confidence": 0.6, "llm": {"label": "c", "confidence": 0.6}},
        {"text": "open question", **cheap},
        {"text": "another open one", **cheap},
        {"text": "soft one", "tier": "llm", "label": "b", "confidence": 0.5,  # its top labels, as logged
         "llm": {"label": "b", "confidence": 0.5, "top": [["b", 0.5], ["c", 0.3], ["zzz", 0.1], ["a"]]}},
        {"text_sha256": hashlib.sha256(b"x").hexdigest(), **cheap},
        {"text_sha256": hashlib.sha256(b"y").hexdigest(), **cheap},
        {**cheap},  # text = "drop"
        {"text": "A val text", **cheap},
        {"text": "a train text", **cheap},
        {"text": "other task", "tier": "llm", "label": "zzz", "confidence": 0.5, "llm": {"label": "zzz",
                                                                                     "confidence": 0.5}},
    ]
    write_segment(tmp_path / "log", entries)
    t = read_traffic(tmp_path / "log", labels, held_out={"a val text"}, known={"a train text"})
    c = t.counts
    assert c["entries"] == 13 and c["audit_entries"] == 1 and c["unique_texts"] == 8 and c["duplicates"] == 2
    assert (c["hashed_texts_skipped"], c["dropped_texts_skipped"]) == (2, 1)
    assert (c["held_out_skipped"], c["known_skipped"], c["unknown_label_skipped"]) == (1, 1, 1)
    assert sorted(t.pool) == ["another open one", "open question"]
    free = {r.text: r for r in t.free}
    assert set(free) == {"Refund  please", "hello", "soft one"} and c["escalated_labels"] == 2
    assert c["audit_labels"] == 1
    assert free["Refund  please"].source == "audit"  # the audited answer labels the cheap-answered text
    assert np.allclose(free["Refund  please"].target, [0.1, 0.8, 0.1])  # top answer + the rest spread evenly
    assert free["hello"].source == "escalated" and free["hello"].target.argmax() == 2
    # the logged top labels kept; a label outside the task's and a malformed pair left out, their
    # mass spread over the labels the log does not name
    assert np.allclose(free["soft one"].target, [0.2, 0.5, 0.3])
    from training.flywheel import answer_distribution

    for conf, task in ((-0.5, labels), (1.7, labels), (0.0, ["a"])):  # clamped: never a negative or NaN target
        p = answer_distribution("a", conf, task)
        assert np.all(p >= 0) and np.isclose(p.sum(), 1.0)
    assert np.allclose(answer_distribution("a", 1.7, labels), [1, 0, 0])
    assert np.allclose(answer_distribution("a", 0.0, ["a"]), [1])


# --- the gate and the pointer ----------------------------------------------------------------


def test_the_parent_rounds_unpicked_texts_join_the_pool_unless_known_or_answered(tmp_path):
    from training.flywheel import FlywheelError, add_carried_pool, read_pool, read_traffic, write_pool

    labels = ["a", "b"]
    write_segment(tmp_path / "log", [
        {"text": "Fresh one", "label": "a", "tier": "student", "confidence": 0.7},
        {"text": "was unpicked", "label": "a", "tier": "llm", "confidence": 0.9,
         "llm": {"label": "b", "confidence": 0.9}},
    ])
    traffic = read_traffic(tmp_path / "log", labels, held_out=set(), known=set())
    write_pool(tmp_path / "flywheel_pool.jsonl", ["Was  unpicked", "still open", "A val text", "learnt now",
                                                  "fresh one", "still open"], "v001")
    carried = read_pool(tmp_path)
    add_carried_pool(traffic, carried, skip={"a val text", "learnt now"})
    # escalated since (its answer is a free label now), in val, learnt, in the new pool, repeated: left out
    assert traffic.pool == ["still open", "Fresh one"]
    assert traffic.counts["pool_carried"] == 1 and traffic.counts["pool"] == 2
    assert [r.text for r in traffic.free] == ["was unpicked"]
    (tmp_path / "flywheel_pool.jsonl").write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(FlywheelError, match=r"flywheel_pool.jsonl:2: not a pool line"):
        read_pool(tmp_path)


def test_gate_refuses_a_worse_version_and_says_why():
    from training.flywheel import gate_verdict

    cur = {"accuracy": 0.90, "llm_share": 0.20, "n": 500}
    ok, reasons = gate_verdict({"accuracy": 0.905, "llm_share": 0.15}, cur, 0.91, 0.01, certified=True)
    assert ok and all(r.startswith("ok") for r in reasons)
    worse, reasons = gate_verdict({"accuracy": 0.89, "llm_share": 0.10}, cur, 0.91, 0.01, certified=True)
    assert not worse and reasons[1].startswith("FAIL") and "0.8900 vs target 0.9000" in reasons[1]
    costlier, reasons = gate_verdict({"accuracy": 0.91, "llm_share": 0.25}, cur, 0.91, 0.01, certified=True)
    assert not costlier and reasons[2].startswith("FAIL") and "0.250 vs the current version's 0.200" in reasons[2]
    assert gate_verdict({"accuracy": 0.91, "llm_share": 0.20}, cur, 0.91, 0.01, certified=True)[0]  # a tie passes
    assert not gate_verdict({"accuracy": 0.91, "llm_share": 0.1}, cur, 0.91, 0.01, certified=False)[0]


def test_point_current_swaps_a_symlink(tmp_path):
    from training.flywheel import FlywheelError, point_current, version_numbers

    for name in ("v001", "v002", ".v003.partial"):
        (tmp_path / name).mkdir()
    point_current(tmp_path, "v001")
    point_current(tmp_path, "v002")
    assert os.readlink(tmp_path / "current") == "v002" and (tmp_path / "current").is_dir()
    assert [n for n, _ in version_numbers(tmp_path)] == [1, 2, 3]  # the link is not a version
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".current")]  # no temp link left
    (tmp_path / "other").mkdir()
    (tmp_path / "current").unlink()
    (tmp_path / "current").mkdir()
    with pytest.raises(FlywheelError, match="not a symlink"):
        point_current(tmp_path, "v001")


def test_an_extraction_cascade_is_refused_not_distilled_without_its_fields(tmp_path):
    from training.flywheel import FlywheelError, run_flywheel

    cfg = tmp_path / "cascade.toml"
    cfg.write_text('[task]\nname = "x"\nkind = "joint"\n\n[[tiers]]\nname = "m"\nkind = "majority"\n'
                   'threshold = 0.0\n')
    with pytest.raises(FlywheelError, match="task.kind is 'joint'.*--teacher-fields"):
        run_flywheel(cfg, tmp_path / "log", tmp_path / "data", tmp_path / "versions", log=lambda *_: None)


def test_flywheel_config_names_the_bad_flag():
    from training.flywheel import FlywheelConfig, FlywheelError

    with pytest.raises(FlywheelError, match="--strategy"):
        FlywheelConfig(strategy="clever")
    with pytest.raises(FlywheelError, match="--budget.*--max-loss"):
        FlywheelConfig(budget=-1, max_loss=1.5)


# --- end to end on the quickstart's smoke cascade --------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`cascade quickstart --smoke` (rules + a tiny student + a tiny large model), then traffic:
    new demo texts (and some repeats) through `cascade batch` with a serving config whose
    thresholds let the student answer about half, `traffic_log` on; plus a segment of hashed
    entries, as `text = "hash"` writes them."""
    from cascade.app.cli import main
    from cascade.app.demo import make_demo
    from cascade.app.quickstart import run_quickstart
    from cascade.config import TrafficLogConfig, dump_config, load_config
    from cascade.tiers import build_tier

    root = tmp_path_factory.mktemp("flywheel")
    qs = root / "qs"
    run_quickstart(qs, smoke=True, progress=False)
    make_demo(root / "traffic-ds", per_label=(8, 0, 0), seed=1)
    texts = [json.loads(line)["text"] for line in (root / "traffic-ds" / "train.jsonl").read_text().splitlines()]
    texts += texts[:15]
    (root / "traffic.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n"
                                                for i, t in enumerate(texts)))
    config = load_config(qs / "cascade.toml")
    conf = build_tier(config.tiers[1], qs).probabilities(texts).max(1)
    config.tiers[0].threshold, config.tiers[1].threshold = 0.6667, float(np.median(conf))
    config.traffic_log = TrafficLogConfig(dir="traffic")
    dump_config(config, qs / "serving.toml")
    assert main(["batch", str(root / "traffic.jsonl"), "--config", str(qs / "serving.toml"), "--out",
                 str(root / "answers.jsonl"), "--no-progress"]) == 0
    write_segment(qs / "traffic", [{"text_sha256": hashlib.sha256(t.encode()).hexdigest(), "label": "x",
                                    "tier": "rules", "confidence": 1.0} for t in ("h1", "h2", "h3")],
                  name="traffic-9999999999999-000001.jsonl")
    return root


def flywheel(root: Path, versions: str, config: Path, *extra: str) -> list[str]:
    return ["flywheel", "--config", str(config), "--log", str(root / "qs" / "traffic"),
            "--data", str(root / "qs" / "data"), "--out", str(root / versions), "--max-steps", "4",
            "--batch-size", "32", "--warmup-steps", "1", "--min-agreement", "0", "--no-progress", *extra]


def test_the_log_keeps_the_large_models_top_labels_and_a_round_learns_them(smoke):
    """What `cascade batch` logged for the escalated texts: the real large-model tier's answer with
    its most probable labels (`llm_top_k`, 5 by default), most probable first, which
    `read_traffic` turns into the soft target; an audit's answer (`llm_answer`) the same."""
    from cascade.config import load_config
    from cascade.data import load_labels
    from cascade.tiers import build_tier
    from serving.traffic_log import llm_answer, read_log
    from training.flywheel import read_traffic

    qs = smoke / "qs"
    config = load_config(qs / "serving.toml")
    llm_name, labels = config.tiers[-1].name, load_labels(qs / "data").labels
    escalated = [e for e in read_log(qs / "traffic") if e.get("tier") == llm_name]
    assert escalated
    for e in escalated:
        top = e["llm"]["top"]
        assert len(top) == min(5, len(labels)) and top[0][0] == e["label"]
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True) and sum(p for _, p in top) <= 1 + 1e-5
    free = {r.text: r.target for r in read_traffic(qs / "traffic", labels, set(), set()).free}
    e = escalated[0]
    got = free[e["text"]]
    assert all(abs(got[labels.index(lab)] - p) < 1e-5 for lab, p in e["llm"]["top"])
    (answer,) = build_tier(config.tiers[-1], qs).predict_batch([e["text"]])
    logged = llm_answer(answer, 3)
    assert logged["tier"] == llm_name and logged["label"] == answer.label and len(logged["top"]) == 3


def test_remembered_answers_ask_the_large_model_once_per_text(smoke):
    """Within `remembered_answers` (a round's calibration and gate), a second tier instance of
    the same large model answers val texts it was asked before without asking its backend, the
    same answers, at the same cost per item in its meter; outside, the backend is asked again."""
    from cascade.config import load_config
    from cascade.data import load_split
    from cascade.tiers import build_tier
    from serving.llm_tier import remembered_answers

    qs = smoke / "qs"
    spec = load_config(qs / "serving.toml").tiers[-1]
    texts = [ex.text for ex in load_split(qs / "data", "val")][:20]
    texts += texts[:3]  # repeats in one batch: asked once
    with remembered_answers() as memo:
        a = build_tier(spec, qs)
        first = a.predict_batch(texts)
        assert len(memo) == 20
        b = build_tier(spec, qs)
        asked: list[int] = []
        choose = b.backend.choose
        b.backend.choose = lambda prompts, choices: asked.append(len(prompts)) or choose(prompts, choices)
        second = b.predict_batch(texts)
        assert asked == []
        assert [(p.label, p.confidence, p.scores) for p in second] == [(p.label, p.confidence, p.scores)
                                                                      for p in first]
        assert b.cost == pytest.approx(a.cost) and b.cost > 0
        renamed = build_tier(spec.model_copy(update={"name": "other"}), qs).predict_batch(texts[:2])
        assert [p.tier for p in renamed] == ["other", "other"]  # the asking tier's name, not the first's
    b.predict_batch(texts[:2])
    assert asked == [2]


def test_a_round_end_to_end_resumes_after_a_kill_and_promotes(smoke, monkeypatch, capsys):
    import training.flywheel as fw
    from cascade.app.cli import main
    from cascade.evaluate import run_eval

    args = flywheel(smoke, "versions", smoke / "qs" / "cascade.toml", "--budget", "12", "--strategy", "uncertainty",
                    "--max-train", "250", "--promote")

    def killed(*a, **k):
        raise KeyboardInterrupt  # as a kill between two steps: the labels are on disk already

    monkeypatch.setattr(fw, "distil_warm", killed)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    partial = smoke / "versions" / ".v001.partial"
    assert len((partial / "labels.jsonl").read_text().splitlines()) == 12
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args) == 2 and "--resume" in capsys.readouterr().err  # not silently started over

    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "12 labels already in labels.jsonl (resumed); 0 to ask" in out
    v = smoke / "versions" / "v001"
    m = json.loads((v / "manifest.json").read_text())
    c = m["counts"]
    assert c["hashed_texts_skipped"] == 3 and c["budget_labels"] == 12 and c["escalated_labels_used"] > 0
    assert c["duplicates"] >= 15 and c["distillation_rows"] == 250 and c["pruned"] == m["prune"]["before"] - 250
    assert m["strategy"] == "uncertainty" and m["parent"]["config"] == str((smoke / "qs" / "cascade.toml").resolve())
    assert m["log"]["segments"] and m["training"]["steps"] == 4
    assert len((v / "texts.sha256").read_text().splitlines()) == 250
    carried = (v / "flywheel_data.jsonl").read_text().splitlines()
    assert len(carried) == c["escalated_labels_used"] + c["audit_labels_used"] + 12
    for name in ("cascade.toml", "cascade.frontier.json", "rules.toml", "student/model.int8.onnx",
                 "student/export.json", "student/train_summary.json"):
        assert (v / name).exists(), name
    assert not (v / "student.checkpoints").exists() and not partial.exists()
    g = m["gate"]
    assert g["passed"] == m["promoted"] is True and os.readlink(smoke / "versions" / "current") == "v001"
    assert "promoted: " in out and g["reasons"][2] in out
    # the version runs from its own dir: its paths are relative (the large model is referenced)
    toml = (v / "cascade.toml").read_text()
    assert 'path = "student"' in toml and 'path = "../../qs/large"' in toml
    report, _ = run_eval(smoke / "versions" / "current" / "cascade.toml", smoke / "qs" / "data", "val")
    assert report["llm_share"] == g["new"]["llm_share"] and report["accuracy"] == g["new"]["accuracy"]
    # the next round reads the same log from where this one stopped: nothing new yet
    assert m["log"]["since"] is None and m["log"]["cursor"]["segment"] == m["log"]["segments"][-1]
    assert main(flywheel(smoke, "versions", smoke / "versions" / "current" / "cascade.toml", "--budget", "5",
                         "--dry-run", "--json")) == 0
    nothing = json.loads(capsys.readouterr().out)
    assert nothing["counts"]["entries"] == 0 and nothing["since"] == m["log"]["cursor"] and not nothing["free"]
    # ... but the texts v001's budget did not pick are still candidates
    handed_on = [json.loads(line)["text"] for line in (v / "flywheel_pool.jsonl").read_text().splitlines()]
    assert c["pool_handed_on"] == len(handed_on) == c["pool"] - 12 and c["pool_carried"] == 0
    assert nothing["counts"]["pool_carried"] == nothing["counts"]["pool"] == len(handed_on)
    assert len(nothing["picks"]["texts"]) == 5 and set(nothing["picks"]["texts"]) <= set(handed_on)
    # from the start, what it learnt is carried, not labelled again
    assert main(flywheel(smoke, "versions", smoke / "versions" / "current" / "cascade.toml", "--budget", "5",
                         "--dry-run", "--json", "--from-start")) == 0
    nxt = json.loads(capsys.readouterr().out)
    bought = {json.loads(line)["text"] for line in (v / "labels.jsonl").read_text().splitlines()}
    assert nxt["dry_run"] and nxt["counts"]["escalated_labels"] == 0 and not nxt["free"]
    assert nxt["counts"]["known_skipped"] >= len(carried) and len(nxt["picks"]["texts"]) == 5
    assert nxt["counts"]["pool_carried"] == 0  # the log's own pool holds them all again
    assert not set(nxt["picks"]["texts"]) & bought
    assert sorted(p.name for p in (smoke / "versions").iterdir()) == ["current", "v001"]  # dry: nothing written


def test_the_gate_refuses_a_version_that_raises_the_share_and_keeps_current(smoke, capsys):
    """Against the serving config (thresholds that answer half of val without the large model),
    a round whose recalibrated thresholds send more to it is written but not promoted."""
    from cascade.app.cli import main

    versions = smoke / "versions-refused"
    versions.mkdir()
    os.symlink(os.path.relpath(smoke / "qs", versions), versions / "current")
    assert main(flywheel(smoke, "versions-refused", smoke / "qs" / "serving.toml", "--budget", "5",
                         "--strategy", "diversity", "--promote", "--json", str(smoke / "refused.json"))) == 0
    out = capsys.readouterr().out
    m = json.loads((versions / "v001" / "manifest.json").read_text())
    g = m["gate"]
    assert not g["passed"] and not m["promoted"] and "gate refused: current unchanged" in out
    assert g["new"]["llm_share"] > g["current"]["llm_share"] and g["reasons"][2].startswith("FAIL")
    assert os.readlink(versions / "current") == os.path.relpath(smoke / "qs", versions)
    assert json.loads((smoke / "refused.json").read_text())["version"] == "v001"
    assert m["selection"]["embedding"] == "pooled hidden state"


def test_a_round_holds_the_audited_sample_out_of_training_and_calibrates_on_it(smoke, capsys):
    """`--calibrate-on-audits`: the log's audited sample (audits, as the service writes them, by
    the real large-model tier, plus escalated items at the audit rate) is never trained on, and
    calibration takes it as label-free evidence beside val."""
    import shutil

    from cascade.app.cli import main
    from cascade.config import load_config
    from cascade.tiers import build_tier
    from serving.traffic_log import read_log
    from training.selection import normalize_text

    qs = smoke / "qs"
    log = smoke / "traffic-audited"
    shutil.copytree(qs / "traffic", log)
    config = load_config(qs / "serving.toml")
    llm_name = config.tiers[-1].name
    cheap = [e for e in read_log(log) if isinstance(e.get("text"), str) and e["tier"] != llm_name][::2]
    answers = build_tier(config.tiers[-1], qs).predict_batch([e["text"] for e in cheap])
    write_segment(log, [{**e, "audit": True, "llm": {"tier": llm_name, "label": a.label,
                                                     "confidence": round(a.confidence, 6)}}
                        for e, a in zip(cheap, answers)], name="traffic-9999999999998-000001.jsonl")
    args = ["flywheel", "--config", str(qs / "serving.toml"), "--log", str(log), "--data", str(qs / "data"),
            "--out", str(smoke / "versions-audits"), "--max-steps", "2", "--batch-size", "32", "--warmup-steps",
            "1", "--min-agreement", "0", "--no-progress", "--calibrate-on-audits"]
    assert main(args) == 0
    out = capsys.readouterr().out
    v = smoke / "versions-audits" / "v001"
    m = json.loads((v / "manifest.json").read_text())
    ev = m["counts"]["audit_evidence"]
    assert ev["audits"] == len(cheap) and ev["evidence_texts"] > 0 and ev["free_labels_held_out"] > 0
    assert f"audited sample: {ev['evidence_texts']} texts held out of training" in out
    held = {normalize_text(t) for t in json.loads((v / "selection.json").read_text())["evidence"]["texts"]}
    assert len(held) == ev["evidence_texts"]
    carried = [json.loads(line)["text"] for line in (v / "flywheel_data.jsonl").read_text().splitlines()]
    assert carried and not {normalize_text(t) for t in carried} & held  # learnt nothing it is tested on
    used = m["calibration"]["evidence"]
    assert used["source"] == "traffic" and 0 < used["n"] <= ev["evidence_texts"] and "val_only" in used
    assert used["n"] + used["dropped_seen"] == ev["evidence_texts"]
