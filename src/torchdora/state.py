"""The one owner of a model's adapter state: which adapters it has, with which configs, which are active.

A model with torchdora adapters carries one :class:`AdapterState` (as the attribute ``torchdora_state``); every
other module reads and changes it through the functions here. The adapter *tensors* live in the adapter layers
(:class:`torchdora.layers.AdapterLayer`), found with :func:`adapter_layers`; a layer's current adapter is the
layer's own business (:meth:`AdapterLayer.using`).

Hooks (:func:`on_adapters_added`) let an integration react when a model gains or loses its adapters without the
core importing it: :mod:`torchdora.hf` registers the Hugging Face save hooks that way.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

from torch import nn

from torchdora.config import DoraConfig
from torchdora.layers import AdapterLayer

__all__ = [
    "AdapterState",
    "state_of",
    "require_state",
    "create_state",
    "drop_state",
    "on_adapters_added",
    "adapter_layers",
    "all_adapter_layers",
    "set_submodule",
    "using_layers",
]

STATE_ATTR = "torchdora_state"

Hook = Callable[[nn.Module], None]
_ADDED_HOOKS: list[Hook] = []
_REMOVED_HOOKS: list[Hook] = []


@dataclasses.dataclass
class AdapterState:
    """A model's adapters: ``configs`` by name in the order they were added, the ``active`` ones (whose updates
    the forward adds up), and the ``current`` one (whose config :meth:`config` returns; see
    :func:`torchdora.using_adapter`)."""

    configs: dict[str, DoraConfig]
    active: list[str]
    current: str

    def config(self) -> DoraConfig:
        return self.configs[self.current]

    def check_known(self, names: list[str], model: nn.Module) -> None:
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise ValueError(f"no adapter named {unknown} in {type(model).__name__}; it has {list(self.configs)}")


def state_of(model: nn.Module) -> AdapterState | None:
    """``model``'s adapter state, ``None`` if it has no torchdora adapters."""
    state = model.__dict__.get(STATE_ATTR)
    return state if isinstance(state, AdapterState) else None


def require_state(model: nn.Module) -> AdapterState:
    """``model``'s adapter state; ``ValueError`` if it has none."""
    state = state_of(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no torchdora adapters: call torchdora.inject(model, config) first")
    return state


def create_state(model: nn.Module, adapter_name: str, config: DoraConfig) -> AdapterState:
    """Give ``model`` its adapter state with one active adapter, and run the added-adapters hooks."""
    state = AdapterState(configs={adapter_name: config}, active=[adapter_name], current=adapter_name)
    model.__dict__[STATE_ATTR] = state
    for hook in _ADDED_HOOKS:
        hook(model)
    return state


def drop_state(model: nn.Module) -> None:
    """Forget ``model``'s adapter state (its last adapter is gone) and run the removed-adapters hooks."""
    if model.__dict__.pop(STATE_ATTR, None) is not None:
        for hook in _REMOVED_HOOKS:
            hook(model)


def on_adapters_added(added: Hook, removed: Hook) -> None:
    """Call ``added(model)`` when a model gains its first adapter and ``removed(model)`` when it loses its last."""
    if added not in _ADDED_HOOKS:
        _ADDED_HOOKS.append(added)
        _REMOVED_HOOKS.append(removed)


def all_adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer of ``model`` by dotted name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer of ``model`` by dotted name (inside :func:`torchdora.using_adapter`, those that hold
    that adapter)."""
    return {name: m for name, m in all_adapter_layers(model).items() if m.current_adapter is not None}


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@contextlib.contextmanager
def using_layers(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """Within the block every layer computes and reports with ``adapter_name`` (layers without it with none),
    and :meth:`AdapterState.config` is that adapter's."""
    state = require_state(model)
    state.check_known([adapter_name], model)
    previous = state.current
    with contextlib.ExitStack() as stack:
        for layer in all_adapter_layers(model).values():
            stack.enter_context(layer.using(adapter_name if adapter_name in layer.adapters else None))
        state.current = adapter_name
        try:
            yield
        finally:
            state.current = previous
