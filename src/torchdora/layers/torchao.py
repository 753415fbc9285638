"""DoRA and LoRA over an 8-bit base: an ``nn.Linear`` whose weight torchao quantized to int8 (weight only).

torchao's ``Int8WeightOnlyConfig`` (``torchao.quantization.quantize_``) replaces a linear layer's weight by an
``Int8Tensor``: one int8 value per weight and one fp32 scale (and zero point) per row, ``Ŵ = (q − z)·s``. Its linear
kernel multiplies by the int8 values and rescales the output, and passes gradients to the input; it implements few
other operations, so the norms, merging and the fused DoRA backward read ``q``, ``z`` and ``s`` directly
(:class:`~torchdora.layers.quantized.QuantizedLinearAdapter`, where everything but reading the format lives).

torchao is an optional dependency (the ``int8`` extra); this module imports it lazily.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdora.layers.quantized import QuantizedLinearAdapter

__all__ = ["Int8LinearAdapter", "is_int8_linear", "dequantize_int8_layers"]


def _is_int8_tensor(weight: object) -> bool:
    if not any(c.__name__ == "Int8Tensor" for c in type(weight).__mro__):
        return False  # cheap test first: never import torchao for models that cannot hold one
    try:
        from torchao.quantization import Int8Tensor
    except ImportError:
        return False
    return isinstance(weight, Int8Tensor)


def is_int8_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` holding a per-row torchao int8 weight."""
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.Linear) or not _is_int8_tensor(weight):
        return False
    return list(weight.block_size) == [1, weight.shape[1]]  # one scale per row (torchao's default for int8)


def _dequantize(weight: Tensor, start: int, stop: int, dtype: torch.dtype) -> Tensor:
    """Rows ``start:stop`` of an int8 weight, ``(q − z)·s`` computed in fp32, as ``dtype``."""
    q, scale = weight.qdata[start:stop].float(), weight.scale[start:stop].float().reshape(-1, 1)
    zero = weight.zero_point
    if zero is not None:
        q = q - zero[start:stop].float().reshape(-1, 1)
    return (q * scale).to(dtype)


def dequantize_int8_layers(model: nn.Module) -> int:
    """Give every int8 ``nn.Linear`` of ``model`` its dequantized weight back (in the weight's logical dtype), e.g.
    before saving a merged model; returns how many were changed."""
    count = 0
    for module in model.modules():
        if is_int8_linear(module):
            weight = module.weight
            module.weight = nn.Parameter(_dequantize(weight, 0, weight.shape[0], weight.dtype),
                                         requires_grad=False)
            count += 1
    return count


class Int8LinearAdapter(QuantizedLinearAdapter):
    """DoRA / LoRA around an ``nn.Linear`` with a torchao int8 weight; see the module doc.

    ``Ŵ = (q − z)·s`` is computed in fp32 from the stored int8 values and per-row scales; the base product is
    torchao's own int8 kernel.
    """

    def __init__(self, base: nn.Module, **kwargs) -> None:
        if not is_int8_linear(base):
            raise TypeError(f"Int8LinearAdapter wraps an nn.Linear with a per-row torchao Int8Tensor weight, got "
                            f"{type(base).__name__} holding {type(getattr(base, 'weight', None)).__name__}")
        super().__init__(base, **kwargs)

    @staticmethod
    def _compute_dtype_of(base: nn.Module) -> torch.dtype:
        return base.weight.dtype  # the dtype the weight was quantized from, and the one its kernel returns

    def _weight_storage(self) -> Tensor:
        """The int8 values (what the cache keys check; torchao's tensor itself cannot even be viewed)."""
        return self.packed_base.weight.qdata

    def dequantize_rows(self, start: int = 0, stop: int | None = None) -> Tensor:
        weight = self.packed_base.weight
        return _dequantize(weight, start, weight.shape[0] if stop is None else stop, torch.float32)

    def _base_product(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.compute_dtype()), self.packed_base.weight).to(x.dtype)
