"""The student tier: an exported student run by onnxruntime, tokenized by `tokenizers`.

No torch here: this tier serves on a machine that has onnxruntime alone. It reads a student
dir (`model.int8.onnx` by default, `options.model = "model.onnx"` for fp32), its
`tokenizer.json`, its labels (`cascade.json`, else config.json's `id2label`), the input length
(config.json's `max_length`; `max_seq_len` in dirs written before it) and the temperature fitted
on validation data (`calibration.json`, else config.json's `temperature`, else 1), so
confidences are calibrated probabilities.

A tagging student (config.json `cascade.tags`; docs/extraction.md, "Student tagger") also
answers fields: its graph's `tag_logits` decoded by BIO argmax into spans of the text
(`cascade/tagging.py`), and its confidence is the item estimate chosen on val
(`calibration.json` `confidence.method`, over tag probabilities at `tag_temperature`, times
the label's probability for a joint task).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cascade.config import ConfigError, TierConfig
from cascade.tagging import CONFIDENCE_METHODS, decode_tags, item_confidence, softmax
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
class TagDecoding:
    """How a tagging student's tag logits become fields and a confidence."""

    tags: list[str]  # tag id -> "O" / "B-name" / "I-name"
    task: str = "joint"  # "extract": the label is "" and does not enter the confidence
    temperature: float = 1.0  # tag probabilities = softmax(tag_logits / temperature)
    confidence: str = "product"  # cascade.tagging.CONFIDENCE_METHODS, chosen on val


@dataclass
class StudentTier:
    name: str
    session: object  # onnxruntime.InferenceSession
    tokenizer: object  # tokenizers.Tokenizer
    labels: list[str]
    temperature: float = 1.0
    max_len: int = 128
    batch_size: int = 32  # rows per onnxruntime run (how it was chosen: docs/students.md)
    meter: CostMeter = field(default_factory=CostMeter)
    tagging: TagDecoding | None = None  # a tagging student (fields beside the label)

    def _run(self, texts: list[str]):
        """(label probabilities (N, L), per-text tag probabilities (n_i, K) or None, offsets).

        Texts are tokenized in one call and batched by token length, so a batch is padded to
        about its own length, not to the longest text that happened to share it."""
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(list(texts))
        rows = [e.ids[:self.max_len] or [0] for e in encodings]
        tag_probs: list = [None] * len(texts)
        outputs = ["logits", "tag_logits"] if self.tagging else ["logits"]
        order = np.argsort([len(r) for r in rows], kind="stable")
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            ids, mask = pad_rows([rows[i] for i in idx])
            result = self.session.run(outputs, {"input_ids": ids, "attention_mask": mask})
            logits = result[0] / self.temperature
            e = np.exp(logits - logits.max(-1, keepdims=True))
            out[idx] = e / e.sum(-1, keepdims=True)
            if self.tagging:
                for row, i in zip(result[1], idx):  # real tokens only: padding never reaches a field
                    tag_probs[i] = softmax(row[: len(rows[i])], self.tagging.temperature)
        offsets = [e.offsets[:self.max_len] for e in encodings] if self.tagging else None
        return out, tag_probs, offsets

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(len(texts), len(labels)) calibrated probabilities."""
        return self._run(texts)[0]

    def predict_batch(self, texts: list[str]) -> list[Prediction | None]:
        t0 = time.perf_counter()
        texts = list(texts)
        probs, tag_probs, offsets = self._run(texts)
        preds = []
        tg = self.tagging
        for i, row in enumerate(probs):
            best = int(row.argmax())
            if tg is None:
                preds.append(Prediction(self.labels[best], float(row[best]), self.name,
                                        scores=dict(zip(self.labels, row.tolist()))))
                continue
            joint = tg.task != "extract"
            fields = decode_tags(texts[i], offsets[i], tag_probs[i].argmax(-1), tg.tags)
            conf = item_confidence(tag_probs[i], tg.confidence, float(row[best]) if joint else None)
            preds.append(Prediction(self.labels[best] if joint else "", conf, self.name, fields=fields,
                                    scores=dict(zip(self.labels, row.tolist())) if joint else None))
        self.meter.add(len(texts), time.perf_counter() - t0)
        return preds

    @property
    def cost(self) -> float:
        return self.meter.mean_ms


def _read_json(path: Path, key: str | None = None):
    """A JSON file of the student dir, or a ConfigError naming the file and what is wrong."""
    if not path.exists():
        raise ConfigError(f"{path}: not found (a student dir has cascade.json, config.json, tokenizer.json "
                          "and the ONNX model)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if key is not None and (not isinstance(data, dict) or key not in data):
        raise ConfigError(f"{path}: no {key!r} key")
    return data


def student_fields(d: Path) -> tuple[list[str], float, int]:
    """(labels, temperature, max_len) of a student dir, this layout or the old one."""
    config = _read_json(d / "config.json")
    ours = config.get("cascade") or {}
    if (d / "cascade.json").exists() or "id2label" not in config:
        labels = list(_read_json(d / "cascade.json", "labels")["labels"])
    else:
        labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    calib = d / "calibration.json"
    if calib.exists():
        temperature = _read_json(calib, "temperature")["temperature"]
    else:  # transformers 5 drops top-level `temperature` from configs it loads; ours keeps a copy
        temperature = ours.get("temperature", config.get("temperature", 1.0))
    max_len = ours.get("max_length", config.get("max_length", config.get("max_seq_len", 128)))
    return labels, float(temperature), int(max_len)


def student_tag_decoding(d: Path) -> TagDecoding | None:
    """A tagging student dir's TagDecoding (config.json `cascade.tags`, calibration.json's
    `tag_temperature` and `confidence.method`); None for a classifier."""
    ours = _read_json(d / "config.json").get("cascade") or {}
    if not ours.get("tags"):
        return None
    calib = _read_json(d / "calibration.json") if (d / "calibration.json").exists() else {}
    method = (calib.get("confidence") or {}).get("method", "product")
    if method not in CONFIDENCE_METHODS:
        raise ConfigError(f"{d / 'calibration.json'}: confidence.method {method!r} is not one of "
                          f"{', '.join(CONFIDENCE_METHODS)}")
    return TagDecoding(list(ours["tags"]), ours.get("task", "joint"), float(calib.get("tag_temperature", 1.0)), method)


def load_student_tier(model_dir: Path, name: str = "student", model_file: str = "model.int8.onnx",
                      threads: int = 0, batch_size: int = 32, spin_wait: bool = False) -> StudentTier:
    """Every fault in the dir is a ConfigError naming the file (no onnxruntime traceback)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    d = Path(model_dir)
    if not d.is_dir():
        raise ConfigError(f"{d}: not a directory (the student dir)")
    path = d / model_file
    if not path.exists():
        raise ConfigError(f"{path}: not found; run `cascade export --model {d} --int8`")
    labels, temperature, max_len = student_fields(d)
    tok_file = d / "tokenizer.json"
    if not tok_file.exists():
        raise ConfigError(f"{tok_file}: not found; the student needs its fast tokenizer")
    try:
        tokenizer = Tokenizer.from_file(str(tok_file))
    except Exception as exc:
        raise ConfigError(f"{tok_file}: not a tokenizers file ({exc})") from None
    # The tier pads and truncates itself (by length, per batch); a file that turns either on
    # would otherwise feed pad ids as real tokens.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    # Idle intra-op threads spin by default, burning a core the large model or the HTTP front
    # end could use; off, the student gives up a little speed alone (docs/service.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # truncated or not ONNX: onnxruntime says InvalidProtobuf / Fail
        reason = str(exc).splitlines()[0][:300]
        raise ConfigError(f"{path}: onnxruntime cannot load it ({reason}); re-export it with `cascade export "
                          f"--model {d} --int8`") from None
    tagging = student_tag_decoding(d)
    if tagging and "tag_logits" not in {o.name for o in session.get_outputs()}:
        raise ConfigError(f"{path}: a tagging student's graph needs a `tag_logits` output; re-export it with "
                          f"`cascade export --model {d} --int8`")
    return StudentTier(name, session, tokenizer, labels, temperature, max_len, batch_size, tagging=tagging)


class StudentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="model.int8.onnx", min_length=1, description="ONNX file in the student dir")
    threads: int = Field(default=0, ge=0, le=1024, description="onnxruntime intra-op threads (0: its default)")
    batch_size: int = Field(default=32, ge=1, le=4096, description="rows per onnxruntime run")
    spin_wait: bool = Field(default=False, description="let onnxruntime's idle threads spin (faster alone, "
                                                       "at the cost of a core shared with other work)")


def parse_options(options: dict) -> StudentOptions:
    return StudentOptions.model_validate(options)


def build_student_tier(spec: TierConfig, base_dir: Path) -> StudentTier:
    if spec.path is None:
        raise ValueError(f"tier {spec.name!r}: kind 'student' needs `path` (a student dir)")
    opts = parse_options(spec.options)
    return load_student_tier(spec.resolve_path(base_dir), spec.name, opts.model, opts.threads, opts.batch_size,
                             opts.spin_wait)
