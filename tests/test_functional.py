"""torchdora.functional against plain float64 recomputations, and gradcheck of the functional core."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck
from torch.testing import assert_close

from torchdora import functional as DF

pytestmark = pytest.mark.usefixtures("single_thread")

OUT, IN, R = 6, 9, 3


def _tensors(seed: int = 0, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    a = torch.randn(R, IN, generator=gen, dtype=torch.float64)
    b = torch.randn(OUT, R, generator=gen, dtype=torch.float64)
    m = torch.rand(OUT, generator=gen, dtype=torch.float64) + 0.5
    return w.to(dtype), a.to(dtype), b.to(dtype), m.to(dtype)


def _ref_norm(w, a, b, s):
    """The obvious formula, row by row, in float64."""
    w, a, b = w.double(), a.double(), b.double()
    return torch.stack([torch.sqrt(((w[i] + s * (b[i] @ a)) ** 2).sum()) for i in range(w.shape[0])])


# ---- scaling and the delta ----------------------------------------------------------------------------
@pytest.mark.parametrize("r, alpha, rslora, expected", [(8, 16, False, 2.0), (16, 8, False, 0.5), (16, 8, True, 2.0),
                                                        (4, 3, True, 1.5)])
def test_lora_scaling(r, alpha, rslora, expected):
    assert DF.lora_scaling(r, alpha, rslora) == pytest.approx(expected)


@pytest.mark.parametrize("r", [0, -2])
def test_lora_scaling_rejects_non_positive_rank(r):
    with pytest.raises(ValueError, match=f"r={r}"):
        DF.lora_scaling(r, 16.0)


def test_delta_weight_is_scaled_product():
    w, a, b, _ = _tensors()
    ref = torch.einsum("or,ri->oi", b, a) * 0.7
    assert_close(DF.delta_weight(a, b, 0.7), ref, rtol=1e-12, atol=1e-12)  # float64, a 3-term sum


# ---- norms --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [0.0, 0.5, 2.0])
def test_dense_row_norm_matches_rowwise_reference(s):
    w, a, b, _ = _tensors()
    assert_close(DF.dense_row_norm(w, a, b, s), _ref_norm(w, a, b, s), rtol=1e-12, atol=1e-12)  # float64 both


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("s", [0.25, 2.0])
def test_factored_row_norm_matches_reference(dtype, tol, s):
    w, a, b, _ = _tensors(dtype=dtype)
    got = DF.factored_row_norm(w, a, b, s)
    # float64: round-off of the expansion only; float32: cancellation in n² = ||W||² + 2s·cross + s²·quad
    assert_close(got.double(), _ref_norm(w, a, b, s), rtol=tol, atol=tol)


def test_factored_row_norm_uses_given_base_norm():
    w, a, b, _ = _tensors()
    base = DF.base_row_sq_norm(w)
    assert_close(DF.factored_row_norm(w, a, b, 0.5, base), _ref_norm(w, a, b, 0.5), rtol=1e-10, atol=1e-10)
    # a wrong cached base norm must change the result: the argument is really used
    assert not torch.allclose(DF.factored_row_norm(w, a, b, 0.5, base + 1.0), _ref_norm(w, a, b, 0.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norms_accumulate_in_fp32_for_low_precision(dtype):
    w, a, b, _ = _tensors(dtype=dtype)
    ref = _ref_norm(w, a, b, 0.5)  # computed from the same rounded low-precision values
    assert DF.base_row_sq_norm(w).dtype == torch.float32
    assert_close(DF.base_row_sq_norm(w).double(), (w.double() ** 2).sum(1), rtol=1e-5, atol=1e-5)  # fp32 sums
    dense = DF.dense_row_norm(w, a, b, 0.5)
    assert dense.dtype == torch.float32
    assert_close(dense.double(), ref, rtol=1e-5, atol=1e-5)  # fp32 accumulation of exact low-precision inputs
    # factored: every product and sum in fp32 too; the expansion n² = ||W||² + 2s·cross + s²·quad adds
    # fp32 cancellation on top (terms here are O(10)), still far below a bf16 ulp
    assert_close(DF.factored_row_norm(w, a, b, 0.5).double(), ref, rtol=1e-5, atol=1e-5)


def test_factored_norm_of_vanishing_row_is_zero_not_nan():
    w, a, b, _ = _tensors()
    w[2] = -0.5 * (b[2] @ a)  # W + s·B·A = 0 on row 2
    got = DF.factored_row_norm(w, a, b, 0.5)
    assert torch.isfinite(got).all()
    assert got[2].abs() < 1e-6  # cancellation residue only
    assert_close(got[[0, 1, 3, 4, 5]], _ref_norm(w, a, b, 0.5)[[0, 1, 3, 4, 5]], rtol=1e-10, atol=1e-10)


# ---- scale, merge, combine -----------------------------------------------------------------------------
def test_dora_scale_zero_norm_gives_zero_and_finite_grad():
    m = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    n = torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64, requires_grad=True)
    out = DF.dora_scale(m, n)
    assert_close(out.detach(), torch.tensor([0.5, 0.0, 0.75], dtype=torch.float64), rtol=0, atol=0)
    out.sum().backward()
    assert torch.isfinite(m.grad).all() and torch.isfinite(n.grad).all()
    assert_close(m.grad, torch.tensor([0.5, 0.0, 0.25], dtype=torch.float64), rtol=1e-15, atol=0)  # 1/n


@pytest.mark.parametrize("kind", ["dora", "lora", "magnitude_only"])
def test_merged_weight_matches_reference_and_unmerges(kind):
    w, a, b, m = _tensors(dtype=torch.float32)
    s = 1.5
    wd, ad, bd, md = w.double(), a.double(), b.double(), m.double()
    if kind == "magnitude_only":
        a_, b_ = None, None
        v = wd
    else:
        a_, b_ = a, b
        v = wd + s * bd @ ad
    mag = None if kind == "lora" else m
    merged, factor = DF.merged_weight(w, a_, b_, mag, s)
    ref = v if kind == "lora" else (md / v.norm(dim=1))[:, None] * v
    assert merged.dtype == torch.float32
    assert_close(merged.double(), ref, rtol=1e-6, atol=1e-6)  # fp32 accumulation of a 3-term product
    assert (factor is None) == (kind == "lora")
    if kind != "lora":
        assert_close(merged.double().norm(dim=1), md, rtol=1e-6, atol=1e-6)  # rows have norm m exactly
    restored = DF.unmerged_weight(merged, a_, b_, factor, s)
    assert_close(restored, w, rtol=1e-5, atol=1e-6)  # fp32 round-off of divide-then-subtract


def test_unmerged_weight_of_zero_norm_row_is_minus_delta():
    w, a, b, m = _tensors()
    s = 0.5
    w[1] = -s * (b[1] @ a)
    merged, factor = DF.merged_weight(w, a, b, m, s)
    assert torch.isfinite(merged).all() and factor[1] == 0
    assert_close(DF.unmerged_weight(merged, a, b, factor, s), w, rtol=1e-10, atol=1e-10)  # float64 round-off


def test_dora_combine_forms():
    gen = torch.Generator().manual_seed(3)
    base, lora, dropped = (torch.randn(4, OUT, generator=gen, dtype=torch.float64) for _ in range(3))
    factor = torch.rand(OUT, generator=gen, dtype=torch.float64) + 0.5
    s = 0.75
    no_dropout = DF.dora_combine(base, lora, factor, s)
    assert_close(no_dropout, factor * base + factor * s * lora, rtol=1e-14, atol=1e-14)
    with_dropout = DF.dora_combine(base, lora, factor, s, dropped)
    assert_close(with_dropout, base + (factor - 1) * dropped + factor * s * lora, rtol=1e-14, atol=1e-14)
    # the dropout form with x~ = x is the plain form (paper eq. 5)
    assert_close(DF.dora_combine(base, lora, factor, s, base), no_dropout, rtol=1e-12, atol=1e-12)
    assert_close(DF.dora_combine(base, None, factor, s), factor * base, rtol=0, atol=0)


# ---- gradcheck, float64 ---------------------------------------------------------------------------------
def _req(*tensors):
    return tuple(t.clone().requires_grad_(True) for t in tensors)


def test_gradcheck_dense_row_norm():
    w, a, b, _ = _tensors()
    assert gradcheck(lambda w, a, b: DF.dense_row_norm(w, a, b, 0.7), _req(w, a, b))


def test_gradcheck_factored_row_norm():
    w, a, b, _ = _tensors()
    assert gradcheck(lambda w, a, b: DF.factored_row_norm(w, a, b, 0.7), _req(w, a, b))


def test_gradcheck_factored_row_norm_matches_dense_gradient():
    w, a, b, _ = _tensors()
    g = torch.randn(OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (DF.dense_row_norm, DF.factored_row_norm):
        ins = _req(w, a, b)
        (fn(*ins, 0.7) * g).sum().backward()
        grads.append([t.grad for t in ins])
    for dense, factored in zip(*grads):
        assert_close(factored, dense, rtol=1e-10, atol=1e-10)  # same function, float64


def test_gradcheck_dora_scale():
    _, _, _, m = _tensors()
    n = torch.rand(OUT, dtype=torch.float64) + 0.5
    assert gradcheck(DF.dora_scale, _req(m, n))


def test_gradcheck_dora_combine():
    gen = torch.Generator().manual_seed(4)
    base, lora, dropped = (torch.randn(3, OUT, generator=gen, dtype=torch.float64) for _ in range(3))
    factor = torch.rand(OUT, generator=gen, dtype=torch.float64) + 0.5
    assert gradcheck(lambda b, l, f: DF.dora_combine(b, l, f, 0.5), _req(base, lora, factor))
    assert gradcheck(lambda b, l, f, d: DF.dora_combine(b, l, f, 0.5, d), _req(base, lora, factor, dropped))


def test_gradcheck_merged_weight():
    w, a, b, m = _tensors()
    assert gradcheck(lambda w, a, b, m: DF.merged_weight(w, a, b, m, 0.9)[0], _req(w, a, b, m))


def test_lora_scaling_rslora_is_sqrt():
    assert DF.lora_scaling(9, 6.0, use_rslora=True) == pytest.approx(6.0 / math.sqrt(9))


# ---- property: the factored norm is the dense norm, for any shapes -------------------------------------------
@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 8), inp=st.integers(1, 12), r=st.integers(1, 5), seed=st.integers(0, 2**16),
       s=st.floats(0.05, 4.0))
def test_factored_equals_dense_for_any_shape(out, inp, r, seed, s):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    a = torch.randn(r, inp, generator=gen, dtype=torch.float64)
    b = torch.randn(out, r, generator=gen, dtype=torch.float64)
    dense = _ref_norm(w, a, b, s)
    # float64; n² is a sum of terms of size ~||W||² + s²||B||²||A||² (≤ ~1e4 here), so its absolute
    # round-off is ~1e-12 and n's is that over 2n: 1e-6 absolute covers even a nearly vanishing row
    assert_close(DF.factored_row_norm(w, a, b, s), dense, rtol=1e-9, atol=1e-6)
    merged, _ = DF.merged_weight(w, a, b, dense, s)  # m = n: the merge must give back W + s·B·A
    assert_close(merged, w + s * b @ a, rtol=1e-9, atol=1e-9)
