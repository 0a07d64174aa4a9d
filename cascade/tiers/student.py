"""The student tier: an exported student run by onnxruntime, tokenized by `tokenizers`.

No torch here: this tier serves on a machine that has onnxruntime alone. It reads a student
dir (`model.int8.onnx` by default, `options.model = "model.onnx"` for fp32), its
`tokenizer.json`, its labels (`cascade.json`) and, when present, the temperature fitted on
validation data (`calibration.json`), so confidences are calibrated probabilities.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cascade.config import TierConfig
from cascade.types import CostMeter, Prediction


def encode_texts(tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int64 ids and attention mask: the student's input, here and at export."""
    return pad_rows([e.ids[:max_len] or [0] for e in tokenizer.encode_batch(list(texts))])


def pad_rows(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


@dataclass
class StudentTier:
    name: str
    session: object  # onnxruntime.InferenceSession
    tokenizer: object  # tokenizers.Tokenizer
    labels: list[str]
    temperature: float = 1.0
    max_len: int = 128
    batch_size: int = 32  # sorted batches of 16/32/64/256 CLINC150 texts: 0.22/0.23/0.27/0.61 ms each (int8)
    meter: CostMeter = field(default_factory=CostMeter)

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(len(texts), len(labels)) calibrated probabilities.

        Texts are tokenized in one call and batched by token length, so a batch is padded to
        about its own length, not to the longest text that happened to share it."""
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        rows = [e.ids[:self.max_len] or [0] for e in self.tokenizer.encode_batch(list(texts))]
        order = np.argsort([len(r) for r in rows], kind="stable")
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            ids, mask = pad_rows([rows[i] for i in idx])
            logits = self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0] / self.temperature
            e = np.exp(logits - logits.max(-1, keepdims=True))
            out[idx] = e / e.sum(-1, keepdims=True)
        return out

    def predict_batch(self, texts: list[str]) -> list[Prediction | None]:
        t0 = time.perf_counter()
        probs = self.probabilities(list(texts))
        preds = []
        for row in probs:
            best = int(row.argmax())
            preds.append(Prediction(self.labels[best], float(row[best]), self.name,
                                    scores=dict(zip(self.labels, row.tolist()))))
        self.meter.add(len(texts), time.perf_counter() - t0)
        return preds

    @property
    def cost(self) -> float:
        return self.meter.mean_ms


def load_student_tier(model_dir: Path, name: str = "student", model_file: str = "model.int8.onnx",
                      threads: int = 0, batch_size: int = 32) -> StudentTier:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    d = Path(model_dir)
    path = d / model_file
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run `cascade export --model {d} --int8`")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    meta = json.loads((d / "cascade.json").read_text())
    config = json.loads((d / "config.json").read_text())
    calib = d / "calibration.json"
    temperature = json.loads(calib.read_text())["temperature"] if calib.exists() else 1.0
    return StudentTier(name, session, Tokenizer.from_file(str(d / "tokenizer.json")), list(meta["labels"]),
                       float(temperature), int(config.get("max_seq_len", 128)), batch_size)


def build_student_tier(spec: TierConfig, base_dir: Path) -> StudentTier:
    if spec.path is None:
        raise ValueError(f"tier {spec.name!r}: kind 'student' needs `path` (a student dir)")
    return load_student_tier(spec.resolve_path(base_dir), spec.name, spec.options.get("model", "model.int8.onnx"),
                             int(spec.options.get("threads", 0)), int(spec.options.get("batch_size", 32)))
