"""Students: the model, teacher initialisation, ONNX export with parity, int8, the student tier."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from cascade.config import build_cascade, parse_config  # noqa: E402
from cascade.data import load_split  # noqa: E402
from cascade.tiers.student import load_student_tier  # noqa: E402
from training import export as export_mod  # noqa: E402
from training.export import ExportError, encode, export_onnx, quantize_int8  # noqa: E402
from training.large import train_bpe  # noqa: E402
from training.model import build_model  # noqa: E402
from training.student import build_student, init_from_teacher, load_student, save_student  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clinc_slice(tmp_path_factory):
    from cascade.data import prepare

    out = tmp_path_factory.mktemp("clinc")
    prepare("clinc150", REPO.parent / "shared" / "data" / "clinc150", out)
    train = [ex for ex in load_split(out, "train") if ex.label in ("weather", "play_music", "book_flight", "timer")]
    val = [ex for ex in load_split(out, "val") if ex.label in ("weather", "play_music", "book_flight", "timer")]
    return out, train, val


@pytest.fixture(scope="module")
def trained_student(tmp_path_factory, clinc_slice):
    """A debug student fitted for a few seconds on 4 CLINC150 intents (real tokenizer, real data)."""
    _, train, val = clinc_slice
    labels = sorted({ex.label for ex in train})
    tok = train_bpe([ex.text for ex in train], 400)
    torch.manual_seed(0)
    model = build_student("debug", tok.get_vocab_size(), len(labels))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, mask = encode(tok, [ex.text for ex in train], 64)
    y = torch.tensor([labels.index(ex.label) for ex in train])
    for step in range(60):
        idx = torch.randint(0, len(train), (32,))
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(ids[idx]), torch.from_numpy(mask[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("student")
    tok.save(str(out / "tokenizer.json"))
    save_student(model.eval(), out, out / "tokenizer.json", labels)
    return out, [ex.text for ex in val], [ex.label for ex in val]


def test_student_shapes_and_padding_invariance():
    model = build_student("debug", 100, 3).eval()
    ids = torch.randint(1, 100, (2, 7))
    mask = torch.ones_like(ids)
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1)
    pmask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], 1)
    with torch.no_grad():
        assert model(ids, mask).shape == (2, 3)
        assert torch.allclose(model(ids, mask), model(padded, pmask), atol=1e-5)


def test_init_from_teacher_copies_embeddings_and_spread_layers():
    teacher = build_model("debug", n_layers=5)
    student = build_student("debug", 256, 4, dim=64, n_heads=4, hidden_dim=128, n_layers=3)
    picks = init_from_teacher(student, teacher)
    assert picks == [0, 2, 4]
    assert torch.equal(student.embed_tokens.weight, teacher.embed_tokens.weight)
    assert torch.equal(student.layers[1].self_attn.q_proj.weight, teacher.layers[2].self_attn.q_proj.weight)
    # GQA teacher (2 KV heads for 4 query heads) -> MHA student: each KV head repeated for its group
    k_t = teacher.layers[4].self_attn.k_proj.weight.view(2, 16, 64)
    k_s = student.layers[2].self_attn.k_proj.weight.view(4, 16, 64)
    assert torch.equal(k_s[0], k_t[0]) and torch.equal(k_s[1], k_t[0]) and torch.equal(k_s[3], k_t[1])
    with pytest.raises(ValueError, match="width"):
        init_from_teacher(build_student("debug", 256, 4), teacher)


def test_export_parity_and_int8_agreement(trained_student):
    d, texts, gold = trained_student
    report = export_onnx(d, texts[:64])
    assert report["parity_max_abs_diff"] <= 1e-4
    q = quantize_int8(d, texts)
    assert q["top1_agreement"] >= 0.97
    # the student learned something real on real data
    tier = load_student_tier(d, model_file="model.onnx")
    preds = tier.predict_batch(texts)
    assert sum(p.label == g for p, g in zip(preds, gold)) / len(gold) > 0.8


def exported_copy(d, texts, tmp_path):
    """A copy of the trained student dir with its ONNX export, for tests that rewrite int8."""
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(d, copy)
    if not (copy / "model.onnx").exists():
        export_onnx(copy, texts[:16])
    return copy


def int8_matmuls(graph) -> tuple[set[str], set[str]]:
    """(MatMul/Gemm names left in fp32, op types or names computed in int8) of a quantized graph:
    dynamic mode replaces a node by MatMulInteger/DynamicQuantizeMatMul; static QDQ keeps the
    node and feeds it from DequantizeLinear."""
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    float_mm, int8 = set(), set()
    for n in graph.node:
        if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"):
            int8.add(n.op_type)
        elif n.op_type in ("MatMul", "Gemm"):
            (int8 if any(i in dequantized for i in n.input) else float_mm).add(n.name)
    return float_mm, int8


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_keeps_the_most_sensitive_matmuls_in_fp32_until_the_target(trained_student, tmp_path, mode):
    import onnx

    d, texts, _ = trained_student
    copy = exported_copy(d, texts, tmp_path)
    # an unreachable target: the fallback excludes up to max_excluded nodes and says it missed
    q = quantize_int8(copy, texts, mode=mode, min_agreement=1.01, sensitivity_texts=64, max_excluded=3)
    assert len(q["kept_fp32"]) == 3 and q["target_met"] is False and q["mode"] == mode
    float_mm, int8 = int8_matmuls(onnx.load(str(copy / "model.int8.onnx")).graph)
    assert set(q["kept_fp32"]) <= float_mm  # still float
    assert int8  # the rest int8
    reached = quantize_int8(copy, texts, mode=mode, min_agreement=q["agreement_all_int8"])
    assert reached["target_met"] and reached["kept_fp32"] == []


def test_static_qdq_int8_option(trained_student, tmp_path):
    d, texts, _ = trained_student
    copy = exported_copy(d, texts, tmp_path)
    q = quantize_int8(copy, texts, mode="static", calibration=texts[::-1], calibration_texts=32)
    assert q["mode"] == "static" and q["calibration_texts"] == 32 and q["top1_agreement"] >= 0.9
    import onnx

    ops = {n.op_type for n in onnx.load(str(copy / "model.int8.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    with pytest.raises(ValueError, match="int8 mode"):
        quantize_int8(copy, texts, mode="per-row")


def test_broken_graph_fails_loudly(trained_student, monkeypatch, tmp_path):
    d, texts, _ = trained_student
    real_export = torch.onnx.export

    def buggy_export(model, args, path, **kw):  # an exporter that gets one weight wrong
        broken = load_student(d)
        with torch.no_grad():
            broken.head.weight[0] += 0.5  # (a bias shift on every label would cancel in softmax)
        return real_export(broken, args, path, **kw)

    monkeypatch.setattr(export_mod.torch.onnx, "export", buggy_export)
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_onnx(d, texts[:16])
    assert not (d / "model.onnx").exists()


def test_student_tier_matches_torch_with_temperature_and_serves_in_a_cascade(trained_student):
    d, texts, _ = trained_student
    if not (d / "model.onnx").exists():
        export_onnx(d, texts[:16])
    (d / "calibration.json").write_text(json.dumps({"temperature": 2.0}))
    tier = load_student_tier(d, model_file="model.onnx")
    probs = tier.probabilities(texts[:20])
    model = load_student(d)
    tok_ids, mask = encode(tier.tokenizer, texts[:20], 128)
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy(tok_ids), torch.from_numpy(mask)) / 2.0, -1).numpy()
    assert np.abs(probs - ref).max() <= 1e-4
    tier.batch_size = 3  # batched by length: 7 batches in another order, rows back in the caller's
    assert len({len(t.split()) for t in texts[:20]}) > 3
    assert np.abs(tier.probabilities(texts[:20]) - ref).max() <= 1e-4
    pred = tier.predict_batch(texts[:1])[0]
    assert set(pred.scores) == set(tier.labels) and abs(sum(pred.scores.values()) - 1) < 1e-5
    config = parse_config({"task": {"name": "t"}, "tiers": [
        {"name": "student", "kind": "student", "path": str(d), "threshold": 0.0, "options": {"model": "model.onnx"}},
    ]}, "<test>")
    assert build_cascade(config, d).predict(texts[0]).tier == "student"
    (d / "calibration.json").unlink()


def test_student_tier_imports_without_torch():
    code = "import cascade.tiers.student, onnxruntime, tokenizers, sys; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
