"""The training loss (``app/train/loss.py``) against ``F.cross_entropy`` on the fp32 logits and a float64 reference.

fp32 logits: loss and gradient agree with ``F.cross_entropy`` to fp32 rounding (``rtol=1e-5, atol=1e-7``: sums of
a few thousand terms of order 1e-3). bf16 logits: the gradient is the float64 one rounded to bf16, so it is within
one bf16 ulp (relative 2⁻⁷) of it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from torchdora.app.train import loss as L


def _logits(rows, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    return logits, targets


@pytest.mark.parametrize("block_elements", [1 << 22, 3 * 100], ids=["one-block", "ragged-blocks"])
def test_fp32_loss_and_gradient_equal_torch_cross_entropy(monkeypatch, block_elements):
    monkeypatch.setattr(L, "_BLOCK_ELEMENTS", block_elements)  # 3 rows of 100 per block: 17 rows → 6 blocks
    logits, targets = _logits(17, 100, torch.float32)
    ref_logits = logits.detach().clone().requires_grad_(True)
    loss = L.cross_entropy(logits, targets)
    expected = F.cross_entropy(ref_logits, targets)
    (2.5 * loss).backward()
    (2.5 * expected).backward()
    assert loss.dtype == torch.float32
    assert_close(loss, expected, rtol=1e-6, atol=0)
    assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-7)


def test_bf16_gradient_is_the_float64_one_rounded():
    logits, targets = _logits(9, 300, torch.bfloat16, seed=1)
    ref = logits.detach().double().requires_grad_(True)
    loss = L.cross_entropy(logits, targets)
    expected = F.cross_entropy(ref, targets)
    loss.backward()
    expected.backward()
    assert logits.grad.dtype == torch.bfloat16
    assert_close(loss.double(), expected, rtol=1e-6, atol=0)  # the loss itself is fp32
    assert_close(logits.grad.double(), ref.grad, rtol=2 ** -7, atol=1e-9)


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-3e4, 3e4, 3e4]], requires_grad=True)
    targets = torch.tensor([1, 2])
    ref = logits.detach().double().requires_grad_(True)
    loss = L.cross_entropy(logits, targets)
    loss.backward()
    F.cross_entropy(ref, targets).backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert_close(loss.double(), F.cross_entropy(ref.detach(), targets), rtol=1e-6, atol=1e-6)
    # at |logit| 3e4 one fp32 ulp is 2e-3, so softmax = exp(logit − lse) carries a relative 2e-3: atol 5e-4 on 0.25
    assert_close(logits.grad.double(), ref.grad, rtol=0, atol=5e-4)


def test_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match=r"logits \(N, V\) and targets \(N,\)"):
        L.cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        L.cross_entropy(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))
