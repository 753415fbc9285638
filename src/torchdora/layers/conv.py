"""``nn.Conv1d/2d/3d`` adapters (``groups == 1``)."""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from torchdora.layers.base import AdapterLayer

__all__ = ["ConvAdapter"]


class ConvAdapter(AdapterLayer):
    """``nn.Conv1d/2d/3d`` (``groups == 1``): ``A`` a conv ``in → r`` with the base geometry, ``B`` 1×1 ``r → out``.

    ``ΔW = (B.view(out, r) @ A.view(r, -1)).view_as(W)``; the norm runs over every dim but the first.
    """

    feature_dim = 1

    def __init__(self, base: nn.Module, **kwargs) -> None:
        if not isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise TypeError(f"ConvAdapter wraps nn.Conv1d/2d/3d, got {type(base).__name__}")
        if base.groups != 1:
            raise ValueError(
                f"grouped convolutions are not supported (groups={base.groups}): a rank-r update of a grouped "
                "weight is not a low-rank product of the full weight. Exclude this module via exclude_modules."
            )
        self._conv: Callable[..., Tensor] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[base.weight.dim() - 2]
        super().__init__(base, **kwargs)

    def _lora_A_shape(self, r: int) -> tuple[int, ...]:
        w = self.base.weight
        return (r, w.shape[1], *w.shape[2:])

    def _lora_B_shape(self, r: int) -> tuple[int, ...]:
        w = self.base.weight
        return (w.shape[0], r, *([1] * (w.dim() - 2)))

    def weight_2d(self) -> Tensor:
        w = self.base.weight
        return w.view(w.shape[0], -1)

    def _base_product(self, x: Tensor) -> Tensor:
        # _conv_forward applies the base's stride, padding (and padding_mode), dilation and groups.
        return self.base._conv_forward(x, self.base.weight, None)

    def _lora_product(self, x: Tensor) -> Tensor:
        a = self.lora_A
        hidden = self.base._conv_forward(x.to(a.dtype), a, None)  # same geometry as the base, in → r
        return self._conv(hidden, self.lora_B).to(x.dtype)
