"""The shared adapter base: DoRA (and plain LoRA, same code) around a frozen base module.

:class:`AdapterLayer` wraps its base module by composition (``self.base``) and sees the base weight as a 2-D
matrix of output-feature rows, ``(out, in)``; the equations live in :mod:`torchdora.functional`. A layer kind
(one file each in this package) says only how its base weight is viewed as rows and how ``A``/``B`` are applied.

A layer holds one or more named adapters (:class:`Adapter`: ``A``, ``B``, ``m``, the scale and the caches of one
fine-tune) in ``layer.adapters``, a ``ModuleDict`` by name; ``"default"`` is the one :func:`torchdora.inject`
creates. ``layer.lora_A``, ``layer.scaling`` and the other per-adapter attributes read and write the adapter the
layer is computing with (the first active one, or each active one in turn), so a layer kind's code is written
for one adapter. The default adapter's state-dict keys are the layer's own (``<layer>.lora_A``), as before named
adapters existed; another adapter's are ``<layer>.adapters.<name>.lora_A``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from torchdora import functional as DF
from torchdora.cache import CachedValue, in_graph
from torchdora.config import check_adapter_name
from torchdora.layers.adapter import (
    DEFAULT_ADAPTER, Adapter, PerAdapter, default_keys_in, default_keys_out, default_keys_reported,
    is_conv1d,
)
from torchdora.layers.merging import MergeMixin
from torchdora.layers.mixed import MixedBatchMixin

__all__ = ["AdapterLayer", "Adapter", "DEFAULT_ADAPTER", "is_conv1d"]


def _norm_dtype(weight: Tensor) -> torch.dtype:
    """The dtype the norms are accumulated and kept in: fp32, fp64 for an fp64 weight."""
    return torch.promote_types(weight.dtype, torch.float32) if weight.is_floating_point() else torch.float32


class AdapterLayer(MergeMixin, MixedBatchMixin, nn.Module):
    """Common DoRA/LoRA logic; subclasses say how the base weight maps to ``(out, in)`` rows.

    Forward (paper eq. 5, with the dropout form of §4.3), bias never scaled, ``factor = m / ||W + s·B·A||``:

    - no dropout: ``y = factor ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b``
    - dropout ``x~`` in training: ``y = x Wᵀ + b + (factor − 1) ⊙ (x~ Wᵀ) + factor ⊙ s·(x~ Aᵀ) Bᵀ``
    - plain LoRA: ``y = x Wᵀ + b + s·(x~ Aᵀ) Bᵀ``

    Parameters (of each named :class:`Adapter`): ``lora_A`` ``(r, in, *kernel)``, ``lora_B`` ``(out, r, *ones)``,
    ``magnitude`` ``(out,)``; magnitude-only modules (paper §5.6) have no ``lora_A``/``lora_B``. Several active
    adapters add their updates: ``y = base(x) + Σ_i (y_i − base(x))`` with ``y_i`` adapter ``i``'s output, each
    DoRA norm taken against the pre-trained weight (PEFT's rule; ``docs/adapters.md``). Merging writes the
    weight of exactly that sum (:meth:`merge`).
    """

    #: which dim of the output holds the output features (-1 for linear/embedding, 1 for conv)
    feature_dim: int = -1
    #: "factored" (default, never builds ``out × in``) or "dense" (the reference formula)
    norm_method: str = "factored"
    #: use the fused forward/backward of :mod:`torchdora.fast` where the layer type has one (``False``: the plain
    #: autograd composition of :func:`torchdora.functional.dora_combine`, the reference path)
    use_fast_path: bool = True

    # per-adapter attributes, of the adapter the layer is computing with (see the module doc)
    lora_A = PerAdapter()
    lora_B = PerAdapter()
    magnitude = PerAdapter()
    lora_dropout = PerAdapter()
    r = PerAdapter()
    lora_alpha = PerAdapter()
    scaling = PerAdapter()
    use_rslora = PerAdapter()
    use_dora = PerAdapter()
    magnitude_only = PerAdapter()
    dropout_p = PerAdapter()
    detach_norm = PerAdapter()
    recompute_output = PerAdapter()

    def __init__(
        self,
        base: nn.Module,
        *,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_dora: bool = True,
        use_rslora: bool = False,
        detach_norm: bool = True,
        magnitude_only: bool = False,
        init: str = "kaiming",
        dtype: torch.dtype | None = torch.float32,
        recompute_output: bool = False,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.disabled = False
        self._sketch: tuple[tuple, Tensor] | None = None
        #: adapters written into the base weight by :meth:`merge`, in order, and what each merge applied
        self.merged_adapters: list[str] = []
        self._merge_terms: dict[str, tuple[Tensor | None, Tensor | None, Tensor | None, float]] = {}
        #: a sample of the weight :meth:`merge` wrote, and the pre-trained rows it cannot recover from it
        self._merge_written: Tensor | None = None
        self._merge_kept_rows: tuple[Tensor, Tensor] | None = None
        #: per-row adapter names for a mixed batch (set by :func:`torchdora.mixed_batch`), else ``None``
        self.row_adapters: Sequence[str | None] | None = None
        self._sq_norm_cache = CachedValue()  # ||W||² of the shared base, for every adapter
        self.adapters = nn.ModuleDict()
        #: the adapters the forward applies, in order
        self.active_adapters: list[str] = []
        self._current: str | None = None
        self.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, use_dora=use_dora, use_rslora=use_rslora,
                         magnitude_only=magnitude_only, init=init, dtype=dtype, detach_norm=detach_norm,
                         recompute_output=recompute_output)
        self.set_adapter(adapter_name)
        self._register_state_dict_hook(default_keys_out)
        self._register_load_state_dict_pre_hook(default_keys_in, with_module=True)
        self.register_load_state_dict_post_hook(default_keys_reported)

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module routes Parameters and Modules past descriptors; per-adapter names go to the adapter
        if isinstance(getattr(type(self), name, None), PerAdapter):
            adapter = self.adapter
            if name in adapter._parameters and isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                adapter._parameters[name] = value  # a plain tensor in a parameter's place (torch.func.functional_call)
            else:
                setattr(adapter, name, value)
        else:
            super().__setattr__(name, value)

    @classmethod
    def prepare_model(cls, model: nn.Module) -> None:
        """Called on the whole model before layers of this class go into it (e.g. to protect modules not wrapped)."""

    # ---- named adapters -----------------------------------------------------------------------------
    @property
    def adapter(self) -> Adapter:
        """The adapter the per-adapter attributes (``lora_A``, ``scaling``, …) refer to right now."""
        try:  # the dicts directly: this runs several times per layer per generated token
            return self._modules["adapters"]._modules[self._current]
        except KeyError:
            raise RuntimeError(f"{type(self).__name__} holds no adapter") from None

    @property
    def current_adapter(self) -> str | None:
        """The adapter the per-adapter attributes refer to (``None``: this layer does not hold the one in use)."""
        return self._current

    @property
    def merged(self) -> bool:
        """Whether some adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    def add_adapter(self, name: str, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                    use_dora: bool = True, use_rslora: bool = False, magnitude_only: bool = False,
                    init: str = "kaiming", dtype: torch.dtype | None = torch.float32, detach_norm: bool = True,
                    recompute_output: bool = False) -> Adapter:
        """Add a new adapter ``name`` (inactive until :meth:`set_adapter`); ``m`` starts at ``||W + s·B·A||``."""
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"{type(self).__name__} already has an adapter named {name!r}; delete_adapter it first")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got init={init!r}")
        weight = self._weight_storage()
        factory = {"device": weight.device, "dtype": dtype or weight.dtype}
        adapter = Adapter(r=r, alpha=alpha, dropout=dropout, use_dora=use_dora, use_rslora=use_rslora,
                          magnitude_only=magnitude_only, detach_norm=detach_norm, recompute_output=recompute_output)
        adapter.train(self.training)
        self.adapters[name] = adapter
        try:
            with self.using(name):
                if not magnitude_only:
                    self._init_direction(r, init, factory)
                if use_dora:
                    with torch.no_grad():
                        adapter.magnitude = nn.Parameter(self._row_norm(detach=True).to(**factory))
        except BaseException:
            del self.adapters[name]
            raise
        if self._current is None:
            self._current = name
        return adapter

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` (one or several, applied in that order) the active adapters; ``[]`` runs the base.

        Refused while adapters are merged, unless ``names`` are the merged ones: the merged weight applies them
        whatever is active, and an adapter computing on top of it would not see the pre-trained weight.
        """
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"no adapter named {unknown} in {type(self).__name__}; it has {list(self.adapters)}")
        if self.merged_adapters and set(names) != set(self.merged_adapters):
            raise RuntimeError(f"adapters {self.merged_adapters} are merged into the base weight; call unmerge() "
                               f"before making {names} active")
        self.active_adapters = names
        if names:
            self._current = names[0]

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` and its tensors; an active one leaves the active list."""
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r} in {type(self).__name__}; it has {list(self.adapters)}")
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the base weight; unmerge() before deleting it")
        del self.adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]
        if self._current == name:
            self._current = next(iter(self.active_adapters or self.adapters), None)

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator["AdapterLayer"]:
        """Within the block, the per-adapter attributes refer to adapter ``name``."""
        state = self.__dict__  # a plain attribute: nn.Module.__setattr__'s checks cost more than the forward's ops
        previous = state["_current"]
        state["_current"] = name
        try:
            yield self
        finally:
            state["_current"] = previous

    # ---- what subclasses define -------------------------------------------------------------------
    def _init_direction(self, r: int, init: str, factory: dict) -> None:
        """Create the current adapter's direction update: LoRA's ``lora_A``/``lora_B`` (VeRA overrides this)."""
        self.lora_A = nn.Parameter(torch.empty(self._lora_A_shape(r), **factory))
        self.lora_B = nn.Parameter(torch.empty(self._lora_B_shape(r), **factory))
        self.reset_lora_parameters(init)

    def _lora_A_shape(self, r: int) -> tuple[int, ...]:
        raise NotImplementedError

    def _lora_B_shape(self, r: int) -> tuple[int, ...]:
        raise NotImplementedError

    def weight_2d(self) -> Tensor:
        """The base weight as ``(out, in)`` rows (a view, no copy)."""
        raise NotImplementedError

    def _weight_storage(self) -> Tensor:
        """The tensor that holds the frozen base weight, for cache keys: :meth:`weight_2d` here; a quantized
        layer returns its packed storage, not a fresh dequantized copy."""
        return self.weight_2d()

    def base_sketch(self) -> Tensor:
        """:func:`torchdora.functional.weight_sketch` of the pre-trained weight, kept while the stored one is unchanged."""
        storage = self._weight_storage()
        key = (id(storage), storage._version, storage.data_ptr(), tuple(storage.shape))
        if self._sketch is None or self._sketch[0] != key:
            self._sketch = (key, DF.weight_sketch(self._pretrained_weight_2d()))
        return self._sketch[1]

    def _set_weight_2d(self, weight_2d: Tensor) -> None:
        with torch.no_grad():
            self.weight_2d().copy_(weight_2d)

    def _base_product(self, x: Tensor) -> Tensor:
        """``x Wᵀ`` without the bias, in the base module's geometry."""
        raise NotImplementedError

    def _lora_product(self, x: Tensor) -> Tensor:
        """``(x Aᵀ) Bᵀ`` unscaled, returned in ``x``'s dtype."""
        raise NotImplementedError

    def _bias(self) -> Tensor | None:
        return getattr(self.base, "bias", None)

    # ---- the adapter as a weight-space function -----------------------------------------------------
    def lora_A_2d(self) -> Tensor | None:
        return None if self.lora_A is None else self.lora_A.reshape(self.r, -1)

    def lora_B_2d(self) -> Tensor | None:
        return None if self.lora_B is None else self.lora_B.reshape(self.lora_B.shape[0], self.r)

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """``B = 0`` so the adapter starts as the identity; ``A`` Kaiming-uniform or normal with std ``1/r`` (as PEFT)."""
        if self.lora_A is None or self.lora_B is None:
            return
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def base_sq_norm(self) -> Tensor:
        """``||W||²`` per row, cached until the base weight changes (see :mod:`torchdora.cache`)."""
        weight = self.weight_2d()
        if torch.compiler.is_compiling():  # the eager cache, read at run time: the base is frozen
            return in_graph(self, "base_sq_norm", (), (weight,), weight.shape[0], _norm_dtype(weight))
        return self._sq_norm_cache.get(lambda: DF.base_row_sq_norm(weight), (self._weight_storage(),))

    def _row_norm(self, detach: bool) -> Tensor:
        """``||W + s·B·A||`` per row, ``(out,)`` in fp32 (fp64 for fp64 weights)."""
        weight = self.weight_2d()
        a, b = self.lora_A_2d(), self.lora_B_2d()
        if a is None or b is None:
            return self.base_sq_norm().sqrt()
        if detach:
            a, b = a.detach(), b.detach()
        if self.norm_method == "dense":
            return DF.dense_row_norm(weight, a, b, self.scaling)
        return DF.factored_row_norm(weight, a, b, self.scaling, self.base_sq_norm())

    def _cache_inputs(self) -> dict:
        """What the norm depends on, for :meth:`CachedValue.get`: ``A``, ``B``, the base weight, the settings."""
        adapter = self.adapter  # once: each per-adapter attribute read looks the adapter up again
        return {"tensors": (adapter.lora_A, adapter.lora_B, self._weight_storage()),
                "extra": (adapter.scaling, self.norm_method)}

    def row_norm(self) -> Tensor:
        """``||W + s·B·A||`` per row as the forward uses it, ``(out,)``.

        Detached (paper §4.3) unless ``detach_norm=False`` and autograd is recording. The detached norm is
        cached and reused while ``A``, ``B`` and the base weight are unchanged (checked on the host, without a
        device synchronisation: :mod:`torchdora.cache`; an edit through ``.data`` needs
        :func:`torchdora.clear_cache`), so decoding and gradient-accumulation micro-batches compute it once.
        Under ``torch.compile`` a training step (autograd recording) computes it in the graph; an eval forward
        reads the cached one (:func:`torchdora.cache.in_graph`).
        """
        if not self.detach_norm and torch.is_grad_enabled():
            return self._row_norm(detach=False)
        if torch.compiler.is_compiling():
            if torch.is_grad_enabled():
                return self._row_norm(detach=True).detach()
            weight, inputs = self.weight_2d(), self._cache_inputs()
            return in_graph(self, "_cached_row_norm", (self._current,), inputs["tensors"], weight.shape[0],
                            _norm_dtype(weight), inputs["extra"])
        return self.adapter._norm_cache.get(lambda: self._row_norm(detach=True), **self._cache_inputs())

    def _cached_row_norm(self, name: str) -> Tensor:
        """Adapter ``name``'s cached detached norm, eagerly (what a compiled eval forward reads at run time)."""
        with self.using(name):
            return self.adapter._norm_cache.get(lambda: self._row_norm(detach=True), **self._cache_inputs())

    def dora_factor(self) -> Tensor:
        """``m / ||W + s·B·A||`` per output feature, ``(out,)``, ``0`` for a zero-norm row.

        Without autograd recording (inference) the factor is cached and reused while ``m``, ``A``, ``B`` and
        the base weight are unchanged, so unmerged inference computes it once (same rule as :meth:`row_norm`).
        """
        adapter = self.adapter
        magnitude = adapter.magnitude
        if magnitude is None:
            raise RuntimeError("dora_factor() needs a DoRA layer (use_dora=True)")
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            norm = self.row_norm()
            return DF.dora_scale(magnitude.to(norm.dtype), norm)
        inputs = self._cache_inputs()
        inputs["tensors"] += (magnitude,)

        def factor() -> Tensor:
            norm = self.row_norm()
            return DF.dora_scale(magnitude.to(norm.dtype), norm)

        return adapter._factor_cache.get(factor, **inputs)

    def clear_cache(self) -> None:
        """Forget the cached norms and factor (:func:`torchdora.clear_cache` does it for a whole model).

        Needed after an edit the cache cannot see from the host: an in-place edit through ``.data`` (which
        leaves the parameter's version counter alone), a write through shared memory (``.numpy()``, DLPack), or
        an update by something that is not a ``torch.optim.Optimizer`` and writes behind the version counter.
        Every other change is seen (:mod:`torchdora.cache`).
        """
        self._sq_norm_cache.clear()
        for adapter in self.adapters.values():
            adapter.clear_cache()

    def _magnitude_has_zero(self) -> bool:
        """Whether some ``m`` is exactly 0, cached as a Python bool while ``m`` is unchanged (on CUDA the first
        check after a change reads the device once)."""
        adapter = self.adapter
        m = adapter.magnitude
        return adapter._zero_magnitude_cache.get(lambda: bool((m == 0).any()), (m,))

    def _fast_forward(self, x: Tensor) -> Tensor | None:
        """The fused DoRA forward for this layer type, or ``None`` where there is none (the reference runs)."""
        return None

    def _factor_view(self, factor: Tensor, ndim: int) -> Tensor:
        if self.feature_dim == -1:
            return factor
        shape = [1] * ndim
        shape[self.feature_dim] = -1
        return factor.view(shape)

    def _add_bias(self, out: Tensor) -> Tensor:
        bias = self._bias()
        if bias is None:
            return out
        return out + self._factor_view(bias, out.dim())

    def _dropout_active(self) -> bool:
        return self.training and self.dropout_p > 0

    def forward(self, x: Tensor) -> Tensor:
        if self.row_adapters is not None:
            return self.mixed_forward(x, self.row_adapters)
        names = [] if self.disabled else [n for n in self.active_adapters if n not in self.merged_adapters]
        if not names:
            return self.base(x)
        if len(names) == 1:
            with self.using(names[0]):
                return self._adapter_forward(x)
        base_out = self.base(x)
        out = base_out
        for name in names:  # each adapter's update on top of the shared base (PEFT's rule)
            with self.using(name):
                out = out + (self._adapter_forward(x) - base_out)
        return out

    def _adapter_forward(self, x: Tensor) -> Tensor:
        """The layer's output with the current adapter (:attr:`adapter`) alone."""
        if not self.use_dora:
            out = self.base(x)
            return out + self.scaling * self._lora_product(self.lora_dropout(x)).to(out.dtype)
        if self.use_fast_path and not torch.compiler.is_compiling():
            # under torch.compile the plain composition below is traced and fused by the compiler instead
            out = self._fast_forward(x)
            if out is not None:
                return out
        base_out = self._base_product(x)
        factor = self._factor_view(self.dora_factor().to(base_out.dtype), base_out.dim())
        dropped_base = None
        lora_in = x
        if self._dropout_active() and not self.magnitude_only:
            lora_in = self.lora_dropout(x)
            dropped_base = self._base_product(lora_in)
        lora_out = None if self.magnitude_only else self._lora_product(lora_in).to(base_out.dtype)
        return self._add_bias(DF.dora_combine(base_out, lora_out, factor, self.scaling, dropped_base))

    # Models read layers' weights (ViT's dtype, generation's lm_head device): answer with the base's, as PEFT does.
    @property
    def weight(self) -> Tensor:
        """The base module's weight (merged into, while merged); not a parameter of this module."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        """The base module's bias, or ``None``."""
        return getattr(self.base, "bias", None)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The current adapter's trainable tensors under fixed names (``lora_A``, ``lora_B``, ``magnitude``)."""
        return self.adapter.adapter_parameters()

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}" + (f", merged={self.merged_adapters}" if self.merged else "")
