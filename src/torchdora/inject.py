"""Put adapters into any ``nn.Module`` by name, take them out, merge them, switch them off."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import nn

from torchdora.config import DoraConfig, module_matches
from torchdora.layers import AdapterLayer
from torchdora.layers.base import DEFAULT_ADAPTER
from torchdora.state import (
    adapter_layers, all_adapter_layers, create_state, drop_state, require_state, set_submodule, state_of,
)
from torchdora.targets import closest_names, find_targets, place_adapter

__all__ = [
    "inject",
    "adapter_layers",
    "adapter_config",
    "merge",
    "unmerge",
    "merge_and_unload",
    "unload",
    "disable_adapters",
    "clear_cache",
    "trainable_parameter_count",
    "find_targets",
    "closest_names",
]


def adapter_config(model: nn.Module) -> DoraConfig:
    """The config of ``model``'s adapter (of the first one added; inside :func:`torchdora.using_adapter`, that
    adapter's)."""
    return require_state(model).config()


def _modules_to_save(model: nn.Module, config: DoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n]
    unmatched = [p for p in config.modules_to_save if not any(module_matches(n, (p,)) for n in names)]
    if unmatched:
        raise ValueError(f"modules_to_save entries {unmatched} match no module of {type(model).__name__}. "
                         f"Closest module names that exist: {closest_names(unmatched, names)}")
    return [n for n in names if module_matches(n, config.modules_to_save)]


def inject(model: nn.Module, config: DoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, nn.Module]:
    """Wrap every module ``config`` targets in a DoRA (or LoRA, VeRA, DVoRA) adapter layer, in place.

    The adapter is named ``adapter_name`` (``"default"``) and active; :func:`torchdora.add_adapter` adds more.
    Afterwards only adapter parameters and the parameters of ``config.modules_to_save`` are trainable.
    Returns the replaced base modules by name (they live on inside the adapters as ``.base``).

    Raises:
        ValueError: the model already has adapters, a target matches nothing (the message lists the
            closest names that exist), a ``modules_to_save`` / ``magnitude_only_modules`` entry matches
            nothing, the adapter name is not a plain name, or a module cannot take an adapter (a grouped
            convolution).
        TypeError: a targeted module's type has no adapter (supported: Linear, transformers Conv1D,
            Conv1d/2d/3d, Embedding; VeRA/DVoRA: Linear and Conv1D).

    On any error the model is left as it was (modules, trainable flags). New adapter layers take the
    train/eval mode of the module they wrap.
    """
    if state_of(model) is not None or all_adapter_layers(model):
        raise ValueError(
            f"{type(model).__name__} already has torchdora adapters; inject once, add more with "
            "torchdora.add_adapter, or call merge_and_unload(model) first to start from plain modules"
        )
    save_names = _modules_to_save(model, config)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        replaced = place_adapter(model, adapter_name, config, active=True)
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    for name in save_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    create_state(model, adapter_name, config)
    return replaced


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> None:
    """Merge the active adapters (or ``adapter_names``, which then become active) into the base weights.

    The merged model computes exactly what the unmerged model computes with the same adapters active
    (``docs/adapters.md``: every DoRA adapter normalised against the pre-trained weight, updates added).
    Merging twice raises; so does merging only part of the active adapters (they would compute on a changed
    base), and a merge whose weight would not be finite. On an error no layer is left merged by this call.
    """
    state = require_state(model)
    layers = list(adapter_layers(model).values())
    names = list(state.active if adapter_names is None else adapter_names)
    state.check_known(names, model)
    merged = {n for layer in layers for n in layer.merged_adapters}
    if adapter_names is None and merged:
        raise RuntimeError(f"adapters {sorted(merged)} are already merged; call torchdora.unmerge(model) first")
    left = [n for n in state.active if n not in names and n not in merged]
    if left:
        raise ValueError(f"merging {names} would leave the active adapter(s) {left} computing on a changed base "
                         f"weight; merge all active adapters, or set_adapter(model, {names}) first")
    done: list[tuple[AdapterLayer, list[str]]] = []
    try:
        for layer in layers:
            here = [n for n in names if n in layer.adapters]
            if here:
                done.append((layer, list(layer.merged_adapters)))
                layer.merge(here)
    except BaseException:
        for layer, before in done:  # back to what was merged before this call
            if layer.merged:
                layer.unmerge()
            if before:
                layer.merge(before)
        raise
    state.active = state.active + [n for n in names if n not in state.active]


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` for every adapter: the pre-trained weights again (to fp32 round-off)."""
    layers = [layer for layer in all_adapter_layers(model).values() if layer.merged]
    if not layers:
        raise RuntimeError(f"{type(model).__name__} has no merged adapter; nothing to unmerge")
    for layer in layers:
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapters and put the plain base modules back; returns ``model`` with no adapter left."""
    layers = adapter_layers(model)
    if not any(layer.merged for layer in layers.values()):
        merge(model)
    for name, layer in layers.items():
        set_submodule(model, name, layer.base)
    drop_state(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapters without merging: the plain base modules go back; returns ``model``."""
    for name, layer in all_adapter_layers(model).items():
        if layer.merged:
            layer.unmerge()
        set_submodule(model, name, layer.base)
    drop_state(model)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model as if no adapter were there (``modules_to_save`` stay as trained).

    PEFT's name for it, :func:`torchdora.disable_adapter`, is the same context manager.
    """
    layers = list(all_adapter_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("cannot disable merged adapters; call torchdora.unmerge(model) first")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.disabled = state


def clear_cache(model: nn.Module) -> None:
    """Forget every adapter layer's cached norms and DoRA factors; the next forward recomputes them.

    The caches are checked from host-side facts only (storage, address, version counter, layout, optimizer
    steps: :mod:`torchdora.cache`, ``docs/cache.md``), so call this after an edit those facts cannot see: an
    in-place edit through ``.data`` (``p.data.add_(…)``, ``p.data.copy_(…)``), a write through shared memory
    (``t.numpy()``, DLPack), or an update by code that is not a ``torch.optim.Optimizer`` and writes behind the
    version counter.
    """
    for layer in all_adapter_layers(model).values():
        layer.clear_cache()


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
