"""Confidence calibration: temperature scaling fitted on validation logits, and ECE.

A classifier's softmax is usually over-confident after training; dividing its logits by one
scalar T > 1 (fitted to minimise validation NLL, Guo et al. 2017) fixes most of it without
changing any argmax. ECE (expected calibration error, 15 equal-width confidence bins) says how
far confidence is from accuracy, before and after.
"""

from __future__ import annotations

import torch

from training.planner import minimise_log


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return torch.nn.functional.cross_entropy(logits.float() / temperature, labels).item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, lo: float = 0.05, hi: float = 20.0,
                    iters: int = 100) -> float:
    """The T minimising NLL(softmax(logits / T)), by golden-section search on log T.

    NLL is unimodal in log T for a fixed set of logits, so a bracketing search is exact enough
    and, unlike LBFGS on T, cannot step to a negative temperature.
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return minimise_log(lambda t: nll(logits, labels, t), lo, hi, iters)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| x bin share."""
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for i in range(n_bins):
        # (lo, hi]; the first bin also takes confidence exactly 0
        in_bin = (confidence > edges[i]) & (confidence <= edges[i + 1])
        if i == 0:
            in_bin |= confidence == 0
        if in_bin.any():
            share = in_bin.float().mean().item()
            ece += abs(correct[in_bin].mean().item() - confidence[in_bin].mean().item()) * share
    return ece


def calibration_report(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict:
    """Fit T and report NLL and ECE before and after (what `calibration.json` stores)."""
    t = fit_temperature(logits, labels)
    before = torch.softmax(logits.float(), dim=-1)
    after = torch.softmax(logits.float() / t, dim=-1)
    return {
        "temperature": t,
        "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, t),
        "ece_before": expected_calibration_error(before, labels, n_bins),
        "ece_after": expected_calibration_error(after, labels, n_bins),
        "n": int(labels.shape[0]), "bins": n_bins,
    }
