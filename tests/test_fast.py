"""The fused DoRA linear path (``torchdora.fast``) against independent references.

References: a plain float64 recomputation in weight space (``W' = m (W + s·B·A) / ||W + s·B·A||`` applied with
``F.linear``), and the layer's own reference path (dense norm + plain autograd composition). Gradients of
``A``, ``B``, ``m`` and the input are compared, with and without dropout, in detached and exact-gradient modes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

from torchdora import DoraConfig, LinearAdapter, inject
from torchdora import functional as DF
from torchdora.fast import DoraLinearFunction, dora_linear

# fp32 fast path vs float64 reference: fp32 products of length <= 96 and a norm, relative error ~1e-6;
# gradients sum a further <= 64 tokens
FP32 = dict(rtol=2e-5, atol=2e-5)
FP32_GRAD = dict(rtol=1e-4, atol=1e-4)
# float64 fast path vs float64 reference: summation order only
FP64 = dict(rtol=1e-10, atol=1e-10)
# bf16 has an 8-bit mantissa (2^-9 relative rounding): a handful of roundings of O(1) values, measured
# against the tensor's largest entry
BF16_REL = 4e-2


def make_layer(in_f: int, out_f: int, r: int, *, bias: bool = True, dtype=torch.float32, conv1d: bool = False,
               seed: int = 0, **kwargs) -> LinearAdapter:
    """A LinearAdapter with random A, B and m (not the identity at init), on a random base layer."""
    gen = torch.Generator().manual_seed(seed)
    if conv1d:
        base = Conv1D(out_f, in_f)
        with torch.no_grad():
            base.weight.copy_(torch.randn(in_f, out_f, generator=gen) * 0.3)
            base.bias.copy_(torch.randn(out_f, generator=gen) * 0.3 if bias else torch.zeros(out_f))
    else:
        base = nn.Linear(in_f, out_f, bias=bias)
        with torch.no_grad():
            base.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.3)
            if bias:
                base.bias.copy_(torch.randn(out_f, generator=gen) * 0.3)
    layer = LinearAdapter(base.to(dtype), r=r, alpha=2.0 * r, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            noise = torch.randn(p.shape, generator=gen).to(p.dtype)
            if p is layer.magnitude:
                p.mul_(1 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
    return layer


def reference_layer(layer: LinearAdapter) -> LinearAdapter:
    """The same layer on the reference path: dense norm, plain autograd composition."""
    ref = copy.deepcopy(layer)
    ref.clear_cache()
    ref.use_fast_path = False
    ref.norm_method = "dense"
    return ref


def weight_space_reference(layer: LinearAdapter, x: Tensor, a: Tensor, b: Tensor, m: Tensor, *,
                           detach: bool = True, x_dropped: Tensor | None = None) -> Tensor:
    """DoRA in float64 weight space (paper eq. 5), autograd-able in ``x``, ``a``, ``b``, ``m``."""
    w = layer.weight_2d().detach().double()
    bias = layer.base.bias
    bias = None if bias is None else bias.detach().double()
    s = layer.scaling
    v = w + s * (b @ a)  # (out, in)
    n = torch.linalg.vector_norm(v, dim=1)
    if detach:
        n = n.detach()
    factor = (m / n)[:, None]
    if x_dropped is None:
        return F.linear(x, factor * v, bias)
    return F.linear(x, w, bias) + F.linear(x_dropped, (factor - 1) * w + factor * s * (b @ a))


def run(layer: LinearAdapter, x: Tensor, g: Tensor, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """Output and the gradients of x, A, B, m for the loss ``sum(y ⊙ g)``."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = layer(x)
    (y.to(g.dtype) * g).sum().backward()
    grads = {name: p.grad for name, p in layer.adapter_parameters().items()}
    grads["x"] = x.grad
    return y.detach(), grads


def assert_rel(got: Tensor, want: Tensor, rel: float) -> None:
    """``|got − want| <= rel · max|want|`` elementwise (low precision: error relative to the tensor's scale)."""
    scale = want.abs().max().item()
    assert_close(got.double(), want.double(), rtol=0, atol=rel * scale + 1e-12)


# ---- fp32/fp64 vs float64 weight-space reference, many shapes ---------------------------------------------------
# in >= 8: with a row of 1 or 2 entries W + s·B·A can nearly vanish, and then the exact-gradient mode's A/B
# gradients are a cancellation of terms of size m/n (well-conditioned rows are what this test is about; the
# zero-norm limit is tested in test_layers.py)
@settings(max_examples=30, deadline=None)
@given(
    in_f=st.integers(8, 96), out_f=st.integers(1, 96), r=st.integers(1, 16), tokens=st.integers(1, 64),
    bias=st.booleans(), conv1d=st.booleans(), detach=st.booleans(), seed=st.integers(0, 1000),
)
def test_fast_path_matches_weight_space_reference(in_f, out_f, r, tokens, bias, conv1d, detach, seed):
    layer = make_layer(in_f, out_f, r, bias=bias, conv1d=conv1d, seed=seed, detach_norm=detach)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, in_f, generator=gen)
    g = torch.randn(tokens, out_f, generator=gen)
    y, grads = run(layer, x, g)
    x64 = x.double().requires_grad_(True)
    a, b, m = (p.detach().double().requires_grad_(True) for p in (layer.lora_A, layer.lora_B, layer.magnitude))
    ref = weight_space_reference(layer, x64, a, b, m, detach=detach)
    (ref * g.double()).sum().backward()
    assert_close(y.double(), ref.detach(), **FP32)
    for name, want in (("x", x64.grad), ("lora_A", a.grad), ("lora_B", b.grad), ("magnitude", m.grad)):
        assert_close(grads[name].double(), want, **FP32_GRAD, msg=name)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_fp64_is_exact(detach, bias):
    layer = make_layer(13, 11, 4, bias=bias, dtype=torch.float64, detach_norm=detach)
    x = torch.randn(2, 5, 13, dtype=torch.float64)  # a batch dimension: the function flattens and restores it
    g = torch.randn(2, 5, 11, dtype=torch.float64)
    y, grads = run(layer, x, g)
    x64 = x.clone().requires_grad_(True)
    a, b, m = (p.detach().clone().requires_grad_(True) for p in (layer.lora_A, layer.lora_B, layer.magnitude))
    ref = weight_space_reference(layer, x64, a, b, m, detach=detach)
    (ref * g).sum().backward()
    assert y.shape == (2, 5, 11)
    assert_close(y, ref.detach(), **FP64)
    for name, want in (("x", x64.grad), ("lora_A", a.grad), ("lora_B", b.grad), ("magnitude", m.grad)):
        assert_close(grads[name], want, **FP64, msg=name)


def test_gradcheck_function():
    """The hand-written backward is the derivative of the forward (float64, every differentiable input)."""
    gen = torch.Generator().manual_seed(0)
    x, w, a, b = (torch.randn(*shape, dtype=torch.float64, generator=gen) for shape in ((4, 5), (3, 5), (2, 5), (3, 2)))
    bias = torch.randn(3, dtype=torch.float64, generator=gen)
    f = torch.rand(3, dtype=torch.float64, generator=gen) + 0.5
    for save_output in (True, False):
        fn = lambda x, a, b, f: DoraLinearFunction.apply(x, w, bias, a, b, f, 0.7, 0.0, save_output)  # noqa: E731
        assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_(True) for t in (x, a, b, f)))


# ---- fast vs the layer's own reference path (dense norm, plain composition) -------------------------------------
SHAPES = [(32, 48, 4, 16), (48, 32, 8, 7), (64, 64, 16, 33), (5, 70, 1, 3)]


@pytest.mark.parametrize("in_f, out_f, r, tokens", SHAPES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("recompute", [False, True])
def test_fast_matches_reference_path_fp32(in_f, out_f, r, tokens, dropout, detach, recompute):
    layer = make_layer(in_f, out_f, r, dropout=dropout, detach_norm=detach, recompute_output=recompute).train()
    ref = reference_layer(layer)
    x = torch.randn(3, tokens, in_f)
    g = torch.randn(3, tokens, out_f)
    y, grads = run(layer, x, g, seed=5)
    y_ref, grads_ref = run(ref, x, g, seed=5)  # same seed: the same dropout mask
    assert_close(y, y_ref, **FP32)
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], **FP32_GRAD, msg=name)
    if dropout:  # the mask really mattered: without it the output differs
        layer.eval()
        assert not torch.allclose(layer(x), y, **FP32)


@pytest.mark.parametrize("in_f, out_f, r, tokens", SHAPES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("recompute", [False, True])
def test_fast_matches_float64_reference_bf16(in_f, out_f, r, tokens, dropout, bias, detach, recompute):
    """bf16 base and bf16 adapter: the fast path is as close to float64 as the bf16 reference path is."""
    layer = make_layer(in_f, out_f, r, bias=bias, dtype=torch.bfloat16, dropout=dropout, detach_norm=detach,
                       recompute_output=recompute).train()
    exact = make_layer(in_f, out_f, r, bias=bias, dtype=torch.float64, dropout=dropout, detach_norm=detach).train()
    exact.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    exact.use_fast_path, exact.norm_method = False, "dense"
    ref = reference_layer(layer)
    x = torch.randn(tokens, in_f).bfloat16()
    g = torch.randn(tokens, out_f)
    y, grads = run(layer, x, g, seed=5)
    y_ref, grads_ref = run(ref, x, g, seed=5)
    y_64, grads_64 = run(exact, x.double(), g.double(), seed=5)  # same mask: F.dropout draws the same bits
    assert y.dtype == torch.bfloat16
    assert_rel(y, y_64, BF16_REL)
    assert_rel(y_ref, y_64, BF16_REL)  # the tolerance is the bf16 reference path's own accuracy
    for name in grads_64:
        assert_rel(grads[name], grads_64[name], BF16_REL)
        assert_rel(grads_ref[name], grads_64[name], BF16_REL)


def test_bf16_base_with_fp32_adapter():
    """The default: adapter parameters in fp32 on a bf16 base; gradients come back in fp32."""
    layer = make_layer(40, 24, 8, dtype=torch.bfloat16)
    layer.lora_A.data, layer.lora_B.data, layer.magnitude.data = (
        p.detach().float() for p in (layer.lora_A, layer.lora_B, layer.magnitude))
    layer.clear_cache()
    exact = reference_layer(layer).double()
    x = torch.randn(9, 40).bfloat16()
    g = torch.randn(9, 24)
    y, grads = run(layer, x, g)
    y_64, grads_64 = run(exact, x.double(), g.double())
    assert y.dtype == torch.bfloat16
    assert_rel(y, y_64, BF16_REL)
    for name in grads_64:
        assert grads[name].dtype == (torch.bfloat16 if name == "x" else torch.float32)
        assert_rel(grads[name], grads_64[name], BF16_REL)


@pytest.mark.parametrize("bias", [True, False])
def test_zero_magnitude_row_keeps_its_gradient(bias):
    """m = 0 makes y = b, so z cannot be read off the output; the layer then saves z and m still learns."""
    layer = make_layer(12, 6, 3, bias=bias)
    with torch.no_grad():
        layer.magnitude[2] = 0.0
    ref = reference_layer(layer)
    x, g = torch.randn(5, 12), torch.randn(5, 6)
    y, grads = run(layer, x, g)
    y_ref, grads_ref = run(ref, x, g)
    assert_close(y, y_ref, **FP32)
    assert grads_ref["magnitude"][2].abs() > 1e-3  # the row does have a gradient
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], **FP32_GRAD, msg=name)


def test_magnitude_only_layer_uses_fast_path_and_matches():
    layer = make_layer(10, 7, 2, magnitude_only=True)
    ref = reference_layer(layer)
    x, g = torch.randn(4, 10), torch.randn(4, 7)
    y, grads = run(layer, x, g)
    y_ref, grads_ref = run(ref, x, g)
    assert_close(y, y_ref, **FP32)
    assert_close(grads["magnitude"], grads_ref["magnitude"], **FP32_GRAD)
    assert_close(grads["x"], grads_ref["x"], **FP32_GRAD)


def test_adapter_is_not_a_no_op():
    """Guard: perturbing B or m changes the fast path's output."""
    layer = make_layer(16, 8, 4)
    x = torch.randn(3, 16)
    before = layer(x).detach()
    with torch.no_grad():
        layer.lora_B.add_(0.5)
    after_b = layer(x).detach()
    assert not torch.allclose(after_b, before, **FP32)
    with torch.no_grad():
        layer.magnitude.mul_(1.5)
    assert not torch.allclose(layer(x).detach(), after_b, **FP32)


def test_inference_forward_matches_training_forward():
    layer = make_layer(20, 12, 4).eval()
    x = torch.randn(6, 20)
    with torch.no_grad():
        fast_nograd = layer(x)
    assert_close(fast_nograd, layer(x).detach(), **FP32)
    assert_close(fast_nograd, reference_layer(layer)(x).detach(), **FP32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("magnitude_only", [False, True])
def test_eval_plan_forward_matches_float64_reference(dtype, bias, magnitude_only):
    """``dora_linear_eval`` (the scale and factor folded into ``B``, the bias in the last product) against the
    weight-space formula in float64, for a 3-D input as a decoder passes it."""
    from torchdora.fast import dora_linear_eval, eval_plan

    layer = make_layer(24, 10, 4, bias=bias, dtype=dtype, magnitude_only=magnitude_only)
    x = torch.randn(2, 3, 24).to(dtype)
    a, b = layer.lora_A_2d(), layer.lora_B_2d()
    with torch.no_grad():
        plan = eval_plan(layer.base.bias, a, b, layer.dora_factor(), layer.scaling, dtype)
        got = dora_linear_eval(x, layer.weight_2d(), plan)
    zero_a = torch.zeros(4, 24, dtype=torch.float64)
    want = weight_space_reference(
        layer, x.double(), zero_a if a is None else a.detach().double(),
        torch.zeros(10, 4, dtype=torch.float64) if b is None else b.detach().double(), layer.magnitude.detach().double(),
    )
    assert got.dtype == dtype and got.shape == (2, 3, 10)
    if dtype == torch.float32:
        assert_close(got.double(), want, **FP32)
    else:
        assert_rel(got.double(), want, BF16_REL)


@pytest.mark.parametrize("conv1d", [False, True])
def test_inference_forward_runs_the_plan_and_sees_edits(conv1d, monkeypatch):
    """Without autograd the layer runs ``dora_linear_eval`` from its cached plan, equal to the reference path,
    and an edit of any tensor in the plan (``A``, ``B``, ``m``, the weight, the bias) is seen at the next call."""
    from torchdora.layers import linear

    calls = [0]
    original = linear.dora_linear_eval

    def counted(*args):
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(linear, "dora_linear_eval", counted)
    layer = make_layer(20, 12, 4, conv1d=conv1d).eval()
    x = torch.randn(1, 5, 20)
    edits = [lambda: layer.lora_A.mul_(-1.5), lambda: layer.lora_B.add_(0.3), lambda: layer.magnitude.mul_(0.5),
             lambda: layer.base.weight.mul_(1.2), lambda: layer.base.bias.add_(1.0)]
    with torch.no_grad():
        before = layer(x)
        for edit in [lambda: None] + edits:
            edit()
            got = layer(x)
            assert_close(got, reference_layer(layer)(x), **FP32)
        assert not torch.allclose(got, before, **FP32)
    assert calls[0] == 1 + len(edits) + 1


def test_custom_dropout_module_takes_the_reference_path():
    """A user-replaced dropout module is honoured (the fast path only fuses nn.Dropout)."""
    layer = make_layer(8, 5, 2, dropout=0.5).train()
    layer.lora_dropout = nn.Identity()  # not nn.Dropout: the reference path must apply this module
    x = torch.randn(4, 8)
    assert_close(layer(x), reference_layer(layer).eval()(x), **FP32)


def test_dora_linear_rejects_nothing_silently_for_unfrozen_base():
    """A trainable base weight needs its own gradient, which only the reference path computes."""
    layer = make_layer(6, 4, 2)
    layer.base.weight.requires_grad_(True)
    x = torch.randn(3, 6)
    layer(x).sum().backward()
    assert layer.base.weight.grad is not None


# ---- what is saved for backward ---------------------------------------------------------------------------------
def _saved_bytes(module: nn.Module, x: Tensor, keep_output: bool) -> int:
    """Bytes of distinct activation storages that autograd keeps between forward and backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        st_ = t.untyped_storage()
        if st_.data_ptr() not in params:
            storages[st_.data_ptr()] = st_.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
        loss = (y * y).sum() if keep_output else (y * 2.0).sum()  # y * y keeps y, as a next layer often does
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("keep_output", [True, False])
def test_saves_no_more_than_lora(keep_output):
    """DoRA's fused layer keeps what LoRA keeps (x, x Aᵀ), plus the output when the next op does not keep it."""
    tokens, in_f, out_f = 64, 32, 48
    x = torch.randn(tokens, in_f, requires_grad=True)
    dora = make_layer(in_f, out_f, 4, bias=False)
    lora = LinearAdapter(copy.deepcopy(dora.base), r=4, use_dora=False)
    dora_bytes, lora_bytes = _saved_bytes(dora, x, keep_output), _saved_bytes(lora, x, keep_output)
    small = 4 * out_f * 4  # a few (out,) vectors: the factor and its views
    extra = 0 if keep_output else tokens * out_f * 4  # the output, saved only by DoRA when the next op drops it
    assert dora_bytes <= lora_bytes + extra + small
    # guard: the plain composition saves z besides what the next op keeps, so it saves more whenever y is kept
    plain = _saved_bytes(reference_layer(dora), x, keep_output)
    assert plain > dora_bytes if keep_output else plain >= dora_bytes


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
def test_recompute_saves_what_lora_saves(dropout, bias):
    """``recompute_output``: nothing of size (tokens, out) is kept, even when the next op drops the output; with
    dropout only the boolean mask comes on top of LoRA's tensors. The gradients stay those of the saving path."""
    tokens, in_f, out_f = 64, 32, 48
    x = torch.randn(tokens, in_f, requires_grad=True)
    dora = make_layer(in_f, out_f, 4, bias=bias, dropout=dropout, recompute_output=True).train()
    lora = LinearAdapter(copy.deepcopy(dora.base), r=4, use_dora=False, dropout=dropout).train()
    mask = tokens * in_f if dropout else 0  # torch.bool: one byte per input element
    for keep_output in (False, True):
        assert _saved_bytes(dora, x, keep_output) <= _saved_bytes(lora, x, keep_output) + mask + 4 * out_f * 4
    saving = copy.deepcopy(dora)
    saving.recompute_output = False
    assert _saved_bytes(saving, x, False) >= _saved_bytes(dora, x, False) + tokens * out_f * 4
    g = torch.randn(tokens, out_f)
    y, grads = run(dora, x.detach(), g, seed=3)
    y_saving, grads_saving = run(saving, x.detach(), g, seed=3)
    assert_close(y, y_saving, rtol=0, atol=0)  # the forward is the same computation
    for name in grads_saving:  # backward differs only in where z comes from (recomputed vs (y − b) / f)
        assert_close(grads[name], grads_saving[name], **FP32, msg=name)


def test_dropout_saves_no_more_than_lora():
    """With dropout DoRA needs x~ Wᵀ + s·(x~ Aᵀ) Bᵀ for m's gradient; it keeps x and a boolean mask instead of x~."""
    tokens, in_f, out_f = 64, 32, 48
    x = torch.randn(tokens, in_f, requires_grad=True)
    dora = make_layer(in_f, out_f, 4, bias=False, dropout=0.1).train()
    lora = LinearAdapter(copy.deepcopy(dora.base), r=4, use_dora=False, dropout=0.1).train()
    dora_bytes, lora_bytes = _saved_bytes(dora, x, True), _saved_bytes(lora, x, True)
    assert dora_bytes <= lora_bytes + tokens * out_f * 4 + 4 * out_f * 4
    assert _saved_bytes(reference_layer(dora), x, True) > dora_bytes


# ---- fp32 accumulation of the norm without an fp32 copy of the weight --------------------------------------------
class _LargestFloat32(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest number of elements of any fp32 tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_norm_is_fp32_accurate_without_fp32_weight_copy(dtype, monkeypatch):
    monkeypatch.setattr(DF, "_UPCAST_BLOCK_ELEMENTS", 64 * 8)  # blocks of 8 rows of 64
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 64, generator=gen).to(dtype)
    a = torch.randn(4, 64, generator=gen) * 0.1
    b = torch.randn(40, 4, generator=gen) * 0.1
    with _LargestFloat32() as mode:
        norm = DF.factored_row_norm(w, a, b, 0.5)
    assert mode.largest <= 64 * 8  # never an fp32 tensor the size of W
    want = torch.linalg.vector_norm(w.double() + 0.5 * b.double() @ a.double(), dim=1)
    assert norm.dtype == torch.float32
    assert_close(norm.double(), want, rtol=1e-6, atol=1e-6)  # fp32 accumulation of exact bf16/fp16 inputs


# ---- torch.compile ----------------------------------------------------------------------------------------------
def test_compile_fullgraph_training_step_matches_eager():
    """No graph break inside the adapter layer: fullgraph=True compiles forward and backward."""
    layer = make_layer(16, 12, 4, dropout=0.0).train()
    x, g = torch.randn(5, 16), torch.randn(5, 12)
    y_eager, grads_eager = run(layer, x, g)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y_comp, grads_comp = run(compiled, x, g)
    assert_close(y_comp, y_eager, **FP32)
    for name in grads_eager:
        assert_close(grads_comp[name], grads_eager[name], **FP32_GRAD, msg=name)


def test_compile_injected_model_has_no_graph_break_in_adapters(make_tiny_llama, input_ids):
    model = make_tiny_llama()
    inject(model, DoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.model.layers[0].mlp)(torch.randn(2, 7, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compile_inductor_eval_forward():
    layer = make_layer(16, 12, 4).eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        want = layer(x)
        got = torch.compile(layer, fullgraph=True)(x)
    assert_close(got, want, **FP32)


# ---- CUDA: the Triton kernels against the PyTorch ops ------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_cuda_fast_path_matches_cpu_reference(dtype, bias, dropout):
    from torchdora import kernels

    layer = make_layer(256, 384, 16, bias=bias, dtype=dtype, dropout=dropout).train()
    x = torch.randn(2, 300, 256).to(dtype)
    g = torch.randn(2, 300, 384)
    ref = reference_layer(layer).double()
    # no dropout: compare to the float64 CPU reference; dropout masks differ between devices, so compare the
    # CUDA fast path to the CUDA reference path under the same seed
    gpu = layer.cuda()
    y, grads = run(gpu, x.cuda(), g.cuda(), seed=3)
    if dropout:
        y_ref, grads_ref = run(reference_layer(gpu), x.cuda(), g.cuda(), seed=3)
    else:
        y_ref, grads_ref = run(ref, x.double(), g.double())
    rel = 1e-4 if dtype == torch.float32 else BF16_REL
    assert_rel(y.cpu(), y_ref.cpu(), rel)
    for name in grads_ref:
        assert_rel(grads[name].cpu(), grads_ref[name].cpu(), rel * 10 if name == "magnitude" else rel)
    assert kernels.available()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_rows, n_cols, r", [(1, 1, 1), (77, 130, 8), (512, 256, 64), (33, 1000, 100)])
def test_triton_kernels_match_torch(dtype, n_rows, n_cols, r):
    from torchdora import kernels

    if not kernels.available():
        pytest.skip("Triton is not installed")
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    z, h, b = (torch.randn(*s, device=dev, generator=gen).to(dtype) for s in ((n_rows, n_cols), (n_rows, r), (n_cols, r)))
    f = (torch.rand(n_cols, device=dev, generator=gen) + 0.5).to(dtype)
    bias = torch.randn(n_cols, device=dev, generator=gen).to(dtype)
    want = f.double() * (z.double() + 0.7 * h.double() @ b.double().T) + bias.double()
    got = kernels.lora_combine_(z.clone(), h, b, f, bias, 0.7)
    rel = 1e-5 if dtype == torch.float32 else 1e-2  # one rounding of an fp32-accumulated value
    assert_rel(got, want, rel)
    g, y = torch.randn(n_rows, n_cols, device=dev, generator=gen).to(dtype), z
    dz, colsum = kernels.scale_and_colsum(g, y, f, bias)
    assert_rel(dz, g.double() * f.double(), rel)
    assert colsum.dtype == torch.float32
    # fp32 sums of (nearly) exact products over <= 512 rows: relative round-off well below 1e-4
    assert_rel(colsum, (g.double() * (y.double() - bias.double())).sum(0), 1e-4)


def test_autocast_bf16_matches_fp32_within_bf16_resolution():
    # Under autocast the fused path must step aside (its in-place GEMM accumulate cannot mix dtypes); the
    # result must still be DoRA's. bf16 keeps 8 mantissa bits: rtol/atol 3e-2 on outputs of size ~1.
    torch.manual_seed(0)
    layer = LinearAdapter(nn.Linear(32, 24), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1.2)
    x = torch.randn(6, 32, requires_grad=True)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert not torch.equal(out.float(), reference)  # the matmuls really ran in bf16
    torch.testing.assert_close(out.float(), reference.detach(), rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert torch.isfinite(layer.lora_B.grad).all() and torch.isfinite(layer.magnitude.grad).all()
