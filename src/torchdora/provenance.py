"""The base an adapter belongs to: a fingerprint of the adapted base weights, saved with every adapter.

DoRA's magnitudes are absolute (paper eq. 5: ``W' = m · V / ||V||``), so an adapter loaded onto other base weights
(another release, another quantization of "the same" model) is silently another model. Every adapter file records
a 16-number sketch of each adapted module's base weight (:func:`torchdora.functional.weight_sketch`), and
:func:`torchdora.load_adapter` compares it with the weights it loads onto.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchdora.functional import sketch_difference
from torchdora.state import adapter_layers

__all__ = ["FINGERPRINT_KIND", "BASE_TOLERANCE", "base_fingerprint", "base_difference"]

FINGERPRINT_KIND = "torchdora-weight-sketch-1"
#: relative difference of a base weight (estimated) above which an adapter is on "other" base weights: bf16 rounding
#: of the same weights is about 0.1 %, another quantization or release of a model several percent
BASE_TOLERANCE = 1e-2


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """A 16-number sketch (:func:`torchdora.functional.weight_sketch`) of each adapted module's base weight, as saved
    with an adapter; a module whose weight is sharded (FSDP2) is left out."""
    modules = {}
    for name, layer in adapter_layers(model).items():
        if getattr(layer.weight, "placements", None) is None:
            modules[name] = [float(v) for v in layer.base_sketch().flatten()]
    return {"kind": FINGERPRINT_KIND, "modules": modules}


def base_difference(model: nn.Module, recorded: dict[str, Any] | None) -> str | None:
    """How the adapted base weights differ from the recorded fingerprint (``None``: they match, or none recorded)."""
    if not recorded or not isinstance(recorded.get("modules"), dict):
        return None
    now = base_fingerprint(model)["modules"]
    differences = {}
    for name, saved in recorded["modules"].items():
        if name in now and isinstance(saved, list) and len(saved) == len(now[name]):
            differences[name] = sketch_difference(torch.tensor(saved, dtype=torch.float64),
                                                  torch.tensor(now[name], dtype=torch.float64))
    worst = max(differences, key=differences.get, default=None)
    if worst is None or differences[worst] <= BASE_TOLERANCE:
        return None
    over = sum(d > BASE_TOLERANCE for d in differences.values())
    return (f"{over} of {len(differences)} adapted modules differ by more than {BASE_TOLERANCE:.0%}, most "
            f"{worst} by about {differences[worst]:.1%} (relative, estimated from the fingerprint saved with it)")
