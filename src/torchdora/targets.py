"""Where an adapter goes and how its layers are built: one target finder and one builder for every entry point.

:func:`torchdora.inject`, :func:`torchdora.add_adapter` and :func:`torchdora.load_adapter` all put an adapter on a
model through :func:`place_adapter`, so every config field means the same whichever was called:

- :func:`select_targets` finds the modules a config selects, seeing an existing adapter layer as its base module;
- :func:`layer_class` is the table from a config's switches and a module's type to the layer class;
- :func:`layer_options` turns a config into one module's layer options (rank, alpha, DoRA/LoRA, magnitude-only,
  recompute, dtype, ...), the same for a new layer and for an adapter added to an existing one.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Sequence

from torch import nn

from torchdora.config import ALL_LINEAR, DoraConfig, module_matches
from torchdora.layers import (
    FUSED_ADAPTERS, AdapterLayer, LinearAdapter, VeraAdapter, VeraProjection, adapter_class_for, is_conv1d,
)
from torchdora.state import set_submodule

__all__ = ["find_targets", "select_targets", "closest_names", "layer_class", "layer_options", "place_adapter"]


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s) that ``"all-linear"`` leaves alone (as PEFT does)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def closest_names(patterns: str | Sequence[str], names: Sequence[str], limit: int = 8) -> list[str]:
    """Module names (last parts or whole dotted names) that look like ``patterns``, for error messages.

    A regex pattern is split into its words first (``".*\\.(q_prj|v_proj)$"`` → ``q_prj``, ``v_proj``).
    """
    wanted = [patterns] if isinstance(patterns, str) else list(patterns)
    words = [w for p in wanted for w in (re.sub(r"[^A-Za-z0-9_]+", " ", p).split() or [p])]
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    close: list[str] = []
    for word in words:
        for candidate in difflib.get_close_matches(word, suffixes + list(names), n=limit, cutoff=0.4):
            if candidate not in close:
                close.append(candidate)
    return close[:limit] or suffixes[:limit]


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Every named module, an adapter layer standing for its base (its insides are not targets of their own)."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, AdapterLayer):
            inside.append(name + ".")
        out[name] = module
    return out


def _unmatched(patterns: tuple[str, ...], names: Sequence[str]) -> list[str]:
    """The entries of a name list that select none of ``names``."""
    return [p for p in patterns if not any(module_matches(n, (p,)) for n in names)]


def select_targets(model: nn.Module, config: DoraConfig) -> dict[str, nn.Module]:
    """The modules ``config`` selects by dotted name, in model order (an adapter layer as itself).

    Raises ``ValueError`` if it selects nothing, or if an entry of a ``target_modules`` list selects nothing
    (a typo must not pass because another entry matched); the message lists the closest names that exist.
    """
    heads = _output_head_names(model)
    candidates = _candidates(model)
    names = list(candidates)
    selected: dict[str, nn.Module] = {}
    for name, module in candidates.items():
        base = module.base if isinstance(module, AdapterLayer) else module
        if config.target_modules == ALL_LINEAR:
            hit = (isinstance(base, nn.Linear) or is_conv1d(base)) and name not in heads
        else:
            hit = module_matches(name, config.target_modules)
        if hit and not (config.exclude_modules and module_matches(name, config.exclude_modules)):
            selected[name] = module
    if not selected:
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no module of {type(model).__name__}. "
            f"Closest module names that exist: {closest_names(config.target_modules, names)}"
        )
    if not isinstance(config.target_modules, str):
        _check_each_entry(model, "target_modules", config.target_modules, names)
    return selected


def find_targets(model: nn.Module, config: DoraConfig) -> list[str]:
    """Dotted names of the modules ``config`` selects, in model order; errors if it selects nothing."""
    return list(select_targets(model, config))


def _check_each_entry(model: nn.Module, field: str, patterns: tuple[str, ...], names: list[str]) -> None:
    unmatched = _unmatched(patterns, names)
    if unmatched:
        raise ValueError(
            f"{field} entries {unmatched} match no module of {type(model).__name__}. "
            f"Closest module names that exist: {closest_names(unmatched, names)}"
        )


def layer_class(module: nn.Module, config: DoraConfig) -> type[AdapterLayer] | None:
    """The layer class for ``module`` under ``config`` (``None``: no adapter for this module type).

    The method comes from the config (VeRA/DVoRA when ``use_vera``, else DoRA/LoRA on the module's own kind);
    the kind from the module (:func:`torchdora.layers.adapter_class_for`).
    """
    own = adapter_class_for(module)
    if config.use_vera:
        return VeraAdapter if own is LinearAdapter else None  # floating-point Linear / Conv1D only
    return own


def layer_options(config: DoraConfig, name: str) -> dict[str, Any]:
    """The per-adapter options of module ``name``: what :class:`AdapterLayer` and its ``add_adapter`` take."""
    options: dict[str, Any] = dict(
        r=config.rank_for(name), alpha=config.alpha_for(name), dropout=config.dropout, use_dora=config.use_dora,
        use_rslora=config.use_rslora, magnitude_only=config.is_magnitude_only(name), init=config.init,
        dtype=config.torch_dtype, detach_norm=config.detach_norm, recompute_output=config.recomputes(name),
    )
    if config.use_vera:
        options.pop("init")
        options["d_initial"] = config.d_initial
    return options


def _check_placement(model: nn.Module, config: DoraConfig, adapter_name: str, targets: dict[str, nn.Module]) -> None:
    """Every reason the adapter cannot go on ``targets``, before anything is changed."""
    names = list(targets)
    for field in ("magnitude_only_modules", "recompute_modules"):
        unmatched = _unmatched(getattr(config, field), names)
        if unmatched:
            raise ValueError(
                f"{field} entries {unmatched} match none of the targeted modules "
                f"{names[:8]}; they must also be listed in target_modules"
            )
    unsupported = [(n, type(m).__name__) for n, m in targets.items()
                   if not isinstance(m, AdapterLayer) and layer_class(m, config) is None]
    if unsupported and config.use_vera:
        name, kind = unsupported[0]
        raise TypeError(f"VeRA/DVoRA adapt nn.Linear and transformers Conv1D only (floating-point weights); "
                        f"{name!r} is a {kind}. Narrow target_modules to linear layers")
    if unsupported:
        raise TypeError(f"no adapter for module type(s) {unsupported[:8]}; supported are nn.Linear, transformers "
                        "Conv1D, nn.Conv1d/2d/3d and nn.Embedding. Narrow target_modules to those layers")
    not_fused = [n for n, m in targets.items() if config.recomputes(n) and not issubclass(
        type(m) if isinstance(m, AdapterLayer) else layer_class(m, config), FUSED_ADAPTERS)]
    if not_fused:
        raise ValueError(
            f"recompute_modules selects {not_fused[:8]}, which are not Linear/Conv1D layers (plain or quantized); "
            "only those have the fused DoRA backward that can recompute its product. Narrow recompute_modules"
        )
    shared = [n for n, m in targets.items() if isinstance(m, AdapterLayer)
              and (config.use_vera or isinstance(m, VeraAdapter))]
    if shared:
        raise ValueError(
            f"adapter {adapter_name!r} would share {shared[:4]} with another adapter, and a VeRA/DVoRA layer holds "
            "one adapter (its d and b are the layer's). Target modules without adapters (exclude_modules)"
        )


def place_adapter(model: nn.Module, adapter_name: str, config: DoraConfig, active: bool) -> dict[str, nn.Module]:
    """Put adapter ``adapter_name`` on every module ``config`` selects, all or nothing.

    A plain module is wrapped in a new layer (in its train/eval mode); an existing adapter layer gains the
    adapter. ``active``: whether new layers compute with it (``False``: inactive until ``set_adapter``). VeRA/
    DVoRA layers share one frozen random pair sized for their largest target (PEFT's rule). Returns the wrapped
    base modules by name. On any error the model is left as it was.
    """
    targets = select_targets(model, config)
    _check_placement(model, config, adapter_name, targets)
    plain = {n: m for n, m in targets.items() if not isinstance(m, AdapterLayer)}
    for cls in {layer_class(m, config) for m in plain.values()}:
        cls.prepare_model(model)
    projection = (VeraProjection.for_modules(plain, config.r, config.projection_prng_key)
                  if config.use_vera else None)
    added: list[AdapterLayer] = []
    wrapped: dict[str, nn.Module] = {}
    try:
        for name, module in targets.items():
            options = layer_options(config, name)
            if isinstance(module, AdapterLayer):
                module.add_adapter(adapter_name, **options)
                added.append(module)
                continue
            cls = layer_class(module, config)
            extra = {"projection": projection} if projection is not None else {}
            layer = cls(module, adapter_name=adapter_name, **options, **extra)
            layer.train(module.training)  # a model put in eval mode before injecting stays there (dropout off)
            if not active:
                layer.set_adapter([])
            set_submodule(model, name, layer)
            wrapped[name] = module
    except BaseException:
        for layer in added:
            layer.delete_adapter(adapter_name)
        for name, base in wrapped.items():
            set_submodule(model, name, base)
        raise
    return wrapped
