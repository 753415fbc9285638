"""One named adapter's tensors and settings (:class:`Adapter`), and how a layer exposes the one it computes with.

A layer (:class:`torchdora.layers.base.AdapterLayer`) keeps its adapters in ``layer.adapters`` by name;
:class:`PerAdapter` attributes (``layer.lora_A``, ``layer.scaling``, ...) read and write the adapter the layer is
computing with, so a layer kind's code is written for one adapter. The state-dict hooks keep the default
adapter's keys those of the layer itself (``<layer>.lora_A``), as before named adapters existed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from torchdora import functional as DF
from torchdora.cache import CachedValue

__all__ = ["Adapter", "PerAdapter", "DEFAULT_ADAPTER", "is_conv1d", "default_keys_out", "default_keys_in",
           "default_keys_reported"]

DEFAULT_ADAPTER = "default"


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' GPT-2 style ``Conv1D`` (a linear layer with weight ``(in, out)``)."""
    if not any(c.__name__ == "Conv1D" for c in type(module).__mro__):
        return False  # cheap test first: never import transformers for modules that cannot be one
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is an optional extra
        return False
    return isinstance(module, Conv1D)


class Adapter(nn.Module):
    """One named adapter of a layer: ``A`` ``(r, in, *kernel)``, ``B`` ``(out, r, *ones)`` (``None`` for a
    magnitude-only module, paper §5.6), ``m`` ``(out,)`` (``None`` for plain LoRA), the scale ``s`` and the
    dropout, and the caches of its norm ``||W + s·B·A||`` and factor ``m / ||W + s·B·A||``.

    The layer that holds it creates ``A`` and ``B`` in its geometry and initialises ``m`` from the base weight
    (:meth:`AdapterLayer.add_adapter`).
    """

    def __init__(self, *, r: int, alpha: float, dropout: float, use_dora: bool, use_rslora: bool,
                 magnitude_only: bool, detach_norm: bool = True, recompute_output: bool = False) -> None:
        super().__init__()
        if magnitude_only and not use_dora:
            raise ValueError("magnitude_only=True needs use_dora=True: plain LoRA has no magnitude to train")
        self.r = r
        self.lora_alpha = float(alpha)
        self.use_rslora = use_rslora
        self.scaling = DF.lora_scaling(r, alpha, use_rslora)
        self.use_dora = use_dora
        self.magnitude_only = magnitude_only
        self.dropout_p = float(dropout)
        #: treat the norm as a constant in backward (paper §4.3); ``False``: the exact gradient
        self.detach_norm = detach_norm
        #: fused path: keep what LoRA keeps and recompute ``x Wᵀ`` in backward for the magnitude's gradient,
        #: rather than keep the ``(N, out)`` output (see :func:`torchdora.fast.dora_linear`)
        self.recompute_output = recompute_output
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # the layer creates A and B in its geometry (AdapterLayer._init_direction), then m = ||W + s·B·A||
        for name in ("lora_A", "lora_B", "magnitude"):
            self.register_parameter(name, None)
        # cached without autograd, each checked against the contents it was computed from (torchdora.cache)
        self._norm_cache = CachedValue()
        self._factor_cache = CachedValue()
        self._zero_magnitude_cache = CachedValue()
        #: the inference forward's tensors (torchdora.fast.eval_plan) of the linear layers
        self._eval_cache = CachedValue()

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors under fixed names (``lora_A``, ``lora_B``, ``magnitude``), present ones only."""
        named = {"lora_A": self.lora_A, "lora_B": self.lora_B, "magnitude": self.magnitude}
        return {k: v for k, v in named.items() if v is not None}

    def clear_cache(self) -> None:
        for cache in (self._norm_cache, self._factor_cache, self._zero_magnitude_cache, self._eval_cache):
            cache.clear()

    def extra_repr(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        extra = ", magnitude_only" if self.magnitude_only else ""
        return f"{kind}, r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:g}, dropout={self.dropout_p:g}{extra}"


class PerAdapter:
    """``layer.<name>`` reads and writes the attribute of the adapter the layer is computing with."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, layer: nn.Module | None, owner: type | None = None) -> Any:
        if layer is None:
            return self
        adapter = layer.adapter
        parameters = adapter._parameters  # a parameter's read through nn.Module.__getattr__ is the slow path
        if self.name in parameters:
            return parameters[self.name]
        return getattr(adapter, self.name)

    def __set__(self, layer: nn.Module, value: Any) -> None:
        setattr(layer.adapter, self.name, value)


# state-dict hooks of a layer: the default adapter's tensors keep the keys they had before named adapters existed
DEFAULT_PREFIX = f"adapters.{DEFAULT_ADAPTER}."


def default_keys_out(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    inner = prefix + DEFAULT_PREFIX
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def default_keys_in(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    if DEFAULT_ADAPTER not in module.adapters:
        return
    names = {n.split(".", 1)[0] for n, _ in module.adapters[DEFAULT_ADAPTER].state_dict(keep_vars=True).items()}
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0] in names]:
        state_dict[prefix + DEFAULT_PREFIX + key[len(prefix):]] = state_dict.pop(key)


def default_keys_reported(module: nn.Module, incompatible: Any) -> None:
    """Missing keys of the default adapter are reported under its state-dict keys too."""
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [k.replace("." + DEFAULT_PREFIX, ".") if not k.startswith(DEFAULT_PREFIX)
                   else k[len(DEFAULT_PREFIX):] for k in keys]
