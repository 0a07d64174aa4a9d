"""`cascade export --model DIR [--int8]`: a student to ONNX, checked against PyTorch.

Every export is followed by a parity check (optimum's habit): the ONNX graph, run by
onnxruntime with full graph optimisation, must give the PyTorch probabilities within 1e-4 on
real texts, or the export fails loudly and removes the file. `--int8` quantizes the weights
(onnxruntime dynamic quantization: int8 weights, activations quantized per batch at run time,
which AVX512-VNNI/AVX2 kernels execute) and reports top-1 agreement with fp32.

Both graphs carry what a reader needs besides the tokenizer in `metadata_props`: the labels
(`labels`, `id2label`), `temperature` (probabilities = softmax(logits / temperature)),
`max_length` and `pad_token_id`, so `onnxruntime` + `tokenizers` alone reproduce the student
tier (docs/students.md).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from training.hf_io import make_world_readable
from training.student import is_student_config, load_student, student_config

PARITY_TOL = 1e-4


class ExportError(RuntimeError):
    """The exported graph does not compute what the PyTorch model computes."""


def encode(tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int64 ids and mask, exactly as the student tier feeds onnxruntime."""
    from cascade.tiers.student import encode_texts

    return encode_texts(tokenizer, texts, max_len)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ort_session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_probs(path: Path, ids: np.ndarray, mask: np.ndarray, batch: int = 64) -> np.ndarray:
    session = ort_session(path)
    out = [session.run(["logits"], {"input_ids": ids[i:i + batch], "attention_mask": mask[i:i + batch]})[0]
           for i in range(0, len(ids), batch)]
    return softmax(np.concatenate(out))


def check_parity(model, onnx_path: Path, ids: np.ndarray, mask: np.ndarray) -> float:
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy(ids), torch.from_numpy(mask)), -1).numpy()
    diff = float(np.abs(onnx_probs(onnx_path, ids, mask) - ref).max())
    if not diff <= PARITY_TOL:  # also catches NaN
        raise ExportError(f"{onnx_path}: ONNX probabilities differ from PyTorch by {diff:.2e} "
                          f"(> {PARITY_TOL:g}); the export is not trustworthy")
    return diff


def student_temperature(model_dir: Path) -> float:
    """The tier's temperature: calibration.json's when present, else config.json's, else 1."""
    calib = model_dir / "calibration.json"
    if calib.exists():
        return float(json.loads(calib.read_text())["temperature"])
    cfg = json.loads((model_dir / "config.json").read_text())
    return float((cfg.get("cascade") or {}).get("temperature", cfg.get("temperature", 1.0)))


def onnx_metadata(model_dir: Path) -> dict[str, str]:
    labels = json.loads((model_dir / "cascade.json").read_text())["labels"]
    max_len = student_config(json.loads((model_dir / "config.json").read_text())).max_seq_len
    return {"labels": json.dumps(labels), "id2label": json.dumps({str(i): lab for i, lab in enumerate(labels)}),
            "temperature": repr(student_temperature(model_dir)), "max_length": str(max_len), "pad_token_id": "0",
            "logits": "(batch, labels); probabilities = softmax(logits / temperature)"}


def stamp_metadata(onnx_path: Path, model_dir: Path) -> None:
    """Write the student's labels and temperature into the graph's `metadata_props`."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)  # weights stay where the export put them
    props = {p.key: p.value for p in model.metadata_props} | onnx_metadata(model_dir)
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    tmp = onnx_path.with_name(onnx_path.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(onnx_path)


def export_onnx(model_dir: str | Path, texts: list[str], opset: int = 18) -> dict:
    from tokenizers import Tokenizer

    d = Path(model_dir)
    model = load_student(d)
    tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
    ids, mask = encode(tokenizer, texts, model.cfg.max_seq_len)
    out = d / "model.onnx"
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=model.cfg.max_seq_len)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])), str(out),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes=(dims, dims), opset_version=opset, dynamo=True, verbose=False)
    try:
        diff = check_parity(model, out, ids, mask)
    except ExportError:
        out.unlink(missing_ok=True)
        raise
    stamp_metadata(out, d)
    make_world_readable(d)
    return {"onnx": str(out), "opset": opset, "parity_max_abs_diff": diff, "parity_texts": len(texts)}


def quantizable_nodes(path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes dynamic quantization would turn into int8."""
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type in ("MatMul", "Gemm")]


def _quantize(src: Path, dst: Path, static: bool, exclude: list[str], calib) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if static:
        quantize_static(str(src), str(dst), calib(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=exclude)
    else:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=exclude)


def quantize_int8(model_dir: str | Path, texts: list[str], static: bool = False, calibration_texts: int = 256,
                  min_agreement: float | None = 0.99, sensitivity_texts: int = 512, max_excluded: int = 8) -> dict:
    """int8 weights. Dynamic (default): activations quantized per batch at run time. Static
    (`static=True`): QDQ graph with activation ranges calibrated on the first
    `calibration_texts` texts, for runtimes that want fixed scales.

    Accuracy-aware fallback: when top-1 agreement with fp32 on `texts` is below
    `min_agreement`, each MatMul's sensitivity is measured (quantize it alone; mean |logit
    change| on `sensitivity_texts`) and the most sensitive are kept in fp32, one at a time, until
    the agreement target is met or `max_excluded` are excluded (the report says which and
    whether the target was met; it is never silently missed).
    """
    from tokenizers import Tokenizer

    d = Path(model_dir)
    src, dst = d / "model.onnx", d / "model.int8.onnx"
    if not src.exists():
        raise ExportError(f"{src}: export to ONNX first (cascade export --model {d})")
    tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
    max_len = student_config(json.loads((d / "config.json").read_text())).max_seq_len
    ids, mask = encode(tokenizer, texts, max_len)
    calib_rows = [{"input_ids": ids[i:i + 1, : int(mask[i].sum())],
                   "attention_mask": mask[i:i + 1, : int(mask[i].sum())]}
                  for i in range(min(calibration_texts, len(texts)))]

    class Reader:  # onnxruntime's CalibrationDataReader protocol
        def __init__(self):
            self.it = iter(calib_rows)

        def get_next(self):
            return next(self.it, None)

    def logits(path: Path, rows: slice = slice(None)) -> np.ndarray:
        session = ort_session(path)
        i, m = ids[rows], mask[rows]
        return np.concatenate([session.run(["logits"], {"input_ids": i[b:b + 64], "attention_mask": m[b:b + 64]})[0]
                               for b in range(0, len(i), 64)])

    fp32_logits = logits(src)
    fp32_top = fp32_logits.argmax(-1)
    excluded: list[str] = []
    _quantize(src, dst, static, excluded, Reader)
    agreement = float((logits(dst).argmax(-1) == fp32_top).mean())
    first_agreement = agreement
    if min_agreement is not None and agreement < min_agreement:
        # sensitivity of each node quantized alone, on a seeded sample
        sample = np.random.default_rng(0).permutation(len(texts))[:sensitivity_texts]
        sample.sort()
        ref = fp32_logits[sample]
        nodes = quantizable_nodes(src)
        probe = d / "model.int8.probe.onnx"
        sensitivity = {}
        try:
            for node in nodes:
                _quantize(src, probe, static, [n for n in nodes if n != node], Reader)
                sensitivity[node] = float(np.abs(logits(probe, sample) - ref).mean())
        finally:
            probe.unlink(missing_ok=True)
        for node in sorted(nodes, key=sensitivity.get, reverse=True)[:max_excluded]:
            excluded.append(node)
            _quantize(src, dst, static, excluded, Reader)
            agreement = float((logits(dst).argmax(-1) == fp32_top).mean())
            if agreement >= min_agreement:
                break
    probs8 = softmax(logits(dst))
    stamp_metadata(dst, d)
    make_world_readable(d)
    return {"int8": str(dst), "mode": "static-qdq" if static else "dynamic", "top1_agreement": agreement,
            "agreement_texts": len(texts), "agreement_all_int8": first_agreement,
            "kept_fp32": excluded, "target": min_agreement,
            "target_met": min_agreement is None or agreement >= min_agreement,
            "max_abs_prob_diff": float(np.abs(softmax(fp32_logits) - probs8).max())}


def export_fp8(model_dir: str | Path, texts: list[str], gold: list[str]) -> dict:
    """Convert a large model or a student to FP8 (training/fp8.py), measure the accuracy change
    on labelled texts, and save the e4m3 weights + scales as `model.fp8.safetensors`."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from training.fp8 import convert_to_fp8, fp8_state

    d = Path(model_dir)
    if is_student_config(json.loads((d / "config.json").read_text())):
        model = load_student(d)
        tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        labels = json.loads((d / "cascade.json").read_text())["labels"]
        ids, mask = encode(tokenizer, texts, model.cfg.max_seq_len)

        def predict() -> list[int]:
            with torch.no_grad():
                return model(torch.from_numpy(ids), torch.from_numpy(mask)).argmax(-1).tolist()
    else:
        from training.large import load_large
        from training.task import label_distribution

        model, tokenizer, fmt = load_large(d)
        labels = fmt.labels

        def predict() -> list[int]:
            return label_distribution(model, tokenizer, fmt, texts, dtype=None).argmax(-1).tolist()

    before = predict()
    converted = convert_to_fp8(model)
    after = predict() if converted else before
    acc = lambda pred: sum(labels[p] == g for p, g in zip(pred, gold)) / max(1, len(gold))  # noqa: E731
    report = {"converted_layers": len(converted), "first_converted": converted[:3], "n": len(texts),
              "accuracy_before": acc(before), "accuracy_fp8": acc(after),
              "accuracy_change": acc(after) - acc(before),
              "top1_agreement": sum(a == b for a, b in zip(before, after)) / max(1, len(texts))}
    if converted:
        save_file(fp8_state(model), str(d / "model.fp8.safetensors"))
        report["fp8_weights"] = str(d / "model.fp8.safetensors")
    return report
