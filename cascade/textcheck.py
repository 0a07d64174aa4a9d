"""What a text must be before any tier sees it, checked once at every edge (HTTP, `cascade
batch`, `cascade eval`) so that one bad text is refused alone instead of failing a batch.

- Lone surrogates (U+D800..U+DFFF, e.g. `"\\ud800"` in JSON) are not Unicode: no UTF-8 encoding
  exists for them and the tokenizers raise on them. Refused, naming the character offset.
- Control characters (C0 and C1, DEL) other than tab, newline and carriage return — NUL among
  them — carry no meaning for a classifier, tokenize inconsistently across tiers and cut C
  strings short. Each is replaced by a space; the text is otherwise left as sent.
- A text that is empty or only whitespace after that is refused: there is nothing to classify,
  and it would otherwise travel all the way to the large model.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class TextError(ValueError):
    """A text no tier may see. `code` is machine-readable; the message names `where`."""

    def __init__(self, code: str, message: str, where: str):
        super().__init__(message)
        self.code = code
        self.where = where


def clean_text(text: object, where: str = "text") -> str:
    """The text a tier may see, or a TextError naming `where` (a field path or file:line).

    Args:
        text: what the caller sent.
        where: how to name it in the error (`texts[3]`, `in.jsonl:12`).
    """
    if not isinstance(text, str):
        raise TextError("invalid_type", f"{where}: expected a string, got {type(text).__name__}", where)
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise TextError("invalid_unicode", f"{where}: lone surrogate U+{ord(bad.group()):04X} at character "
                                           f"{bad.start()}; the text must be valid Unicode", where)
    text = _CONTROL.sub(" ", text)
    if not text.strip():
        raise TextError("empty_text", f"{where}: empty or only whitespace", where)
    return text
