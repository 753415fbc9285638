"""Many adapters on one base model: add, switch, delete, combine, and batches that mix them (PEFT's names).

    >>> torchdora.inject(model, DoraConfig(r=8, target_modules=["q_proj", "v_proj"]))     # adapter "default"
    >>> torchdora.load_adapter(model, "runs/french", adapter_name="french")               # either file format
    >>> torchdora.set_adapter(model, "french")                   # or a list: their updates add up
    >>> with torchdora.disable_adapter(model): ...                # the base model
    >>> with torchdora.mixed_batch(model, ["french", None, "default"]): model(ids)   # one adapter per row
    >>> torchdora.add_weighted_adapter(model, ["default", "french"], [0.5, 0.5], "blend")
    >>> torchdora.delete_adapter(model, "french")

Every adapter layer keeps its adapters in ``layer.adapters`` by name, each with its own norm cache
(:class:`torchdora.layers.base.Adapter`). A model-level call applies to every layer that holds the adapter;
a layer without it runs its base for that adapter. ``modules_to_save`` belong to the model, not to an adapter:
they are set by the first adapter and shared.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Iterator, Sequence

from torch import nn

from torchdora.config import DoraConfig, check_adapter_name
from torchdora.inject import disable_adapters, inject
from torchdora.state import (
    adapter_layers, all_adapter_layers, drop_state, require_state, set_submodule, state_of, using_layers,
)
from torchdora.targets import place_adapter

__all__ = [
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapter",
    "active_adapters",
    "list_adapters",
    "using_adapter",
    "add_weighted_adapter",
    "mixed_batch",
]

disable_adapter = disable_adapters
"""PEFT's name for :func:`torchdora.disable_adapters`: ``with disable_adapter(model): ...`` runs the base model."""


def list_adapters(model: nn.Module) -> list[str]:
    """The names of ``model``'s adapters, in the order they were added."""
    return list(require_state(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters the forward applies, in order (PEFT's ``active_adapters``)."""
    return list(require_state(model).active)


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> None:
    """Make ``adapter_name`` (or several, whose updates add up) the active adapter(s) of every layer.

    Refused while adapters are merged (unless they are the ones named): unmerge first.
    """
    state = require_state(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    state.check_known(names, model)
    layers = list(all_adapter_layers(model).values())
    merged = {n for layer in layers for n in layer.merged_adapters}
    if merged and set(names) != merged:
        raise RuntimeError(f"adapters {sorted(merged)} are merged into the base weights; call "
                           f"torchdora.unmerge(model) before making {names} active")
    for layer in layers:
        layer.set_adapter([n for n in names if n in layer.adapters])
    state.active = names


def add_adapter(model: nn.Module, adapter_name: str, config: DoraConfig) -> list[str]:
    """Add adapter ``adapter_name`` on the modules ``config`` targets (inactive: see :func:`set_adapter`).

    A model without adapters gets it by :func:`torchdora.inject` (and it is active). Every field of ``config``
    applies to the new adapter as it would in :func:`torchdora.inject` (both build through
    :func:`torchdora.targets.place_adapter`), per adapter: rank, alpha, DoRA/LoRA/VeRA/DVoRA, magnitude-only
    modules, ``recompute_modules``, ``detach_norm``, dtype. Returns the adapted module names.

    Raises:
        ValueError: the name exists or is not a plain name, a target matches nothing, a VeRA/DVoRA adapter would
            share a module with another adapter, or ``config`` has ``modules_to_save`` (they are the model's,
            shared by all adapters: set them on the first adapter).
    """
    check_adapter_name(adapter_name)
    state = state_of(model)
    if state is None:
        inject(model, config, adapter_name=adapter_name)
        return list(adapter_layers(model))
    if adapter_name in state.configs:
        raise ValueError(f"{type(model).__name__} already has an adapter named {adapter_name!r}; "
                         "delete_adapter(model, name) first or choose another name")
    if config.modules_to_save:
        raise ValueError(
            f"modules_to_save={list(config.modules_to_save)} in the config of adapter {adapter_name!r}: "
            "modules_to_save belong to the model and are shared by all adapters; set them on the first adapter"
        )
    place_adapter(model, adapter_name, config, active=False)
    state.configs[adapter_name] = config
    set_adapter(model, state.active)  # layers that gained the adapter follow the model's choice
    return [n for n, layer in all_adapter_layers(model).items() if adapter_name in layer.adapters]


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete adapter ``adapter_name`` and free its tensors; a layer left without adapters becomes its base
    module again. If it was active, the remaining active ones stay active (the first remaining adapter if none)."""
    state = require_state(model)
    state.check_known([adapter_name], model)
    layers = {n: layer for n, layer in all_adapter_layers(model).items() if adapter_name in layer.adapters}
    merged = [n for n, layer in layers.items() if adapter_name in layer.merged_adapters]
    if merged:
        raise RuntimeError(f"adapter {adapter_name!r} is merged in {merged[:4]}; call torchdora.unmerge(model) first")
    active = [n for n in state.active if n != adapter_name]
    for name, layer in layers.items():
        layer.delete_adapter(adapter_name)
        if not layer.adapters:
            set_submodule(model, name, layer.base)
    del state.configs[adapter_name]
    if not state.configs:
        drop_state(model)
        return
    if state.current == adapter_name:
        state.current = next(iter(state.configs))
    set_adapter(model, active or list(state.configs)[:1])


@contextlib.contextmanager
def using_adapter(model: nn.Module, adapter_name: str) -> Iterator[nn.Module]:
    """Within the block ``model`` looks like a model with adapter ``adapter_name`` only: :func:`adapter_layers`
    lists the layers that hold it, their ``lora_A``/``magnitude``/… are its tensors, and :func:`adapter_config`
    is its config. Saving, loading and analysis code written for one adapter thus works on any named one."""
    with using_layers(model, adapter_name):
        yield model


@contextlib.contextmanager
def mixed_batch(model: nn.Module, row_adapters: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row ``i`` of every batch (dim 0) runs through adapter ``row_adapters[i]``, ``None`` for
    the base model: one forward serves several fine-tunes (DoRA and LoRA alike). Inference form: no dropout.

    A layer computes the base product once for the whole batch and each adapter's low-rank product and cached
    DoRA factor on its rows only (:meth:`AdapterLayer.mixed_forward`). Works around ``model.generate(...)`` as
    long as the batch keeps its rows (no beam search). Raises ``ValueError`` for an unknown name and
    ``RuntimeError`` while adapters are merged.
    """
    rows = list(row_adapters)
    require_state(model).check_known(sorted({n for n in rows if n is not None}), model)
    layers = list(all_adapter_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("a mixed-adapter batch needs unmerged adapters; call torchdora.unmerge(model) first")
    try:
        for layer in layers:
            layer.row_adapters = [n if n in layer.adapters else None for n in rows]
        yield model
    finally:
        for layer in layers:
            layer.row_adapters = None


# ---- combining ---------------------------------------------------------------------------------------------
def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "cat") -> None:
    """A new adapter ``adapter_name`` that combines ``adapters`` with ``weights`` (PEFT's name, its ``"cat"`` type).

    Per layer, with ``V = W + Σ_i w_i s_i B_i A_i`` the combined direction, exactly representable at rank
    ``Σ r_i`` by concatenating the factors (scale 1):

    - LoRA adapters: ``W' = V``.
    - DoRA adapters: ``W' = m ⊙ V / ||V||`` with ``m = ||W|| + Σ_i w_i (m_i − ||W||)``: each adapter's change of
      the per-feature magnitude relative to the base's norm is weighted like its directional update. With
      weights summing to 1 this is ``Σ_i w_i m_i``; with one adapter and weight 1 it is that adapter. The
      result is not ``Σ_i w_i W'_i`` (DoRA's weight is not linear in its parameters): it is the DoRA adapter
      whose updates are the weighted updates.

    The adapters must all be DoRA or all LoRA. A layer without one of them counts it as a zero update.
    The new adapter is inactive (see :func:`set_adapter`); its config records the ranks per module.
    """
    if combination_type != "cat":
        raise ValueError(f"combination_type={combination_type!r} is not supported; 'cat' is the exact one "
                         "(PEFT's 'linear' sums A's and B's separately, which is not the weighted update)")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite numbers, got {bad}; e.g. [0.5, 0.5]")
    check_adapter_name(adapter_name)
    state = require_state(model)
    state.check_known(list(adapters), model)
    if adapter_name in state.configs:
        raise ValueError(f"{type(model).__name__} already has an adapter named {adapter_name!r}")
    configs = state.configs
    kinds = {configs[n].use_dora for n in adapters}
    if len(kinds) != 1:
        raise ValueError(f"adapters {list(adapters)} mix DoRA and LoRA; combine adapters of one kind")
    layers = {n: layer for n, layer in all_adapter_layers(model).items() if any(a in layer.adapters for a in adapters)}
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("the adapters are merged; call torchdora.unmerge(model) before combining them")
    ranks: dict[str, int] = {}
    try:
        for name, layer in layers.items():
            new = layer.add_weighted_adapter(adapter_name, [(n, float(w)) for n, w in zip(adapters, weights)
                                                             if n in layer.adapters])
            ranks[name] = 1 if new.magnitude_only else new.r
    except BaseException:
        for name in ranks:
            layers[name].delete_adapter(adapter_name)
        raise
    if not ranks:
        raise ValueError(f"adapters {list(adapters)} are on no layer of {type(model).__name__}")
    exact = {re.escape(n): r for n, r in ranks.items()}
    r0 = next(iter(ranks.values()))
    configs[adapter_name] = DoraConfig(
        r=r0, alpha=float(r0), target_modules=tuple(ranks), rank_pattern=exact,
        alpha_pattern={k: float(v) for k, v in exact.items()}, use_dora=configs[adapters[0]].use_dora,
        magnitude_only_modules=tuple(n for n, layer in layers.items() if layer.adapters[adapter_name].magnitude_only),
        dtype=configs[adapters[0]].dtype,
    )
    set_adapter(model, active_adapters(model))
