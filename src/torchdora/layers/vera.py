"""VeRA and DVoRA adapters for ``nn.Linear`` and transformers' ``Conv1D``.

VeRA (Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024, eq. 1)::

    y = x W0ᵀ + b0 + x (Λ_b B Λ_d A)ᵀ

``A`` ``(r, in)`` and ``B`` ``(out, r)`` are frozen random matrices shared by every adapted layer; only
``d`` ``(r,)`` (``Λ_d = diag(d)``, starts at ``d_initial``) and ``b`` ``(out,)`` (``Λ_b = diag(b)``, starts at 0,
so the adapter starts as the identity) train. DVoRA (DoRA paper §5.4) puts DoRA's magnitude on top::

    W' = m · (W0 + Λ_b B Λ_d A) / ||W0 + Λ_b B Λ_d A||,      m starts at ||W0||

The update is the LoRA pair ``A' = Λ_d A``, ``B' = Λ_b B`` with scale 1
(:func:`torchdora.functional.vera_factors`), so the DoRA machinery of :class:`AdapterLayer` (factored norm,
its cache, merge, unmerge, the fused linear path) runs unchanged on it.

The shared pair follows PEFT: one :class:`VeraProjection` per model sized ``(r, max in)`` / ``(max out, r)`` over
the adapted layers, each layer using ``A[:, :in]`` and ``B[:out, :]``, so layers of one shape use identical
matrices. It is a submodule of every layer (one object: ``.to()`` moves it once) holding non-persistent
buffers, so a model's ``state_dict`` never repeats it per layer: :func:`torchdora.inject` regenerates it from
``projection_prng_key`` and :func:`torchdora.save_adapter` writes it once.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from torchdora import functional as DF
from torchdora.layers.base import AdapterLayer, is_conv1d
from torchdora.layers.linear import LinearAdapter

__all__ = ["VeraProjection", "VeraAdapter", "shared_projection"]


class VeraProjection(nn.Module):
    """The frozen random pair shared by all VeRA/DVoRA layers of a model.

    Buffers ``vera_A`` ``(r, in_features)`` and ``vera_B`` ``(out_features, r)``, drawn from ``seed`` by
    :func:`torchdora.functional.vera_projections` (PEFT's rule). Non-persistent: never in a ``state_dict``.
    """

    def __init__(self, r: int, in_features: int, out_features: int, seed: int = 0) -> None:
        super().__init__()
        self.r, self.seed = int(r), int(seed)
        vera_A, vera_B = DF.vera_projections(self.r, in_features, out_features, self.seed)
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)

    @classmethod
    def for_modules(cls, modules: Mapping[str, nn.Module], r: int, seed: int) -> "VeraProjection":
        """The pair sized for the largest of ``modules`` (``nn.Linear`` or ``Conv1D``), on their weights' device."""
        sizes, device = [], None
        for name, module in modules.items():
            if not (isinstance(module, nn.Linear) or is_conv1d(module)):
                raise TypeError(
                    f"VeRA/DVoRA adapt nn.Linear and transformers Conv1D only; {name!r} is a "
                    f"{type(module).__name__}. Narrow target_modules to linear layers"
                )
            w = module.weight
            sizes.append((w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0]))  # (in, out)
            device = device or w.device
        if not sizes:
            raise ValueError("no modules to size the VeRA projections for")
        projection = cls(r, max(s[0] for s in sizes), max(s[1] for s in sizes), seed)
        return projection.to(device) if device is not None and device.type != "meta" else projection

    @property
    def in_features(self) -> int:
        return self.vera_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.vera_B.shape[0]

    def extra_repr(self) -> str:
        return f"r={self.r}, max_in={self.in_features}, max_out={self.out_features}, seed={self.seed}"


class VeraAdapter(LinearAdapter):
    """VeRA (``use_dora=False``) or DVoRA (``use_dora=True``) around an ``nn.Linear`` / ``Conv1D``.

    Parameters: ``vera_lambda_d`` ``(r,)``, ``vera_lambda_b`` ``(out,)`` (PEFT's names), and for DVoRA
    ``magnitude`` ``(out,)``. ``projection`` is the model's shared :class:`VeraProjection` (rank ``r``, at least
    this layer's size). There is no scale: ``scaling = 1``, whatever ``alpha`` the config records.
    """

    def __init__(self, base: nn.Module, *, projection: VeraProjection, r: int, d_initial: float = 0.1,
                 **kwargs) -> None:
        if kwargs.get("magnitude_only"):
            raise ValueError("a VeRA/DVoRA layer always trains d and b; magnitude_only applies to DoRA only")
        kwargs.pop("init", None)
        # AdapterLayer.__init__ calls _init_direction below; the projection is attached after it, so the update is
        # zero there and DVoRA's magnitude starts at ||W0||.
        super().__init__(base, r=r, **kwargs)
        self.scaling = 1.0  # VeRA has no scale (alpha is recorded with the config but does not apply)
        if projection.r != r or projection.in_features < self.in_features or projection.out_features < self.out_features:
            raise ValueError(
                f"the shared VeRA projection ({projection.extra_repr()}) does not fit this layer (r={r}, "
                f"in={self.in_features}, out={self.out_features}); build it with VeraProjection.for_modules"
            )
        self.vera_projection = projection
        self.d_initial = float(d_initial)
        self.reset_vera_parameters(self.d_initial)

    combinable = False  # d and b are the layer's, not a named adapter's
    _plain_cache_inputs = False  # the norm depends on d, b and the shared pair

    def add_adapter(self, name: str, **kwargs):
        if len(self.adapters):  # d and b live on the layer, not in a named adapter: one adapter per layer
            raise ValueError(f"a VeRA/DVoRA layer holds one adapter; {type(self).__name__} cannot add {name!r}")
        return super().add_adapter(name, **kwargs)

    def _init_direction(self, r: int, init: str, factory: dict) -> None:
        self.lora_A = self.lora_B = None  # no LoRA pair: the update is built from d, b and the shared A, B
        self.vera_lambda_d = nn.Parameter(torch.zeros(r, **factory))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **factory))
        self.vera_projection: VeraProjection | None = None

    def reset_vera_parameters(self, d_initial: float = 0.1) -> None:
        """``d = d_initial``, ``b = 0`` (VeRA §3.1): the update starts at zero, as PEFT's ``init_weights=True``."""
        with torch.no_grad():
            self.vera_lambda_d.fill_(d_initial)
            self.vera_lambda_b.zero_()

    def vera_A_slice(self) -> Tensor:
        """This layer's ``A`` ``(r, in)``: the shared ``vera_A[:, :in]`` in the parameters' dtype."""
        return self.vera_projection.vera_A[:, : self.in_features].to(self.vera_lambda_d.dtype)

    def vera_B_slice(self) -> Tensor:
        """This layer's ``B`` ``(out, r)``: the shared ``vera_B[:out, :]`` in the parameters' dtype."""
        return self.vera_projection.vera_B[: self.out_features, :].to(self.vera_lambda_b.dtype)

    def _factors(self) -> tuple[Tensor, Tensor] | tuple[None, None]:
        if self.vera_projection is None:  # during AdapterLayer.__init__: b = 0, no update yet
            return None, None
        return DF.vera_factors(self.vera_A_slice(), self.vera_B_slice(), self.vera_lambda_d, self.vera_lambda_b)

    def lora_A_2d(self) -> Tensor | None:
        """``A' = Λ_d A`` ``(r, in)``: the update as a LoRA factor (scale 1)."""
        return self._factors()[0]

    def lora_B_2d(self) -> Tensor | None:
        """``B' = Λ_b B`` ``(out, r)``: the update as a LoRA factor (scale 1)."""
        return self._factors()[1]

    def _cache_inputs(self) -> dict:
        inputs = super()._cache_inputs()
        inputs["tensors"] = (self._weight_storage(), self.vera_lambda_d, self.vera_lambda_b)
        if self.vera_projection is not None:  # the frozen pair every layer shares
            inputs["tensors"] += (self.vera_projection.vera_A, self.vera_projection.vera_B)
        return inputs

    def _lora_product(self, x: Tensor) -> Tensor:
        d = self.vera_lambda_d
        return DF.vera_update(x.to(d.dtype), self.vera_A_slice(), self.vera_B_slice(), d, self.vera_lambda_b).to(x.dtype)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """``vera_lambda_d``, ``vera_lambda_b`` and (DVoRA) ``magnitude``; the shared pair is saved once per model."""
        named = {"vera_lambda_d": self.vera_lambda_d, "vera_lambda_b": self.vera_lambda_b, "magnitude": self.magnitude}
        return {k: v for k, v in named.items() if v is not None}

    def extra_repr(self) -> str:
        kind = "dvora" if self.use_dora else "vera"
        return f"{kind}, r={self.r}, d_initial={self.d_initial:g}, dropout={self.dropout_p:g}"


def shared_projection(layers: Iterable[AdapterLayer]) -> VeraProjection | None:
    """The one :class:`VeraProjection` the VeRA/DVoRA ``layers`` share, ``None`` if there is none.

    Raises ``ValueError`` if the layers hold different pairs (built by hand, not by :func:`torchdora.inject`).
    """
    found = {id(layer.vera_projection): layer.vera_projection for layer in layers if isinstance(layer, VeraAdapter)}
    if len(found) > 1:
        raise ValueError(f"VeRA layers hold {len(found)} different projection pairs; inject them with one config")
    return next(iter(found.values()), None)
