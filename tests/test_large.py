"""The large model end to end: import of the real SmolLM2, task format, `cascade train large`."""

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer  # noqa: E402

from cascade.app.cli import main  # noqa: E402
from training.hf_io import load_hf  # noqa: E402
from training.importer import greedy_complete, import_model  # noqa: E402
from training.large import checkpoint_dir_for, load_large, train_bpe  # noqa: E402
from training.model import build_model  # noqa: E402
from training.task import TaskFormat, add_label_tokens, label_distribution, resize_for_labels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    pytest.importorskip("gguf", reason="the GGUF import needs the gguf package (train extra)")
    out = tmp_path_factory.mktemp("smollm2")
    import_model("smollm2-135m", out)
    return out


@pytest.mark.slow
def test_imported_smollm2_knows_paris_in_ours_and_in_transformers(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    model = load_hf(smollm2_dir).eval()
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert "Paris" in greedy_complete(model, tok, "The capital of France is", max_new_tokens=4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = hf_tok("The capital of France is", return_tensors="pt")
    assert "Paris" in hf_tok.decode(hf.generate(**ids, max_new_tokens=4, do_sample=False)[0])
    # label distribution on the real model: one pass per text, a proper distribution
    labels = ["weather", "play_music", "book_flight"]
    ids = add_label_tokens(tok, labels)
    resize_for_labels(model, tok, labels, ids)
    fmt = TaskFormat(labels, ids)
    probs = label_distribution(model, tok, fmt, ["will it rain tomorrow", "put on some jazz"], dtype=None)
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-5)


def test_label_tokens_decode_to_label_names_and_score_in_one_pass():
    tok = train_bpe(["hello there", "book a flight please", "what is the weather"] * 20, vocab_size=300)
    labels = ["greet", "book_flight", "weather"]
    ids = add_label_tokens(tok, labels)
    assert add_label_tokens(tok, labels) == ids  # idempotent
    assert [tok.decode([i]) for i in ids] == ["<|greet|>", "<|book_flight|>", "<|weather|>"]
    # a text containing the bare label word is not turned into the label token
    assert not set(ids) & set(tok.encode("weather greet").ids)
    model = build_model("debug", vocab_size=tok.get_vocab_size(), eos_token_id=0, bos_token_id=None)
    resize_for_labels(model, tok, labels, ids)
    assert model.embed_tokens.weight.shape[0] == tok.get_vocab_size() == max(ids) + 1
    fmt = TaskFormat(labels, ids)
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    texts = ["hello", "a much longer text about a flight to somewhere", "weather?"] * 3
    probs = label_distribution(model, tok, fmt, texts, batch_size=4, dtype=None)
    hook.remove()
    assert probs.shape == (9, 3) and torch.allclose(probs.sum(-1), torch.ones(9))
    assert sum(shape[0] for shape in calls) == 9  # every text through the model exactly once
    # same text, same answer, whatever its batch neighbours and padding
    assert torch.allclose(probs[0], probs[3], atol=1e-5) and torch.allclose(probs[1], probs[4], atol=1e-5)


def test_train_large_from_scratch_end_to_end(tmp_path, make_dataset):
    rows = [(f"please book a flight to city {i}", "book_flight") for i in range(24)]
    rows += [(f"is it going to rain on day {i}", "weather") for i in range(24)]
    data = make_dataset({"train": rows, "val": rows[::4], "test": rows[::6]})
    out = tmp_path / "model"
    assert main(["train", "large", "--data", str(data), "--out", str(out), "--size", "auto", "--max-steps", "80",
                 "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "3", "--precision", "fp32",
                 "--vocab-size", "300", "--no-progress", "--ckpt-every", "10"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["chosen_size"] == "debug" and "inference_aware" in summary["plan"]
    assert summary["val_accuracy"] == 1.0
    assert summary["losses"][-1] < summary["losses"][0]
    # the model dir is a Hugging Face dir with our task format beside it
    hf = transformers.LlamaForCausalLM.from_pretrained(out)
    assert hf.config.num_key_value_heads == 2
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    model, tok, fmt = load_large(out)
    assert fmt.labels == ["book_flight", "weather"]
    assert hf_tok.convert_tokens_to_ids("<|weather|>") == fmt.label_token_ids[1]
    probs = label_distribution(model, tok, fmt, ["book a flight to city 99", "will it rain on day 99"], dtype=None)
    assert probs.argmax(-1).tolist() == [0, 1]
    # generation_config.json: transformers' greedy generate stops right after the label token
    prompt = hf_tok(fmt.prompt("will it rain on day 99"), return_tensors="pt")
    generated = hf.generate(**prompt, max_new_tokens=5, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert generated.tolist() == [fmt.label_token_ids[1]]
    # checkpoints beside the model dir, not in it
    assert [p.name for p in checkpoint_dir_for(out).iterdir()] and not (out / "checkpoints").exists()
    assert (out / "train_log.jsonl").exists()


def test_cli_reports_bad_init(tmp_path, make_dataset, capsys):
    data = make_dataset({s: [("a b", "x"), ("c d", "y")] for s in ("train", "val", "test")})
    assert main(["train", "large", "--data", str(data), "--out", str(tmp_path / "m"), "--init", "nope"]) == 2
    assert "not a known model" in capsys.readouterr().err
