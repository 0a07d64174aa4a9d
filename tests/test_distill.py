"""Distillation: the loss by hand, unlabeled rows, the teacher cache, the student command."""

import json
import math

import pytest

torch = pytest.importorskip("torch")

from cascade.app.cli import main  # noqa: E402
from training.distill import kd_loss, teacher_distributions  # noqa: E402
from training.trainer import IGNORE  # noqa: E402


def test_kd_loss_by_hand_and_t_squared():
    teacher = torch.tensor([[0.8, 0.2]])
    student = torch.zeros(1, 2)  # uniform
    label = torch.tensor([0])
    kl_t1 = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert kd_loss(student, teacher, label, temperature=1.0, alpha=1.0).item() == pytest.approx(kl_t1, rel=1e-5)
    # at T=2 the teacher softens to normalise(sqrt(p)) = (2/3, 1/3); KL is scaled by T^2 = 4
    p2 = [2 / 3, 1 / 3]
    kl_t2 = sum(p * math.log(p / 0.5) for p in p2) * 4
    assert kd_loss(student, teacher, label, temperature=2.0, alpha=1.0).item() == pytest.approx(kl_t2, rel=1e-4)
    # alpha = 0: plain cross-entropy on the label
    assert kd_loss(student, teacher, label, temperature=2.0, alpha=0.0).item() == pytest.approx(math.log(2), rel=1e-5)
    mixed = kd_loss(student, teacher, label, temperature=2.0, alpha=0.3).item()
    assert mixed == pytest.approx(0.3 * kl_t2 + 0.7 * math.log(2), rel=1e-4)


def test_unlabeled_rows_learn_from_the_teacher_alone():
    teacher = torch.tensor([[0.8, 0.2], [0.8, 0.2]])
    student = torch.tensor([[0.3, -0.1], [0.3, -0.1]])
    only_teacher = kd_loss(student[:1], teacher[:1], torch.tensor([IGNORE]), 2.0, alpha=0.3)
    assert only_teacher.item() == pytest.approx(kd_loss(student[:1], teacher[:1], torch.tensor([1]), 2.0,
                                                        alpha=1.0).item())
    both = kd_loss(student, teacher, torch.tensor([IGNORE, 1]), 2.0, alpha=0.3)
    assert both.item() == pytest.approx(only_teacher.item() + kd_loss(student[1:], teacher[1:], torch.tensor([1]),
                                                                      2.0, 0.3).item())


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    data = root / "data"
    data.mkdir()
    rows = {"book_flight": "please book a flight to city {}", "weather": "is it going to rain on day {}",
            "timer": "set a timer for {} minutes"}
    for split, n in (("train", 30), ("val", 8), ("test", 8)):
        with (data / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                for label, pattern in rows.items():
                    f.write(json.dumps({"id": f"{split}-{label}-{i}", "text": pattern.format(i),
                                        "label": label}) + "\n")
    (data / "labels.json").write_text(json.dumps({"labels": sorted(rows), "oos_label": None}))
    teacher = root / "teacher"
    assert main(["train", "large", "--data", str(data), "--out", str(teacher), "--size", "debug", "--max-steps", "60",
                 "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "3", "--precision", "fp32",
                 "--vocab-size", "300", "--no-progress", "--ckpt-every", "100"]) == 0
    return root, data, teacher


def test_teacher_cache_is_reused(tiny_task, tmp_path):
    _, _, teacher = tiny_task
    texts = ["please book a flight to city 5", "set a timer for 3 minutes"]
    first, cached = teacher_distributions(teacher, texts, tmp_path)
    assert not cached and first.shape == (2, 3) and torch.allclose(first.sum(-1), torch.ones(2))
    again, cached = teacher_distributions(teacher, texts, tmp_path)
    assert cached and torch.equal(first, again)
    _, cached = teacher_distributions(teacher, texts + ["another"], tmp_path)
    assert not cached  # different texts, different cache entry


def test_train_student_end_to_end_with_unlabeled_and_calibration(tiny_task, capsys):
    root, data, teacher = tiny_task
    extra = root / "traffic.txt"
    extra.write_text("book a flight to city 77\nwill it rain on day 9\n\nset a timer for 8 minutes\n")
    out = root / "student"
    args = ["train", "student", "--data", str(data), "--teacher", str(teacher), "--out", str(out), "--size", "debug",
            "--unlabeled", str(extra), "--max-steps", "40", "--batch-size", "16", "--lr", "3e-3",
            "--warmup-steps", "2", "--precision", "fp32", "--no-progress", "--alpha", "0.5"]
    assert main(args) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["unlabeled_texts"] == 3 and not summary["teacher_cache_used"]
    assert summary["val_accuracy"] >= 0.9
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["temperature"] > 0 and calib["nll_after"] <= calib["nll_before"] + 1e-9
    assert {"ece_before", "ece_after", "bins"} <= set(calib) and calib["bins"] == 15
    assert "cascade export" in capsys.readouterr().out
    # second run: the teacher is not asked again; the cache is beside the teacher's dir, not in it
    assert main(args[:7] + [str(root / "student2")] + args[8:]) == 0
    assert json.loads((root / "student2" / "train_summary.json").read_text())["teacher_cache_used"] is True
    assert not (teacher / "label_cache").exists() and list((root / "teacher.labels").glob("teacher-*.safetensors"))


def test_augmented_copies_are_new_seeded_and_teacher_labelled(tiny_task):
    from training.augment import augment_texts

    texts = ["please book a flight to city 5", "set a timer for 3 minutes", "will it rain on day 2", "hi"]
    copies = augment_texts(texts, per_text=4, seed=3)
    assert copies == augment_texts(texts, per_text=4, seed=3)  # seeded: the teacher cache is reused
    assert copies != augment_texts(texts, per_text=4, seed=4)
    assert 0 < len(copies) <= 16 and len(set(copies)) == len(copies)
    assert not {c.lower() for c in copies} & {t.lower() for t in texts} and all(c.strip() for c in copies)
    with pytest.raises(ValueError, match="per_text"):
        augment_texts(texts, -1)

    root, data, teacher = tiny_task
    out = root / "student-aug"
    assert main(["train", "student", "--data", str(data), "--teacher", str(teacher), "--out", str(out),
                 "--size", "debug", "--augment", "2", "--max-steps", "10", "--batch-size", "16",
                 "--precision", "fp32", "--no-progress"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["augment"] == 2 and summary["unlabeled_texts"] > summary["train_texts"]


def test_kd_search_chooses_t_and_alpha_on_val_and_keeps_only_its_record(tiny_task, monkeypatch):
    """`--kd-search`: one short student per grid point, the best val accuracy kept (the grid's
    first among equals), every trial recorded in the final summary, no trial left on disk, and a
    second run reuses the record instead of training the trials again."""
    import training.distill as distill
    from training.kd_search import parse_grid, search_dir

    root, data, teacher = tiny_task
    out = root / "student-kd"
    args = ["train", "student", "--data", str(data), "--teacher", str(teacher), "--out", str(out), "--size", "debug",
            "--max-steps", "6", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "2", "--precision", "fp32",
            "--no-progress", "--kd-search", "--kd-grid", "1:0.5,4:0.9,2:0.2", "--kd-search-epochs", "2"]
    assert main(args) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    search = summary["kd_search"]
    grid = [(g["temperature"], g["alpha"]) for g in search["grid"]]
    assert grid == [(1.0, 0.5), (4.0, 0.9), (2.0, 0.2)] and all(0 <= g["val_accuracy"] <= 1 for g in search["grid"])
    accs = [g["val_accuracy"] for g in search["grid"]]
    best = search["grid"][accs.index(max(accs))]
    assert (search["chosen"]["temperature"], search["chosen"]["alpha"]) == (best["temperature"], best["alpha"])
    assert (summary["temperature_kd"], summary["alpha"]) == (best["temperature"], best["alpha"])
    assert all(g["steps"] == 6 for g in search["grid"])  # each trial ran the recipe (capped here at 6 steps)
    where = search_dir(out)
    assert where.parent == out.parent and sorted(p.name for p in where.iterdir()) == ["kd_search.json"]
    assert not any("kd" in p.name for p in out.iterdir())  # the student dir holds the student alone

    trained = []
    real = distill.train_student
    monkeypatch.setattr(distill, "train_student", lambda *a, **k: trained.append(k.get("temperature")) or real(*a, **k))
    assert main(args) == 0  # the record says every point is measured: only the final student trains
    assert trained == [summary["temperature_kd"]]
    assert json.loads((out / "train_summary.json").read_text())["kd_search"]["grid"] == search["grid"]

    for bad, where_ in (("2:1.5", "entry 0"), ("2:0.5,x", "entry 1"), ("0:0.5", "entry 0"), ("2:0.5,2:0.5", "twice")):
        with pytest.raises(ValueError, match=where_):
            parse_grid(bad)
    with pytest.raises(SystemExit, match="either the search or them"):
        main(args + ["--alpha", "0.7"])
    from training.kd_search import search_kd
    from training.trainer import TrainConfig

    with pytest.raises(ValueError, match="--kd-search-epochs 0"):
        search_kd(data, teacher, root / "never", TrainConfig(), 0)
    extract = root / "extract-data"
    extract.mkdir()
    (extract / "labels.json").write_text(json.dumps({"labels": [""], "task": "extract", "fields": ["city"]}))
    with pytest.raises(ValueError, match="extract task"):
        search_kd(extract, teacher, root / "never", TrainConfig(), 1)
    assert not search_dir(root / "never").exists()
