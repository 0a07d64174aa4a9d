"""The ensemble tier (`kind = "ensemble"`): real onnxruntime students over one label list, their
calibrated probabilities averaged; configured from cascade.toml, refused with the key or dir
named when the members do not fit together."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from cascade.config import ConfigError, build_cascade, load_config  # noqa: E402
from cascade.tiers.student import load_student_tier  # noqa: E402
from tests.helpers import onnx_student_dir  # noqa: E402

LABELS = ["billing", "card", "refund"]
TEXTS = ["1 2 3", "4", "5 6 7 8 9 10 11", "12 13", "hello 14 15", "63 62 61 60 59 58 57 56 55 54"]


def members(root: Path, labels_b: list[str] = LABELS, under: str = "models") -> Path:
    """root/models/a and root/models/b: two students with different logit tables; b at temperature 2."""
    onnx_student_dir(root / under / "a", LABELS, seed=1)
    onnx_student_dir(root / under / "b", labels_b, seed=2)
    (root / under / "b" / "calibration.json").write_text(json.dumps({"temperature": 2.0}))
    return root


def config(root: Path, options: str, path: str = 'path = "models"') -> Path:
    cfg = root / "cascade.toml"
    cfg.write_text(f'''[task]
name = "demo"

[[tiers]]
name = "students"
kind = "ensemble"
{path}
threshold = 0.5
options = {{ {options} }}

[[tiers]]
name = "fallback"
kind = "majority"
path = "data"
options = {{ label = "refund" }}
''')
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "train.jsonl").write_text(json.dumps({"text": "x", "label": "refund"}) + "\n")
    return cfg


def alone(d: Path) -> np.ndarray:
    return load_student_tier(d, model_file="model.onnx").probabilities(TEXTS)


def test_the_ensemble_answers_the_weighted_mean_of_its_members_calibrated_probabilities(tmp_path):
    root = members(tmp_path)
    cfg = config(root, 'members = ["a", "b"], weights = [3, 1], model = "model.onnx"')
    cascade = build_cascade(load_config(cfg), root)
    tier = cascade.tiers[0]
    pa, pb = alone(root / "models" / "a"), alone(root / "models" / "b")
    assert not np.allclose(pa, pb, atol=1e-3)  # the members really differ
    expected = 0.75 * pa + 0.25 * pb
    np.testing.assert_allclose(tier.probabilities(TEXTS), expected, atol=1e-6)
    preds = tier.predict_batch(TEXTS)
    for row, pred in zip(expected, preds):
        assert pred.label == LABELS[int(row.argmax())] and pred.tier == "students"
        assert pred.confidence == pytest.approx(float(row.max()), abs=1e-6)
        assert sum(pred.scores.values()) == pytest.approx(1.0, abs=1e-6)
    assert tier.cost > 0
    # the router uses it as any tier: confident answers stay, the rest fall through
    answers = cascade.predict_batch(TEXTS)
    for row, ans in zip(expected, answers):
        assert ans.tier == ("students" if row.max() >= 0.5 else "fallback")
    cascade.close()


def test_equal_weights_by_default_and_the_same_answer_in_any_batch(tmp_path):
    root = members(tmp_path, under=".")  # no `path`: the members sit beside cascade.toml
    cfg = config(root, 'members = ["a", "b"], model = "model.onnx", batch_size = 2', path="")
    tier = build_cascade(load_config(cfg), root).tiers[0]
    mean = (alone(root / "a") + alone(root / "b")) / 2
    batched = tier.probabilities(TEXTS)
    np.testing.assert_allclose(batched, mean, atol=1e-6)
    one_by_one = np.stack([tier.probabilities([t])[0] for t in TEXTS])
    reordered = tier.probabilities(TEXTS[::-1])[::-1]
    assert np.abs(one_by_one - batched).max() <= 1e-6 and np.abs(reordered - batched).max() <= 1e-6


@pytest.mark.parametrize("options, where", [
    ('members = ["a"]', "members"),
    ('members = ["a", "a"]', "members"),
    ('members = ["a", "b"], weights = [1]', "weights"),
    ('members = ["a", "b"], weights = [1, -1]', "weights"),
    ('members = ["a", "b"], weights = [inf, 1]', "weights"),
    ('members = ["a", "b"], temperature = 2', "temperature"),
])
def test_bad_options_are_refused_at_load_naming_the_key(tmp_path, options, where):
    root = members(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(config(root, options))
    assert "cascade.toml: tiers[0] ('students').options" in str(err.value) and where in str(err.value)


@pytest.mark.parametrize("labels_b", [["card", "billing", "refund"], ["billing", "card", "other"],
                                      ["billing", "card", "refund", "other"]])
def test_members_with_other_labels_are_refused_naming_the_member(tmp_path, labels_b):
    root = members(tmp_path, labels_b=labels_b)
    with pytest.raises(ConfigError, match=r"tier 'students': options.members\[1\]: .*b has other labels"):
        build_cascade(load_config(config(root, 'members = ["a", "b"], model = "model.onnx"')), root)


def test_a_missing_or_repeated_member_is_refused_naming_the_key(tmp_path):
    root = members(tmp_path)
    with pytest.raises(ConfigError, match=r"options.members\[1\] \('missing'\): .*missing: not a directory"):
        build_cascade(load_config(config(root, 'members = ["a", "missing"], model = "model.onnx"')), root)
    with pytest.raises(ConfigError, match="name one dir twice"):
        build_cascade(load_config(config(root, 'members = ["a", "./a"], model = "model.onnx"')), root)


def test_the_flywheel_refuses_an_ensemble_rather_than_retrain_one_member(tmp_path):
    from training.flywheel import FlywheelError, run_flywheel

    cfg = config(members(tmp_path), 'members = ["a", "b"]')
    with pytest.raises(FlywheelError, match="tier 'students' is of kind 'ensemble'"):
        run_flywheel(cfg, tmp_path / "log", tmp_path / "data", tmp_path / "versions", log=lambda *_: None)
