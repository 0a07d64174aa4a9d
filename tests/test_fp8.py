import pytest

torch = pytest.importorskip("torch")

from training.fp8 import ACTIVATION_AMAX_CAP, Fp8Linear, convert_to_fp8, dequantize_rowwise, fp8_state, quantize_rowwise  # noqa: E402
from training.model import build_model  # noqa: E402


def test_rowwise_roundtrip_error_bound():
    torch.manual_seed(0)
    x = torch.randn(64, 256) * torch.logspace(-2, 2, 64)[:, None]  # rows of very different ranges
    q, scale = quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    err = (dequantize_rowwise(q, scale) - x).abs()
    # e4m3 keeps 3 mantissa bits: round-off <= 2^-4 of the value, plus the subnormal step 2^-9
    bound = x.abs() / 16 + scale * 2.0**-9
    assert (err <= bound + 1e-7).all()
    assert (dequantize_rowwise(q, scale).abs().amax(-1) - x.abs().amax(-1)).abs().max() < 1e-3 * x.abs().max()


def test_activation_cap_saturates_outliers():
    x = torch.tensor([[5000.0, 1.0, -3000.0, 0.5]])
    q, scale = quantize_rowwise(x, ACTIVATION_AMAX_CAP)
    back = dequantize_rowwise(q, scale)
    assert back[0, 0] == pytest.approx(1200.0) and back[0, 2] == pytest.approx(-1200.0)
    assert back[0, 1] == pytest.approx(1.0, rel=0.07)


def test_converter_skips_first_and_last_blocks_and_attention():
    torch.manual_seed(0)
    model = build_model("debug", n_layers=4).eval()
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(tokens)
    converted = convert_to_fp8(model)
    assert converted == [f"layers.{i}.mlp.{n}" for i in (1, 2) for n in ("gate_proj", "up_proj", "down_proj")]
    assert isinstance(model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert isinstance(model.layers[3].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.layers[1].mlp.gate_proj, Fp8Linear)
    assert isinstance(model.layers[2].self_attn.q_proj, torch.nn.Linear)
    with torch.no_grad():
        out = model(tokens)
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.05
    assert all(v.dtype in (torch.float8_e4m3fn, torch.float32) for v in fp8_state(model).values())
    assert len(fp8_state(model)) == 12


def test_export_fp8_on_a_trained_large_model_reports_accuracy_change(tmp_path, make_dataset):
    import json

    from cascade.app.cli import main

    rows = [(f"please book a flight to city {i}", "book_flight") for i in range(24)]
    rows += [(f"is it going to rain on day {i}", "weather") for i in range(24)]
    data = make_dataset({"train": rows, "val": rows[::3], "test": rows[::6]})
    out = tmp_path / "model"
    assert main(["train", "large", "--data", str(data), "--out", str(out), "--size", "debug", "--max-steps", "60",
                 "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "3", "--precision", "fp32",
                 "--vocab-size", "300", "--no-progress", "--ckpt-every", "100"]) == 0
    # debug has 2 layers: first and last, nothing to convert; 4 layers gives 2 converted blocks
    assert main(["export", "--model", str(out), "--data", str(data), "--fp8"]) == 0
    report = json.loads((out / "export.json").read_text())["fp8"]
    assert report["converted_layers"] == 0 and report["accuracy_change"] == 0.0
    assert main(["export", "--model", str(out), "--data", str(data), "--int8"]) == 2
    (out / "model.fp8.safetensors").write_bytes((out / "model.safetensors").read_bytes())  # a side file
    from training.hf_io import load_hf

    load_hf(out)  # side files next to model.safetensors are not mistaken for shards
