"""The training loss: mean cross-entropy whose backward keeps nothing vocabulary-sized beyond the logits.

``F.cross_entropy(logits.float(), targets)`` keeps an fp32 ``log_softmax`` of the logits for backward and, during
backward, two more fp32 ``(tokens, vocab)`` gradients (and a copy in the logits' dtype). With a large vocabulary
that is the biggest tensor of a step: SmolLM2's 49152 entries × 768 tokens are 144 MiB per fp32 copy, Llama 3's
128256 × 2048 tokens are 1 GiB. It does not shrink with a bf16 base, since the loss is taken in fp32 either way.

:func:`cross_entropy` computes the same loss and gradient from what it must keep anyway, the logits (in their own
dtype) and one fp32 log-sum-exp per token: forward and backward go through the vocabulary a bounded block of rows
at a time, in fp32, and the gradient ``(softmax − onehot) / N`` is written straight into a tensor of the logits'
dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cross_entropy"]

#: fp32 elements of one block of rows (16 MiB): the only vocabulary-sized temporary beyond the logits and gradient
_BLOCK_ELEMENTS = 1 << 22


def _row_blocks(rows: int, vocab: int) -> list[slice]:
    """Consecutive row slices of about :data:`_BLOCK_ELEMENTS` elements each."""
    step = max(1, _BLOCK_ELEMENTS // max(vocab, 1))
    return [slice(start, start + step) for start in range(0, rows, step)]


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        rows, vocab = logits.shape
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for block in _row_blocks(rows, vocab):
            lse[block] = torch.logsumexp(logits[block].float(), dim=1)
        picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1).float()
        ctx.save_for_backward(logits, targets, lse)
        return (lse - picked).mean()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        rows, vocab = logits.shape
        scale = grad.float() / rows
        out = torch.empty_like(logits)
        for block in _row_blocks(rows, vocab):
            p = logits[block].float().sub_(lse[block, None]).exp_()  # softmax of the block's rows
            p.scatter_add_(1, targets[block, None], torch.full_like(p[:, :1], -1.0))  # − onehot
            out[block] = p.mul_(scale)
        return out, None


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits (N, V)`` against class indices ``targets (N,)``, as fp32; equal to
    ``F.cross_entropy(logits.float(), targets)`` (no ignored index: pass only the positions that count), with a
    gradient in ``logits.dtype``."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy takes logits (N, V) and targets (N,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    return _CrossEntropy.apply(logits, targets)
