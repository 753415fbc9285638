"""Adapter layers, one file per kind of base module, all sharing :class:`~torchdora.layers.base.AdapterLayer`.

- :class:`LinearAdapter` (``linear.py``): ``nn.Linear`` and transformers' ``Conv1D`` (weight stored ``(in, out)``).
- :class:`ConvAdapter` (``conv.py``): ``nn.Conv1d/2d/3d`` with ``groups == 1``; ``A`` is a conv ``in → r`` with the
  base kernel, stride, padding and dilation, ``B`` a 1×1 conv ``r → out``.
- :class:`EmbeddingAdapter` (``embedding.py``): ``nn.Embedding``; the output feature is the embedding dimension.
- :class:`Linear4bitAdapter` (``bnb.py``): bitsandbytes' 4-bit ``Linear4bit`` (NF4/FP4), QDoRA; the weight stays
  packed and is dequantized a block of rows at a time.
- :class:`Int8LinearAdapter` (``torchao.py``): an ``nn.Linear`` whose weight torchao quantized to int8 (weight
  only, one scale per row). Both quantized kinds share :class:`QuantizedLinearAdapter` (``quantized.py``).
- :class:`VeraAdapter` (``vera.py``): VeRA / DVoRA on ``nn.Linear`` and ``Conv1D``, with the model's shared
  :class:`VeraProjection`; :func:`torchdora.inject` builds it when ``DoraConfig(use_vera=True)``.

A new kind of base (a quantized linear layer, another adapter method) is a new file here that subclasses
:class:`AdapterLayer` and is listed in :func:`adapter_class_for`.
"""

from __future__ import annotations

from torch import nn

from torchdora.layers.base import AdapterLayer, is_conv1d
from torchdora.layers.bnb import Linear4bitAdapter, is_linear4bit
from torchdora.layers.conv import ConvAdapter
from torchdora.layers.embedding import EmbeddingAdapter
from torchdora.layers.linear import LinearAdapter
from torchdora.layers.quantized import QuantizedLinearAdapter
from torchdora.layers.torchao import Int8LinearAdapter, is_int8_linear
from torchdora.layers.vera import VeraAdapter, VeraProjection

__all__ = [
    "AdapterLayer", "LinearAdapter", "ConvAdapter", "EmbeddingAdapter", "Linear4bitAdapter", "Int8LinearAdapter",
    "QuantizedLinearAdapter", "VeraAdapter",
    "VeraProjection", "FUSED_ADAPTERS", "adapter_class_for", "is_conv1d",
]

#: adapter classes whose DoRA forward is the fused autograd function (:mod:`torchdora.fast`): the ones that can
#: recompute ``x Wᵀ`` in backward rather than keep their output (``recompute_modules``)
FUSED_ADAPTERS: tuple[type[AdapterLayer], ...] = (LinearAdapter, QuantizedLinearAdapter)


def adapter_class_for(module: nn.Module) -> type[AdapterLayer] | None:
    """The adapter class that wraps ``module``, or ``None`` if its type is not supported."""
    if is_linear4bit(module):  # before nn.Linear: Linear4bit subclasses it
        return Linear4bitAdapter
    if is_int8_linear(module):  # before nn.Linear: an nn.Linear holding an int8 tensor
        return Int8LinearAdapter
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return LinearAdapter
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return ConvAdapter
    if isinstance(module, nn.Embedding):
        return EmbeddingAdapter
    return None
