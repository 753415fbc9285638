"""Choose, per DoRA layer, whether backward keeps its output or recomputes ``x Wᵀ``.

DoRA's magnitude gradient needs ``z = x Wᵀ + s·(x Aᵀ) Bᵀ`` per token (``∂L/∂m = Σ_tokens ∂L/∂y ⊙ z / n``). The fused
layer (:mod:`torchdora.fast`) recovers ``z`` from the layer's output ``y``, which costs nothing where a later op keeps
``y`` for its own backward anyway (a gated MLP's ``act(gate) ⊙ up`` keeps ``up``'s output), and one ``(tokens, out)``
tensor more than LoRA elsewhere. There, recomputing ``x Wᵀ`` in backward keeps exactly what LoRA keeps, for one
more ``(tokens, in) × (in, out)`` product: a cost per byte saved proportional to ``in_features``.

:func:`choose_recompute` finds out which outputs are kept by running one small forward with autograd's
saved-tensor hooks watching, then picks recompute for the layers whose output nothing keeps and whose
``in_features`` is the smallest among those (the cheapest bytes to give back: in a Llama block the q, k, v
projections, not the MLP's down projection, whose input is 2.7× wider).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from torchdora.layers import FUSED_ADAPTERS, AdapterLayer

__all__ = ["kept_outputs", "choose_recompute"]


def _fused_dora_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """DoRA layers with the fused linear path (the only ones that can recompute), by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FUSED_ADAPTERS) and m.use_dora}


def kept_outputs(model: nn.Module, forward: Callable[[], Any]) -> dict[str, bool]:
    """For each fused DoRA layer of ``model``: whether some later op saves its output for backward.

    ``forward()`` runs the model once with autograd recording (e.g. one short training batch); meanwhile every
    layer recomputes (so its own backward does not save its output) and the storages autograd saves are recorded.
    Nothing is trained: the graph is dropped, and the random number generators are left as they were.
    """
    layers = _fused_dora_layers(model)
    outputs: dict[str, torch.Tensor] = {}
    saved: set[int] = set()
    previous = {name: layer.recompute_output for name, layer in layers.items()}

    def remember(name: str):
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            # holding the output keeps its memory from being reused by a later tensor that a later op saves
            outputs[name] = out
        return hook

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.add(t.untyped_storage().data_ptr())
        return t

    handles = [layer.register_forward_hook(remember(name)) for name, layer in layers.items()]
    try:
        for layer in layers.values():
            layer.recompute_output = True
        # fork_rng: the probe's dropout draws must not shift the training run's (a resumed run probes again)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = forward()
        del result
    finally:
        for h in handles:
            h.remove()
        for name, layer in layers.items():
            layer.recompute_output = previous[name]
    return {name: outputs[name].untyped_storage().data_ptr() in saved for name in layers if name in outputs}


def choose_recompute(model: nn.Module, forward: Callable[[], Any]) -> list[str]:
    """Set ``recompute_output`` on the fused DoRA layers where it saves memory cheaply; returns their names.

    A layer recomputes when :func:`kept_outputs` finds its output kept by nothing else and its ``in_features`` is
    the smallest among such layers; every other layer keeps its output (free where it is kept anyway).
    """
    kept = kept_outputs(model, forward)
    layers = _fused_dora_layers(model)
    candidates = [name for name, is_kept in kept.items() if not is_kept]
    if not candidates:
        return []
    cheapest = min(layers[name].in_features for name in candidates)
    chosen = [name for name in candidates if layers[name].in_features == cheapest]
    for name, layer in layers.items():
        layer.recompute_output = name in chosen
    return chosen
