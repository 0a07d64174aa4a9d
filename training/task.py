"""The classification task as the large model sees it: a prompt, then one label token.

Every label gets one added vocabulary token, `<|label|>` (its name between markers, so generated
text shows the name and user text that happens to contain the bare word is not mistaken for it).
The model answers by producing that token after the prompt; its confidence is the softmax over
the label tokens' logits at the answer position. So the full label distribution of a text costs
one forward pass over the prompt, whatever the number of labels: the property distillation and
the cascade's large-model tier need (scoring 150 multi-token continuations per text would cost
~150 passes).

For an extraction task (`task_kind` extract or joint) the answer goes on: after the label token
(joint) the cue `FIELDS_CUE` and the fields as one line of JSON (`fields_json`: the present
fields in schema order, each a list of spans of the text, Python's default separators — the ones
llguidance's JSON grammar writes), then the end token. At serving time the large-model tier asks
its backend for that JSON under `cascade.fields.fields_json_schema`, so every answer is valid and
every value a span of the input.

The template, labels, field names and their token ids are saved in the model dir's `cascade.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from cascade.fields import FIELDS_CUE  # noqa: F401 (re-exported: the training side's name for it)
from training.model import Transformer

DEFAULT_TEMPLATE = "Request: {text}\nIntent:"


def label_token(label: str) -> str:
    return f"<|{label}|>"


@dataclass
class TaskFormat:
    labels: list[str]
    label_token_ids: list[int]
    prompt_template: str = DEFAULT_TEMPLATE
    task: str = ""
    oos_label: str | None = None
    max_prompt_tokens: int = 128  # longer texts are cut from the left of the text, keeping the template
    extra: dict = field(default_factory=dict)
    task_kind: str = "classify"  # classify | extract | joint
    fields: list[str] = field(default_factory=list)  # the schema's field names, in schema order
    label_fields: dict[str, list[str]] = field(default_factory=dict)  # joint: the fields each label was seen with

    def prompt(self, text: str) -> str:
        return self.prompt_template.format(text=text)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, model_dir: str | Path) -> TaskFormat:
        path = Path(model_dir) / "cascade.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found; is {model_dir} a model trained by `cascade train large`?")
        return cls(**json.loads(path.read_text()))


def fields_json(fields: dict[str, list[str]], names: list[str]) -> str:
    """The answer line the model learns: present fields in schema order (`names`), compact."""
    return json.dumps({n: list(fields[n]) for n in names if fields.get(n)}, ensure_ascii=False)


def add_label_tokens(tokenizer: Tokenizer, labels: list[str]) -> list[int]:
    """Add one token per label (idempotent); returns their ids in label order."""
    tokens = [AddedToken(label_token(lab), single_word=False, normalized=False, special=False) for lab in labels]
    tokenizer.add_tokens(tokens)
    ids = [tokenizer.token_to_id(label_token(lab)) for lab in labels]
    if any(i is None for i in ids):
        raise ValueError("the tokenizer did not take the label tokens")
    return ids


@torch.no_grad()
def resize_for_labels(model: Transformer, tokenizer: Tokenizer, labels: list[str], label_ids: list[int]) -> None:
    """Grow the embedding (and untied head) to the tokenizer's size; each new label row starts
    at the mean embedding of its name's ordinary tokens, so training starts from meaning."""
    new_size = tokenizer.get_vocab_size(with_added_tokens=True)
    old = model.embed_tokens.weight
    if new_size > old.shape[0]:
        emb = torch.nn.Embedding(new_size, old.shape[1], dtype=old.dtype, device=old.device)
        emb.weight[: old.shape[0]] = old
        emb.weight[old.shape[0]:] = old.mean(0)
        model.embed_tokens = emb
        if model.cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        else:
            head = torch.nn.Linear(old.shape[1], new_size, bias=False, dtype=old.dtype, device=old.device)
            head.weight.zero_()
            head.weight[: old.shape[0]] = model.lm_head.weight
            model.lm_head = head
        model.cfg.vocab_size = new_size
    for label, tid in zip(labels, label_ids):
        pieces = [i for i in tokenizer.encode(" " + label.replace("_", " ")).ids if i < old.shape[0]]
        if pieces:
            model.embed_tokens.weight[tid] = model.embed_tokens.weight[pieces].mean(0)


def encode_prompts(tokenizer: Tokenizer, fmt: TaskFormat, texts: list[str]) -> list[list[int]]:
    out = []
    for text in texts:
        ids = tokenizer.encode(fmt.prompt(text)).ids
        if len(ids) > fmt.max_prompt_tokens:
            # Keep the tail: the template's answer cue ("Intent:") is at the end.
            ids = ids[-fmt.max_prompt_tokens:]
        out.append(ids)
    return out


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad so every row's last position is its answer position."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return tokens, mask


@torch.no_grad()
def label_distribution(model: Transformer, tokenizer: Tokenizer, fmt: TaskFormat, texts: list[str],
                       batch_size: int = 32, dtype: torch.dtype | None = torch.bfloat16,
                       progress=None) -> torch.Tensor:
    """(len(texts), len(labels)) probabilities: one forward pass per text, batched.

    Texts are sorted by length inside the call so batches carry little padding. `progress`
    (a cascade.progress.Progress) hears each batch.
    """
    model.eval()
    device = next(model.parameters()).device
    encoded = encode_prompts(tokenizer, fmt, texts)
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    label_ids = torch.tensor(fmt.label_token_ids, device=device)
    out = torch.empty(len(texts), len(fmt.labels))
    pad = model.cfg.eos_token_id or 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        tokens, mask = left_pad([encoded[i] for i in idx], pad)
        tokens, mask = tokens.to(device), mask.to(device)
        last = torch.zeros_like(mask, dtype=torch.bool)
        last[:, -1] = True
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(tokens, attention_mask=mask, logits_at=last)  # (b, vocab)
        out[idx] = torch.softmax(logits.float()[:, label_ids], dim=-1).cpu()
        if progress is not None:
            progress.update(len(idx))
    return out
