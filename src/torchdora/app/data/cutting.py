"""Tokenize only the part of a long text that survives the cut to ``max_length`` tokens.

A 50 MB line cut to 32 tokens would otherwise be tokenized whole first (gigabytes of token objects and offsets,
minutes of work). :func:`tail_tokens` tokenizes a piece of the end of the text, ``(keep + MARGIN) ×
CHARS_PER_TOKEN`` characters, and reads four times more until that piece gives at least ``keep + MARGIN``
tokens; :func:`head_tokens` does the same from the start. Only the first tokens of a piece (at its cut edge) can
differ from the whole text's tokens (a word cut in two); :data:`MARGIN` spare tokens keep that edge out of the
``keep`` tokens used, so the result equals tokenizing the whole text and then cutting it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["CHARS_PER_TOKEN", "MARGIN", "tail_tokens", "head_tokens"]

CHARS_PER_TOKEN = 8
"""Characters per token assumed for the first piece; longer tokens (runs of spaces, rare words) read more."""
MARGIN = 16
"""Tokens tokenized beyond the ``keep`` that are used, covering the cut edge of a piece."""


def tail_tokens(tokenizer: PreTrainedTokenizerBase, text: str, keep: int, **kwargs: Any) -> tuple[Any, int]:
    """``(encoding, start)``: ``tokenizer(text[start:], **kwargs)`` for a ``start`` such that its last ``keep``
    tokens are those of ``tokenizer(text, **kwargs)`` (``start`` is 0 for a short text: then it is that encoding).
    Character offsets in the encoding count from ``start``."""
    budget = (keep + MARGIN) * CHARS_PER_TOKEN
    while budget < len(text):
        start = _run_start(text, len(text) - budget, len(text) - budget // 2)
        encoded = tokenizer(text[start:], **kwargs)
        if len(encoded["input_ids"]) >= keep + MARGIN:
            return encoded, start
        budget *= 4
    return tokenizer(text, **kwargs), 0


def head_tokens(tokenizer: PreTrainedTokenizerBase, text: str, keep: int, **kwargs: Any) -> list[int]:
    """Ids whose first ``keep`` are the first ``keep`` of ``tokenizer(text, **kwargs)``, from a start of ``text``
    (all of them for a short text)."""
    budget = (keep + MARGIN) * CHARS_PER_TOKEN
    while budget < len(text):
        end = _run_start(text, budget, budget * 2)
        ids = list(tokenizer(text[:end], **kwargs)["input_ids"])
        if len(ids) >= keep + MARGIN:
            return ids
        budget *= 4
    return list(tokenizer(text, **kwargs)["input_ids"])


def _run_start(text: str, first: int, last: int) -> int:
    """The first index in ``[first, last)`` where a run of whitespace starts, else ``first``."""
    for index in range(max(first, 1), min(last, len(text))):
        if text[index].isspace() and not text[index - 1].isspace():
            return index
    return first
