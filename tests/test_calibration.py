import pytest

torch = pytest.importorskip("torch")

from training.temperature import calibration_report, expected_calibration_error, fit_temperature, nll  # noqa: E402


def synthetic(n=4000, classes=10, seed=0):
    """Labels drawn from softmax(z): z is calibrated by construction; 3z is over-confident."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 1.5
    labels = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    return z, labels


def test_temperature_recovers_the_overconfidence_factor_and_lowers_nll():
    z, labels = synthetic()
    t = fit_temperature(3.0 * z, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll(3.0 * z, labels, t) < nll(3.0 * z, labels) - 0.1
    report = calibration_report(3.0 * z, labels)
    assert report["ece_after"] < 0.5 * report["ece_before"]
    assert report["ece_after"] < 0.03


def test_temperature_never_changes_the_argmax():
    z, labels = synthetic(500)
    t = fit_temperature(z, labels)
    assert torch.equal((z / t).argmax(-1), z.argmax(-1))


def test_ece_by_hand():
    # two bins used: conf 0.9 (2 items, 1 right) and conf 0.6 (2 items, 2 right)
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 1])
    # |0.5 - 0.9| * 0.5 + |1.0 - 0.6| * 0.5 = 0.4
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, torch.tensor([0, 1])) == 0.0


def test_bad_shapes():
    with pytest.raises(ValueError, match="expected logits"):
        fit_temperature(torch.zeros(3), torch.zeros(3, dtype=torch.long))
