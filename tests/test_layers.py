"""Adapter layers against a plain float64 re-computation of DoRA in weight space (paper eq. 5).

The reference never uses the layer's code path: it builds ``W' = m (W + s·B·A) / ||W + s·B·A||`` (norm per
output feature) as a full weight and applies it with the plain op (``F.linear``, ``F.convNd``,
``F.embedding``); the LoRA product ``s·(x Aᵀ) Bᵀ`` becomes the same op applied with ``s·B·A``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import gradcheck
from torch.func import functional_call
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

from torchdora import ConvAdapter, DoraConfig, EmbeddingAdapter, LinearAdapter, inject, merge_and_unload
from torchdora.layers import adapter_class_for

pytestmark = pytest.mark.usefixtures("single_thread")

# "*_plain": the same layer with the fused fast path off (AdapterLayer.use_fast_path = False), so both the fused
# autograd function and the plain composition are checked against the reference
KINDS = ["linear", "linear_plain", "hf_conv1d", "hf_conv1d_plain", "conv1d", "conv2d", "conv2d_reflect", "conv3d",
         "embedding"]
# fp32 layer vs float64 reference: a few fp32 products of length <= 40 and a norm; relative error ~1e-6
FP32 = dict(rtol=1e-5, atol=1e-5)
# float64 layer vs float64 reference: different summation order only
FP64 = dict(rtol=1e-10, atol=1e-10)


@dataclass
class Case:
    base: nn.Module
    x: Tensor


def make_case(kind: str, bias: bool = True, seed: int = 0) -> Case:
    """A small base module of ``kind`` and an input batch for it, fp32."""
    torch.manual_seed(seed)
    kind = kind.removesuffix("_plain")
    if kind == "linear":
        return Case(nn.Linear(9, 6, bias=bias), torch.randn(2, 3, 9))
    if kind == "hf_conv1d":
        base = Conv1D(6, 9)  # nf=out, nx=in; weight (in, out)
        nn.init.normal_(base.weight, std=0.3)
        nn.init.normal_(base.bias, std=0.3)
        if not bias:
            with torch.no_grad():
                base.bias.zero_()  # Conv1D always has a bias: a zero one stands for "no bias"
        return Case(base, torch.randn(2, 3, 9))
    if kind == "conv1d":
        return Case(nn.Conv1d(3, 5, 3, stride=2, padding=1, bias=bias), torch.randn(2, 3, 8))
    if kind == "conv2d":
        return Case(nn.Conv2d(3, 5, (3, 2), padding=1, dilation=(1, 2), bias=bias), torch.randn(2, 3, 6, 5))
    if kind == "conv2d_reflect":
        return Case(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect", bias=bias), torch.randn(2, 2, 5, 5))
    if kind == "conv3d":
        return Case(nn.Conv3d(2, 4, 2, stride=(1, 2, 1), bias=bias), torch.randn(1, 2, 4, 4, 3))
    if kind == "embedding":
        return Case(nn.Embedding(11, 6), torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(seed)))
    raise AssertionError(kind)


def make_layer(kind: str, bias: bool = True, dtype: torch.dtype = torch.float32, **kwargs):
    case = make_case(kind, bias)
    base = case.base.to(dtype)
    x = case.x if kind == "embedding" else case.x.to(dtype)
    kwargs.setdefault("r", 3)
    kwargs.setdefault("alpha", 5.0)
    layer = adapter_class_for(base)(base, dtype=dtype, **kwargs)
    layer.use_fast_path = not kind.endswith("_plain")
    return layer, x


def perturb(layer, seed: int = 7, b: bool = True, a: bool = True, m: bool = True) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if b and layer.lora_B is not None:
            layer.lora_B.add_(0.4 * torch.randn(layer.lora_B.shape, generator=gen).to(layer.lora_B.dtype))
        if a and layer.lora_A is not None:
            layer.lora_A.add_(0.4 * torch.randn(layer.lora_A.shape, generator=gen).to(layer.lora_A.dtype))
        if m and layer.magnitude is not None:
            layer.magnitude.mul_(1 + 0.3 * torch.randn(layer.magnitude.shape, generator=gen).to(layer.magnitude.dtype))


# ---- the independent reference -------------------------------------------------------------------------------
def base_weight_2d(layer) -> Tensor:
    """The base weight as float64 ``(out, in)`` rows, written out per module type (not via the layer)."""
    base = layer.base
    w = base.weight.detach().double()
    if isinstance(base, Conv1D):
        return w.T
    if isinstance(base, nn.Embedding):
        return w.T  # (d, V)
    return w.reshape(w.shape[0], -1)


def apply_2d(layer, w2d: Tensor, x: Tensor, bias: Tensor | None = None) -> Tensor:
    """The plain op of the base module with weight ``w2d`` (``(out, in)`` rows), float64."""
    base = layer.base
    if isinstance(base, nn.Embedding):
        return F.embedding(x, w2d.T)
    x = x.double()
    if isinstance(base, (nn.Linear, Conv1D)):
        return F.linear(x, w2d, bias)
    weight = w2d.reshape(base.weight.shape)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    if base.padding_mode != "zeros":
        pad = [p for p in reversed(base.padding) for _ in range(2)]
        return conv(F.pad(x, pad, mode=base.padding_mode), weight, bias, base.stride, 0, base.dilation)
    return conv(x, weight, bias, base.stride, base.padding, base.dilation)


def reference(layer, x: Tensor, a: Tensor | None, b: Tensor | None, m: Tensor | None, *,
              use_dora: bool, s: float, detach: bool = True, x_dropped: Tensor | None = None) -> Tensor:
    """DoRA/LoRA forward in weight space, float64, autograd-able in ``a``, ``b``, ``m``."""
    w = base_weight_2d(layer)
    bias = getattr(layer.base, "bias", None)
    bias = None if bias is None else bias.detach().double()
    delta = torch.zeros_like(w) if a is None else s * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))
    if not use_dora:
        xd = x if x_dropped is None else x_dropped
        return apply_2d(layer, w, x, bias) + apply_2d(layer, delta, xd)
    v = w + delta
    n = torch.linalg.vector_norm(v, dim=1)
    if detach:
        n = n.detach()
    factor = (m / n)[:, None]
    if x_dropped is None:
        return apply_2d(layer, factor * v, x, bias)
    # the dropout form: y = x Wᵀ + b + (m/n − 1)(x~ Wᵀ) + (m/n) s (x~ Aᵀ) Bᵀ
    return apply_2d(layer, w, x, bias) + apply_2d(layer, (factor - 1) * w + factor * delta, x_dropped)


def params64(layer):
    get = lambda p: None if p is None else p.detach().double()  # noqa: E731
    return get(layer.lora_A), get(layer.lora_B), get(layer.magnitude)


def ref_forward(layer, x, **kwargs):
    a, b, m = params64(layer)
    return reference(layer, x, a, b, m, use_dora=layer.use_dora, s=layer.scaling, **kwargs)


class FixedMask(nn.Module):
    """Dropout with a given mask, so the layer and the reference see the same ``x~``."""

    def __init__(self, mask: Tensor, p: float) -> None:
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:  # like nn.Dropout
            return x
        return x * self.mask.to(x.dtype) / (1 - self.p)


# ---- forward vs reference -----------------------------------------------------------------------------------
KIND_BIAS = [(k, b) for k in KINDS for b in (True, False) if not (k == "embedding" and not b)]  # Embedding: no bias


@pytest.mark.parametrize("kind, bias", KIND_BIAS)
@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_reference(kind, bias, use_dora, use_rslora):
    layer, x = make_layer(kind, bias, use_dora=use_dora, use_rslora=use_rslora, r=4, alpha=6.0)
    assert layer.scaling == pytest.approx(6.0 / (2.0 if use_rslora else 4.0))
    perturb(layer)
    out = layer(x)
    assert out.dtype == torch.float32
    assert_close(out.double(), ref_forward(layer, x), **FP32)


@pytest.mark.parametrize("kind", KINDS)
def test_fp64_layer_matches_reference_tightly(kind):
    layer, x = make_layer(kind, dtype=torch.float64)
    perturb(layer)
    assert_close(layer(x), ref_forward(layer, x), **FP64)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "embedding"])
@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_dropout_forward_matches_reference_form(kind, use_dora, bias):
    p = 0.4
    layer, x = make_layer(kind, bias, use_dora=use_dora, dropout=p)
    perturb(layer)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(11)) > p
    layer.lora_dropout = FixedMask(mask, p)
    layer.train()
    out = layer(x)
    x_dropped = x.double() * mask / (1 - p)
    assert_close(out.double(), ref_forward(layer, x, x_dropped=x_dropped), **FP32)
    # the mask matters: the no-dropout reference is a different number
    assert not torch.allclose(out.double(), ref_forward(layer, x), **FP32)
    # in eval mode dropout is off and the plain form applies
    layer.eval()
    assert_close(layer(x).double(), ref_forward(layer, x), **FP32)


@pytest.mark.parametrize("kind", ["linear", "linear_plain", "hf_conv1d", "conv2d"])
@pytest.mark.parametrize("grad", [True, False])
def test_real_dropout_matches_reference_with_the_same_draw(kind, grad):
    p = 0.5
    layer, x = make_layer(kind, dropout=p)
    perturb(layer)
    layer.train()
    torch.manual_seed(0)
    mask = F.dropout(torch.ones_like(x), p, training=True) != 0  # the draw nn.Dropout makes from this seed
    torch.manual_seed(0)
    with torch.set_grad_enabled(grad):
        first = layer(x)
    assert_close(first.double(), ref_forward(layer, x, x_dropped=x.double() * mask / (1 - p)), **FP32)
    torch.manual_seed(1)
    assert not torch.allclose(layer(x), first)
    layer.eval()
    assert_close(layer(x).double(), ref_forward(layer, x), **FP32)


def test_embedding_ignores_dropout():
    layer, x = make_layer("embedding", dropout=0.5)
    perturb(layer)
    layer.train()
    assert_close(layer(x).double(), ref_forward(layer, x), **FP32)


def test_low_precision_base_with_fp32_adapter():
    layer, x = make_layer("linear", dtype=torch.float32)
    layer.base.to(torch.bfloat16)
    perturb(layer)
    x = x.to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    # bf16 activations and base products: 8 mantissa bits, so a few 2^-8 relative of outputs of size ~1
    assert_close(out.double(), ref_forward(layer, x), rtol=3e-2, atol=3e-2)


def test_dense_norm_method_agrees_with_factored():
    layer, x = make_layer("conv2d", dtype=torch.float64, detach_norm=False)
    perturb(layer)
    g = torch.randn(layer(x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for method in ("factored", "dense"):
        layer.norm_method = method
        layer.zero_grad()
        out = layer(x)
        (out * g).sum().backward()
        grads.append((out.detach(), *(p.grad.clone() for p in layer.adapter_parameters().values())))
    for factored, dense in zip(*grads):
        assert_close(factored, dense, **FP64)


def test_cached_norm_follows_parameter_and_dtype_changes():
    layer, x = make_layer("linear")
    layer(x)  # fills the norm cache
    perturb(layer)  # in-place edits under no_grad, as an optimizer step does
    assert_close(layer(x).double(), ref_forward(layer, x), **FP32)
    with torch.no_grad():
        layer.base.weight.mul_(1.5)  # the frozen base edited in place
    assert_close(layer(x).double(), ref_forward(layer, x), **FP32)
    layer.load_state_dict({k: v * 0.9 for k, v in layer.state_dict().items()})
    assert_close(layer(x).double(), ref_forward(layer, x), **FP32)
    layer.double()
    assert_close(layer(x.double()), ref_forward(layer, x), **FP64)


@pytest.mark.parametrize("kind", KINDS)
def test_magnitude_only_matches_reference(kind):
    layer, x = make_layer(kind, magnitude_only=True)
    assert layer.lora_A is None and layer.lora_B is None
    assert set(layer.adapter_parameters()) == {"magnitude"}
    assert_close(layer(x), layer.base(x), **FP32)
    perturb(layer)
    out = layer(x)
    assert not torch.allclose(out, layer.base(x), **FP32)
    w = base_weight_2d(layer)
    m = layer.magnitude.detach().double()
    bias = getattr(layer.base, "bias", None)
    ref = apply_2d(layer, (m / w.norm(dim=1))[:, None] * w, x, None if bias is None else bias.detach().double())
    assert_close(out.double(), ref, **FP32)


def test_magnitude_only_needs_dora():
    with pytest.raises(ValueError, match="magnitude_only=True needs use_dora=True"):
        make_layer("linear", magnitude_only=True, use_dora=False)


# ---- initialisation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_initial_output_equals_base_and_changes_when_perturbed(kind, use_dora, init):
    layer, x = make_layer(kind, use_dora=use_dora, init=init)
    base_out = layer.base(x)
    assert_close(layer(x), base_out, **FP32)
    if use_dora:  # m starts at ||W|| per output feature
        assert_close(layer.magnitude.detach().double(), base_weight_2d(layer).norm(dim=1), **FP32)
    # guard: the adapter is not a no-op. Embedding starts with A = 0 (PEFT's convention), other kinds with B = 0
    if kind == "embedding":
        perturb(layer, b=False, m=False)
    else:
        perturb(layer, a=False, m=False)
    changed = layer(x)
    assert not torch.allclose(changed, base_out, **FP32)
    if use_dora:
        perturb(layer, a=False, b=False)
        assert not torch.allclose(layer(x), changed, **FP32)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_init_distributions(kind):
    layer, _ = make_layer(kind, r=4)
    fan_in = layer.lora_A[0].numel()
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7  # kaiming_uniform(a=√5) bound
    assert (layer.lora_B == 0).all()
    big = LinearAdapter(nn.Linear(4000, 3), r=4, init="gaussian")
    assert (big.lora_B == 0).all()
    # 16000 samples: the std estimate is within 3 % of 1/r = 0.25 with overwhelming probability
    assert big.lora_A.std().item() == pytest.approx(0.25, rel=0.03)


def test_embedding_init_follows_peft():
    layer, _ = make_layer("embedding")
    assert (layer.lora_A == 0).all()
    assert layer.lora_B.std() > 0.5  # N(0, 1)


def test_bad_init_is_rejected():
    with pytest.raises(ValueError, match="init='xavier'"):
        make_layer("linear", init="xavier")


def test_only_adapter_parameters_trainable():
    layer, _ = make_layer("linear")
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"adapters.default.lora_A", "adapters.default.lora_B", "adapters.default.magnitude"}
    # the default adapter's state-dict keys are the layer's own, as before named adapters existed
    assert set(layer.state_dict()) == {"lora_A", "lora_B", "magnitude", "base.weight", "base.bias"}


# ---- gradients: detached norm (paper §4.3) vs exact -----------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("detach", [True, False])
def test_gradients_match_reference(kind, detach):
    layer, x = make_layer(kind, dtype=torch.float64, detach_norm=detach)
    perturb(layer)
    g = torch.randn(layer(x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (layer(x) * g).sum().backward()
    a, b, m = (t.requires_grad_(True) for t in params64(layer))
    (reference(layer, x, a, b, m, use_dora=True, s=layer.scaling, detach=detach) * g).sum().backward()
    assert_close(layer.lora_A.grad, a.grad, **FP64)
    assert_close(layer.lora_B.grad, b.grad, **FP64)
    assert_close(layer.magnitude.grad, m.grad, **FP64)
    # guard: the two modes really give different A/B gradients (so this test can tell them apart)
    a2, b2, m2 = (t.requires_grad_(True) for t in params64(layer))
    (reference(layer, x, a2, b2, m2, use_dora=True, s=layer.scaling, detach=not detach) * g).sum().backward()
    assert not torch.allclose(a.grad, a2.grad, **FP64)


@pytest.mark.parametrize("kind", ["linear", "hf_conv1d", "conv2d"])
def test_dropout_gradients_match_reference(kind):
    p = 0.3
    layer, x = make_layer(kind, dtype=torch.float64, dropout=p)
    perturb(layer)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) > p
    layer.lora_dropout = FixedMask(mask, p)
    layer.train()
    g = torch.randn(layer(x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (layer(x) * g).sum().backward()
    a, b, m = (t.requires_grad_(True) for t in params64(layer))
    (reference(layer, x, a, b, m, use_dora=True, s=layer.scaling, x_dropped=x * mask / (1 - p)) * g).sum().backward()
    for got, want in ((layer.lora_A.grad, a.grad), (layer.lora_B.grad, b.grad), (layer.magnitude.grad, m.grad)):
        assert_close(got, want, **FP64)


@pytest.mark.parametrize("kind", ["linear", "linear_plain", "hf_conv1d", "conv2d", "embedding"])
@pytest.mark.parametrize("detach", [False, True])
def test_gradcheck_layer_forward(kind, detach):
    layer, x = make_layer(kind, dtype=torch.float64, detach_norm=detach, r=2)
    perturb(layer)
    a, b, m = (t.clone().requires_grad_(True) for t in params64(layer))
    x = x[:1, ..., :4] if kind == "conv2d" else x[:1]  # one example: gradcheck perturbs every input element
    xs = () if kind == "embedding" else (x.clone().requires_grad_(True),)

    def forward(*tensors):
        inp = x if kind == "embedding" else tensors[0]
        rest = tensors[len(xs):]
        params = {"magnitude": rest[0]}
        if not detach:
            params.update(lora_A=rest[1], lora_B=rest[2])
        return functional_call(layer, params, (inp,))

    # Exact mode: the gradient of the forward in x, A, B, m. Detached mode: A/B gradients deliberately
    # ignore the norm's dependence on them (checked against the reference above), so only x and m here.
    inputs = xs + ((m, a, b) if not detach else (m,))
    assert gradcheck(forward, inputs)


# ---- merging -----------------------------------------------------------------------------------------------
def _wrap(kind: str, bias: bool = True, **config):
    case = make_case(kind, bias)
    model = nn.Sequential(case.base)
    inject(model, DoraConfig(target_modules=["0"], r=3, alpha=5.0, **config))
    model[0].use_fast_path = not kind.endswith("_plain")
    return model, case.x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_dora", [True, False])
def test_merge_unmerge_merge_and_unload(kind, use_dora):
    model, x = _wrap(kind, use_dora=use_dora)
    layer = model[0]
    perturb(layer)
    w0 = layer.base.weight.detach().clone()
    unmerged = model(x)
    assert_close(unmerged.double(), ref_forward(layer, x), **FP32)
    layer.merge()
    assert layer.merged
    assert_close(model(x), unmerged, **FP32)
    if use_dora:  # the merged weight's rows have norm m
        assert_close(base_weight_2d(layer).norm(dim=1), layer.magnitude.detach().double(), **FP32)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert_close(layer.base.weight.detach(), w0, rtol=1e-5, atol=1e-6)  # fp32 round-off of divide-then-subtract
    assert_close(model(x), unmerged, **FP32)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    merge_and_unload(model)
    assert type(model[0]) is type(layer.base) and model[0] is layer.base
    assert_close(model(x), unmerged, **FP32)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_merge_of_magnitude_only(kind):
    model, x = _wrap(kind, magnitude_only_modules=["0"])
    perturb(model[0])
    before = model(x)
    merge_and_unload(model)
    assert_close(model(x), before, **FP32)


# ---- zero-norm rows ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("how", ["cancel", "zero"])
def test_zero_norm_row_is_finite(kind, detach, how):
    layer, x = make_layer(kind, detach_norm=detach)
    if how == "cancel":  # W row = −s·B·A row
        perturb(layer)
        with torch.no_grad():
            delta = layer.scaling * (layer.lora_B_2d() @ layer.lora_A_2d())
            layer.weight_2d()[0] = -delta[0]
    else:  # a zero W row with B·A = 0
        with torch.no_grad():
            layer.weight_2d()[0] = 0
            if layer.lora_A is not None:
                layer.lora_B.zero_() if kind != "embedding" else layer.lora_A.zero_()
            layer.magnitude.fill_(1.0)
    layer.train()
    out = layer(x)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for name, p in layer.adapter_parameters().items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    layer.eval()
    with torch.no_grad():
        before = layer(x)
        w0 = layer.base.weight.clone()
        layer.merge()
        assert torch.isfinite(layer.base.weight).all()
        assert torch.isfinite(layer(x)).all()
        if how == "zero":  # (a cancelled row's direction is round-off noise: only finiteness is defined)
            assert_close(layer(x), before, **FP32)
        layer.unmerge()
        assert torch.isfinite(layer.base.weight).all()
        assert_close(layer.base.weight, w0, rtol=1e-5, atol=1e-5)  # fp32 round-off of the cancelled row


# ---- errors --------------------------------------------------------------------------------------------------
def test_grouped_conv_is_refused():
    with pytest.raises(ValueError, match="groups=2"):
        ConvAdapter(nn.Conv2d(4, 4, 3, groups=2))


@pytest.mark.parametrize("cls, module", [(LinearAdapter, nn.Conv2d(2, 2, 1)), (ConvAdapter, nn.Linear(2, 2)),
                                         (EmbeddingAdapter, nn.Linear(2, 2))])
def test_wrong_base_type_is_a_type_error(cls, module):
    with pytest.raises(TypeError, match=type(module).__name__):
        cls(module)


def test_non_floating_point_linear_weight_is_refused():
    # A quantized (integer) weight would give a meaningless norm and merge: refuse it with the fix named.
    linear = nn.Linear(8, 4)
    linear.weight = nn.Parameter(torch.zeros(4, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="int8 weight.*exclude_modules"):
        LinearAdapter(linear)
