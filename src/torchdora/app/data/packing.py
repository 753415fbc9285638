"""Packing: several short tokenized examples concatenated into one row of at most ``max_length`` tokens.

Short examples padded to the longest of a batch waste most of each row; packing fills rows instead. Each row
carries ``position_ids`` that restart at 0 for every example and no attention mask. transformers (>= 4.56)
reads such position ids as packed sequences and builds a block-diagonal causal mask from them (for eager,
SDPA and flash attention alike, ``masking_utils.find_packed_sequence_indices``), so a token attends only to
earlier tokens of its own example: the loss of a packed row is the loss of its examples run one by one.

A model whose attention ignores position-id resets would let examples see their row neighbours (a leak the
loss does not show). :func:`packing_isolates_examples` checks the actual model on two random sequences before
training; :func:`torchdora.app.train.train` warns when it fails (then packing still trains, with that
trade-off: more tokens per second against examples that are not independent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["pack_examples", "packing_isolates_examples"]


def pack_examples(items: Sequence[Mapping[str, Sequence[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate consecutive tokenized examples into rows of at most ``max_length`` tokens.

    Greedy, in order (the split is already shuffled with the seed): an example joins the current row if it
    fits, else starts a new one; examples are never cut. Each row gets ``position_ids`` restarting at 0 per
    example; :class:`torchdora.app.data.Collator` pads them with the rows.
    """
    rows: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for item in items:
        ids, labels = list(item["input_ids"]), list(item["labels"])
        if len(ids) > max_length:
            raise ValueError(f"an example of {len(ids)} tokens is longer than max_length={max_length}")
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ids
        current["labels"] += labels
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        rows.append(current)
    return rows


@torch.no_grad()
def packing_isolates_examples(model: nn.Module, vocab_size: int, length: int = 6, atol: float = 1e-4) -> bool:
    """Whether ``model`` keeps two examples packed in one row apart: the logits of the second example in the
    row ``[a, b]`` (position ids ``0..n-1, 0..n-1``) equal those of ``b`` alone. ``atol`` covers the
    round-off of a different attention kernel; a leak moves the logits by far more."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab_size, (1, length), generator=generator).to(device)
    b = torch.randint(0, vocab_size, (1, length), generator=generator).to(device)
    positions = torch.arange(length, device=device).repeat(1, 2)
    was_training = model.training
    model.eval()
    try:
        packed = model(input_ids=torch.cat([a, b], dim=1), position_ids=positions, use_cache=False).logits
        alone = model(input_ids=b, use_cache=False).logits
    finally:
        model.train(was_training)
    return bool(torch.allclose(packed[:, length:].float(), alone.float(), atol=atol, rtol=1e-3))
