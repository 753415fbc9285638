"""QDoRA: DoRA and LoRA over a bitsandbytes 4-bit base (``bitsandbytes.nn.Linear4bit``, NF4 or FP4).

The frozen base weight stays packed (4 bits per weight plus one scale per block of 64). The layer computes
exactly what :class:`~torchdora.layers.linear.LinearAdapter` computes on the dequantized weight ``Ŵ``
(paper eq. 5 on the dequantized weight; docs/memory.md):

    y = (m / ||Ŵ + s·B·A||) ⊙ (x Ŵᵀ + s·(x Aᵀ) Bᵀ) + b

- Norms, the fused forward/backward and merging are :class:`~torchdora.layers.quantized.QuantizedLinearAdapter`'s
  (bounded dequantized row blocks, the packed weight kept for backward); this module reads the 4-bit format.
- CPU hazard (docs/memory.md): on CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight into an inference-only
  layout after one eval-mode forward without gradients; ``bitsandbytes.matmul_4bit`` then takes a kernel with no
  backward and the gradients that flow through the layer are silently wrong. The adapter turns that repacking off
  for its base and undoes a repacking that already happened; :func:`disable_cpu_weight_repacking` does the same for
  every ``Linear4bit`` of a model (the ones not adapted pass gradients on to earlier layers too).
- A packed 4-bit weight cannot take the merged weight without re-quantizing it (a second rounding):
  :meth:`Linear4bitAdapter.merge` swaps in :meth:`Linear4bitAdapter.merged_linear`, a plain ``nn.Linear`` holding
  the merged dequantized weight (in the base's compute dtype, bf16/fp16/fp32).

bitsandbytes is an optional dependency (the ``qdora`` extra); this module imports it lazily.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from torchdora import functional as DF
from torchdora.layers.quantized import BLOCK_ELEMENTS, QuantizedLinearAdapter

__all__ = ["Linear4bitAdapter", "is_linear4bit", "disable_cpu_weight_repacking", "dequantize_linear4bit"]

#: elements of ``Ŵ`` dequantized at a time for the norms (16 MiB of fp32)
_BLOCK_ELEMENTS = BLOCK_ELEMENTS


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
    """Undo bitsandbytes' inference-only CPU repacking of ``layer.weight`` (if it happened) and prevent it.

    The repacking reorders the 4-bit codes (undone exactly) and turns the block scales into a transposed bf16
    table (un-nesting double-quantized ones). bitsandbytes' own inverse leaves a non-nested table transposed (the
    weights come back scrambled) and re-quantizes a nested one (a second rounding). Here the scales go back to their
    order as fp32 copies of the bf16 values the repacked kernel used, not nested: the layer then computes what it
    computed while repacked, and its dequantized weight is that of the standard kernel.
    """
    layer.support_avx512bf16_for_cpu = False
    state = getattr(layer.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # no public inverse exists

    scales = state.absmax  # (in / blocksize, out) bf16
    state.original_nested = False  # keep the scales as they are: no re-quantization
    codes, state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
    state.absmax = scales.T.reshape(-1).float().contiguous()  # (out · in / blocksize,) in row-major block order
    state.nested = False
    layer.weight.data, layer.weight.quant_state = codes, state


def disable_cpu_weight_repacking(model: nn.Module) -> int:
    """Turn off (and undo) bitsandbytes' AVX512-BF16 inference repacking on every ``Linear4bit`` of ``model``.

    Call it on a 4-bit model before training: a repacked layer gives wrong gradients (docs/memory.md). Returns the
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


class Linear4bitAdapter(QuantizedLinearAdapter):
    """DoRA / LoRA around a ``bitsandbytes.nn.Linear4bit`` base (QDoRA); see the module doc and
    :class:`~torchdora.layers.quantized.QuantizedLinearAdapter`, which holds everything but reading the format.

    The adapter tensors default to fp32 (``dtype``), whatever the base's compute dtype; the norms are
    accumulated in fp32. ``weight_2d()`` returns a fresh dequantized copy (use it for analysis, not in a loop).
    """

    @classmethod
    def prepare_model(cls, model: nn.Module) -> None:
        """Every ``Linear4bit`` of the model, adapted or not, stops (and undoes) the CPU inference repacking: one
        left repacked has no backward, and the gradients of every adapter before it would be zero."""
        disable_cpu_weight_repacking(model)

    def __init__(self, base: nn.Module, **kwargs) -> None:
        if not is_linear4bit(base):
            raise TypeError(f"Linear4bitAdapter wraps bitsandbytes.nn.Linear4bit, got {type(base).__name__}")
        _unpack_cpu_weight(base)
        super().__init__(base, **kwargs)

    @staticmethod
    def _compute_dtype_of(base: nn.Module) -> torch.dtype:
        """``bnb_4bit_compute_dtype``, else the weight's original dtype."""
        return base.compute_dtype or base.weight.quant_state.dtype

    def dequantize_rows(self, start: int = 0, stop: int | None = None, absmax: Tensor | None = None) -> Tensor:
        return dequantize_linear4bit(self.packed_base, start, stop, absmax)

    def row_unit(self) -> int:
        """Rows that fill whole quantization blocks."""
        return self.packed_base.weight.quant_state.blocksize // math.gcd(
            self.in_features, self.packed_base.weight.quant_state.blocksize)

    def _row_blocks(self, block_elements: int | None = None):
        """``Ŵ`` as consecutive row blocks of about :data:`_BLOCK_ELEMENTS` elements, on quantization blocks; the
        block scales are decoded once for all of them."""
        _unpack_cpu_weight(self.packed_base)
        unit = self.row_unit()
        rows = max(unit, ((block_elements or _BLOCK_ELEMENTS) // self.in_features) // unit * unit)
        absmax = _absmax(self.packed_base.weight.quant_state)
        return DF.dequantized_row_blocks(lambda start, stop: self.dequantize_rows(start, stop, absmax),
                                         self.out_features, rows)

    def _base_product(self, x: Tensor) -> Tensor:
        import bitsandbytes as bnb

        _unpack_cpu_weight(self.packed_base)
        weight = self.packed_base.weight
        return bnb.matmul_4bit(x.to(self.compute_dtype()), weight, quant_state=weight.quant_state).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        _unpack_cpu_weight(self.packed_base)  # cheap attribute checks: someone may have switched it back on
        return super().forward(x)
