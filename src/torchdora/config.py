"""The adapter configuration: a small frozen dataclass, validated on construction, saved with every adapter."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch

__all__ = ["DoraConfig", "ALL_LINEAR", "module_matches", "pattern_value", "check_adapter_name"]

ALL_LINEAR = "all-linear"
InitKind = Literal["kaiming", "gaussian"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _as_tuple(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a string or a list of strings, got {value!r}") from None
    for item in items:
        if not isinstance(item, str) or not item:
            raise TypeError(f"{name} must hold non-empty strings, got {item!r} in {value!r}")
    return items


def module_matches(name: str, patterns: str | tuple[str, ...]) -> bool:
    """Whether a module's dotted ``name`` is selected by ``patterns``.

    A single string is a regular expression that must match the whole name (PEFT's convention); a tuple
    holds exact names or suffixes at a dot boundary (``"q_proj"`` selects ``"model.layers.0.self_attn.q_proj"``).
    """
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def pattern_value(name: str, patterns: Mapping[str, Any], default: Any) -> Any:
    """The value of the first key of ``patterns`` (a regex) matching the end of ``name``, else ``default``.

    Same rule as PEFT's ``rank_pattern``/``alpha_pattern``: the key matches a trailing run of dotted parts.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-+=@]{0,99}")


def check_adapter_name(name: object) -> str:
    """An adapter name must be safe as a state-dict key part and as a folder name (``save_adapter`` writes adapter
    ``name`` to ``<folder>/<name>/``): letters, digits and ``_ - + = @``, not starting with ``-``, at most 100
    characters; no dots, path separators, ``.``/``..`` or absolute paths. Returns it; raises ``ValueError``."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"adapter name {name!r} is not allowed: use 1-100 letters, digits or '_-+=@' (not starting with '-'), "
            "e.g. 'french' or 'lora_r8'; names become state-dict keys and folder names, so dots and path "
            "separators are refused"
        )
    return name


@dataclass(frozen=True)
class DoraConfig:
    """How adapters are placed and parametrised.

    Args:
        r: LoRA rank (paper default recipe: 32; half rank 16).
        alpha: LoRA alpha; the scale is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the adapter input (PEFT's DoRA form: only the adapter path sees the dropped input).
        target_modules: which modules get an adapter: a regex string matched against the whole dotted name,
            a list of exact names or name suffixes, or ``"all-linear"`` (every Linear/Conv1D except the output head).
        exclude_modules: same forms as ``target_modules``; matching modules are skipped.
        rank_pattern: ``{regex: value}`` per-module overrides of ``r``.
        alpha_pattern: ``{regex: value}`` per-module overrides of ``alpha``.
        magnitude_only_modules: modules (same forms as a list target) that train only the magnitude ``m``
            (paper §5.6); they must also be targeted.
        recompute_modules: DoRA Linear/Conv1D modules (same forms as ``magnitude_only_modules``) that keep only
            what LoRA keeps for backward (the input and ``x Aᵀ``) and multiply ``x Wᵀ`` again there for the
            magnitude's gradient, instead of keeping their ``(tokens, out)`` output. Less activation memory where
            nothing downstream keeps the output anyway (e.g. ``q_proj``/``k_proj`` before a rotary embedding,
            ``down_proj``/``o_proj`` before a residual add), for one more ``(tokens, in) × (in, out)`` product.
        use_dora: ``False`` gives plain LoRA with the same code, for like-for-like comparisons.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        detach_norm: treat ``||W + s·B·A||`` as a constant in back-propagation (paper §4.3, the default);
            ``False`` keeps it in the graph (exact gradient, the ablation).
        init: ``"kaiming"`` (A Kaiming-uniform, B zero) or ``"gaussian"`` (A normal with std ``1/r``, B zero).
        modules_to_save: modules (exact names or suffixes) kept fully trainable and saved with the adapter,
            e.g. a classifier head.
        dtype: dtype of the adapter parameters (``"float32"`` default; ``None`` follows the base weight).
        use_vera: VeRA's update ``Λ_b B Λ_d A`` instead of LoRA's ``s·B·A`` (Kopiczko et al., ICLR 2024): ``A``,
            ``B`` frozen random and shared by all adapted layers, only ``d`` ``(r,)`` and ``b`` ``(out,)`` train.
            With ``use_dora`` it is DVoRA (DoRA paper §5.4), else VeRA. Linear/Conv1D targets only; ``alpha``,
            ``init``, ``rank_pattern`` and ``alpha_pattern`` do not apply (VeRA has no scale).
        d_initial: VeRA's initial value of every ``d`` (``b`` starts at 0); PEFT's default 0.1.
        projection_prng_key: seed of the shared random ``A``/``B`` (PEFT's name and generator rule).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ("q_proj", "v_proj")
    exclude_modules: str | tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    magnitude_only_modules: tuple[str, ...] = ()
    recompute_modules: tuple[str, ...] = ()
    use_dora: bool = True
    use_rslora: bool = False
    detach_norm: bool = True
    init: InitKind = "kaiming"
    modules_to_save: tuple[str, ...] = ()
    dtype: str | None = "float32"
    use_vera: bool = False
    d_initial: float = 0.1
    projection_prng_key: int = 0

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got r={self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 < self.alpha < math.inf:
            raise ValueError(f"alpha must be a positive number, got alpha={self.alpha!r} (finite, above 0)")
        set_("alpha", float(self.alpha))
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout!r}")
        set_("dropout", float(self.dropout))
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                if value != ALL_LINEAR:
                    try:
                        re.compile(value)
                    except re.error as err:
                        raise ValueError(f"{name}={value!r} is not a valid regular expression: {err}") from None
            else:
                set_(name, _as_tuple(value, name))
        if self.target_modules == ():
            raise ValueError("target_modules is empty: name at least one module, e.g. target_modules=['q_proj', 'v_proj']")
        set_("magnitude_only_modules", _as_tuple(self.magnitude_only_modules, "magnitude_only_modules"))
        set_("recompute_modules", _as_tuple(self.recompute_modules, "recompute_modules"))
        set_("modules_to_save", _as_tuple(self.modules_to_save, "modules_to_save"))
        for name in ("magnitude_only_modules", "recompute_modules"):
            if getattr(self, name) and not self.use_dora:
                raise ValueError(
                    f"{name}={list(getattr(self, name))} needs use_dora=True: plain LoRA has no magnitude"
                )
        for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            mapping = dict(getattr(self, name))
            for key, value in mapping.items():
                if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value < math.inf:
                    raise ValueError(f"{name}[{key!r}] must be a positive number, got {value!r} (finite, above 0)")
                try:
                    re.compile(key)
                except re.error as err:
                    raise ValueError(f"{name} key {key!r} is not a valid regular expression: {err}") from None
            set_(name, mapping)
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got init={self.init!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or None, got dtype={self.dtype!r}")
        self._check_vera()

    def _check_vera(self) -> None:
        if not isinstance(self.use_vera, bool):
            raise TypeError(f"use_vera must be True or False, got use_vera={self.use_vera!r}")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)) or not math.isfinite(self.d_initial):
            raise ValueError(f"d_initial must be a finite number, got d_initial={self.d_initial!r}")
        object.__setattr__(self, "d_initial", float(self.d_initial))
        key = self.projection_prng_key
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 2**63:
            raise ValueError(f"projection_prng_key must be an integer in [0, 2**63), got projection_prng_key={key!r}")
        if not self.use_vera:
            return
        for name in ("rank_pattern", "alpha_pattern", "magnitude_only_modules", "recompute_modules", "use_rslora"):
            if getattr(self, name):
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not supported with use_vera=True: VeRA has no scale and "
                    f"shares one rank-r projection pair across layers. Remove {name}"
                )
    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else _DTYPES[self.dtype]

    def rank_for(self, name: str) -> int:
        return int(pattern_value(name, self.rank_pattern, self.r))

    def alpha_for(self, name: str) -> float:
        return float(pattern_value(name, self.alpha_pattern, self.alpha))

    def is_magnitude_only(self, name: str) -> bool:
        return bool(self.magnitude_only_modules) and module_matches(name, self.magnitude_only_modules)

    def recomputes(self, name: str) -> bool:
        return bool(self.recompute_modules) and module_matches(name, self.recompute_modules)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` inverts it."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DoraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DoraConfig fields {unknown}; known fields are {sorted(known)}")
        kwargs = dict(data)
        for key in ("target_modules", "exclude_modules"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)
