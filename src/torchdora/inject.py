"""Put adapters into any ``nn.Module`` by name, take them out, merge them, switch them off."""

from __future__ import annotations

import contextlib
import difflib
import re
from typing import Iterator, Sequence

from torch import nn

from torchdora.config import ALL_LINEAR, DoraConfig, module_matches
from torchdora.layers import (
    FUSED_ADAPTERS, AdapterLayer, LinearAdapter, VeraAdapter, VeraProjection, adapter_class_for, is_conv1d,
)
from torchdora.layers.base import DEFAULT_ADAPTER

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

_CONFIG_ATTR = "torchdora_config"
#: every named adapter's config, ``{name: DoraConfig}`` (see :mod:`torchdora.adapters`)
_CONFIGS_ATTR = "torchdora_configs"


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s) that ``"all-linear"`` leaves alone (as PEFT does)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


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


def _closest_names(model: nn.Module, patterns: str | tuple[str, ...]) -> list[str]:
    return closest_names(patterns, [name for name, _ in model.named_modules() if name])


def _unmatched(patterns: tuple[str, ...], names: Sequence[str]) -> list[str]:
    """The entries of a name list that select none of ``names``."""
    return [p for p in patterns if not any(module_matches(n, (p,)) for n in names)]


def _check_each_entry(model: nn.Module, field: str, patterns: str | tuple[str, ...], names: list[str]) -> None:
    """Every entry of a name list must select something: a typo must not pass because another entry matched."""
    if isinstance(patterns, str):
        return
    unmatched = _unmatched(patterns, names)
    if unmatched:
        raise ValueError(
            f"{field} entries {unmatched} match no module of {type(model).__name__}. "
            f"Closest module names that exist: {_closest_names(model, tuple(unmatched))}"
        )


def find_targets(model: nn.Module, config: DoraConfig) -> list[str]:
    """Dotted names of the modules ``config`` selects, in model order; errors if it selects nothing."""
    heads = _output_head_names(model)
    selected: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if config.target_modules == ALL_LINEAR:
            hit = _is_linear(module) and name not in heads
        else:
            hit = module_matches(name, config.target_modules)
        if hit and config.exclude_modules and module_matches(name, config.exclude_modules):
            hit = False
        if hit:
            selected.append(name)
    if not selected:
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no module of {type(model).__name__}. "
            f"Closest module names that exist: {_closest_names(model, config.target_modules)}"
        )
    if config.target_modules != ALL_LINEAR:
        _check_each_entry(model, "target_modules", config.target_modules, [n for n, _ in model.named_modules() if n])
    return selected


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer of ``model`` by dotted name (inside :func:`torchdora.using_adapter`, those that hold
    that adapter)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer) and m._current is not None}


def adapter_config(model: nn.Module) -> DoraConfig:
    """The config ``model``'s adapters were injected with."""
    config = getattr(model, _CONFIG_ATTR, None)
    if not isinstance(config, DoraConfig):
        raise ValueError(f"{type(model).__name__} has no torchdora adapters: call torchdora.inject(model, config) first")
    return config


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: DoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, nn.Module]:
    """Wrap every module ``config`` targets in a DoRA (or LoRA) adapter layer, in place.

    The adapter is named ``adapter_name`` (``"default"``); :func:`torchdora.add_adapter` adds more.

    Afterwards only adapter parameters and the parameters of ``config.modules_to_save`` are trainable.
    Returns the replaced base modules by name (they live on inside the adapters as ``.base``).

    Raises:
        ValueError: the model already has adapters, a target matches nothing (the message lists the
            closest names that exist), a ``modules_to_save`` / ``magnitude_only_modules`` entry matches
            nothing, or a module cannot take an adapter (a grouped convolution).
        TypeError: a targeted module's type has no adapter (supported: Linear, transformers Conv1D,
            Conv1d/2d/3d, Embedding).

    On any error the model is left as it was (modules, trainable flags). New adapter layers take the
    train/eval mode of the module they wrap.
    """
    if adapter_layers(model) or hasattr(model, _CONFIG_ATTR):
        raise ValueError(
            f"{type(model).__name__} already has torchdora adapters; inject once, or call "
            "merge_and_unload(model) first to start from plain modules"
        )
    targets = find_targets(model, config)
    for field in ("magnitude_only_modules", "recompute_modules"):
        unmatched = _unmatched(getattr(config, field), targets)
        if unmatched:
            raise ValueError(
                f"{field} entries {unmatched} match none of the targeted modules "
                f"{targets[:8]}; they must also be listed in target_modules"
            )
    not_linear = [n for n in targets if config.recomputes(n)
                  and not issubclass(adapter_class_for(model.get_submodule(n)) or LinearAdapter, FUSED_ADAPTERS)]
    if not_linear:
        raise ValueError(
            f"recompute_modules selects {not_linear[:8]}, which are not Linear/Conv1D layers (plain or quantized); "
            "only those have the fused DoRA backward that can recompute its product. Narrow recompute_modules"
        )
    unsupported = [(n, type(model.get_submodule(n)).__name__) for n in targets
                   if adapter_class_for(model.get_submodule(n)) is None]
    if unsupported:
        raise TypeError(
            f"no adapter for module type(s) {unsupported[:8]}; supported are nn.Linear, transformers Conv1D, "
            "nn.Conv1d/2d/3d and nn.Embedding. Narrow target_modules to those layers"
        )
    save_names = [n for n, _ in model.named_modules() if n and config.modules_to_save
                  and module_matches(n, config.modules_to_save)]
    _check_each_entry(model, "modules_to_save", config.modules_to_save, [n for n, _ in model.named_modules() if n])

    # A layer can still refuse its module (e.g. a grouped conv): remember the trainable flags so that a
    # failure part-way leaves the model exactly as it was.
    # VeRA/DVoRA: one frozen random pair for the whole model, sized for its largest target (PEFT's rule)
    vera = {} if not config.use_vera else {
        "projection": VeraProjection.for_modules({n: model.get_submodule(n) for n in targets}, config.r,
                                                 config.projection_prng_key),
        "d_initial": config.d_initial,
    }
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    replaced: dict[str, nn.Module] = {}
    try:
        for name in targets:
            base = model.get_submodule(name)
            layer_cls = VeraAdapter if config.use_vera else adapter_class_for(base)
            assert layer_cls is not None  # checked above
            layer = layer_cls(
                base,
                r=config.rank_for(name),
                alpha=config.alpha_for(name),
                dropout=config.dropout,
                use_dora=config.use_dora,
                use_rslora=config.use_rslora,
                detach_norm=config.detach_norm,
                magnitude_only=config.is_magnitude_only(name),
                recompute_output=config.recomputes(name),
                init=config.init,
                dtype=config.torch_dtype,
                **vera,
                adapter_name=adapter_name,
            )
            layer.train(base.training)  # a model put in eval mode before injecting stays there (dropout off)
            _set_submodule(model, name, layer)
            replaced[name] = base
    except BaseException:
        for name, base in replaced.items():
            _set_submodule(model, name, base)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    for name in save_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    setattr(model, _CONFIG_ATTR, config)
    setattr(model, _CONFIGS_ATTR, {adapter_name: config})
    _hf_hooks(model, attach=True)
    return replaced


def _forget_configs(model: nn.Module) -> None:
    for attr in (_CONFIG_ATTR, _CONFIGS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    _hf_hooks(model, attach=False)


def _hf_hooks(model: nn.Module, attach: bool) -> None:
    """Adapter-only ``save_pretrained`` on transformers models while adapters are in (see :mod:`torchdora.hf`)."""
    from torchdora import hf

    (hf.attach if attach else hf.detach)(model)


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> None:
    """Merge the active adapters (or ``adapter_names``) into the base weights (merging twice raises).

    Adapters not merged stay: an active one then computes on top of the merged weight.
    """
    for layer in adapter_layers(model).values():
        if adapter_names is None:
            layer.merge()
        else:
            layer.merge([n for n in adapter_names if n in layer.adapters])


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` for every adapter."""
    for layer in adapter_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapters and put the plain base modules back; returns ``model`` with no adapter left."""
    for name, layer in adapter_layers(model).items():
        if not layer.merged:
            layer.merge()
        _set_submodule(model, name, layer.base)
    _forget_configs(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapters without merging: the plain base modules go back; returns ``model``."""
    for name, layer in adapter_layers(model).items():
        if layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base)
    _forget_configs(model)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model as if no adapter were there (``modules_to_save`` stay as trained).

    PEFT's name for it, :func:`torchdora.disable_adapter`, is the same context manager.
    """
    layers = list(adapter_layers(model).values())
    merged = [layer for layer in layers if layer.merged]
    if merged:
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
    for layer in adapter_layers(model).values():
        layer.clear_cache()


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
