"""DoRA's linear layer as one autograd function, so that DoRA costs what LoRA costs.

The plain composition of the DoRA forward (paper eq. 5 with the detached norm of §4.3),

    y = f ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b,        f = m / ||W + s·B·A||   (one factor per output feature),

lets autograd keep ``x`` (for ``A``'s gradient), ``x Aᵀ`` (for ``B``'s), and the pre-scale product
``z = x Wᵀ + s·(x Aᵀ) Bᵀ`` (for ``f``'s), and runs four elementwise passes over the ``(tokens, out)`` output
each way. :class:`DoraLinearFunction` instead

- adds the LoRA product into the base product inside the matrix multiply (``addmm``) and applies ``f`` and the
  bias in one more pass, in place;
- saves ``x``, ``h = x Aᵀ`` (what LoRA saves) and the layer's *output* ``y``: without dropout
  ``∂L/∂f = Σ_tokens ∂L/∂y ⊙ (y − b) / f``, and where the next op keeps ``y`` anyway (one that multiplies by
  it, as a gated MLP does with its up projection) it costs no extra memory (a bf16/fp16 layer with a bias, or a
  zero factor, saves ``z`` instead: see :func:`dora_linear`);
- with dropout ``x~ = dropout(x)`` it evaluates
  ``y = x Wᵀ + b + (f − 1) ⊙ (x~ Wᵀ) + f ⊙ s·(x~ Aᵀ) Bᵀ = (x − x~) Wᵀ + f ⊙ d + b`` with
  ``d = x~ Wᵀ + s·(x~ Aᵀ) Bᵀ``, and saves ``x`` (shared by every layer that reads it) and the boolean mask rather
  than a per-layer copy of ``x~``;
- with ``recompute=True`` keeps only what LoRA keeps and multiplies ``x Wᵀ`` (``x~ Wᵀ``) again in backward: for
  layers whose output nothing downstream keeps, where memory matters more than one more product.

The factor ``f`` is an input, so the same function serves the detached norm (``f`` built from a detached norm)
and the exact gradient (``f`` built from a norm that is in the graph): autograd takes ``∂L/∂f`` on from here.
On CUDA the elementwise passes run as fused Triton kernels when Triton is installed (:mod:`torchdora.kernels`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["DoraLinearFunction", "EvalPlan", "dora_linear", "dora_linear_eval", "dora_linear_forward", "eval_plan"]

_FULL_PRECISION = (torch.float32, torch.float64)


def _kernels(t: Tensor) -> Any | None:
    """The Triton kernel module when ``t`` is a CUDA fp32/bf16/fp16 tensor and Triton imports, else ``None``."""
    if not t.is_cuda or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    from torchdora import kernels  # lazy: imports Triton

    return kernels if kernels.available() else None


def _combine_(z: Tensor, h: Tensor | None, lora_B: Tensor | None, factor: Tensor, bias: Tensor | None,
              scaling: float) -> Tensor:
    """``f ⊙ (z + s·h Bᵀ) + b`` written into ``z``. ``z``: ``(N, out)``, ``h``: ``(N, r)``, ``factor``: ``(out,)``."""
    k = _kernels(z)
    if k is not None:
        return k.lora_combine_(z, h, lora_B, factor, bias, scaling)
    if h is not None:
        z.addmm_(h, lora_B.T, alpha=scaling)  # the rank-r product lands in the GEMM's accumulate
    if bias is None:
        return z.mul_(factor)
    return torch.addcmul(bias, z, factor, out=z)


def _scale_and_colsum(grad: Tensor, saved: Tensor, factor: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(grad ⊙ f, Σ_tokens grad ⊙ (saved − b))``: the scaled gradient ``(N, out)`` and an ``(out,)`` sum
    accumulated in at least fp32. ``bias`` is ``None`` when ``saved`` has no bias in it.
    """
    k = _kernels(grad)
    if k is not None:
        return k.scale_and_colsum(grad, saved, factor, bias)
    acc = _acc_dtype(grad.dtype)
    colsum = (grad * saved).sum(0, dtype=acc)
    if bias is not None:
        colsum = colsum - bias.to(acc) * grad.sum(0, dtype=acc)
    return grad * factor, colsum


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp32 for bf16/fp16/fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _safe_inverse(factor: Tensor) -> Tensor:
    """``1 / f`` in at least fp32, ``0`` where ``f == 0`` (a zero-norm row, whose ``z`` vanishes)."""
    # two kernels rather than a chain of where/ones/zeros: on a GPU this layer is launch-bound at small sizes
    return factor.to(_acc_dtype(factor.dtype)).reciprocal().nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _keep(mask: Tensor, dtype: torch.dtype, p: float) -> Tensor:
    """The dropout multiplier ``mask / (1 − p)`` as ``dtype``: ``x~ = x ⊙ keep``."""
    return mask.to(dtype).mul_(1.0 / (1.0 - p))


def dora_linear_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor | None, lora_B: Tensor | None,
    factor: Tensor, scaling: float, dropout_p: float = 0.0, dequantize: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The DoRA linear forward without autograd bookkeeping (inference, or no trainable input).

    ``x``: ``(..., in)``; ``weight``: ``(out, in)`` rows (or packed storage that ``dequantize`` turns into them);
    ``lora_A``: ``(r, in)``; ``lora_B``: ``(out, r)``; ``factor``: ``(out,)`` (``m / ||W + s·B·A||``); returns
    ``(..., out)`` in ``x.dtype``.
    """
    if dequantize is not None:
        weight = dequantize(weight)
    out_features = weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    f = factor.to(x.dtype)
    a = None if lora_A is None else lora_A.to(x.dtype)
    b = None if lora_B is None else lora_B.to(x.dtype)
    if dropout_p > 0 and a is not None:
        xd = torch.nn.functional.dropout(x2, dropout_p, True)
        y = x2 - xd
        y = torch.mm(y, weight.T) if bias is None else torch.addmm(bias, y, weight.T)
        d = torch.mm(xd, weight.T).addmm_(torch.mm(xd, a.T), b.T, alpha=scaling)  # x~ Wᵀ + s·(x~ Aᵀ) Bᵀ
        y.addcmul_(d, f)
    else:
        h = None if a is None else torch.mm(x2, a.T)
        y = _combine_(torch.mm(x2, weight.T), h, b, f, bias, scaling)
    return y.view(*x.shape[:-1], out_features)


#: what :func:`dora_linear_eval` reads besides ``x`` and ``W``: ``A``, ``f ⊙ s·B``, ``f`` and ``b`` in the input dtype
EvalPlan = tuple[Tensor | None, Tensor | None, Tensor, Tensor | None]


def eval_plan(bias: Tensor | None, lora_A: Tensor | None, lora_B: Tensor | None, factor: Tensor, scaling: float,
              dtype: torch.dtype) -> EvalPlan:
    """The adapter's tensors as :func:`dora_linear_eval` applies them, built once per adapter state (a layer
    caches it): ``A`` ``(r, in)``, ``f ⊙ s·B`` ``(out, r)`` (the scale and the factor folded into ``B``'s rows,
    computed in the factor's precision), ``f`` ``(out,)`` and ``b``, all in ``dtype``."""
    f = factor.to(dtype)
    b = None if bias is None else bias.to(dtype)
    if lora_A is None or lora_B is None:
        return None, None, f, b
    scaled_B = (lora_B.to(factor.dtype) * (scaling * factor).unsqueeze(1)).to(dtype)
    return lora_A.to(dtype), scaled_B, f, b


def dora_linear_eval(x: Tensor, weight: Tensor, plan: EvalPlan) -> Tensor:
    """The DoRA linear forward for inference from a prepared :func:`eval_plan`, in four operations:

        y = f ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b = (x Aᵀ)(f ⊙ s·B)ᵀ + b + f ⊙ (x Wᵀ),

    the bias added by the last product and ``f ⊙ x Wᵀ`` accumulated into it, as many operations as LoRA's own
    forward (``x Wᵀ + b``, two rank-``r`` products, the scaled add). ``x`` ``(..., in)`` in the plan's dtype,
    ``weight`` ``(out, in)``; returns ``(..., out)``.
    """
    lora_A, scaled_B, f, bias = plan
    z = torch.nn.functional.linear(x, weight)
    if lora_A is None:  # a magnitude-only layer
        return z.mul_(f) if bias is None else torch.addcmul(bias, z, f, out=z)
    y = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A), scaled_B, bias)
    return y.addcmul_(z, f)


class DoraLinearFunction(torch.autograd.Function):
    """``y = f ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b`` (and the dropout form) with LoRA's saved tensors; see the module doc.

    Gradients flow to ``x``, ``lora_A``, ``lora_B`` and ``factor``; the base ``weight`` and ``bias`` are frozen.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor | None,
                lora_B: Tensor | None, factor: Tensor, scaling: float, dropout_p: float,
                save_output: bool, recompute: bool = False,
                dequantize: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        cdt = x.dtype
        ctx.dequantize = dequantize
        stored, weight = weight, (weight if dequantize is None else dequantize(weight))  # a quantized base
        out_features, in_features = weight.shape  # is kept packed (stored) and dequantized again in backward
        x2 = x.reshape(-1, in_features)  # (N, in), a view of x when x is contiguous
        f = factor.to(cdt)  # the factor exactly as applied; its inverse recovers z from y
        a = None if lora_A is None else lora_A.to(cdt)
        b = None if lora_B is None else lora_B.to(cdt)
        ctx.scaling, ctx.dropout_p, ctx.x_shape = scaling, dropout_p, x.shape
        ctx.param_dtypes = (None if lora_A is None else lora_A.dtype, factor.dtype)
        if dropout_p > 0 and a is not None:
            xd, mask = torch.native_dropout(x2, dropout_p, True)  # same RNG draw as nn.Dropout
            y = x2 - xd
            y = torch.mm(y, weight.T) if bias is None else torch.addmm(bias, y, weight.T)  # (x − x~) Wᵀ + b
            h = torch.mm(xd, a.T)  # (N, r)
            d = torch.mm(xd, weight.T)
            del xd  # backward rebuilds x~ from x and the mask: x is shared with the other readers of x
            d.addmm_(h, b.T, alpha=scaling)  # d = x~ Wᵀ + s·(x~ Aᵀ) Bᵀ, (N, out)
            y.addcmul_(d, f)
            out = y.view(*x.shape[:-1], out_features)
            ctx.mode = "dropout"
            ctx.save_for_backward(x, stored, a, b, f, h, None if recompute else d, mask)
            return out
        h = None if a is None else torch.mm(x2, a.T)  # (N, r)
        z = torch.mm(x2, weight.T)  # (N, out)
        if recompute:  # keep what LoRA keeps; backward multiplies x Wᵀ again
            out = _combine_(z, h, b, f, bias, scaling).view(*x.shape[:-1], out_features)
            ctx.mode = "recompute"
            ctx.save_for_backward(x, stored, a, b, f, h, None, None)
            return out
        if save_output:
            out = _combine_(z, h, b, f, bias, scaling).view(*x.shape[:-1], out_features)
            ctx.mode = "output"
            ctx.save_for_backward(x, stored, a, b, f, h, out, bias)
            return out
        if h is not None:
            z.addmm_(h, b.T, alpha=scaling)
        y = z * f if bias is None else torch.addcmul(bias, z, f)
        out = y.view(*x.shape[:-1], out_features)
        ctx.mode = "pre_scale"
        ctx.save_for_backward(x, stored, a, b, f, h, z, None)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, a, b, f, h, saved, extra = ctx.saved_tensors
        if ctx.dequantize is not None:
            weight = ctx.dequantize(weight)
        s = ctx.scaling
        out_features, in_features = weight.shape
        need_x, _, _, need_a, need_b, need_f = ctx.needs_input_grad[:6]
        g = grad_out.reshape(-1, out_features)
        x2 = x.reshape(-1, in_features)
        keep = _keep(extra, x.dtype, ctx.dropout_p) if ctx.mode == "dropout" else None  # (N, in): x~ = x ⊙ keep
        if saved is None:  # recompute: z (no dropout) or d (dropout)
            saved = torch.mm(x2 if keep is None else x2 * keep, weight.T)
            if h is not None:
                saved.addmm_(h, b.T, alpha=s)
        if ctx.mode == "output":  # saved = y, extra = bias: Σ g ⊙ z = Σ g ⊙ (y − b) / f
            dz, colsum = _scale_and_colsum(g, saved.reshape(-1, out_features), f, extra)
            grad_f = colsum * _safe_inverse(f)
        else:  # saved = z (no dropout) or d (dropout): Σ g ⊙ saved
            dz, grad_f = _scale_and_colsum(g, saved, f, None)
        grad_a = grad_b = dh = None
        if a is not None and (need_a or need_b or need_x):
            if need_b:
                grad_b = torch.mm(dz.T, h).mul_(s)  # (out, r)
            dh = torch.mm(dz, b).mul_(s)  # (N, r)
        if ctx.mode == "dropout":
            if need_a:
                grad_a = torch.mm(dh.T, x2 * keep)
            grad_x = None
            if need_x:
                # x enters as (x − x~) Wᵀ and as x~ in d: ∂L/∂x = g W + keep ⊙ ((f − 1) ⊙ g W + ∂L/∂h A)
                inner = torch.mm(dz - g, weight)
                inner.addmm_(dh, a)
                grad_x = torch.mm(g, weight).addcmul_(inner, keep).view(ctx.x_shape)
        else:
            if need_a and a is not None:
                grad_a = torch.mm(dh.T, x2)  # (r, in)
            grad_x = None
            if need_x:
                grad_x = torch.mm(dz, weight)
                if a is not None:
                    grad_x.addmm_(dh, a)
                grad_x = grad_x.view(ctx.x_shape)
        a_dtype, f_dtype = ctx.param_dtypes
        if grad_a is not None:
            grad_a = grad_a.to(a_dtype)
        if grad_b is not None:
            grad_b = grad_b.to(a_dtype)
        grad_factor = grad_f.to(f_dtype) if need_f else None
        return grad_x, None, None, grad_a, grad_b, grad_factor, None, None, None, None, None


def dora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor | None, lora_B: Tensor | None,
    factor: Tensor, scaling: float, dropout_p: float = 0.0, save_output: bool | None = None,
    recompute: bool = False, dequantize: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """DoRA linear forward ``f ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b`` (dropout form when ``dropout_p > 0``), fused.

    Shapes: ``x`` ``(..., in)``, ``weight`` ``(out, in)`` (frozen), ``bias`` ``(out,)`` or ``None`` (frozen),
    ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)`` (``None`` for a magnitude-only layer), ``factor`` ``(out,)``
    = ``m / ||W + s·B·A||``. Returns ``(..., out)`` in ``x.dtype``.

    ``save_output`` chooses what backward keeps for ``∂L/∂f``: the output ``y`` (free when the next op keeps it)
    or the pre-scale product ``z``. Recovering ``z`` from ``y`` divides by ``f``, so it needs every factor
    non-zero, and in bf16/fp16 with a bias the subtraction ``y − b`` would cancel bits; ``None`` decides from
    these (reading ``factor`` on the host, a device sync on CUDA: pass it when known).

    ``recompute=True`` keeps neither: backward multiplies ``x Wᵀ`` (``x~ Wᵀ`` with dropout) again, so the layer
    keeps exactly what LoRA keeps (``x`` and ``x Aᵀ``) at the cost of one more ``(N, in) × (in, out)`` product.
    Worth it where nothing downstream keeps the output anyway (a projection followed by a rotary embedding or a
    residual add) and activation memory is the limit.

    ``dequantize`` (a quantized base, e.g. bitsandbytes NF4): ``weight`` is the packed storage and
    ``dequantize(weight)`` the ``(out, in)`` matrix in ``x.dtype``; backward keeps the packed storage and
    dequantizes again, as QLoRA's own matmul does, so no full-precision copy outlives the forward.
    """
    if dropout_p > 0 and lora_A is None:
        dropout_p = 0.0  # a magnitude-only layer has no LoRA input to drop (the reference form does the same)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_A, lora_B, factor)
    )
    if not needs_grad:
        return dora_linear_forward(x, weight, bias, lora_A, lora_B, factor, scaling, dropout_p, dequantize)
    if save_output is None:
        save_output = (bias is None or x.dtype in _FULL_PRECISION) and bool((factor != 0).all())
    return DoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, factor, scaling, dropout_p, save_output,
                                    recompute, dequantize)
