"""``nn.Embedding`` adapters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdora.layers.base import AdapterLayer

__all__ = ["EmbeddingAdapter"]


class EmbeddingAdapter(AdapterLayer):
    """``nn.Embedding`` (weight ``(V, d)``): ``A`` ``(r, V)``, ``B`` ``(d, r)``, norm of ``Wᵀ + s·B·A`` over ``V``.

    Initialisation follows PEFT's embedding convention (``A = 0``, ``B ~ N(0, 1)``): ``B·A`` still starts at
    zero, and ``B`` gets a gradient from the first step. Dropout is not applied to token ids.
    """

    def __init__(self, base: nn.Module, **kwargs) -> None:
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"EmbeddingAdapter wraps nn.Embedding, got {type(base).__name__}")
        kwargs = {**kwargs, "dropout": 0.0}
        super().__init__(base, **kwargs)

    def add_adapter(self, name: str, **kwargs):
        return super().add_adapter(name, **{**kwargs, "dropout": 0.0})  # token ids: nothing to drop

    def _lora_A_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.base.num_embeddings)

    def _lora_B_shape(self, r: int) -> tuple[int, ...]:
        return (self.base.embedding_dim, r)

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        if self.lora_A is None or self.lora_B is None:
            return
        with torch.no_grad():
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def weight_2d(self) -> Tensor:
        return self.base.weight.T  # (d, V)

    def _embed(self, ids: Tensor, table: Tensor) -> Tensor:
        b = self.base
        return F.embedding(ids, table, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)

    def _base_product(self, x: Tensor) -> Tensor:
        return self._embed(x, self.base.weight)

    def _lora_product(self, x: Tensor) -> Tensor:
        return self._embed(x, self.lora_A.T) @ self.lora_B.T  # (..., r) @ (r, d)
