"""Merging adapters into a layer's base weight, undoing it, and combining adapters into a new one.

The rule (``docs/adapters.md``): adapters active together add their updates, each DoRA adapter normalised
against the *pre-trained* weight (paper eq. 5 per adapter), so the merged weight of a set of adapters is
:func:`torchdora.functional.merged_weight_of_adapters` of the pre-trained weight, whether they are merged in one
call or several. :class:`MergeMixin` holds that logic for :class:`torchdora.layers.base.AdapterLayer`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from torchdora import functional as DF
from torchdora.cache import sample_of
from torchdora.config import check_adapter_name
from torchdora.layers.adapter import Adapter

__all__ = ["MergeMixin"]


class MergeMixin:
    """Merge, unmerge and combine for an adapter layer (uses its ``adapters``, ``using``, ``weight_2d``,
    ``_set_weight_2d``, ``lora_A_2d``/``lora_B_2d`` and ``base_sq_norm``)."""

    #: whether :meth:`add_weighted_adapter` can combine this layer's adapters (VeRA keeps d, b on the layer)
    combinable: bool = True

    @torch.no_grad()
    def add_weighted_adapter(self, name: str, weighted: Sequence[tuple[str, float]]) -> Adapter:
        """Add adapter ``name`` whose update is the ``(adapter, weight)`` pairs' weighted updates, exactly, at rank
        ``Σ r_i`` (:func:`torchdora.functional.weighted_combination`; scale 1). Inactive, like :meth:`add_adapter`.
        """
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"{type(self).__name__} already has an adapter named {name!r}; delete_adapter it first")
        if self.merged:
            raise RuntimeError("the adapters are merged; call unmerge() before combining them")
        if not self.combinable:
            raise ValueError(f"{type(self).__name__} keeps its update outside its named adapters (e.g. VeRA's d, "
                             "b); only LoRA/DoRA adapters can be combined")
        kinds = {self.adapters[n].use_dora for n, _ in weighted}
        if len(kinds) != 1:
            raise ValueError(f"adapters {[n for n, _ in weighted]} mix DoRA and LoRA; combine adapters of one kind")
        parts = [(w, *self.adapter_terms(n)) for n, w in weighted]
        a, b, m = DF.weighted_combination(parts, self.base_sq_norm().sqrt())
        rank = 0 if a is None else a.shape[0]
        adapter = Adapter(r=max(rank, 1), alpha=float(max(rank, 1)), dropout=0.0, use_dora=kinds.pop(),
                          use_rslora=False, magnitude_only=rank == 0)
        adapter.train(self.training)
        if rank:
            adapter.lora_A = nn.Parameter(a.reshape(self._lora_A_shape(rank)).clone())
            adapter.lora_B = nn.Parameter(b.reshape(self._lora_B_shape(rank)).clone())
        if m is not None:
            adapter.magnitude = nn.Parameter(m.clone())
        self.adapters[name] = adapter
        return adapter


    def _names_to_merge(self, adapter_names: Sequence[str] | None) -> list[str]:
        """The adapters a :meth:`merge` call writes, checked: known, not yet merged, and leaving no active adapter
        unmerged beside merged ones."""
        if adapter_names is None:
            names = [n for n in self.active_adapters if n not in self.merged_adapters]
            if self.merged and not names:
                raise RuntimeError(f"{type(self).__name__} is already merged; call unmerge() first")
        else:
            names = list(adapter_names)
        for name in names:
            if name not in self.adapters:
                raise ValueError(f"no adapter named {name!r} in {type(self).__name__}; it has {list(self.adapters)}")
            if name in self.merged_adapters:
                raise RuntimeError(f"adapter {name!r} is already merged; call unmerge() first")
        left = [n for n in self.active_adapters if n not in self.merged_adapters and n not in names]
        if names and left:
            raise ValueError(
                f"merging {names} would leave the active adapter(s) {left} computing on a changed base weight; "
                f"merge every active adapter together (merge(adapter_names=None)) or set_adapter({names}) first"
            )
        return names

    def adapter_terms(self, name: str) -> tuple[Tensor | None, Tensor | None, Tensor | None, float]:
        """``(A, B, m, s)`` of adapter ``name`` as 2-D detached tensors (VeRA: its update as a LoRA pair)."""
        with self.using(name):
            a, b = self.lora_A_2d(), self.lora_B_2d()
            magnitude = self.magnitude
            detach = lambda t: None if t is None else t.detach().clone()  # noqa: E731 (kept for unmerge)
            return detach(a), detach(b), detach(magnitude), float(self.scaling)

    def _pretrained_weight_2d(self) -> Tensor:
        """The base weight without the merged adapters: the weight itself when nothing is merged."""
        weight = self.weight_2d()
        if not self.merged_adapters:
            return weight
        terms = [self._merge_terms[n] for n in self.merged_adapters]
        restored, _ = DF.unmerged_weight_of_adapters(weight, [tuple(t.to(weight.device) if isinstance(t, Tensor)
                                                                    else t for t in term) for term in terms])
        if self._merge_kept_rows is not None:
            rows, values = self._merge_kept_rows
            restored[rows.to(weight.device)] = values.to(weight.device, weight.dtype)
        return restored

    def _check_merged_weight_unchanged(self) -> None:
        current = sample_of(self.weight_2d())
        written = self._merge_written
        if written is None or not torch.equal(current, written.to(current.device, current.dtype)):
            raise RuntimeError(
                f"{type(self).__name__}: the base weight changed since merge() (a state dict or an in-place "
                "edit replaced the merged weight), so unmerge() cannot restore the original weight. Load the "
                "unmerged base model and the adapter again"
            )

    @torch.no_grad()
    def merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Write adapters (default: the active ones) into the base weight; they become active. Bias unchanged.

        Whether merged in one call or several, the merged adapters give the weight of the multi-adapter rule
        (:func:`torchdora.functional.merged_weight_of_adapters`): every DoRA norm against the pre-trained
        weight, so a merged layer computes exactly what the same adapters compute unmerged and active together.
        An active adapter cannot stay unmerged beside merged ones (``ValueError``). Edits of ``A``, ``B`` or
        ``m`` take effect at the next merge; :meth:`unmerge` undoes exactly what was written here. A merge whose
        weight would not be finite is refused and leaves the layer as it was.
        """
        names = self._names_to_merge(adapter_names)
        if not names:
            return
        if self.merged:
            self._check_merged_weight_unchanged()
        pretrained = self._pretrained_weight_2d()
        new_terms = {n: self.adapter_terms(n) for n in names}
        added, factors = DF.merged_weight_of_adapters(pretrained, list(new_terms.values()))
        acc = torch.promote_types(pretrained.dtype, torch.float32)
        merged = (self.weight_2d().to(acc) + (added.to(acc) - pretrained.to(acc))).to(pretrained.dtype)
        if not bool(torch.isfinite(merged).all()):
            raise ValueError(f"merging {names} into {type(self).__name__} gives a non-finite weight (NaN or inf in "
                             "an adapter, or an overflow in the weight's dtype); the layer is left unmerged")
        terms = dict(self._merge_terms)
        for (name, (a, b, _, scaling)), factor in zip(new_terms.items(), factors):
            terms[name] = (a, b, factor, scaling)
        c = torch.ones(merged.shape[0], dtype=acc, device=merged.device)
        for _, _, factor, _ in terms.values():
            if factor is not None:
                c += factor.to(device=merged.device, dtype=acc) - 1
        lost = (c == 0).nonzero().flatten()
        kept = (lost.cpu(), pretrained[lost].clone()) if lost.numel() else None
        self._set_weight_2d(merged)
        self._merge_terms, self._merge_kept_rows = terms, kept
        self._merge_written = sample_of(self.weight_2d()).clone()
        self.merged_adapters = self.merged_adapters + names
        self.active_adapters = self.active_adapters + [n for n in names if n not in self.active_adapters]

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the pre-trained base weight (to fp32 round-off), undoing every merged adapter.

        Raises ``RuntimeError`` if the merged weight was replaced since :meth:`merge` (e.g. a state dict loaded
        into the merged model): the base weight cannot be recovered from a weight this layer did not write.
        """
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged; nothing to unmerge")
        self._check_merged_weight_unchanged()
        self._set_weight_2d(self._pretrained_weight_2d())
        self._merge_terms, self._merge_kept_rows, self._merge_written = {}, None, None
        self.merged_adapters = []
