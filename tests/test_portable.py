"""Portable model dirs: what tools that are not ours read from a student dir and a large-model
dir (onnxruntime + tokenizers alone, transformers' Auto classes), and where training keeps what
is not served (checkpoints and the teacher-label cache beside the model dir)."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from cascade.app.cli import main  # noqa: E402
from cascade.tiers.student import encode_texts, load_student_tier  # noqa: E402
from tests.helpers import run_docs_recipe  # noqa: E402
from training import distill  # noqa: E402
from training.distill import label_cache_dir, teacher_distributions  # noqa: E402
from training.large import checkpoint_dir_for, load_large  # noqa: E402
from training.student import build_student, load_student, save_student  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LABELS = ["book_flight", "timer", "weather"]
TEXTS = ["please book a flight to city 5", "set a timer for 3 minutes", "hi",
         "is it going to rain on day 9 " * 6,  # longer than the student's max_length: truncated
         "weather", "book a flight to city 77 and set a timer"]
TRAIN_ARGS = ["--size", "debug", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "1", "--precision", "fp32",
              "--vocab-size", "300", "--no-progress", "--eval-every", "0", "--ckpt-every", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    rows = {"book_flight": "please book a flight to city {}", "weather": "is it going to rain on day {}",
            "timer": "set a timer for {} minutes"}
    for split, n in (("train", 8), ("val", 3), ("test", 3)):
        with (data / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                for label, pattern in rows.items():
                    row = {"id": f"{split}-{label}-{i}", "text": pattern.format(i), "label": label}
                    f.write(json.dumps(row) + "\n")
    (data / "labels.json").write_text(json.dumps({"labels": LABELS, "oos_label": None}))
    return data


def train(data: Path, out: Path, *extra: str) -> None:
    assert main(["train", "large", "--data", str(data), "--out", str(out), *TRAIN_ARGS, *extra]) == 0


@pytest.fixture(scope="module")
def large_dirs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Tiny large models saved in fp32 and in bf16, trained under a umask that hides files."""
    root = tmp_path_factory.mktemp("large")
    old = os.umask(0o077)
    try:
        train(data_dir, root / "fp32", "--max-steps", "4")
        train(data_dir, root / "bf16", "--max-steps", "2", "--save-dtype", "bf16",
              "--checkpoint-dir", str(root / "bf16-ckpts"))
    finally:
        os.umask(old)
    return {"fp32": root / "fp32", "bf16": root / "bf16"}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, data_dir, large_dirs) -> Path:
    """A real student dir, written and exported the way `cascade train student` + `cascade
    export` write it (random weights: the files, not the accuracy, are under test)."""
    teacher = large_dirs["fp32"]
    tok = Tokenizer.from_file(str(teacher / "tokenizer.json"))
    torch.manual_seed(0)
    model = build_student("debug", tok.get_vocab_size(), len(LABELS), max_seq_len=12).eval()
    d = tmp_path_factory.mktemp("students") / "student"
    save_student(model, d, teacher / "tokenizer.json", LABELS,
                 {"data": str(data_dir), "teacher": str(teacher), "oos_label": None}, temperature=1.7)
    # the dataset for the parity check is found through cascade.json's relative path
    assert main(["export", "--model", str(d), "--int8", "--min-agreement", "0"]) == 0
    return d


def recipe() -> str:
    """The python block of docs/students.md's section on running a student without cascade."""
    doc = (REPO / "docs" / "students.md").read_text()
    section = doc[doc.index("## Without cascade"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_onnxruntime_and_tokenizers_alone_reproduce_the_student_tier(student_dir):
    got = run_docs_recipe(recipe(), student_dir, '"models/student"',
                          "{'labels': labels, 'probs': probabilities(json.loads(sys.argv[1])).tolist()}", TEXTS)
    assert got["modules"] == [] and got["labels"] == LABELS
    tier = load_student_tier(student_dir, model_file="model.onnx", batch_size=2)  # by length, 3 batches
    assert tier.temperature == 1.7 and tier.max_len == 12
    assert np.abs(np.array(got["probs"]) - tier.probabilities(TEXTS)).max() <= 1e-5
    # the graph carries the labels and the temperature itself
    import onnxruntime as ort

    for graph in ("model.onnx", "model.int8.onnx"):
        meta = ort.InferenceSession(str(student_dir / graph)).get_modelmeta().custom_metadata_map
        assert json.loads(meta["labels"]) == LABELS and float(meta["temperature"]) == 1.7
        assert json.loads(meta["id2label"]) == {"0": "book_flight", "1": "timer", "2": "weather"}
        assert meta["max_length"] == "12"


def test_transformers_loads_the_student_dir_and_tokenizes_as_the_tier(student_dir):
    config = transformers.AutoConfig.from_pretrained(student_dir)
    assert config.id2label == dict(enumerate(LABELS)) and config.label2id == {lab: i for i, lab in enumerate(LABELS)}
    assert config.cascade["kind"] == "student" and config.cascade["temperature"] == 1.7
    assert config.cascade["max_length"] == 12
    raw = json.loads((student_dir / "config.json").read_text())
    assert (raw["max_length"], raw["temperature"], raw["pad_token_id"]) == (12, 1.7, 0)
    assert json.loads((student_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    hf_tok = transformers.AutoTokenizer.from_pretrained(student_dir)
    ours = Tokenizer.from_file(str(student_dir / "tokenizer.json"))
    assert [hf_tok(t)["input_ids"] for t in TEXTS] == [ours.encode(t).ids for t in TEXTS]
    batch = hf_tok(TEXTS, padding=True, truncation=True, return_tensors="np")
    ids, mask = encode_texts(ours, TEXTS, 12)  # exactly what the tier feeds onnxruntime
    assert np.array_equal(batch["input_ids"], ids) and np.array_equal(batch["attention_mask"], mask)
    # our own loaders read the new layout; paths in cascade.json are relative to the student dir
    assert load_student(student_dir).cfg.max_seq_len == 12
    meta = json.loads((student_dir / "cascade.json").read_text())
    assert not Path(meta["data"]).is_absolute() and not Path(meta["teacher"]).is_absolute()
    assert (student_dir / meta["teacher"] / "config.json").exists()
    assert (student_dir / meta["data"] / "labels.json").exists()


def test_transformers_loads_the_large_model_dir_and_tokenizes_as_ours(large_dirs):
    d = large_dirs["fp32"]
    config = transformers.AutoConfig.from_pretrained(d)
    assert config.model_type == "llama" and config.id2label == dict(enumerate(LABELS))
    _, tok, fmt = load_large(d)
    assert config.cascade["prompt_template"] == fmt.prompt_template
    assert config.cascade["label_token_ids"] == fmt.label_token_ids
    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["eos_token"] == tok_config["pad_token"] == "<|endoftext|>"
    assert tok_config["model_max_length"] == config.max_position_embeddings
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    prompts = [fmt.prompt(t) for t in TEXTS] + ["<|weather|> and <|timer|>"]
    assert [hf_tok(p)["input_ids"] for p in prompts] == [tok.encode(p).ids for p in prompts]
    assert hf_tok.convert_tokens_to_ids("<|timer|>") == fmt.label_token_ids[1]


@pytest.mark.parametrize("save", ["fp32", "bf16"])
def test_large_model_dir_says_its_dtype_stops_after_the_label_and_holds_only_the_model(large_dirs, save):
    d = large_dirs[save]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[save]
    config = json.loads((d / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == str(dtype).removeprefix("torch.")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    assert transformers.AutoModelForCausalLM.from_pretrained(d, dtype="auto").dtype == dtype
    assert load_large(d)[0].embed_tokens.weight.dtype == torch.float32  # ours computes in fp32 by default
    fmt = json.loads((d / "cascade.json").read_text())
    assert config["id2label"] == {str(i): lab for i, lab in enumerate(LABELS)}
    gen = transformers.GenerationConfig.from_pretrained(d)
    assert gen.eos_token_id == [config["eos_token_id"], *fmt["label_token_ids"]]
    # served by another user: readable whatever the umask of the run that wrote it
    assert oct(d.stat().st_mode & 0o777) == oct(0o755)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in d.iterdir()} == {p.name: oct(0o644) for p in d.iterdir()}
    # checkpoints beside the model dir (or where --checkpoint-dir said), not in it
    assert not (d / "checkpoints").exists() and not (d / "label_cache").exists()
    ckpts = checkpoint_dir_for(d) if save == "fp32" else d.parent / "bf16-ckpts"
    assert [p.name for p in sorted(ckpts.iterdir())][-1] == ("step-0000004" if save == "fp32" else "step-0000002")
    assert not any(p.suffix == ".safetensors" and p.name != "model.safetensors" for p in d.iterdir())


def test_teacher_label_cache_lives_beside_the_teacher_and_the_old_place_is_still_read(large_dirs, tmp_path,
                                                                                     monkeypatch, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(large_dirs["fp32"], teacher)
    before = sorted(p.name for p in teacher.iterdir())
    probs, cached = teacher_distributions(teacher, TEXTS)
    assert not cached and sorted(p.name for p in teacher.iterdir()) == before
    entries = list((tmp_path / "teacher.labels").iterdir())
    assert len(entries) == 1 and teacher_distributions(teacher, TEXTS)[1]
    # an entry an older version left in TEACHER/label_cache/ is still found
    (teacher / "label_cache").mkdir()
    entries[0].rename(teacher / "label_cache" / entries[0].name)
    again, cached = teacher_distributions(teacher, TEXTS)
    assert cached and torch.equal(again, probs) and "old in-dir cache" in capsys.readouterr().err
    # a teacher whose parent is not ours to write: the cache goes under CASCADE_HOME
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(distill.os, "access", lambda path, mode: False)
    assert label_cache_dir(teacher) == tmp_path / "home" / "teacher-labels"


def test_resume_finds_checkpoints_beside_the_model_dir_and_in_the_old_place(data_dir, tmp_path, capsys):
    out = tmp_path / "m"
    train(data_dir, out, "--max-steps", "4")
    first = json.loads((out / "train_summary.json").read_text())["losses"]
    capsys.readouterr()
    train(data_dir, out, "--max-steps", "6", "--resume")
    assert "resumed from step 4" in capsys.readouterr().err
    resumed = json.loads((out / "train_summary.json").read_text())["losses"]
    assert len(resumed) == 6 and resumed[:4] == first
    assert (checkpoint_dir_for(out) / "step-0000006").exists() and not (out / "checkpoints").exists()
    # a run started before the layout change: its checkpoints are in OUT/checkpoints
    checkpoint_dir_for(out).rename(out / "checkpoints")
    train(data_dir, out, "--max-steps", "8", "--resume")
    err = capsys.readouterr().err
    assert "resumed from step 6" in err and "old in-dir location" in err
    assert (out / "checkpoints" / "step-0000008").exists()
