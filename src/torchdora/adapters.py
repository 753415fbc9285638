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
import re
from typing import Iterator, Sequence

import torch
from torch import nn

from torchdora import functional as DF
from torchdora.config import ALL_LINEAR, DoraConfig, module_matches
from torchdora.inject import (
    _CONFIG_ATTR,
    _CONFIGS_ATTR,
    _closest_names,
    _forget_configs,
    _is_linear,
    _output_head_names,
    _set_submodule,
    adapter_layers,
    disable_adapters,
    inject,
)
from torchdora.layers import AdapterLayer, adapter_class_for
from torchdora.layers.base import DEFAULT_ADAPTER, Adapter

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

_ACTIVE_ATTR = "torchdora_active_adapters"

#: PEFT's name for :func:`torchdora.disable_adapters`: ``with disable_adapter(model): ...`` runs the base model
disable_adapter = disable_adapters


def _configs(model: nn.Module) -> dict[str, DoraConfig]:
    configs = getattr(model, _CONFIGS_ATTR, None)
    if not configs:
        raise ValueError(f"{type(model).__name__} has no torchdora adapters: call torchdora.inject(model, config) first")
    return configs


def list_adapters(model: nn.Module) -> list[str]:
    """The names of ``model``'s adapters, in the order they were added."""
    return list(_configs(model))


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters the forward applies, in order (PEFT's ``active_adapters``)."""
    names = list_adapters(model)
    return list(getattr(model, _ACTIVE_ATTR, names[:1]))


def _check_names(model: nn.Module, names: Sequence[str]) -> None:
    known = list_adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"no adapter named {unknown} in {type(model).__name__}; it has {known}")


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> None:
    """Make ``adapter_name`` (or several, whose updates add up) the active adapter(s) of every layer."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    _check_names(model, names)
    for layer in adapter_layers(model).values():
        layer.set_adapter([n for n in names if n in layer.adapters])
    setattr(model, _ACTIVE_ATTR, names)


def _targets(model: nn.Module, config: DoraConfig) -> dict[str, nn.Module]:
    """The modules ``config`` selects, seeing each adapter layer as its base module; errors if none."""
    heads = _output_head_names(model)
    candidates: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, AdapterLayer):
            inside.append(name + ".")  # its base, adapters and dropout are not targets of their own
        candidates[name] = module
    selected = {}
    for name, module in candidates.items():
        base = module.base if isinstance(module, AdapterLayer) else module
        if config.target_modules == ALL_LINEAR:
            hit = _is_linear(base) and name not in heads
        else:
            hit = module_matches(name, config.target_modules)
        if hit and not (config.exclude_modules and module_matches(name, config.exclude_modules)):
            selected[name] = module
    if not selected:
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no module of {type(model).__name__}. "
            f"Closest module names that exist: {_closest_names(model, config.target_modules)}"
        )
    return selected


def _layer_kwargs(config: DoraConfig, name: str) -> dict:
    return dict(r=config.rank_for(name), alpha=config.alpha_for(name), dropout=config.dropout,
                use_dora=config.use_dora, use_rslora=config.use_rslora,
                magnitude_only=config.is_magnitude_only(name), init=config.init, dtype=config.torch_dtype)


def add_adapter(model: nn.Module, adapter_name: str, config: DoraConfig) -> list[str]:
    """Add adapter ``adapter_name`` on the modules ``config`` targets (inactive: see :func:`set_adapter`).

    A model without adapters gets it by :func:`torchdora.inject`. Layer-wide settings (``detach_norm``,
    ``recompute_modules``) stay those of the layer's first adapter. Returns the adapted module names.

    Raises:
        ValueError: the name exists or is not a plain name, a target matches nothing, or ``config`` has
            ``modules_to_save`` (they are the model's, shared by all adapters: set them on the first adapter).
    """
    if not getattr(model, _CONFIGS_ATTR, None):
        inject(model, config, adapter_name=adapter_name)
        return list(adapter_layers(model))
    if adapter_name in list_adapters(model):
        raise ValueError(f"{type(model).__name__} already has an adapter named {adapter_name!r}; "
                         "delete_adapter(model, name) first or choose another name")
    if config.modules_to_save:
        raise ValueError(
            f"modules_to_save={list(config.modules_to_save)} in the config of adapter {adapter_name!r}: "
            "modules_to_save belong to the model and are shared by all adapters; set them on the first adapter"
        )
    targets = _targets(model, config)
    unsupported = [(n, type(m).__name__) for n, m in targets.items()
                   if not isinstance(m, AdapterLayer) and adapter_class_for(m) is None]
    if unsupported:
        raise TypeError(f"no adapter for module type(s) {unsupported[:8]}; narrow target_modules")
    added: list[AdapterLayer] = []
    wrapped: dict[str, nn.Module] = {}
    try:
        for name, module in targets.items():
            if isinstance(module, AdapterLayer):
                module.add_adapter(adapter_name, **_layer_kwargs(config, name))
                added.append(module)
            else:
                layer = adapter_class_for(module)(module, adapter_name=adapter_name,
                                                  detach_norm=config.detach_norm, **_layer_kwargs(config, name))
                layer.set_adapter([])  # inactive until set_adapter
                layer.train(module.training)
                _set_submodule(model, name, layer)
                wrapped[name] = module
    except BaseException:
        for layer in added:
            layer.delete_adapter(adapter_name)
        for name, base in wrapped.items():
            _set_submodule(model, name, base)
        raise
    _configs(model)[adapter_name] = config
    set_adapter(model, active_adapters(model))  # layers that gained the adapter follow the model's choice
    return list(targets)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete adapter ``adapter_name`` and free its tensors; a layer left without adapters becomes its base
    module again. If it was active, the remaining active ones stay active (the first remaining adapter if none)."""
    _check_names(model, [adapter_name])
    layers = {n: layer for n, layer in adapter_layers(model).items() if adapter_name in layer.adapters}
    merged = [n for n, layer in layers.items() if adapter_name in layer.merged_adapters]
    if merged:
        raise RuntimeError(f"adapter {adapter_name!r} is merged in {merged[:4]}; call torchdora.unmerge(model) first")
    active = [n for n in active_adapters(model) if n != adapter_name]
    for name, layer in layers.items():
        layer.delete_adapter(adapter_name)
        if not layer.adapters:
            _set_submodule(model, name, layer.base)
    del _configs(model)[adapter_name]
    remaining = list(getattr(model, _CONFIGS_ATTR))
    if not remaining:
        _forget_configs(model)
        if hasattr(model, _ACTIVE_ATTR):
            delattr(model, _ACTIVE_ATTR)
        return
    if getattr(model, _CONFIG_ATTR, None) is not None and adapter_name == DEFAULT_ADAPTER:
        setattr(model, _CONFIG_ATTR, _configs(model)[remaining[0]])
    set_adapter(model, active or remaining[:1])


@contextlib.contextmanager
def using_adapter(model: nn.Module, adapter_name: str) -> Iterator[nn.Module]:
    """Within the block ``model`` looks like a model with adapter ``adapter_name`` only: :func:`adapter_layers`
    lists the layers that hold it, their ``lora_A``/``magnitude``/… are its tensors, and :func:`adapter_config`
    is its config. Saving, loading and analysis code written for one adapter thus works on any named one."""
    _check_names(model, [adapter_name])
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    previous = [layer._current for layer in layers]
    config = getattr(model, _CONFIG_ATTR)
    try:
        for layer in layers:
            layer._current = adapter_name if adapter_name in layer.adapters else None
        setattr(model, _CONFIG_ATTR, _configs(model)[adapter_name])
        yield model
    finally:
        for layer, current in zip(layers, previous):
            layer._current = current
        setattr(model, _CONFIG_ATTR, config)


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
    _check_names(model, sorted({n for n in rows if n is not None}))
    layers = list(adapter_layers(model).values())
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
    _check_names(model, list(adapters))
    if adapter_name in list_adapters(model):
        raise ValueError(f"{type(model).__name__} already has an adapter named {adapter_name!r}")
    configs = _configs(model)
    kinds = {configs[n].use_dora for n in adapters}
    if len(kinds) != 1:
        raise ValueError(f"adapters {list(adapters)} mix DoRA and LoRA; combine adapters of one kind")
    ranks: dict[str, int] = {}
    for name, layer in adapter_layers(model).items():
        present = [(float(w), layer.adapters[n]) for n, w in zip(adapters, weights) if n in layer.adapters]
        if not present:
            continue
        if layer.merged:
            raise RuntimeError("the adapters are merged; call torchdora.unmerge(model) before combining them")
        if type(layer)._init_direction is not AdapterLayer._init_direction:
            raise ValueError(f"{type(layer).__name__} ({name}) keeps its update outside its named adapters "
                             "(e.g. VeRA's d, b); only LoRA/DoRA adapters can be combined")
        parts = []
        for w, ad in present:
            with layer.using(next(k for k, v in layer.adapters.items() if v is ad)):
                a, b = layer.lora_A_2d(), layer.lora_B_2d()
            parts.append((w, None if a is None else a.detach(), None if b is None else b.detach(),
                          None if ad.magnitude is None else ad.magnitude.detach(), ad.scaling))
        with torch.no_grad():
            a, b, m = DF.weighted_combination(parts, layer.base_sq_norm().sqrt())
        first = present[0][1]
        rank = 0 if a is None else a.shape[0]
        new = Adapter(r=max(rank, 1), alpha=float(max(rank, 1)), dropout=0.0, use_dora=first.use_dora,
                      use_rslora=False, magnitude_only=rank == 0)
        new.train(layer.training)
        if rank:
            new.lora_A = nn.Parameter(a.reshape(layer._lora_A_shape(rank)).clone())
            new.lora_B = nn.Parameter(b.reshape(layer._lora_B_shape(rank)).clone())
        if m is not None:
            new.magnitude = nn.Parameter(m.clone())
        layer.adapters[adapter_name] = new
        ranks[name] = max(rank, 1)
    if not ranks:
        raise ValueError(f"adapters {list(adapters)} are on no layer of {type(model).__name__}")
    exact = {re.escape(n): r for n, r in ranks.items()}
    r0 = next(iter(ranks.values()))
    configs[adapter_name] = DoraConfig(
        r=r0, alpha=float(r0), target_modules=tuple(ranks), rank_pattern=exact,
        alpha_pattern={k: float(v) for k, v in exact.items()}, use_dora=configs[adapters[0]].use_dora,
        magnitude_only_modules=tuple(n for n, layer in adapter_layers(model).items()
                                     if adapter_name in layer.adapters and layer.adapters[adapter_name].magnitude_only),
        dtype=configs[adapters[0]].dtype,
    )
    set_adapter(model, active_adapters(model))
