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
from torchdora.cache import CachedValue, in_graph, sample_of

__all__ = ["AdapterLayer", "Adapter", "DEFAULT_ADAPTER", "is_conv1d"]

DEFAULT_ADAPTER = "default"
#: most adapters in a mixed batch multiplied all together (each token against every adapter's ``A`` and ``B``);
#: more run one adapter at a time
MIXED_STACK_MAX = 8


def _norm_dtype(weight: Tensor) -> torch.dtype:
    """The dtype the norms are accumulated and kept in: fp32, fp64 for an fp64 weight."""
    return torch.promote_types(weight.dtype, torch.float32) if weight.is_floating_point() else torch.float32


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' GPT-2 style ``Conv1D`` (a linear layer with weight ``(in, out)``)."""
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
                 magnitude_only: bool) -> None:
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
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # the layer creates A and B in its geometry (AdapterLayer._init_direction), then m = ||W + s·B·A||
        for name in ("lora_A", "lora_B", "magnitude"):
            self.register_parameter(name, None)
        # cached without autograd, each checked against the contents it was computed from (torchdora.cache)
        self._norm_cache = CachedValue()
        self._factor_cache = CachedValue()
        self._zero_magnitude_cache = CachedValue()

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors under fixed names (``lora_A``, ``lora_B``, ``magnitude``), present ones only."""
        named = {"lora_A": self.lora_A, "lora_B": self.lora_B, "magnitude": self.magnitude}
        return {k: v for k, v in named.items() if v is not None}

    def clear_cache(self) -> None:
        for cache in (self._norm_cache, self._factor_cache, self._zero_magnitude_cache):
            cache.clear()

    def extra_repr(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        extra = ", magnitude_only" if self.magnitude_only else ""
        return f"{kind}, r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:g}, dropout={self.dropout_p:g}{extra}"


class _OfAdapter:
    """``layer.<name>`` reads and writes the attribute of the adapter the layer is computing with."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, layer: "AdapterLayer | None", owner: type | None = None) -> Any:
        if layer is None:
            return self
        return getattr(layer.adapter, self.name)

    def __set__(self, layer: "AdapterLayer", value: Any) -> None:
        setattr(layer.adapter, self.name, value)


# state-dict hooks: the default adapter's tensors keep the keys they had before named adapters existed
_DEFAULT_PREFIX = f"adapters.{DEFAULT_ADAPTER}."


def _default_keys_out(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    inner = prefix + _DEFAULT_PREFIX
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _default_keys_in(module: "AdapterLayer", state_dict: dict, prefix: str, *args: Any) -> None:
    if DEFAULT_ADAPTER not in module.adapters:
        return
    names = {n.split(".", 1)[0] for n, _ in module.adapters[DEFAULT_ADAPTER].state_dict(keep_vars=True).items()}
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0] in names]:
        state_dict[prefix + _DEFAULT_PREFIX + key[len(prefix):]] = state_dict.pop(key)


def _default_keys_reported(module: nn.Module, incompatible: Any) -> None:
    """Missing keys of the default adapter are reported under its state-dict keys too."""
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [k.replace("." + _DEFAULT_PREFIX, ".") if not k.startswith(_DEFAULT_PREFIX)
                   else k[len(_DEFAULT_PREFIX):] for k in keys]


class AdapterLayer(nn.Module):
    """Common DoRA/LoRA logic; subclasses say how the base weight maps to ``(out, in)`` rows.

    Forward (REFERENCE §1, paper eq. 5), bias never scaled, ``factor = m / ||W + s·B·A||``:

    - no dropout: ``y = factor ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b``
    - dropout ``x~`` in training: ``y = x Wᵀ + b + (factor − 1) ⊙ (x~ Wᵀ) + factor ⊙ s·(x~ Aᵀ) Bᵀ``
    - plain LoRA: ``y = x Wᵀ + b + s·(x~ Aᵀ) Bᵀ``

    Parameters (of each named :class:`Adapter`): ``lora_A`` ``(r, in, *kernel)``, ``lora_B`` ``(out, r, *ones)``,
    ``magnitude`` ``(out,)``; magnitude-only modules (paper §5.6) have no ``lora_A``/``lora_B``. Several active
    adapters add their updates: ``y = base(x) + Σ_i (y_i − base(x))`` with ``y_i`` adapter ``i``'s output (PEFT's
    rule for several active DoRA adapters).
    """

    #: which dim of the output holds the output features (-1 for linear/embedding, 1 for conv)
    feature_dim: int = -1
    #: "factored" (default, never builds ``out × in``) or "dense" (the reference formula)
    norm_method: str = "factored"
    #: a mixed-adapter batch runs as two batched products over per-row stacked ``A``, ``s·B`` (layers whose
    #: update is ``(x Aᵀ) Bᵀ`` on the last dim: linear kinds), rather than one small product per adapter
    stacks_mixed_batch: bool = False
    #: use the fused forward/backward of :mod:`torchdora.fast` where the layer type has one (``False``: the plain
    #: autograd composition of :func:`torchdora.functional.dora_combine`, the reference path)
    use_fast_path: bool = True

    # per-adapter attributes, of the adapter the layer is computing with (see the module doc)
    lora_A = _OfAdapter()
    lora_B = _OfAdapter()
    magnitude = _OfAdapter()
    lora_dropout = _OfAdapter()
    r = _OfAdapter()
    lora_alpha = _OfAdapter()
    scaling = _OfAdapter()
    use_rslora = _OfAdapter()
    use_dora = _OfAdapter()
    magnitude_only = _OfAdapter()
    dropout_p = _OfAdapter()

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
        self.detach_norm = detach_norm
        #: fused path: keep what LoRA keeps and recompute ``x Wᵀ`` in backward for the magnitude's gradient,
        #: rather than keep the ``(N, out)`` output (see :func:`torchdora.fast.dora_linear`)
        self.recompute_output = recompute_output
        self.disabled = False
        #: adapters written into the base weight by :meth:`merge`, in order, and what each merge applied
        self.merged_adapters: list[str] = []
        self._merge_states: dict[str, tuple[Tensor | None, Tensor | None, Tensor | None, float, Tensor]] = {}
        #: per-row adapter names for a mixed batch (set by :func:`torchdora.mixed_batch`), else ``None``
        self.row_adapters: Sequence[str | None] | None = None
        self._sq_norm_cache = CachedValue()  # ||W||² of the shared base, for every adapter
        self.adapters = nn.ModuleDict()
        #: the adapters the forward applies, in order
        self.active_adapters: list[str] = []
        self._current: str | None = None
        self.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, use_dora=use_dora, use_rslora=use_rslora,
                         magnitude_only=magnitude_only, init=init, dtype=dtype)
        self.set_adapter(adapter_name)
        self._register_state_dict_hook(_default_keys_out)
        self._register_load_state_dict_pre_hook(_default_keys_in, with_module=True)
        self.register_load_state_dict_post_hook(_default_keys_reported)

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module routes Parameters and Modules past descriptors; per-adapter names go to the adapter
        if isinstance(getattr(type(self), name, None), _OfAdapter):
            adapter = self.adapter
            if name in adapter._parameters and isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                adapter._parameters[name] = value  # a plain tensor in a parameter's place (torch.func.functional_call)
            else:
                setattr(adapter, name, value)
        else:
            super().__setattr__(name, value)

    # ---- named adapters -----------------------------------------------------------------------------
    @property
    def adapter(self) -> Adapter:
        """The adapter the per-adapter attributes (``lora_A``, ``scaling``, …) refer to right now."""
        if self._current is None:
            raise RuntimeError(f"{type(self).__name__} holds no adapter")
        return self.adapters[self._current]

    @property
    def merged(self) -> bool:
        """Whether some adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    @merged.setter
    def merged(self, value: bool) -> None:  # for subclasses that merge their own way (e.g. a 4-bit base)
        self.merged_adapters = list(self.active_adapters) if value else []

    def add_adapter(self, name: str, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                    use_dora: bool = True, use_rslora: bool = False, magnitude_only: bool = False,
                    init: str = "kaiming", dtype: torch.dtype | None = torch.float32) -> Adapter:
        """Add a new adapter ``name`` (inactive until :meth:`set_adapter`); ``m`` starts at ``||W + s·B·A||``."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
        if name in self.adapters:
            raise ValueError(f"{type(self).__name__} already has an adapter named {name!r}; delete_adapter it first")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got init={init!r}")
        weight = self._weight_storage()
        factory = {"device": weight.device, "dtype": dtype or weight.dtype}
        adapter = Adapter(r=r, alpha=alpha, dropout=dropout, use_dora=use_dora, use_rslora=use_rslora,
                          magnitude_only=magnitude_only)
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
        """Make ``names`` (one or several, applied in that order) the active adapters; ``[]`` runs the base."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"no adapter named {unknown} in {type(self).__name__}; it has {list(self.adapters)}")
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
        previous = self._current
        self._current = name
        try:
            yield self
        finally:
            self._current = previous

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
            weight = self.weight_2d()
            return in_graph(self, "_cached_row_norm", (self._current,), self._cache_inputs()["tensors"],
                            weight.shape[0], _norm_dtype(weight))
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

    def mixed_forward(self, x: Tensor, row_adapters: Sequence[str | None]) -> Tensor:
        """Each row ``i`` of the batch (dim 0 of ``x``) through adapter ``row_adapters[i]`` (``None``: the base).

        One base product for the whole batch, then per adapter ``g`` on its rows ``R_g`` only:
        ``z[R_g] += s_g·(x[R_g] A_gᵀ) B_gᵀ`` and ``y[R_g] = f_g ⊙ z[R_g] + b`` with the cached DoRA factor
        ``f_g = m_g / ||W + s_g·B_g·A_g||`` (``f = 1`` for LoRA adapters and base rows). The inference form:
        dropout is not applied. Equals running each row alone through its adapter (to fp32 round-off).
        """
        if len(row_adapters) != x.shape[0]:
            raise ValueError(
                f"row_adapters has {len(row_adapters)} entries but the batch has {x.shape[0]} rows; give one "
                "adapter name (or None for the base) per row"
            )
        unknown = sorted({n for n in row_adapters if n is not None and n not in self.adapters})
        if unknown:
            raise ValueError(f"no adapter named {unknown} in {type(self).__name__}; it has {list(self.adapters)}")
        if self.merged_adapters:
            raise RuntimeError("a mixed-adapter batch needs the unmerged base weight; call unmerge() first")
        if self.stacks_mixed_batch and not torch.is_grad_enabled() and (
                len(set(row_adapters) - {None}) <= MIXED_STACK_MAX):
            return self._mixed_stacked(x, row_adapters)
        z = self._base_product(x)  # (B, ..., out) or (B, out, ...) for a conv
        out_features = z.shape[self.feature_dim]
        factors = torch.ones(x.shape[0], out_features, dtype=z.dtype, device=z.device)  # (B, out)
        for name, rows in self._row_groups(row_adapters, z.device):
            with self.using(name):
                if not self.magnitude_only:
                    z = z.index_add(0, rows, self._lora_product(x.index_select(0, rows)).to(z.dtype),
                                    alpha=self.scaling)
                if self.use_dora:
                    factors[rows] = self.dora_factor().to(z.dtype)
        shape = [x.shape[0]] + [1] * (z.dim() - 1)
        shape[self.feature_dim] = out_features
        return self._add_bias(z * factors.view(shape))

    def _mixed_stacked(self, x: Tensor, row_adapters: Sequence[str | None]) -> Tensor:
        """:meth:`mixed_forward` for a linear kind without autograd, as two products against every adapter of the
        batch at once: ``h = x [A_1; …; A_G]ᵀ`` ``(…, G·r)``, each row keeps its own adapter's block of ``h``
        (scaled by its ``s``, the others zeroed), then ``h [B_1 … B_G]ᵀ``; no per-adapter loop and no per-row
        copy of ``A``, ``B`` (``G ≤`` :data:`MIXED_STACK_MAX` keeps the extra products small)."""
        names = tuple(dict.fromkeys(n for n in row_adapters if n is not None))
        a_cat, b_cat, s_table, f_table = self._mixed_stacks(names)  # (G·r, in), (G·r, out), (G+1, G), (G+1, out)
        idx = self._row_index(row_adapters, names, x.device)  # (B,) each row's adapter, len(names) for the base
        z = self._base_product(x)  # (B, ..., out)
        rows, groups = x.shape[0], len(names)
        xb = x.reshape(rows, -1, x.shape[-1]).to(a_cat.dtype)  # (B, T, in)
        h = torch.matmul(xb, a_cat.T).view(rows, xb.shape[1], groups, -1)  # (B, T, G, r)
        h = h * s_table.index_select(0, idx).view(rows, 1, groups, 1)  # s_g on the row's own block, 0 elsewhere
        lora = torch.matmul(h.view(rows, xb.shape[1], -1), b_cat)  # (B, T, out)
        z = z + lora.view(z.shape).to(z.dtype)
        factor = f_table.index_select(0, idx).to(z.dtype)  # (B, out)
        return self._add_bias(z * factor.view(rows, *([1] * (z.dim() - 2)), -1))

    def _mixed_stacks(self, names: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``[A_1; …; A_G]`` ``(G·r, in)`` and ``[B_1 … B_G]ᵀ`` ``(G·r, out)`` (zero-padded to the largest rank),
        the scales as rows ``s_g·e_g`` ``(G+1, G)`` and the factors ``(G+1, out)`` (``1`` for LoRA) of adapters
        ``names``, row ``G`` for base rows (no update, factor 1); cached while every adapter and the base weight
        are unchanged (:mod:`torchdora.cache`)."""
        if type(self)._cache_inputs is AdapterLayer._cache_inputs:  # read straight from the adapters (per token)
            tensors: list = [self._weight_storage()]
            extra: list = [names, self.norm_method]
            for name in names:
                adapter = self.adapters[name]
                tensors += [adapter.lora_A, adapter.lora_B, adapter.magnitude]
                extra.append(adapter.scaling)
        else:  # a layer kind with inputs of its own (VeRA's vectors and shared pair)
            tensors, extra = [], [names]
            for name in names:
                with self.using(name):
                    inputs = self._cache_inputs()
                    tensors += [*inputs["tensors"], self.magnitude]
                    extra.append(inputs["extra"])
        cache = self.__dict__.get("_mixed_cache")
        if cache is None:
            cache = self.__dict__["_mixed_cache"] = CachedValue()
        return cache.get(lambda: self._build_mixed_stacks(names), tensors, tuple(extra))

    def _build_mixed_stacks(self, names: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pairs, factors = [], []
        for name in names:
            with self.using(name):
                pairs.append((self.lora_A_2d(), self.lora_B_2d(), self.scaling))
                factors.append(self.dora_factor() if self.use_dora else None)
        known = [a for a, _, _ in pairs if a is not None]
        weight = self._weight_storage()
        dtype = known[0].dtype if known else torch.float32
        rank, groups = max([a.shape[0] for a in known], default=1), len(names)
        a_cat = weight.new_zeros(groups, rank, self.in_features, dtype=dtype)
        b_cat = weight.new_zeros(groups, rank, self.out_features, dtype=dtype)
        s_table = weight.new_zeros(groups + 1, groups, dtype=dtype)
        f_table = weight.new_ones(groups + 1, self.out_features, dtype=torch.float32)
        for g, ((a, b, scaling), factor) in enumerate(zip(pairs, factors)):
            if a is not None:  # a magnitude-only adapter has no direction update
                a_cat[g, :a.shape[0]] = a
                b_cat[g, :a.shape[0]] = b.T
                s_table[g, g] = scaling
            if factor is not None:
                f_table[g] = factor
        return a_cat.view(groups * rank, -1), b_cat.view(groups * rank, -1), s_table, f_table

    def _row_index(self, row_adapters: Sequence[str | None], names: tuple[str, ...], device: torch.device) -> Tensor:
        """The stack slot of each row (``len(names)`` for base rows) on ``device``, kept for the next call."""
        key = (tuple(row_adapters), device)
        kept = self.__dict__.get("_row_index_kept")
        if kept is None or kept[0] != key:
            slot = {n: g for g, n in enumerate(names)}
            index = torch.tensor([slot.get(n, len(names)) for n in row_adapters], device=device)
            kept = self.__dict__["_row_index_kept"] = (key, index)
        return kept[1]

    def _row_groups(self, row_adapters: Sequence[str | None], device: torch.device) -> list[tuple[str, Tensor]]:
        """``(name, rows)`` per adapter of a mixed batch, the row indices on ``device``; kept for the next call
        with the same assignment (a generated token's), since building them is a host-to-device copy."""
        key = (tuple(row_adapters), device)
        kept = self.__dict__.get("_row_groups_kept")
        if kept is None or kept[0] != key:
            groups = [(name, torch.tensor([i for i, n in enumerate(row_adapters) if n == name], device=device))
                      for name in dict.fromkeys(n for n in row_adapters if n is not None)]
            kept = self.__dict__["_row_groups_kept"] = (key, groups)
        return kept[1]

    # ---- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Write adapters (default: the active ones) into the base weight, one after the other. Bias unchanged.

        A merged layer computes with the weight written here: edits of ``A``, ``B`` or ``m`` take effect at
        the next merge, and :meth:`unmerge` undoes exactly what was applied here, whatever happened to the
        adapter in between. Adapters not merged stay: an active one computes on top of the merged weight.
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        if self.merged and adapter_names is None:
            raise RuntimeError(f"{type(self).__name__} is already merged; call unmerge() first")
        for name in names:
            if name not in self.adapters:
                raise ValueError(f"no adapter named {name!r} in {type(self).__name__}; it has {list(self.adapters)}")
            if name in self.merged_adapters:
                raise RuntimeError(f"adapter {name!r} is already merged; call unmerge() first")
        for name in names:
            with self.using(name):
                magnitude = None if self.magnitude is None else self.magnitude.detach()
                a, b = self.lora_A_2d(), self.lora_B_2d()
                merged, factor = DF.merged_weight(self.weight_2d(), a, b, magnitude, self.scaling)
                self._set_weight_2d(merged)
                a, b = (None if t is None else t.detach().clone() for t in (a, b))
                self._merge_states[name] = (factor, a, b, self.scaling, sample_of(self.weight_2d()).clone())
                self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight (to fp32 round-off), undoing every merged adapter, last merged first.

        Raises ``RuntimeError`` if the merged weight was replaced since :meth:`merge` (e.g. a state dict loaded
        into the merged model): the base weight cannot be recovered from a weight this layer did not write.
        """
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged; nothing to unmerge")
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            *applied, scaling, written = self._merge_states[name]
            current = sample_of(self.weight_2d())
            if not torch.equal(current, written.to(current.device, current.dtype)):  # .to() in between is fine
                raise RuntimeError(
                    f"{type(self).__name__}: the base weight changed since merge() (a state dict or an in-place "
                    "edit replaced the merged weight), so unmerge() cannot restore the original weight. Load the "
                    "unmerged base model and the adapter again"
                )
            factor, a, b = (None if t is None else t.to(current.device) for t in applied)
            self._set_weight_2d(DF.unmerged_weight(self.weight_2d(), a, b, factor, scaling))
            del self._merge_states[name]
            self.merged_adapters.pop()

    # Models read their layers' weights directly (ViT checks ``projection.weight.dtype``, generation code the
    # ``lm_head``'s device); as PEFT's layers do, an adapter answers with its base module's tensors.
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
