"""Examples to token ids with the loss on the completion only, and padded batches of them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.nn.utils.rnn import pad_sequence

from torchdora.app.data.chat import chat_prompt_ids, tokenize_chat_cut
from torchdora.app.data.cutting import head_tokens, tail_tokens
from torchdora.app.data.schema import IGNORE_INDEX, Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["tokenize_example", "tokenize_examples", "tokenize_with_cuts", "collate", "Collator"]


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    max_length: int,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """Token ids of ``prompt + completion`` with the loss only on the completion.

    Prompt and completion are tokenized separately (the prompt with the
    tokenizer's special tokens, e.g. BOS), so the completion tokens are
    exactly those that option scoring sees.  ``labels`` is ``-100`` on prompt
    tokens.  With ``add_eos`` (the default, so the model learns to stop) the
    eos token ends the completion; pass ``False`` to score options.

    Too-long examples lose prompt tokens from the left (after a leading BOS,
    which is kept) so the completion stays whole; a completion longer than
    ``max_length - 1`` is cut on the right, keeping one prompt token to
    predict its first token from. Only the part of a long text that can
    survive the cut is tokenized (:mod:`torchdora.app.data.cutting`), with
    the same result.

    Chat examples (``example.messages``) go through the chat template
    (:func:`torchdora.app.data.chat.tokenize_chat`: loss on every assistant
    turn); with ``add_eos=False`` (scoring) the prompt is the template's
    rendering of the earlier turns plus its generation prompt and the
    completion is the last answer's text.
    """
    return _tokenize(tokenizer, example, max_length, add_eos)[0]


def _tokenize(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int,
              add_eos: bool) -> tuple[dict[str, list[int]], bool]:
    """:func:`tokenize_example` and whether the example was longer than ``max_length`` (and so was cut)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one prompt and one target token), got {max_length}")
    if example.messages:
        if add_eos:  # training: every assistant turn, with its end-of-turn token, as the template renders it
            return tokenize_chat_cut(tokenizer, example.messages, max_length)
        prompt_ids = chat_prompt_ids(tokenizer, example.messages, keep=max_length)  # scoring: the last answer
    else:
        prompt_ids = list(tail_tokens(tokenizer, example.prompt, max_length, add_special_tokens=True)[0]["input_ids"])
    completion_ids = head_tokens(tokenizer, example.completion, max_length, add_special_tokens=False)
    if add_eos and tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    if not prompt_ids or not completion_ids:
        raise ValueError(f"Example tokenizes to an empty prompt or completion: {example!r}")
    cut = len(completion_ids) > max_length - 1
    completion_ids = completion_ids[: max_length - 1]
    room = max_length - len(completion_ids)
    if len(prompt_ids) > room:
        cut = True
        bos = tokenizer.bos_token_id
        keep_bos = bos is not None and prompt_ids[0] == bos and room > 1
        head = prompt_ids[:1] if keep_bos else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - (room - len(head)) :]
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }, cut


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Iterable[Example],
    max_length: int,
    add_eos: bool = True,
) -> list[dict[str, list[int]]]:
    """:func:`tokenize_example` over many examples."""
    return [tokenize_example(tokenizer, e, max_length, add_eos) for e in examples]


def tokenize_with_cuts(
    tokenizer: PreTrainedTokenizerBase,
    examples: Iterable[Example],
    max_length: int,
    add_eos: bool = True,
) -> tuple[list[dict[str, list[int]]], int]:
    """:func:`tokenize_examples` and how many of the examples were longer than ``max_length`` and were cut (the
    prompt, or a chat's earliest turns, from the left; a completion longer than ``max_length - 1`` on the right)."""
    items, cut = [], 0
    for example in examples:
        item, was_cut = _tokenize(tokenizer, example, max_length, add_eos)
        items.append(item)
        cut += was_cut
    return items, cut


def collate(
    batch: Sequence[Mapping[str, Sequence[int]]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad tokenized examples into ``input_ids``, ``labels``, ``attention_mask`` (and ``position_ids`` for
    packed rows).

    Inputs are padded with ``pad_token_id``, labels with ``-100`` (no loss),
    position ids with 0 and the attention mask is 0 on padding.  ``pad_to_multiple_of`` rounds the
    length up (helps tensor-core kernels).
    """
    if not batch:
        raise ValueError("collate() got an empty batch")
    ids = [torch.as_tensor(item["input_ids"], dtype=torch.long) for item in batch]
    labels = [torch.as_tensor(item["labels"], dtype=torch.long) for item in batch]
    masks = [torch.ones(len(item), dtype=torch.long) for item in ids]
    out = {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_token_id),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        "attention_mask": pad_sequence(masks, batch_first=True, padding_value=0),
    }
    values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}
    if "position_ids" in batch[0]:  # packed rows (torchdora.app.data.packing): padding is a sequence of its own
        positions = [torch.as_tensor(item["position_ids"], dtype=torch.long) for item in batch]
        out["position_ids"] = pad_sequence(positions, batch_first=True, padding_value=0)
    if pad_to_multiple_of:
        extra = -out["input_ids"].shape[1] % pad_to_multiple_of
        out = {k: torch.nn.functional.pad(v, (0, extra), value=values[k]) for k, v in out.items()}
    return out


@dataclass(frozen=True)
class Collator:
    """Picklable ``collate_fn`` for :class:`torch.utils.data.DataLoader`.

    Build it with ``Collator(tokenizer.pad_token_id)``.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = field(default=None)

    def __call__(self, batch: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_token_id, self.pad_to_multiple_of)
