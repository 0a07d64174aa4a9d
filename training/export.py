"""`cascade export --model DIR [--int8]`: a student to ONNX, checked against PyTorch.

Every export is followed by a parity check (optimum's habit): the ONNX graph, run by
onnxruntime with full graph optimisation, must give the PyTorch probabilities within 1e-4 on
real texts, or the export fails loudly and removes the file. `--int8` quantizes the weight
MatMuls to int8 and reports top-1 agreement with fp32, in one of two modes:

- `static` (the default): a QDQ graph with per-channel int8 weights and uint8 activations whose
  scales were fixed at export, calibrated (min/max) on a sample of train texts. onnxruntime
  fuses each Q/DQ pair and MatMul into an integer GEMM, so a text's answer is a function of its
  own tokens: the same, bit for bit, whatever shares its batch and however far it is padded.
- `dynamic`: int8 weights, activations quantized at run time with one scale for the whole
  batch tensor, so a text's probabilities move with its batch-mates (docs/students.md,
  "Answers that don't depend on the batch", has the numbers for both).

Both graphs carry what a reader needs besides the tokenizer in `metadata_props`: the labels
(`labels`, `id2label`), `temperature` (probabilities = softmax(logits / temperature)),
`max_length` and `pad_token_id`, so `onnxruntime` + `tokenizers` alone reproduce the student
tier (docs/students.md).

A tagging student's graphs have a second output, `tag_logits` (batch, tokens, tags), and
`tags`/`fields`/`task`/`tag_temperature`/`confidence` in `metadata_props`; its parity check
holds both outputs to PyTorch and requires the fields decoded from each to be identical, and
its int8 agreement counts a text as agreeing when its label and its decoded fields both do
(docs/extraction.md, "Student tagger").
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


def onnx_tagger_logits(path: Path, ids: np.ndarray, mask: np.ndarray, batch: int = 64,
                       session=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """A tagging graph's label logits (N, L) and, per text, its real tokens' tag logits (n_i, K)."""
    session = session or ort_session(path)
    labels, tags = [], []
    for i in range(0, len(ids), batch):
        m = mask[i:i + batch]
        lg, tg = session.run(["logits", "tag_logits"], {"input_ids": ids[i:i + batch], "attention_mask": m})
        labels.append(lg)
        tags += [row[: int(n)] for row, n in zip(tg, m.sum(1))]
    return np.concatenate(labels), tags


def student_tagging(model_dir: Path) -> dict | None:
    """{"task", "fields", "tags"} of a tagging student dir (config.json), None for a classifier."""
    ours = json.loads((Path(model_dir) / "config.json").read_text()).get("cascade") or {}
    return {k: ours[k] for k in ("task", "fields", "tags")} if ours.get("tags") else None


def decoded_fields(texts: list[str], offsets, tag_logits: list[np.ndarray], tags: list[str]) -> list[dict]:
    from cascade.tagging import decode_tags

    return [decode_tags(t, o, z.argmax(-1), tags) for t, o, z in zip(texts, offsets, tag_logits)]


def check_parity(model, onnx_path: Path, ids: np.ndarray, mask: np.ndarray, texts: list[str] | None = None,
                 offsets=None, tags: list[str] | None = None) -> dict:
    """Max |p_onnx - p_torch| of the label probabilities (and, for a tagger given `texts`,
    `offsets` and `tags`, of every real token's tag probabilities, and the decoded fields
    compared text by text); raises ExportError past PARITY_TOL or on any field difference."""
    with torch.no_grad():
        out = model(torch.from_numpy(ids), torch.from_numpy(mask))
    if tags is None:
        ref = torch.softmax(out, -1).numpy()
        diff = float(np.abs(onnx_probs(onnx_path, ids, mask) - ref).max())
        report = {"parity_max_abs_diff": diff}
    else:
        ref_labels, ref_tags = torch.softmax(out[0], -1).numpy(), out[1].numpy()
        n = mask.sum(1)
        ref_tags = [row[: int(k)] for row, k in zip(ref_tags, n)]
        got_labels, got_tags = onnx_tagger_logits(onnx_path, ids, mask)
        tag_diff = max(float(np.abs(softmax(a) - softmax(b)).max()) for a, b in zip(got_tags, ref_tags))
        diff = float(np.abs(softmax(got_labels) - ref_labels).max())
        same = sum(a == b for a, b in zip(decoded_fields(texts, offsets, got_tags, tags),
                                          decoded_fields(texts, offsets, ref_tags, tags)))
        report = {"parity_max_abs_diff": diff, "parity_tag_max_abs_diff": tag_diff,
                  "parity_fields_identical": same / len(texts)}
        if same != len(texts):
            raise ExportError(f"{onnx_path}: ONNX and PyTorch decode different fields for {len(texts) - same} of "
                              f"{len(texts)} texts; the export is not trustworthy")
        diff = max(diff, tag_diff)
    if not diff <= PARITY_TOL:  # also catches NaN
        raise ExportError(f"{onnx_path}: ONNX probabilities differ from PyTorch by {diff:.2e} "
                          f"(> {PARITY_TOL:g}); the export is not trustworthy")
    return report


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
    meta = {"labels": json.dumps(labels), "id2label": json.dumps({str(i): lab for i, lab in enumerate(labels)}),
            "temperature": repr(student_temperature(model_dir)), "max_length": str(max_len), "pad_token_id": "0",
            "logits": "(batch, labels); probabilities = softmax(logits / temperature)"}
    tagging = student_tagging(model_dir)
    if tagging:
        calib_file = model_dir / "calibration.json"
        calib = json.loads(calib_file.read_text()) if calib_file.exists() else {}
        meta.update({"task": tagging["task"], "fields": json.dumps(tagging["fields"]),
                     "tags": json.dumps(tagging["tags"]),
                     "tag_temperature": repr(float(calib.get("tag_temperature", 1.0))),
                     "confidence": (calib.get("confidence") or {}).get("method", "product"),
                     "tag_logits": "(batch, tokens, tags); BIO tags per token, softmax(tag_logits / "
                                   "tag_temperature); decoding: docs/extraction.md"})
    return meta


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


class FixedOrderPool(torch.nn.Module):
    """What `model.onnx` holds: the student's forward with its mean pool summed in one order
    whatever the batch: hidden states zero-padded to `max_seq_len` tokens, then one batched
    MatMul per text, (B, 1, max_len) @ (B, max_len, C), in place of a sum over the token axis.

    Why: every op before the pool gives a text's tokens the same values bit for bit whatever
    shares its batch (static int8), but a reduction over the token axis does not. onnxruntime's
    ReduceSum over axis 1 sums in another order for a batch of 1 than for several, and a MatMul
    over the batch's own length T sums its tail in another order when T changes (1e-7 relative
    in the pooled vector, measured), which the QuantizeLinear before the int8 head now and then
    turns into a whole quantization step (5e-3 in a logit). With the length fixed and one
    MatMul per text, the order is fixed and padded tokens add exact zeros. Costs B x max_len x C
    multiply-adds; inputs are at most `max_len` tokens (the tier and the tokenizer truncate).
    The parity check holds this forward to the student's own (training/student.py
    `StudentClassifier.forward`, `EncoderStudent.forward`: both pool `encode`'s hidden states);
    `export_onnx(fixed_order_pool=False)` exports that one. A tagger's second output, the tag
    head on every token's hidden state, needs no reduction: it is row-exact as it stands."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = self.student
        # (B, T, C): the student's own encoder, our blocks or a BERT (EncoderStudent, whose
        # attention masks padded keys additively and takes token_type_ids of zeros)
        x = m.encode(tokens, attention_mask)
        keep = attention_mask.bool()
        fill = m.cfg.max_seq_len - tokens.shape[1]
        padded = torch.nn.functional.pad(x, (0, 0, 0, fill))  # (B, max_len, C)
        weights = torch.nn.functional.pad(keep.to(x.dtype), (0, fill)).unsqueeze(1)  # (B, 1, max_len)
        pooled = torch.matmul(weights, padded).squeeze(1) / weights.sum(-1).clamp(min=1.0)  # (B, C)
        if getattr(m.cfg, "n_tags", 0):  # a tagger: per-token tags need no reduction, (B, T, K)
            return m.head(pooled), m.tag_head(x)
        return m.head(pooled)


def export_onnx(model_dir: str | Path, texts: list[str], opset: int = 18, fixed_order_pool: bool = True) -> dict:
    from tokenizers import Tokenizer

    d = Path(model_dir)
    model = load_student(d)
    tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
    ids, mask = encode(tokenizer, texts, model.cfg.max_seq_len)
    tagging = student_tagging(d)
    out = d / "model.onnx"
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=model.cfg.max_seq_len)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = FixedOrderPool(model).eval() if fixed_order_pool else model
        torch.onnx.export(graph, (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])), str(out),
                          input_names=["input_ids", "attention_mask"],
                          output_names=["logits", "tag_logits"] if tagging else ["logits"],
                          dynamic_shapes=(dims, dims), opset_version=opset, dynamo=True, verbose=False)
    try:
        if tagging:
            from training.tagging import token_offsets

            parity = check_parity(model, out, ids, mask, texts, token_offsets(tokenizer, texts, model.cfg.max_seq_len),
                                  tagging["tags"])
        else:
            parity = check_parity(model, out, ids, mask)
    except ExportError:
        out.unlink(missing_ok=True)
        raise
    stamp_metadata(out, d)
    make_world_readable(d)
    return {"onnx": str(out), "opset": opset, **parity, "parity_texts": len(texts)}


INT8_MODES = ("static", "dynamic")


def quantizable_nodes(path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes whose second input is a weight: the ones int8 quantizes.
    (Attention's activation x activation MatMuls stay fp32 in both modes.)"""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]


def _quantize(src: Path, dst: Path, mode: str, exclude: list[str], calib, cache: Path | None = None) -> None:
    """Write `dst`, `src` with every weight MatMul/Gemm but `exclude` (and the embedding) in int8."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
        return
    keep = set(quantizable_nodes(src)) - set(exclude)
    others = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node
              if n.op_type in ("MatMul", "Gemm") and n.name not in keep]
    # uint8 activations: onnxruntime's x86 kernels fuse u8 x s8 Q/DQ/MatMul into one integer GEMM
    # (MatMulIntegerToFloat); int8 activations were left as DQ + fp32 MatMul, 10x slower at batch 1.
    # Outputs stay fp32 (no second rounding, no Q/DQ after every MatMul); ranges are min/max over
    # the calibration texts, cached in `cache` so the sensitivity probes calibrate once.
    quantize_static(str(src), str(dst), calib(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm", "Gather"],
                    nodes_to_exclude=others, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
                    calibration_cache_path=cache)
    feed_float_inputs(dst, set(others))


def feed_float_inputs(path: Path, nodes: set[str]) -> None:
    """Give `nodes` back the fp32 tensors that a QDQ pair was put in front of, and drop the pairs
    nothing reads any more. quantize_static puts one Quantize/Dequantize pair on a tensor for all
    its readers, so a MatMul kept in fp32 beside quantized ones (q/k/v and gate/up share their
    input) would still read a rounded activation."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.name not in nodes:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in read]:  # the dropped pairs' scales
        graph.initializer.remove(t)
    onnx.save(model, str(path))


def quantize_int8(model_dir: str | Path, texts: list[str], mode: str = "static",
                  calibration: list[str] | None = None, calibration_texts: int = 256,
                  min_agreement: float | None = 0.99, sensitivity_texts: int = 512, max_excluded: int = 8) -> dict:
    """Write `model.int8.onnx`: int8 weight MatMuls and embedding, checked against fp32 on `texts`.

    Args:
        mode: "static" (activation scales fixed at export: a text's answer does not depend on
            its batch) or "dynamic" (scales computed per batch at run time).
        calibration: texts whose activation ranges set the static scales (a seeded sample of
            `calibration_texts` of them, each run alone); default: `texts`. Use train texts.
        min_agreement: accuracy-aware fallback. When top-1 agreement with fp32 on `texts` is
            below it, each weight MatMul's sensitivity is measured (quantize it alone; mean
            |logit change| on `sensitivity_texts`) and the most sensitive are kept in fp32, one
            at a time, until the target is met or `max_excluded` are excluded (the report says
            which and whether the target was met; it is never silently missed). None: off.
            For a tagging student a text agrees when its label and its decoded fields both
            equal fp32's (`fields_agreement`: the fields alone), and the logit change counts
            the tag logits too.
    Returns:
        the report saved under `int8` in export.json.
    """
    import tempfile

    from tokenizers import Tokenizer

    if mode not in INT8_MODES:
        raise ValueError(f"int8 mode {mode!r}: expected one of {', '.join(INT8_MODES)}")
    d = Path(model_dir)
    src, dst = d / "model.onnx", d / "model.int8.onnx"
    if not src.exists():
        raise ExportError(f"{src}: export to ONNX first (cascade export --model {d})")
    tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
    max_len = student_config(json.loads((d / "config.json").read_text())).max_seq_len
    ids, mask = encode(tokenizer, texts, max_len)
    pool = list(calibration) if calibration else list(texts)
    # a seeded sample, not the head: split files are often grouped by label
    picked = [pool[i] for i in sorted(np.random.default_rng(0).permutation(len(pool))[:calibration_texts])]
    calib_rows = [dict(zip(("input_ids", "attention_mask"), encode(tokenizer, [t], max_len)))
                  for t in (picked if mode == "static" else [])]

    class Reader:  # onnxruntime's CalibrationDataReader protocol; each text alone, unpadded
        def __init__(self):
            self.it = iter(calib_rows)

        def get_next(self):
            return next(self.it, None)

    tagging = student_tagging(d)
    if tagging:
        from training.tagging import token_offsets

        offsets = token_offsets(tokenizer, texts, max_len)

    def answers(path: Path, rows=slice(None)) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """(label logits, per-text tag logits or None) of `texts[rows]` through the graph at `path`."""
        i, m = ids[rows], mask[rows]
        if tagging:
            return onnx_tagger_logits(path, i, m)
        session = ort_session(path)
        return np.concatenate([session.run(["logits"], {"input_ids": i[b:b + 64], "attention_mask": m[b:b + 64]})[0]
                               for b in range(0, len(i), 64)]), None

    def logits(path: Path, rows=slice(None)) -> np.ndarray:
        return answers(path, rows)[0]

    fp32_logits, fp32_tags = answers(src)
    fp32_top = fp32_logits.argmax(-1)
    fp32_fields = decoded_fields(texts, offsets, fp32_tags, tagging["tags"]) if tagging else None
    fields_agreement = None

    def agreement_of(path: Path) -> float:
        """Top-1 label agreement with fp32; a tagger's text agrees when its fields do too."""
        nonlocal fields_agreement
        lg, tg = answers(path)
        same = lg.argmax(-1) == fp32_top
        if tagging:
            f_same = np.array([a == b for a, b in zip(decoded_fields(texts, offsets, tg, tagging["tags"]),
                                                      fp32_fields)])
            fields_agreement = float(f_same.mean())
            same &= f_same
        return float(same.mean())

    def change(path: Path, sample) -> float:
        """Mean |logit change| against fp32 on `sample` (a tagger's tag logits counted too)."""
        lg, tg = answers(path, sample)
        out = float(np.abs(lg - fp32_logits[sample]).mean())
        if tagging:
            out += float(np.mean([np.abs(a - fp32_tags[k]).mean() for a, k in zip(tg, sample)]))
        return out

    excluded: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cascade-int8-") as tmp:
        cache = Path(tmp) / "ranges.json" if mode == "static" else None

        def quantize(out: Path, exclude: list[str]) -> None:
            _quantize(src, out, mode, exclude, Reader, cache)

        quantize(dst, excluded)
        agreement = agreement_of(dst)
        first_agreement = agreement
        if min_agreement is not None and agreement < min_agreement:
            # sensitivity of each node quantized alone, on a seeded sample
            sample = np.random.default_rng(0).permutation(len(texts))[:sensitivity_texts]
            sample.sort()
            nodes = quantizable_nodes(src)
            probe = Path(tmp) / "probe.onnx"
            sensitivity = {}
            for node in nodes:
                quantize(probe, [n for n in nodes if n != node])
                sensitivity[node] = change(probe, sample)
            for node in sorted(nodes, key=sensitivity.get, reverse=True)[:max_excluded]:
                excluded.append(node)
                quantize(dst, excluded)
                agreement = agreement_of(dst)
                if agreement >= min_agreement:
                    break
    probs8 = softmax(logits(dst))
    stamp_metadata(dst, d)
    make_world_readable(d)
    tag_report = {"fields_agreement": fields_agreement} if tagging else {}
    return {"int8": str(dst), "mode": mode, "top1_agreement": agreement, **tag_report,
            "agreement_texts": len(texts), "agreement_all_int8": first_agreement,
            "calibration_texts": len(calib_rows),
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
                out = model(torch.from_numpy(ids), torch.from_numpy(mask))
            return (out[0] if isinstance(out, tuple) else out).argmax(-1).tolist()  # a tagger: its labels
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
