"""Constrained decoding to a label set: a token trie walked one step per decode.

Each label is tokenized once; the trie's children at the current node are the only tokens the
model may emit next, so the output is always one of the labels, whatever the logits. At each
step the model's probabilities are renormalised over the allowed tokens. A label's probability
is the product of those conditionals along its path.

The full label distribution (`scores`) is exact when every label is one token (the fine-tuned
label-token models: one forward pass gives it). For multi-token labels only the chosen path is
expanded; a sibling subtree's mass, measured where the path left it, is split evenly among its
labels, so the scores still sum to one but are an approximation off the chosen path.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrieNode:
    children: dict[int, TrieNode] = field(default_factory=dict)
    label: int | None = None  # a label ends here
    labels_below: list[int] = field(default_factory=list)  # every label in this subtree


class TokenTrie:
    """The label set as token sequences. `end_token` lets a label that is a prefix of another
    finish (the model chooses between continuing and ending)."""

    def __init__(self, sequences: list[list[int]], end_token: int | None):
        if not sequences:
            raise ValueError("choices: the label set is empty")
        self.root = TrieNode()
        self.end_token = end_token
        for index, seq in enumerate(sequences):
            if not seq:
                raise ValueError(f"choices[{index}]: tokenizes to nothing")
            node = self.root
            node.labels_below.append(index)
            for tok in seq:
                node = node.children.setdefault(tok, TrieNode())
                node.labels_below.append(index)
            if node.label is not None:
                raise ValueError(f"choices[{index}]: same tokens as choices[{node.label}]")
            node.label = index
        self.n_labels = len(sequences)
        self.single_token = all(len(s) == 1 for s in sequences)

    def allowed(self, node: TrieNode) -> list[int]:
        """Tokens that may follow `node`; the end token only where a label ends and others go on."""
        toks = list(node.children)
        if node.label is not None and node.children:
            if self.end_token is None:
                raise ValueError("a label is a prefix of another: the tokenizer needs an end token")
            toks.append(self.end_token)
        return toks


@dataclass
class ChoiceState:
    """One request's walk down the trie."""

    trie: TokenTrie
    node: TrieNode = None  # type: ignore[assignment]
    path_prob: float = 1.0
    scores: list[float] = None  # type: ignore[assignment]
    label: int | None = None  # set when done

    def __post_init__(self) -> None:
        self.node = self.node or self.trie.root
        self.scores = [0.0] * self.trie.n_labels

    def allowed(self) -> list[int]:
        return self.trie.allowed(self.node)

    def advance(self, token: int, probs: dict[int, float]) -> bool:
        """Take `token`, given the renormalised probabilities of the allowed tokens. Returns
        True when a label is complete."""
        for tok, p in probs.items():
            if tok == token:
                continue
            if tok == self.trie.end_token and tok not in self.node.children:
                self.scores[self.node.label] += self.path_prob * p
                continue
            below = self.node.children[tok].labels_below
            for lab in below:
                self.scores[lab] += self.path_prob * p / len(below)
        self.path_prob *= probs[token]
        if token == self.trie.end_token and token not in self.node.children:
            self.label = self.node.label
        else:
            self.node = self.node.children[token]
            if not self.node.children:
                self.label = self.node.label
        if self.label is not None:
            self.scores[self.label] += self.path_prob
            return True
        return False
