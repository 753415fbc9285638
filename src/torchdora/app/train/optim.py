"""AdamW's parameter groups: DoRA's magnitude ``m`` may get its own learning rate and weight decay.

DoRA trains ``m`` (one scalar per output feature, paper section 4, Eq. 5) with the same optimizer as ``A`` and
``B``. ``m`` starts at ``||W0||`` per row and its gradient has another scale than the direction's, so its step
size is a setting worth changing on its own (``--magnitude-lr-ratio``, ``--magnitude-weight-decay``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from torchdora.inject import adapter_layers

__all__ = ["magnitude_parameters", "param_groups", "apply_group_settings"]

#: the key of the magnitude in :meth:`torchdora.layers.base.AdapterLayer.adapter_parameters`
MAGNITUDE = "magnitude"


def magnitude_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable magnitude vectors ``m`` of ``model``'s DoRA/DVoRA layers (none for LoRA, VeRA, full)."""
    found = [layer.adapter_parameters().get(MAGNITUDE) for layer in adapter_layers(model).values()]
    return [p for p in found if p is not None and p.requires_grad]


def param_groups(model: nn.Module, lr: float, magnitude_lr_ratio: float = 1.0, weight_decay: float = 0.0,
                 magnitude_weight_decay: float | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``model``'s trainable parameters, each parameter exactly once.

    The magnitudes get ``lr · magnitude_lr_ratio`` and ``magnitude_weight_decay`` (``None``: ``weight_decay``);
    every other trainable parameter ``lr`` and ``weight_decay``. When the magnitude's settings equal the rest's
    (the default), one group holds every parameter in ``named_parameters()`` order, as a plain
    ``AdamW(params)`` would, so checkpoints written before this option existed still resume.
    Each group carries ``lr_ratio``; :func:`apply_group_settings` reads it when a resume changes ``lr``.
    """
    if magnitude_lr_ratio <= 0:
        raise ValueError(f"magnitude_lr_ratio must be positive, got {magnitude_lr_ratio!r}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = weight_decay if magnitude_weight_decay is None else magnitude_weight_decay
    magnitude = {id(p) for p in magnitude_parameters(model)}
    if not magnitude or (magnitude_lr_ratio == 1.0 and decay == weight_decay):
        return [{"params": trainable, "lr": lr, "weight_decay": weight_decay, "lr_ratio": 1.0}]
    return [
        {"params": [p for p in trainable if id(p) not in magnitude], "lr": lr, "weight_decay": weight_decay,
         "lr_ratio": 1.0},
        {"params": [p for p in trainable if id(p) in magnitude], "lr": lr * magnitude_lr_ratio,
         "weight_decay": decay, "lr_ratio": magnitude_lr_ratio, "magnitude": True},
    ]


def apply_group_settings(groups: list[dict[str, Any]], lr: float, weight_decay: float,
                         magnitude_weight_decay: float | None = None) -> list[float]:
    """Set each group's peak ``initial_lr`` (``lr · lr_ratio``) and ``weight_decay`` from the run's settings, in
    place (after a checkpoint loaded the optimizer's own); returns the peak rates for the scheduler's ``base_lrs``."""
    peaks = []
    for group in groups:
        group["initial_lr"] = lr * group.get("lr_ratio", 1.0)
        magnitude = group.get("magnitude", False) and magnitude_weight_decay is not None
        group["weight_decay"] = magnitude_weight_decay if magnitude else weight_decay
        peaks.append(group["initial_lr"])
    return peaks
