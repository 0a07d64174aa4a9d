"""Small real artifacts for tests: an ONNX student dir that onnxruntime and `tokenizers` load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def word_tokenizer(vocab: int = 64):
    """Token i is the word 'i'; anything else is token 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({str(i): i for i in range(vocab)}, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def onnx_student_dir(directory: Path, labels: list[str], vocab: int = 64, seed: int = 0) -> Path:
    """A student dir (model.onnx, tokenizer.json, cascade.json, config.json) whose model sums a
    per-token logit table over the unmasked tokens: a real graph run by onnxruntime."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = np.random.RandomState(seed).randn(vocab, len(labels)).astype(np.float32) * 3
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["per_token"], axis=0),
         helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
         helper.make_node("Mul", ["per_token", "mask3"], ["masked"]),
         helper.make_node("ReduceSum", ["masked", "seq"], ["logits"], keepdims=0)],
        "tiny_student",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(labels)])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([2], np.int64), "last"),
         numpy_helper.from_array(np.array([1], np.int64), "seq")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(directory / "model.onnx"))
    word_tokenizer(vocab).save(str(directory / "tokenizer.json"))
    (directory / "cascade.json").write_text(json.dumps({"labels": labels}))
    (directory / "config.json").write_text(json.dumps({"max_seq_len": 32}))
    return directory


def run_docs_recipe(code: str, model_dir: Path, placeholder: str, result: str, arg) -> dict:
    """Run a docs recipe (onnxruntime + tokenizers only) in a fresh interpreter, its model path
    `placeholder` replaced by `model_dir`, `arg` as JSON in sys.argv[1]; returns the JSON object
    whose items `result` (a Python dict expression over the recipe's names) gives, plus
    "modules": the cascade/training/torch modules it imported (none, for a portable recipe)."""
    import re
    import subprocess
    import sys

    assert not re.search(r"^\s*(import|from)\s+(cascade|training|serving|torch)\b", code, re.M)
    script = code.replace(placeholder, repr(str(model_dir))) + (
        f"\nimport sys\nprint(json.dumps({{**({result}),\n"
        "  'modules': sorted(m for m in ('cascade', 'training', 'torch') if m in sys.modules)}))\n")
    run = subprocess.run([sys.executable, "-c", script, json.dumps(arg)], capture_output=True, text=True,
                         cwd=model_dir, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)
