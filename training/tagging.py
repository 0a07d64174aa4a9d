"""Training side of the tagging student: gold BIO rows, the token loss, decoding a torch model,
and choosing the item confidence.

The tag math itself (tag set, span location, encode/decode, confidence estimates, AUROC) is
torch-free in `cascade/tagging.py`, shared with the student tier. Here:

- `tag_rows`: per text, the tag id of each of the tokens the student reads (the tier's
  `encode_texts`: at most `max_len` tokens, an empty text one id-0 token tagged O).
- `tag_loss`: per text, the mean token cross-entropy over its real tokens, times the row's
  weight (gold rows 1, rows from the large model's extractions `teacher_fields_weight`),
  summed over the batch like the label term.
- `tagger_answers`: a torch tagger's label probabilities and per-text tag logits, decoded.
- `confidence_report`: each estimate's AUROC (confidence as a detector of an exactly right
  item) and area under the risk-coverage curve on val; the best AUROC is the tier's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cascade.fields import same_fields
from cascade.tagging import (
    CONFIDENCE_METHODS,
    auroc,
    decode_tags,
    encode_tags,
    item_confidence,
    locate_spans,
    risk_coverage_area,
    softmax,
)
from training.trainer import IGNORE


def token_offsets(tokenizer, texts: list[str], max_len: int) -> list[list[tuple[int, int]]]:
    """Per text, the (start, end) of each token the student reads (truncated like its ids)."""
    return [list(e.offsets[:max_len]) for e in tokenizer.encode_batch(list(texts))]


def tag_rows(tokenizer, texts: list[str], fields: list[dict | None], tags: list[str],
             max_len: int) -> tuple[list[list[int]], int]:
    """(tag ids per token of each text, how many values were not found in their text)."""
    rows, missing = [], 0
    for text, offsets, f in zip(texts, token_offsets(tokenizer, texts, max_len), fields):
        spans, lost = locate_spans(text, f)
        missing += len(lost)
        rows.append(encode_tags(text, offsets, spans, tags) or [0])  # the empty text's id-0 token: O
    return rows, missing


def tag_loss(tag_logits: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """Summed over rows: weight x mean token cross-entropy of the row's tagged tokens.

    Args:
        tag_logits: (B, T, K).
        targets: (B, T) tag ids, IGNORE on padding (and on rows with no tag target).
        row_weight: (B,) per-row weight.
    """
    B, T, K = tag_logits.shape
    ce = torch.nn.functional.cross_entropy(tag_logits.float().reshape(B * T, K), targets.reshape(B * T),
                                           ignore_index=IGNORE, reduction="none").view(B, T)
    n = (targets != IGNORE).sum(1)
    per_row = ce.sum(1) / n.clamp(min=1)
    return (row_weight * per_row * (n > 0)).sum()


@dataclass
class TaggerAnswers:
    label_probs: np.ndarray  # (N, L), at temperature 1
    tag_logits: list[np.ndarray]  # per text (n_i, K), its real tokens only
    offsets: list[list[tuple[int, int]]]

    def fields(self, texts: list[str], tags: list[str]) -> list[dict]:
        return [decode_tags(t, o, z.argmax(-1), tags) for t, o, z in zip(texts, self.offsets, self.tag_logits)]


@torch.no_grad()
def tagger_answers(model, tokenizer, texts: list[str], max_len: int, batch: int = 256) -> TaggerAnswers:
    """A torch tagger's answers for `texts`, in eval mode (restored after)."""
    from cascade.tiers.student import encode_texts

    was_training = model.training
    model.eval()
    ids, mask = encode_texts(tokenizer, texts, max_len)
    probs, tag_logits = [], []
    for i in range(0, len(ids), batch):
        m = torch.from_numpy(mask[i:i + batch])
        logits, tl = model(torch.from_numpy(ids[i:i + batch]), m)
        probs.append(torch.softmax(logits.float(), -1).numpy())
        tag_logits += [row[: int(n)].float().numpy() for row, n in zip(tl, m.sum(1))]
    model.train(was_training)
    return TaggerAnswers(np.concatenate(probs), tag_logits, token_offsets(tokenizer, texts, max_len))


def fit_tag_temperature(tag_logits: list[np.ndarray], gold_rows: list[list[int]]) -> float:
    """Temperature for the tag softmax, by token NLL on val (as the label temperature)."""
    from training.temperature import fit_temperature

    z = torch.from_numpy(np.concatenate([t[: len(g)] for t, g in zip(tag_logits, gold_rows)]))
    y = torch.tensor([x for t, g in zip(tag_logits, gold_rows) for x in g[: len(t)]])
    return fit_temperature(z, y)


def item_confidences(answers: TaggerAnswers, method: str, joint: bool, label_temperature: float = 1.0,
                     tag_temperature: float = 1.0) -> np.ndarray:
    """Each item's confidence under `method` (cascade.tagging.item_confidence)."""
    label_p = softmax(np.log(np.clip(answers.label_probs, 1e-30, None)), label_temperature).max(-1)
    return np.array([item_confidence(softmax(z, tag_temperature), method, label_p[i] if joint else None)
                     for i, z in enumerate(answers.tag_logits)])


def confidence_report(answers: TaggerAnswers, texts: list[str], tags: list[str], labels: list[str],
                      gold_labels: list[str | None], gold_fields: list[dict | None], joint: bool,
                      label_temperature: float, tag_temperature: float) -> dict:
    """AUROC and risk-coverage area of each estimate on these (val) items; picks the best AUROC.

    An item is correct when its fields match exactly (normalised, cascade.fields) and, for a
    joint task, its label too: the cascade's `joint` / `exact_match` metric."""
    pred_fields = answers.fields(texts, tags)
    pred_labels = [labels[i] for i in answers.label_probs.argmax(-1)]
    correct = np.array([same_fields(pf, gf) and (not joint or pl == gl)
                        for pf, gf, pl, gl in zip(pred_fields, gold_fields, pred_labels, gold_labels)])
    estimates = {}
    for method in CONFIDENCE_METHODS:
        conf = item_confidences(answers, method, joint, label_temperature, tag_temperature)
        estimates[method] = {"auroc": auroc(conf, correct), "risk_coverage_area": risk_coverage_area(conf, correct),
                             "mean_confidence": float(conf.mean()) if len(conf) else None}
    best = max(CONFIDENCE_METHODS, key=lambda m: -1.0 if estimates[m]["auroc"] is None else estimates[m]["auroc"])
    return {"method": best, "estimates": estimates, "n": len(texts), "item_accuracy": float(correct.mean()),
            "combined_with_label": joint}
