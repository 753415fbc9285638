"""Mixed-adapter batches: each row of one batch through its own adapter (:func:`torchdora.mixed_batch`).

One base product for the whole batch; each adapter's low-rank product and cached DoRA factor on its rows only, or,
for linear kinds without autograd, two products against every adapter of the batch stacked together
(:meth:`MixedBatchMixin._mixed_stacked`). :class:`MixedBatchMixin` holds that logic for
:class:`torchdora.layers.base.AdapterLayer`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from torchdora.cache import CachedValue

__all__ = ["MixedBatchMixin", "MIXED_STACK_MAX"]

#: most adapters in a mixed batch multiplied all together (each token against every adapter's ``A`` and ``B``);
#: more run one adapter at a time
MIXED_STACK_MAX = 8


class MixedBatchMixin:
    """Mixed-adapter forward for an adapter layer (uses its ``adapters``, ``using``, ``_base_product``,
    ``_lora_product``, ``dora_factor``, ``_cache_inputs`` and ``_add_bias``)."""

    #: a mixed-adapter batch runs as two batched products over per-row stacked ``A``, ``s·B`` (layers whose
    #: update is ``(x Aᵀ) Bᵀ`` on the last dim: linear kinds), rather than one small product per adapter
    stacks_mixed_batch: bool = False
    #: whether :meth:`_cache_inputs` is the base one (``A``, ``B``, the weight): the stacks' cache key is then
    #: read straight from the adapters; a kind with inputs of its own (VeRA) sets ``False``
    _plain_cache_inputs: bool = True

    def mixed_forward(self, x: Tensor, row_adapters: Sequence[str | None]) -> Tensor:
        """Each row ``i`` of the batch (dim 0 of ``x``) through adapter ``row_adapters[i]`` (``None``: the base).

        One base product for the whole batch, then per adapter ``g`` on its rows ``R_g`` only:
        ``z[R_g] += s_g·(x[R_g] A_gᵀ) B_gᵀ`` and ``y[R_g] = f_g ⊙ z[R_g] + b`` with the cached DoRA factor
        ``f_g = m_g / ||W + s_g·B_g·A_g||`` (``f = 1`` for LoRA adapters and base rows). The inference form:
        dropout is not applied. Equals running each row alone through its adapter (to fp32 round-off).
        """
        if len(row_adapters) != x.shape[0]:
            raise ValueError(
                f"row_adapters has {len(row_adapters)} entries but the batch has {x.shape[0]} rows; give one "
                "adapter name (or None for the base) per row"
            )
        unknown = sorted({n for n in row_adapters if n is not None and n not in self.adapters})
        if unknown:
            raise ValueError(f"no adapter named {unknown} in {type(self).__name__}; it has {list(self.adapters)}")
        if self.merged_adapters:
            raise RuntimeError("a mixed-adapter batch needs the unmerged base weight; call unmerge() first")
        if self.stacks_mixed_batch and not torch.is_grad_enabled() and (
                0 < len(set(row_adapters) - {None}) <= MIXED_STACK_MAX):
            return self._mixed_stacked(x, row_adapters)
        z = self._base_product(x)  # (B, ..., out) or (B, out, ...) for a conv
        out_features = z.shape[self.feature_dim]
        factors = torch.ones(x.shape[0], out_features, dtype=z.dtype, device=z.device)  # (B, out)
        for name, rows in self._row_groups(row_adapters, z.device):
            with self.using(name):
                if not self.magnitude_only:
                    z = z.index_add(0, rows, self._lora_product(x.index_select(0, rows)).to(z.dtype),
                                    alpha=self.scaling)
                if self.use_dora:
                    factors[rows] = self.dora_factor().to(z.dtype)
        shape = [x.shape[0]] + [1] * (z.dim() - 1)
        shape[self.feature_dim] = out_features
        return self._add_bias(z * factors.view(shape))

    def _mixed_stacked(self, x: Tensor, row_adapters: Sequence[str | None]) -> Tensor:
        """:meth:`mixed_forward` for a linear kind without autograd, as two products against every adapter of the
        batch at once: ``h = x [A_1; …; A_G]ᵀ`` ``(…, G·r)``, each row keeps its own adapter's block of ``h``
        (scaled by its ``s``, the others zeroed), then ``h [B_1 … B_G]ᵀ``; no per-adapter loop and no per-row
        copy of ``A``, ``B`` (``G ≤`` :data:`MIXED_STACK_MAX` keeps the extra products small)."""
        names = tuple(dict.fromkeys(n for n in row_adapters if n is not None))
        a_cat, b_cat, s_table, f_table = self._mixed_stacks(names)  # (G·r, in), (G·r, out), (G+1, G), (G+1, out)
        idx = self._row_index(row_adapters, names, x.device)  # (B,) each row's adapter, len(names) for the base
        z = self._base_product(x)  # (B, ..., out)
        rows, groups = x.shape[0], len(names)
        xb = x.reshape(rows, -1, x.shape[-1]).to(a_cat.dtype)  # (B, T, in)
        h = torch.matmul(xb, a_cat.T).view(rows, xb.shape[1], groups, -1)  # (B, T, G, r)
        h = h * s_table.index_select(0, idx).view(rows, 1, groups, 1)  # s_g on the row's own block, 0 elsewhere
        lora = torch.matmul(h.view(rows, xb.shape[1], -1), b_cat)  # (B, T, out)
        z = z + lora.view(z.shape).to(z.dtype)
        factor = f_table.index_select(0, idx).to(z.dtype)  # (B, out)
        return self._add_bias(z * factor.view(rows, *([1] * (z.dim() - 2)), -1))

    def _mixed_stacks(self, names: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``[A_1; …; A_G]`` ``(G·r, in)`` and ``[B_1 … B_G]ᵀ`` ``(G·r, out)`` (zero-padded to the largest rank),
        the scales as rows ``s_g·e_g`` ``(G+1, G)`` and the factors ``(G+1, out)`` (``1`` for LoRA) of adapters
        ``names``, row ``G`` for base rows (no update, factor 1); cached while every adapter and the base weight
        are unchanged (:mod:`torchdora.cache`)."""
        if self._plain_cache_inputs:  # read straight from the adapters (per token)
            tensors: list = [self._weight_storage()]
            extra: list = [names, self.norm_method]
            for name in names:
                adapter = self.adapters[name]
                tensors += [adapter.lora_A, adapter.lora_B, adapter.magnitude]
                extra.append(adapter.scaling)
        else:  # a layer kind with inputs of its own (VeRA's vectors and shared pair)
            tensors, extra = [], [names]
            for name in names:
                with self.using(name):
                    inputs = self._cache_inputs()
                    tensors += [*inputs["tensors"], self.magnitude]
                    extra.append(inputs["extra"])
        cache = self.__dict__.get("_mixed_cache")
        if cache is None:
            cache = self.__dict__["_mixed_cache"] = CachedValue()
        return cache.get(lambda: self._build_mixed_stacks(names), tensors, tuple(extra))

    def _build_mixed_stacks(self, names: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pairs, factors = [], []
        for name in names:
            with self.using(name):
                pairs.append((self.lora_A_2d(), self.lora_B_2d(), self.scaling))
                factors.append(self.dora_factor() if self.use_dora else None)
        known = [a for a, _, _ in pairs if a is not None]
        weight = self._weight_storage()
        dtype = known[0].dtype if known else torch.float32
        rank, groups = max([a.shape[0] for a in known], default=1), len(names)
        a_cat = weight.new_zeros(groups, rank, self.in_features, dtype=dtype)
        b_cat = weight.new_zeros(groups, rank, self.out_features, dtype=dtype)
        s_table = weight.new_zeros(groups + 1, groups, dtype=dtype)
        f_table = weight.new_ones(groups + 1, self.out_features, dtype=torch.float32)
        for g, ((a, b, scaling), factor) in enumerate(zip(pairs, factors)):
            if a is not None:  # a magnitude-only adapter has no direction update
                a_cat[g, :a.shape[0]] = a
                b_cat[g, :a.shape[0]] = b.T
                s_table[g, g] = scaling
            if factor is not None:
                f_table[g] = factor
        return a_cat.view(groups * rank, -1), b_cat.view(groups * rank, -1), s_table, f_table

    def _row_index(self, row_adapters: Sequence[str | None], names: tuple[str, ...], device: torch.device) -> Tensor:
        """The stack slot of each row (``len(names)`` for base rows) on ``device``, kept for the next call."""
        key = (tuple(row_adapters), device)
        kept = self.__dict__.get("_row_index_kept")
        if kept is None or kept[0] != key:
            slot = {n: g for g, n in enumerate(names)}
            index = torch.tensor([slot.get(n, len(names)) for n in row_adapters], device=device)
            kept = self.__dict__["_row_index_kept"] = (key, index)
        return kept[1]

    def _row_groups(self, row_adapters: Sequence[str | None], device: torch.device) -> list[tuple[str, Tensor]]:
        """``(name, rows)`` per adapter of a mixed batch, the row indices on ``device``; kept for the next call
        with the same assignment (a generated token's), since building them is a host-to-device copy."""
        key = (tuple(row_adapters), device)
        kept = self.__dict__.get("_row_groups_kept")
        if kept is None or kept[0] != key:
            groups = [(name, torch.tensor([i for i, n in enumerate(row_adapters) if n == name], device=device))
                      for name in dict.fromkeys(n for n in row_adapters if n is not None)]
            kept = self.__dict__["_row_groups_kept"] = (key, groups)
        return kept[1]
