"""QDoRA: DoRA and LoRA over a bitsandbytes 4-bit base (``bitsandbytes.nn.Linear4bit``, NF4 or FP4).

The frozen base weight stays packed (4 bits per weight plus one scale per block of 64). The layer computes
exactly what :class:`~torchdora.layers.linear.LinearAdapter` computes on the dequantized weight ``Ŵ``
(REFERENCE §1, §7):

    y = (m / ||Ŵ + s·B·A||) ⊙ (x Ŵᵀ + s·(x Aᵀ) Bᵀ) + b

- ``||Ŵ||²`` is computed once (the base is frozen) and ``Ŵ Aᵀ`` once per change of ``A``, both by dequantizing a
  bounded block of rows at a time (:func:`torchdora.functional.dequantized_row_blocks`), never all of ``Ŵ`` in fp32.
- The fused forward/backward of :mod:`torchdora.fast` keeps the packed weight, not a dequantized copy, for
  backward and dequantizes it again there, as QLoRA's own matmul does.
- CPU hazard (REFERENCE §7): on CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight into an inference-only
  layout after one eval-mode forward without gradients; ``bitsandbytes.matmul_4bit`` then takes a kernel with no
  backward and the gradients that flow through the layer are silently wrong. The adapter turns that repacking off
  for its base and undoes a repacking that already happened; :func:`disable_cpu_weight_repacking` does the same for
  every ``Linear4bit`` of a model (the ones not adapted pass gradients on to earlier layers too).
- A packed 4-bit weight cannot take the merged weight without re-quantizing it (a second rounding):
  :meth:`Linear4bitAdapter.merge` refuses, and :meth:`Linear4bitAdapter.merged_linear` returns a plain
  ``nn.Linear`` holding the merged dequantized weight (in the base's compute dtype, bf16/fp16/fp32).

bitsandbytes is an optional dependency (the ``qdora`` extra); this module imports it lazily.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdora import functional as DF
from torchdora.cache import CachedValue
from torchdora.layers.base import AdapterLayer

__all__ = ["Linear4bitAdapter", "is_linear4bit", "disable_cpu_weight_repacking", "dequantize_linear4bit"]

#: elements of ``Ŵ`` dequantized at a time for the norms: 4 Mi floats = 16 MiB of fp32
_BLOCK_ELEMENTS = 1 << 22


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a ``bitsandbytes.nn.Linear4bit`` (False when bitsandbytes is not installed)."""
    if "Linear4bit" not in type(module).__name__ and not any(
        c.__name__ == "Linear4bit" for c in type(module).__mro__
    ):
        return False  # cheap test first: never import bitsandbytes for models that cannot hold one
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def _unpack_cpu_weight(layer: nn.Module) -> None:
    """Undo bitsandbytes' inference-only CPU repacking of ``layer.weight`` (if it happened) and prevent it."""
    layer.support_avx512bf16_for_cpu = False
    state = getattr(layer.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # no public inverse exists

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)


def disable_cpu_weight_repacking(model: nn.Module) -> int:
    """Turn off (and undo) bitsandbytes' AVX512-BF16 inference repacking on every ``Linear4bit`` of ``model``.

    Call it on a 4-bit model before training: a repacked layer gives wrong gradients (REFERENCE §7). Returns the
    number of ``Linear4bit`` layers seen.
    """
    count = 0
    for module in model.modules():
        if is_linear4bit(module):
            _unpack_cpu_weight(module)
            count += 1
    return count


def _absmax(state: Any) -> Tensor:
    """The per-block scales of a 4-bit weight as fp32 ``(blocks,)``, undoing double quantization."""
    if not getattr(state, "nested", False):
        return state.absmax.float()
    from bitsandbytes.functional import dequantize_blockwise

    return (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def dequantize_linear4bit(layer: nn.Module, start: int = 0, stop: int | None = None,
                          absmax: Tensor | None = None) -> Tensor:
    """Rows ``start:stop`` of a ``Linear4bit`` weight, dequantized to its original dtype, ``(stop − start, in)``.

    Reads only the packed bytes and block scales of those rows; ``start·in`` and ``stop·in`` must fall on
    quantization-block boundaries (or ``stop`` be the last row). ``absmax`` may be passed in from
    :func:`_absmax` when several row blocks are read.
    """
    from bitsandbytes.functional import QuantState, dequantize_4bit

    _unpack_cpu_weight(layer)
    weight, state = layer.weight, layer.weight.quant_state
    out_features, in_features = state.shape
    stop = out_features if stop is None else stop
    if start == 0 and stop == out_features:
        return dequantize_4bit(weight.data, state)
    first, last = start * in_features, stop * in_features  # element range in the flattened weight
    if first % state.blocksize or (last % state.blocksize and stop != out_features) or first % 2 or last % 2:
        raise ValueError(f"rows {start}:{stop} do not fall on {state.blocksize}-element quantization blocks")
    packed = weight.data.view(torch.uint8).reshape(-1)[first // 2:(last + 1) // 2]
    scales = (_absmax(state) if absmax is None else absmax)[first // state.blocksize:math.ceil(last / state.blocksize)]
    rows = QuantState(absmax=scales, shape=torch.Size((stop - start, in_features)), code=state.code,
                      blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
    return dequantize_4bit(packed, rows)


class Linear4bitAdapter(AdapterLayer):
    """DoRA / LoRA around a ``bitsandbytes.nn.Linear4bit`` base (QDoRA); see the module doc.

    The adapter tensors default to fp32 (``dtype``), whatever the base's compute dtype; the norms are
    accumulated in fp32. ``weight_2d()`` returns a fresh dequantized copy (use it for analysis, not in a loop).
    """

    #: dtype of the ``nn.Linear`` that :meth:`merge` swaps in (``None``: the base's compute dtype)
    merge_dtype: torch.dtype | None = None

    def __init__(self, base: nn.Module, **kwargs) -> None:
        if not is_linear4bit(base):
            raise TypeError(f"Linear4bitAdapter wraps bitsandbytes.nn.Linear4bit, got {type(base).__name__}")
        _unpack_cpu_weight(base)
        if kwargs.get("dtype", torch.float32) is None:  # "the base's dtype": the packed storage is uint8
            kwargs["dtype"] = base.weight.quant_state.dtype
        self._base_sq_cache = CachedValue()  # checked against the packed weight's contents (torchdora.cache)
        super().__init__(base, **kwargs)

    @property
    def packed_base(self) -> nn.Module:
        """The ``Linear4bit`` (also while merged, when :attr:`base` is the merged ``nn.Linear``)."""
        return self.__dict__.get("_packed_base", self.base)

    @property
    def in_features(self) -> int:
        return self.packed_base.in_features

    @property
    def out_features(self) -> int:
        return self.packed_base.out_features

    def _lora_A_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.in_features)

    def _lora_B_shape(self, r: int) -> tuple[int, ...]:
        return (self.out_features, r)

    # ---- the packed weight ----------------------------------------------------------------------
    def _weight_storage(self) -> Tensor:
        return self.packed_base.weight

    def compute_dtype(self) -> torch.dtype:
        """The dtype the base multiplies in (``bnb_4bit_compute_dtype``), else the weight's original dtype."""
        return self.packed_base.compute_dtype or self.packed_base.weight.quant_state.dtype

    def weight_2d(self) -> Tensor:
        """The dequantized base weight ``Ŵ`` ``(out, in)``: a new tensor in the weight's original dtype."""
        return dequantize_linear4bit(self.packed_base)

    def _set_weight_2d(self, weight_2d: Tensor) -> None:
        raise RuntimeError("a 4-bit base weight cannot be overwritten; use merged_linear()")

    def _row_blocks(self):
        """``Ŵ`` as consecutive row blocks of about :data:`_BLOCK_ELEMENTS` elements, on quantization blocks."""
        _unpack_cpu_weight(self.packed_base)
        state = self.packed_base.weight.quant_state
        unit = state.blocksize // math.gcd(self.in_features, state.blocksize)  # rows that fill whole blocks
        rows = max(unit, (_BLOCK_ELEMENTS // self.in_features) // unit * unit)
        absmax = _absmax(state)
        return DF.dequantized_row_blocks(
            lambda start, stop: dequantize_linear4bit(self.packed_base, start, stop, absmax), self.out_features, rows
        )

    def base_sq_norm(self) -> Tensor:
        """``||Ŵ||²`` per row, computed block by block once and cached while the packed weight is unchanged."""
        return self._base_sq_cache.get(lambda: DF.blockwise_row_sq_norm(self._row_blocks()),
                                       sampled=(self.packed_base.weight,))

    def _row_norm(self, detach: bool) -> Tensor:
        """``||Ŵ + s·B·A||`` per row, ``(out,)`` fp32, with ``Ŵ Aᵀ`` from bounded dequantized row blocks."""
        if self.lora_A is None:
            return self.base_sq_norm().sqrt()
        a, b = self.lora_A_2d(), self.lora_B_2d()
        if detach:
            a, b = a.detach(), b.detach()
        with torch.no_grad():
            weight_at = DF.blockwise_weight_times_At(self._row_blocks(), a.detach())  # (out, r)
        if not detach:  # exact-gradient mode: Ŵ Aᵀ depends on A linearly, so d(Ŵ Aᵀ) = Ŵ dAᵀ
            weight_at = _LinearInA.apply(weight_at, a, self)
        return DF.row_norm_from_terms(self.base_sq_norm(), weight_at, a, b, self.scaling)

    def clear_cache(self) -> None:
        super().clear_cache()
        self._base_sq_cache.clear()

    # ---- forward ----------------------------------------------------------------------------------
    def _dequantize(self, dtype: torch.dtype):
        return lambda packed: dequantize_linear4bit(self.packed_base).to(dtype)

    def _base_product(self, x: Tensor) -> Tensor:
        import bitsandbytes as bnb

        _unpack_cpu_weight(self.packed_base)
        weight = self.packed_base.weight
        cdt = self.compute_dtype()
        return bnb.matmul_4bit(x.to(cdt), weight, quant_state=weight.quant_state).to(x.dtype)

    def _lora_product(self, x: Tensor) -> Tensor:
        a = self.lora_A
        return F.linear(F.linear(x.to(a.dtype), a), self.lora_B).to(x.dtype)

    def _bias(self) -> Tensor | None:
        return self.packed_base.bias

    def forward(self, x: Tensor) -> Tensor:
        _unpack_cpu_weight(self.packed_base)  # cheap attribute checks: someone may have switched it back on
        return super().forward(x)

    def _fast_forward(self, x: Tensor) -> Tensor | None:
        from torchdora.fast import dora_linear

        bias = self._bias()
        dropout = self._dropout_active() and self.lora_A is not None
        if (
            not x.is_floating_point()
            or torch.is_autocast_enabled(x.device.type)
            or (bias is not None and bias.requires_grad)
            or (dropout and type(self.lora_dropout) is not nn.Dropout)
        ):
            return None
        if bias is not None:
            bias = bias.to(x.dtype)
        save_output = (bias is None or x.dtype in (torch.float32, torch.float64)) and not self._magnitude_has_zero()
        return dora_linear(
            x, self.packed_base.weight, bias, self.lora_A, self.lora_B, self.dora_factor(), self.scaling,
            self.dropout_p if dropout else 0.0, save_output=save_output, recompute=self.recompute_output,
            dequantize=self._dequantize(x.dtype),
        )

    # ---- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Swap the 4-bit base for :meth:`merged_linear` (the packed layer is kept aside for :meth:`unmerge`).

        ``merge_and_unload`` then leaves that plain ``nn.Linear`` in the model: writing the merged weight back
        into 4 bits would round it a second time.
        """
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged; call unmerge() first")
        packed = self.base
        self.base = self.merged_linear(self.merge_dtype)
        self.__dict__["_packed_base"] = packed  # not a submodule: the state dict holds the merged layer only
        self.merged = True

    def unmerge(self) -> None:
        """Put the 4-bit base back, exactly as it was (no round-off: it was never overwritten)."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged; nothing to unmerge")
        self.base = self.__dict__.pop("_packed_base")
        self.merged = False

    @torch.no_grad()
    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W' = (m / ||Ŵ + s·B·A||) (Ŵ + s·B·A)`` (fp32 math) and the base's bias.

        ``dtype``: the new layer's dtype; ``None`` gives the base's compute dtype (bf16 for a usual QLoRA load).
        """
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is merged; unmerge() first")
        dtype = dtype or self.compute_dtype()
        weight = self.weight_2d()
        magnitude = None if self.magnitude is None else self.magnitude.detach()
        merged, _ = DF.merged_weight(weight.float(), self.lora_A_2d(), self.lora_B_2d(), magnitude, self.scaling)
        bias = self._bias()
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device,
                           dtype=dtype)
        linear.weight.copy_(merged)
        if bias is not None:
            linear.bias.copy_(bias)
        linear.requires_grad_(False)
        return linear


class _LinearInA(torch.autograd.Function):
    """Attach ``Ŵ Aᵀ`` (computed without autograd) to ``A``'s graph: ``∂(Ŵ Aᵀ)/∂A`` applied as ``gᵀ Ŵ``."""

    @staticmethod
    def forward(ctx: Any, weight_at: Tensor, lora_A: Tensor, layer: Linear4bitAdapter) -> Tensor:
        ctx.layer = layer
        return weight_at.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # grad: (out, r)
        grad_a, rows = None, 0
        for blk in ctx.layer._row_blocks():  # gᵀ Ŵ summed over row blocks, never all of Ŵ at once
            part = grad[rows:rows + blk.shape[0]].T @ blk.to(grad.dtype)  # (r, in)
            grad_a = part if grad_a is None else grad_a.add_(part)
            rows += blk.shape[0]
        return None, grad_a, None
