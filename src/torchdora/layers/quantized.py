"""DoRA and LoRA over a linear layer whose frozen weight is stored quantized (QDoRA), whatever the format.

The layer computes exactly what :class:`~torchdora.layers.linear.LinearAdapter` computes on the dequantized weight
``Ŵ`` (paper eq. 5):

    y = (m / ||Ŵ + s·B·A||) ⊙ (x Ŵᵀ + s·(x Aᵀ) Bᵀ) + b

- ``||Ŵ||²`` is computed once (the base is frozen) and ``Ŵ Aᵀ`` once per change of ``A``, both by dequantizing a
  bounded block of rows at a time (:func:`torchdora.functional.dequantized_row_blocks`), never all of ``Ŵ`` in fp32.
- The fused forward/backward of :mod:`torchdora.fast` keeps the quantized weight, not a dequantized copy, for
  backward and dequantizes it again there, as QLoRA's own matmul does.
- A quantized weight cannot take the merged weight without re-quantizing it (a second rounding):
  :meth:`QuantizedLinearAdapter.merge` swaps in :meth:`QuantizedLinearAdapter.merged_linear`, a plain ``nn.Linear``
  holding the merged dequantized weight, and :meth:`~QuantizedLinearAdapter.unmerge` puts the quantized layer back.

A format is a subclass that says how to read its weight: :meth:`~QuantizedLinearAdapter.dequantize_rows`,
:meth:`~QuantizedLinearAdapter.row_unit`, :meth:`~QuantizedLinearAdapter.compute_dtype` and
:meth:`~QuantizedLinearAdapter._base_product` (bitsandbytes NF4/FP4 in ``bnb.py``, torchao int8 in ``torchao.py``).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdora import functional as DF
from torchdora.cache import CachedValue
from torchdora.layers.base import AdapterLayer

__all__ = ["QuantizedLinearAdapter"]

#: elements of ``Ŵ`` dequantized at a time for the norms: 4 Mi floats = 16 MiB of fp32
BLOCK_ELEMENTS = 1 << 22


class QuantizedLinearAdapter(AdapterLayer):
    """DoRA / LoRA around a linear layer with a quantized frozen weight; see the module doc.

    The adapter tensors default to fp32 (``dtype``; ``None``: the base's compute dtype), whatever the weight's
    storage; the norms are accumulated in fp32. ``weight_2d()`` returns a fresh dequantized copy (use it for
    analysis, not in a loop).
    """

    stacks_mixed_batch = True
    #: dtype of the ``nn.Linear`` that :meth:`merge` swaps in (``None``: the base's compute dtype)
    merge_dtype: torch.dtype | None = None

    def __init__(self, base: nn.Module, **kwargs) -> None:
        self._base_sq_cache = CachedValue()  # checked against the quantized weight's storage (torchdora.cache)
        if kwargs.get("dtype", torch.float32) is None:  # "the base's dtype": the storage itself is integer
            kwargs["dtype"] = self._compute_dtype_of(base)
        super().__init__(base, **kwargs)

    # ---- what a format provides -----------------------------------------------------------------------
    @staticmethod
    def _compute_dtype_of(base: nn.Module) -> torch.dtype:
        """The dtype ``base`` multiplies in."""
        raise NotImplementedError

    def dequantize_rows(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` of ``Ŵ`` ``(stop − start, in)``, reading only those rows' stored values and scales;
        ``start`` and ``stop`` are multiples of :meth:`row_unit` (or ``stop`` the last row)."""
        raise NotImplementedError

    def row_unit(self) -> int:
        """Rows that :meth:`dequantize_rows` can start and stop on (a quantization block's rows)."""
        return 1

    def _base_product(self, x: Tensor) -> Tensor:
        """``x Ŵᵀ`` through the format's own kernel, in ``x.dtype``."""
        raise NotImplementedError

    # ---- the quantized weight ---------------------------------------------------------------------------
    @property
    def packed_base(self) -> nn.Module:
        """The quantized layer (also while merged, when :attr:`base` is the merged ``nn.Linear``)."""
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

    def _weight_storage(self) -> Tensor:
        return self.packed_base.weight

    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype_of(self.packed_base)

    def weight_2d(self) -> Tensor:
        """The dequantized base weight ``Ŵ`` ``(out, in)``: a new tensor."""
        return self.dequantize_rows()

    def _set_weight_2d(self, weight_2d: Tensor) -> None:
        raise RuntimeError(f"a quantized base weight ({type(self).__name__}) cannot be overwritten; use "
                           "merged_linear()")

    def _row_blocks(self, block_elements: int | None = None) -> Iterator[Tensor]:
        """``Ŵ`` as consecutive row blocks of about ``block_elements`` (:data:`BLOCK_ELEMENTS`) elements, on
        :meth:`row_unit` rows."""
        unit = self.row_unit()
        rows = max(unit, ((block_elements or BLOCK_ELEMENTS) // self.in_features) // unit * unit)
        return DF.dequantized_row_blocks(self.dequantize_rows, self.out_features, rows)

    def base_sq_norm(self) -> Tensor:
        """``||Ŵ||²`` per row, computed block by block once and cached while the stored weight is unchanged."""
        return self._base_sq_cache.get(lambda: DF.blockwise_row_sq_norm(self._row_blocks()),
                                       (self._weight_storage(),))

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
        return lambda stored: self.dequantize_rows().to(dtype)

    def _lora_product(self, x: Tensor) -> Tensor:
        a = self.lora_A
        return F.linear(F.linear(x.to(a.dtype), a), self.lora_B).to(x.dtype)

    def _bias(self) -> Tensor | None:
        return self.packed_base.bias

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
            x, self._weight_storage(), bias, self.lora_A, self.lora_B, self.dora_factor(), self.scaling,
            self.dropout_p if dropout else 0.0, save_output=save_output, recompute=self.recompute_output,
            dequantize=self._dequantize(x.dtype),
        )

    # ---- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Swap the quantized base for :meth:`merged_linear` of every merged adapter (the quantized layer is kept
        aside for :meth:`unmerge`); the same rule and checks as :meth:`AdapterLayer.merge`.

        ``merge_and_unload`` then leaves that plain ``nn.Linear`` in the model: writing the merged weight back
        into the quantized format would round it a second time.
        """
        names = self._names_to_merge(adapter_names)
        if not names:
            return
        linear = self.merged_linear(self.merge_dtype, self.merged_adapters + names)
        if not self.merged:
            self.__dict__["_packed_base"] = self.base  # not a submodule: the state dict holds the merged layer
        self.base = linear
        self.merged_adapters = self.merged_adapters + names
        self.active_adapters = self.active_adapters + [n for n in names if n not in self.active_adapters]

    def unmerge(self) -> None:
        """Put the quantized base back, exactly as it was (no round-off: it was never overwritten)."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged; nothing to unmerge")
        self.base = self.__dict__.pop("_packed_base")
        self.merged_adapters = []

    @torch.no_grad()
    def merged_linear(self, dtype: torch.dtype | None = None, adapter_names: Sequence[str] | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``Ŵ`` with ``adapter_names`` (default: the current adapter) merged by the
        multi-adapter rule (:func:`torchdora.functional.merged_weight_of_adapters`, fp32 math), and the base's bias.

        ``dtype``: the new layer's dtype; ``None`` gives the base's compute dtype.
        """
        dtype = dtype or self.compute_dtype()
        weight = self.weight_2d()
        names = [self.current_adapter] if adapter_names is None else list(adapter_names)
        merged, _ = DF.merged_weight_of_adapters(weight.float(), [self.adapter_terms(n) for n in names])
        if not bool(torch.isfinite(merged.to(dtype)).all()):
            raise ValueError(f"merging {names} into {type(self).__name__} gives a non-finite weight (NaN or inf in "
                             f"an adapter, or an overflow in {dtype}); the layer is left unmerged")
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
    def forward(ctx: Any, weight_at: Tensor, lora_A: Tensor, layer: QuantizedLinearAdapter) -> Tensor:
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
