"""The shared adapter base: DoRA (and plain LoRA, same code) around a frozen base module.

:class:`AdapterLayer` wraps its base module by composition (``self.base``) and sees the base weight as a 2-D
matrix of output-feature rows, ``(out, in)``; the equations live in :mod:`torchdora.functional`. A layer kind
(one file each in this package) says only how its base weight is viewed as rows and how ``A``/``B`` are applied.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from torchdora import functional as DF
from torchdora.cache import CachedValue, sample_of

__all__ = ["AdapterLayer", "is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' GPT-2 style ``Conv1D`` (a linear layer with weight ``(in, out)``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is an optional extra
        return False
    return isinstance(module, Conv1D)


class AdapterLayer(nn.Module):
    """Common DoRA/LoRA logic; subclasses say how the base weight maps to ``(out, in)`` rows.

    Forward (REFERENCE §1, paper eq. 5), bias never scaled, ``factor = m / ||W + s·B·A||``:

    - no dropout: ``y = factor ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b``
    - dropout ``x~`` in training: ``y = x Wᵀ + b + (factor − 1) ⊙ (x~ Wᵀ) + factor ⊙ s·(x~ Aᵀ) Bᵀ``
    - plain LoRA: ``y = x Wᵀ + b + s·(x~ Aᵀ) Bᵀ``

    Parameters: ``lora_A`` ``(r, in, *kernel)``, ``lora_B`` ``(out, r, *ones)``, ``magnitude`` ``(out,)``;
    magnitude-only modules (paper §5.6) have no ``lora_A``/``lora_B``.
    """

    #: which dim of the output holds the output features (-1 for linear/embedding, 1 for conv)
    feature_dim: int = -1
    #: "factored" (default, never builds ``out × in``) or "dense" (the reference formula)
    norm_method: str = "factored"
    #: use the fused forward/backward of :mod:`torchdora.fast` where the layer type has one (``False``: the plain
    #: autograd composition of :func:`torchdora.functional.dora_combine`, the reference path)
    use_fast_path: bool = True

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
    ) -> None:
        super().__init__()
        if magnitude_only and not use_dora:
            raise ValueError("magnitude_only=True needs use_dora=True: plain LoRA has no magnitude to train")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got init={init!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r = r
        self.lora_alpha = float(alpha)
        self.use_rslora = use_rslora
        self.scaling = DF.lora_scaling(r, alpha, use_rslora)
        self.use_dora = use_dora
        self.detach_norm = detach_norm
        self.magnitude_only = magnitude_only
        #: fused path: keep what LoRA keeps and recompute ``x Wᵀ`` in backward for the magnitude's gradient,
        #: rather than keep the ``(N, out)`` output (see :func:`torchdora.fast.dora_linear`)
        self.recompute_output = recompute_output
        self.dropout_p = float(dropout)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = self.base.weight
        factory = {"device": weight.device, "dtype": dtype or weight.dtype}
        self.merged = False
        self.disabled = False
        #: what merge() applied: the factor, and the adapter and weight it was applied with (see unmerge)
        self._merge_state: tuple[Tensor | None, Tensor | None, Tensor | None, float, Tensor] | None = None
        # cached without autograd, each checked against the contents it was computed from (torchdora.cache)
        self._sq_norm_cache = CachedValue()
        self._norm_cache = CachedValue()
        self._factor_cache = CachedValue()
        self._zero_magnitude_cache = CachedValue()

        if magnitude_only:
            self.lora_A: nn.Parameter | None = None
            self.lora_B: nn.Parameter | None = None
        else:
            self._init_direction(r, init, factory)
        self.magnitude: nn.Parameter | None = None
        if use_dora:
            with torch.no_grad():
                norm = self._row_norm(detach=True)
            self.magnitude = nn.Parameter(norm.to(**factory))

    # ---- what subclasses define -------------------------------------------------------------------
    def _init_direction(self, r: int, init: str, factory: dict) -> None:
        """Create the trainable direction update: LoRA's ``lora_A``/``lora_B`` (VeRA overrides this)."""
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
        if torch.compiler.is_compiling():  # the cache check is not traceable; recompute in graph
            return DF.base_row_sq_norm(weight.detach())
        return self._sq_norm_cache.get(lambda: DF.base_row_sq_norm(weight), sampled=(self._weight_storage(),))

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
        """What the norm depends on, for :meth:`CachedValue.get`: ``A``, ``B`` exactly, ``W`` by a sample."""
        return {"exact": (self.lora_A, self.lora_B), "sampled": (self._weight_storage(),),
                "extra": (self.scaling, self.norm_method)}

    def row_norm(self) -> Tensor:
        """``||W + s·B·A||`` per row as the forward uses it, ``(out,)``.

        Detached (paper §4.3) unless ``detach_norm=False`` and autograd is recording. The detached norm is
        cached and reused while ``A``, ``B`` and the base weight hold what they held when it was computed
        (:mod:`torchdora.cache` says how that is checked), so eval and gradient-accumulation micro-batches
        compute it once.
        """
        if not self.detach_norm and torch.is_grad_enabled():
            return self._row_norm(detach=False)
        if torch.compiler.is_compiling():
            return self._row_norm(detach=True).detach()
        return self._norm_cache.get(lambda: self._row_norm(detach=True), **self._cache_inputs())

    def dora_factor(self) -> Tensor:
        """``m / ||W + s·B·A||`` per output feature, ``(out,)``, ``0`` for a zero-norm row.

        Without autograd recording (inference) the factor is cached and reused while ``m``, ``A``, ``B`` and
        the base weight are unchanged, so unmerged inference computes it once.
        """
        if self.magnitude is None:
            raise RuntimeError("dora_factor() needs a DoRA layer (use_dora=True)")
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            norm = self.row_norm()
            return DF.dora_scale(self.magnitude.to(norm.dtype), norm)
        inputs = self._cache_inputs()
        inputs["exact"] += (self.magnitude,)

        def factor() -> Tensor:
            norm = self.row_norm()
            return DF.dora_scale(self.magnitude.to(norm.dtype), norm)

        return self._factor_cache.get(factor, **inputs)

    def clear_cache(self) -> None:
        """Forget the cached norms and factor (:func:`torchdora.clear_cache` does it for a whole model).

        Needed only after editing the *base weight* in place behind autograd (through ``.data`` or a raw
        pointer) in a way that may miss the sampled entries (a few rows or columns): every other change is
        seen (:mod:`torchdora.cache`).
        """
        for cache in (self._sq_norm_cache, self._norm_cache, self._factor_cache, self._zero_magnitude_cache):
            cache.clear()

    def _magnitude_has_zero(self) -> bool:
        """Whether some ``m`` is exactly 0, cached per content of ``m`` (on CUDA the check is a host sync)."""
        m = self.magnitude
        return bool(self._zero_magnitude_cache.get(lambda: (m == 0).any(), exact=(m,)))

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
        if self.disabled or self.merged:
            return self.base(x)
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

    # ---- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Write the adapted weight into the base weight (zero inference overhead). Bias is unchanged.

        A merged layer computes with the weight written here: edits of ``A``, ``B`` or ``m`` take effect at
        the next merge, and :meth:`unmerge` undoes exactly what was applied here, whatever happened to the
        adapter in between.
        """
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged; call unmerge() first")
        magnitude = None if self.magnitude is None else self.magnitude.detach()
        a, b = self.lora_A_2d(), self.lora_B_2d()
        merged, factor = DF.merged_weight(self.weight_2d(), a, b, magnitude, self.scaling)
        self._set_weight_2d(merged)
        a, b = (None if t is None else t.detach().clone() for t in (a, b))
        self._merge_state = (factor, a, b, self.scaling, sample_of(self.weight_2d()).clone())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight (to fp32 round-off).

        Raises ``RuntimeError`` if the merged weight was replaced since :meth:`merge` (e.g. a state dict loaded
        into the merged model): the base weight cannot be recovered from a weight this layer did not write.
        """
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged; nothing to unmerge")
        *applied, scaling, written = self._merge_state
        current = sample_of(self.weight_2d())
        if not torch.equal(current, written.to(current.device, current.dtype)):  # .to() in between is fine
            raise RuntimeError(
                f"{type(self).__name__}: the base weight changed since merge() (a state dict or an in-place edit "
                "replaced the merged weight), so unmerge() cannot restore the original weight. Load the "
                "unmerged base model and the adapter again"
            )
        factor, a, b = (None if t is None else t.to(current.device) for t in applied)
        weight = DF.unmerged_weight(self.weight_2d(), a, b, factor, scaling)
        self._set_weight_2d(weight)
        self._merge_state = None
        self.merged = False

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
        """The trainable tensors under fixed names (``lora_A``, ``lora_B``, ``magnitude``), present ones only."""
        named = {"lora_A": self.lora_A, "lora_B": self.lora_B, "magnitude": self.magnitude}
        return {k: v for k, v in named.items() if v is not None}

    def extra_repr(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        extra = ", magnitude_only" if self.magnitude_only else ""
        return f"{kind}, r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:g}, dropout={self.dropout_p:g}{extra}"
