"""Mixed-adapter batches: each row of one batch through its own adapter (:func:`torchdora.mixed_batch`).

One base product for the whole batch; each adapter's low-rank product and cached DoRA factor on its rows only, or,
for linear kinds without autograd, the rows grouped by adapter and two batched products over the adapters' stacked
``A`` and ``s·B`` (:meth:`MixedBatchMixin._mixed_stacked`, the grouped form of multi-LoRA servers' kernels).
:class:`MixedBatchMixin` holds that logic for :class:`torchdora.layers.base.AdapterLayer`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from torchdora.cache import CachedValue

__all__ = ["MixedBatchMixin", "MIXED_STACK_MAX", "RowLayout", "row_layout"]

#: most adapters in a mixed batch run as one grouped product (their ``A``, ``s·B`` are copied into a cached
#: stack); more run one adapter at a time
MIXED_STACK_MAX = 8


class RowLayout(NamedTuple):
    """A mixed batch's rows laid out by adapter: ``slots`` groups of ``width`` rows each.

    ``gather`` ``(slots·width,)``: the batch row in each place (padding places repeat row 0); ``scatter``
    ``(B,)``: each row's place; both ``None`` when the batch already is the layout (no padding, rows in slot
    order); ``slot`` ``(B,)``: each row's adapter slot (``len(names)`` for a base row).
    """

    slots: int
    width: int
    gather: Tensor | None
    scatter: Tensor | None
    slot: Tensor


def row_layout(row_adapters: Sequence[str | None], names: Sequence[str], device: torch.device) -> RowLayout:
    """The :class:`RowLayout` of rows ``row_adapters`` over adapters ``names`` (base rows last, slot ``G``)."""
    index = {n: g for g, n in enumerate(names)}
    slot = [index.get(n, len(names)) for n in row_adapters]  # None (a base row): the last slot
    slots = len(names) + (len(names) in slot)
    members: list[list[int]] = [[] for _ in range(slots)]
    for row, g in enumerate(slot):
        members[g].append(row)
    width = max(len(m) for m in members)
    gather = [m[j] if j < len(m) else 0 for m in members for j in range(width)]
    scatter = [0] * len(slot)
    for g, m in enumerate(members):
        for j, row in enumerate(m):
            scatter[row] = g * width + j
    identity = list(range(len(slot)))

    def tensor(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    same = gather == identity  # the batch is the layout: no padding, rows already in slot order
    return RowLayout(slots, width, None if same else tensor(gather), None if same else tensor(scatter),
                     tensor(slot))


class MixedBatchMixin:
    """Mixed-adapter forward for an adapter layer (uses its ``adapters``, ``using``, ``_base_product``,
    ``_lora_product``, ``dora_factor``, ``_cache_inputs`` and ``_add_bias``)."""

    #: a mixed-adapter batch runs as two batched products over the adapters' stacked ``A``, ``s·B`` (layers whose
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
        if self.merged_adapters:
            raise RuntimeError("a mixed-adapter batch needs the unmerged base weight; call unmerge() first")
        names, layout = self._row_layout(row_adapters, x.device)
        if self.stacks_mixed_batch and not torch.is_grad_enabled() and 0 < len(names) <= MIXED_STACK_MAX:
            return self._mixed_stacked(x, names, layout)
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

    def _mixed_stacked(self, x: Tensor, names: tuple[str, ...], layout: RowLayout) -> Tensor:
        """:meth:`mixed_forward` for a linear kind without autograd, as one grouped product per factor: the rows
        laid out by adapter ``(G, c, T, in)`` (``c`` the most rows any adapter has, shorter groups padded),
        ``h_g = x_g A_gᵀ`` and ``x_g`` 's update ``h_g (s_g·B_g)ᵀ`` as two batched products over the stacked
        adapters, and each row's update taken back from its slot. Each row meets only its own adapter, so the
        products cost what one LoRA adapter's do on the whole batch (plus the padding); the rows are copied, the
        adapters' tensors are not. Base rows (``None``) form a group with a zero update."""
        a_stack, b_stack, f_table = self._mixed_stacks(names)  # (G+1, r, in), (G+1, r, out), (G+1, out)
        z = self._base_product(x)  # (B, ..., out)
        rows = x.shape[0]
        xb = x.reshape(rows, -1, x.shape[-1]).to(a_stack.dtype)  # (B, T, in)
        if layout.gather is not None:
            xb = xb.index_select(0, layout.gather)  # (S·c, T, in): slot by slot, padding rows repeat row 0
        tokens = xb.shape[1]
        h = torch.bmm(xb.reshape(layout.slots, -1, xb.shape[-1]), a_stack[:layout.slots].transpose(1, 2))
        if layout.scatter is None and z.dtype == b_stack.dtype and z.is_contiguous():
            # the batch is the layout: the update lands in the base product's accumulate (z is this call's own)
            z.view(layout.slots, -1, z.shape[-1]).baddbmm_(h, b_stack[:layout.slots])
        else:
            lora = torch.bmm(h, b_stack[:layout.slots]).view(-1, tokens, b_stack.shape[-1])  # (S·c, T, out)
            if layout.scatter is not None:
                lora = lora.index_select(0, layout.scatter)  # (B, T, out): each row's own slot
            z = z + lora.view(z.shape).to(z.dtype)
        if layout.scatter is None:  # the batch is the layout: slot g's factor broadcasts over its rows, no gather
            z_slots, factor = z.view(layout.slots, -1, z.shape[-1]), f_table[:layout.slots].unsqueeze(1)
        else:
            z_slots, factor = z, f_table.index_select(0, layout.slot).view(rows, *([1] * (z.dim() - 2)), -1)
        factor, bias = factor.to(z.dtype), self._bias()
        if bias is None:
            z_slots.mul_(factor)
        else:
            torch.addcmul(bias, z_slots, factor, out=z_slots)  # f ⊙ z + b, in place
        return z

    def _mixed_stacks(self, names: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """``A_g`` ``(G+1, r, in)``, ``s_g·B_gᵀ`` ``(G+1, r, out)`` (zero-padded to the largest rank) and the
        factors ``(G+1, out)`` (``1`` for LoRA) of adapters ``names``, slot ``G`` for base rows (no update,
        factor 1); cached while every adapter and the base weight are unchanged (:mod:`torchdora.cache`)."""
        if self._plain_cache_inputs:  # read straight from the adapters' dicts (per layer, per token)
            tensors: list = [self._weight_storage()]
            extra: list = [names, self.norm_method]
            adapters = self.adapters._modules
            for name in names:
                adapter = adapters[name]
                parameters = adapter._parameters
                tensors += [parameters["lora_A"], parameters["lora_B"], parameters["magnitude"]]
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

    def _build_mixed_stacks(self, names: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor]:
        pairs, factors = [], []
        for name in names:
            with self.using(name):
                pairs.append((self.lora_A_2d(), self.lora_B_2d(), self.scaling))
                factors.append(self.dora_factor() if self.use_dora else None)
        known = [a for a, _, _ in pairs if a is not None]
        weight = self._weight_storage()
        dtype = known[0].dtype if known else torch.float32
        rank, groups = max([a.shape[0] for a in known], default=1), len(names)
        a_stack = weight.new_zeros(groups + 1, rank, self.in_features, dtype=dtype)
        b_stack = weight.new_zeros(groups + 1, rank, self.out_features, dtype=dtype)
        f_table = weight.new_ones(groups + 1, self.out_features, dtype=torch.float32)
        for g, ((a, b, scaling), factor) in enumerate(zip(pairs, factors)):
            if a is not None:  # a magnitude-only adapter has no direction update
                a_stack[g, :a.shape[0]] = a
                b_stack[g, :a.shape[0]] = scaling * b.T
            if factor is not None:
                f_table[g] = factor
        return a_stack, b_stack, f_table

    def _row_layout(self, row_adapters: Sequence[str | None],
                    device: torch.device) -> tuple[tuple[str, ...], RowLayout]:
        """The batch's adapters (each named once, in order) and where each row goes in the grouped products,
        checked and built once for an assignment and kept for the next call with it (a generated token's):
        building it copies index tensors to ``device``."""
        key = (tuple(row_adapters), device, tuple(self.adapters._modules))  # an adapter added or deleted: anew
        kept = self.__dict__.get("_row_layout_kept")
        if kept is None or kept[0] != key:
            unknown = sorted({n for n in row_adapters if n is not None and n not in self.adapters})
            if unknown:
                raise ValueError(
                    f"no adapter named {unknown} in {type(self).__name__}; it has {list(self.adapters)}")
            names = tuple(dict.fromkeys(n for n in row_adapters if n is not None))
            kept = self.__dict__["_row_layout_kept"] = (key, (names, row_layout(row_adapters, names, device)))
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
