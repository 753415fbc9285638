"""The null baseline of the decomposition analysis: random updates of the measured size, with nothing learned.

A correlation of ΔM on ΔD means something only against what updates without any learned structure give on the
same pre-trained weights: the row norms of ``W_0`` alone tie ΔM to ΔD (a random update of per-entry size ``σ``
moves a row of norm ``ρ`` in ``d`` dimensions by ``ΔD ≈ dσ²/(2ρ²)`` and ``ΔM ≈ σ·sqrt(2/π)``), and every
snapshot of a run is larger than the one before. The random updates mimic each method's parametrisation:

- ``"full"`` (full fine-tuning): ``W_t = W_0 + c_t · Σ_{k≤t} E_k``, a random walk of Gaussian ``(K, in)`` steps.
- ``"lora"``: ``W_t = W_0 + c_t · B_t A`` with ``A ~ N(0, 1/in)`` of shape ``(r, in)`` fixed and ``B_t`` a random
  walk of Gaussian ``(K, r)`` steps: a rank-``r`` update, as LoRA's.
- ``"dora"``: the direction ``V_t = W_0 + c_t · B_t A`` as LoRA's, and the magnitude
  ``m_t = ||W_0[n]|| + τ_t · g_t`` with ``g_t`` a random walk of Gaussian ``(K,)`` steps;
  ``W_t = m_t · V_t / ||V_t||`` (:func:`torchdora.functional.merged_weight`).

Size: one scalar per (run, module type, snapshot), shared by all layers, so that the mean ΔD over layers equals
the measured one (``c_t``) and, for DoRA, the mean ΔM over layers too (``τ_t``; ΔM of a DoRA weight is exactly
``mean |m − ||W_0|||``). How the update is spread over layers is left to chance and to ``W_0``: that is what
the across-layer statistics of :mod:`torchdora.analysis.stats` are compared against.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from torchdora.analysis.decomposition import DecompositionRow, magnitude_direction_change
from torchdora.analysis.stats import module_type
from torchdora.functional import merged_weight

__all__ = ["NULL_KINDS", "null_kind", "random_weight", "calibrate_scale", "random_update_rows"]

NULL_KINDS = ("full", "lora", "dora")


def null_kind(method: str) -> str:
    """The random-update family of a method: ``"dora"``, ``"lora"``, else ``"full"`` (any full fine-tuning)."""
    return method if method in ("dora", "lora") else "full"


def random_weight(w0: Tensor, kind: str, walk: Tensor, scale: float, lora_a: Tensor | None = None,
                  magnitude_walk: Tensor | None = None, magnitude_scale: float = 0.0) -> Tensor:
    """The random trained weight ``W_t`` of one module (see the module docstring), float64 ``(K, in)``.

    ``w0``: ``(K, in)``. ``walk``: ``(K, in)`` for ``"full"``, ``B_t`` of shape ``(K, r)`` for ``"lora"``/``"dora"``
    (then ``lora_a`` is ``A``, ``(r, in)``). ``magnitude_walk``: ``g_t``, ``(K,)``, DoRA only.
    """
    w0 = w0.to(torch.float64)
    if kind == "full":
        return w0 + scale * walk
    if lora_a is None:
        raise ValueError(f"a {kind!r} random update needs lora_a (the fixed A of the rank-r update)")
    if kind == "lora":
        merged, _ = merged_weight(w0, lora_a, walk, None, scale)
        return merged
    if kind == "dora":
        if magnitude_walk is None:
            raise ValueError("a 'dora' random update needs magnitude_walk (the random walk of the magnitude)")
        magnitude = torch.linalg.vector_norm(w0, dim=1) + magnitude_scale * magnitude_walk
        merged, _ = merged_weight(w0, lora_a, walk, magnitude, scale)
        return merged
    raise ValueError(f"kind must be one of {NULL_KINDS}, got {kind!r}")


def calibrate_scale(mean_dd: Callable[[float], float], target: float, start: float = 1e-3, tol: float = 1e-7,
                    max_iter: int = 60) -> float:
    """The ``c > 0`` with ``mean_dd(c) == target`` for an increasing ``mean_dd`` with ``mean_dd(0) = 0``.

    Secant steps on ``log ΔD`` against ``log c`` (ΔD grows like ``c²`` for small ``c``, so this converges in a
    few evaluations), falling back to bisection on ``log c`` where ΔD saturates. ``tol``: relative error.
    """
    if not target > 0:
        return 0.0
    c_prev, v_prev = start, mean_dd(start)
    if v_prev > 0:
        c = c_prev * (target / v_prev) ** 0.5
        for _ in range(12):
            v = mean_dd(c)
            if abs(v - target) <= tol * target:
                return c
            slope = math.log(v / v_prev) / math.log(c / c_prev) if v > 0 and v != v_prev and c != c_prev else 0.0
            if not (math.isfinite(slope) and slope > 0.2):
                break  # saturating: bisect instead
            c_prev, v_prev, c = c, v, c * (target / v) ** (1 / slope)
    lo = hi = start
    while mean_dd(lo) > target:
        lo /= 4
    while mean_dd(hi) < target:
        hi *= 4
        if hi > 1e12:
            raise ValueError(f"no random update reaches ΔD = {target:g} (ΔD saturates at {mean_dd(hi):g})")
    for _ in range(max_iter):
        mid = (lo * hi) ** 0.5
        value = mean_dd(mid)
        if abs(value - target) <= tol * target:
            return mid
        lo, hi = (mid, hi) if value < target else (lo, mid)
    return (lo * hi) ** 0.5


def _mean_direction_change(w0s: Sequence[Tensor], updates: Sequence[Tensor]) -> Callable[[float], float]:
    """``c ↦`` mean over modules of the mean over rows of ``1 − cos(W_0[n], W_0[n] + c·E[n])``, in closed form.

    With ``a = ||w||²``, ``b = w·e``, ``g = ||w||²||e||² − (w·e)²`` per row (computed once), ``||w + ce||² =
    a + 2cb + c²||e||²``, ``cos = (a + cb)/sqrt(a·||w + ce||²)`` and ``1 − cos = (1 − cos²)/(1 + cos)`` with
    ``1 − cos² = c²g / (a·||w + ce||²)``: no cancellation at tiny angles, and each call costs O(rows), so the
    scale is found without rebuilding any weight. (The rows reported are then measured on the built weights.)
    """
    a, b, e, g, weight = [], [], [], [], []
    for w, u in zip(w0s, updates):
        ww, uu, wu = (w * w).sum(1), (u * u).sum(1), (w * u).sum(1)  # (K,) each
        a.append(ww), b.append(wu), e.append(uu), g.append((ww * uu - wu * wu).clamp_min(0))
        weight.append(torch.full_like(ww, 1.0 / (w.shape[0] * len(w0s))))
    a, b, e, g, weight = (torch.cat(t) for t in (a, b, e, g, weight))
    a = a.clamp_min(torch.finfo(torch.float64).tiny)  # a zero row has no direction; keep it finite

    def mean_dd(c: float) -> float:
        norm2 = a + 2 * c * b + c * c * e  # ||w + c·e||²
        cos = (a + c * b) / (a * norm2).sqrt()
        return float((weight * (c * c * g / (a * norm2)) / (1 + cos)).sum())

    return mean_dd


def random_update_rows(
    weights: Mapping[str, Tensor], rows: Sequence[DecompositionRow], ranks: Mapping[str, int] | None = None,
    seed: int = 0,
) -> list[DecompositionRow]:
    """Rows of random updates shaped like ``rows``: the same runs, snapshots and modules, sized as measured.

    ``weights``: module name → pre-trained weight as ``(K, in)`` output-feature rows. ``ranks``: method → the
    adapter rank ``r`` (needed for ``lora``/``dora`` methods). One random walk per module and run, seeded by
    ``seed`` and the run's position, so the result is reproducible.
    """
    ranks = dict(ranks or {})
    out: list[DecompositionRow] = []
    runs = list(dict.fromkeys(r.run for r in rows))
    for run_index, run in enumerate(runs):
        run_rows = [r for r in rows if r.run == run]
        method = run_rows[0].method
        kind = null_kind(method)
        if kind != "full" and ranks.get(method) is None:
            raise ValueError(f"the null of {method!r} needs its adapter rank: pass ranks={{{method!r}: r}}")
        for kind_name in dict.fromkeys(module_type(r.module) for r in run_rows):
            members = [r for r in run_rows if module_type(r.module) == kind_name]
            modules = list(dict.fromkeys(r.module for r in members))
            steps = sorted({r.step for r in members if r.step is not None})
            out.extend(_null_of_modules(weights, members, modules, steps, kind, ranks.get(method),
                                        seed * 1_000_003 + run_index * 1009 + len(out)))
    return out


def _null_of_modules(weights: Mapping[str, Tensor], members: Sequence[DecompositionRow], modules: list[str],
                     steps: list[int], kind: str, rank: int | None, seed: int) -> list[DecompositionRow]:
    """Snapshot by snapshot: advance every module's random walk, then size the step's updates to the measured
    mean ΔD (and, DoRA, ΔM) over the modules."""
    generator = torch.Generator().manual_seed(seed)
    measured = {(r.module, r.step): r for r in members}
    w0 = {m: weights[m].to(torch.float64) for m in modules}
    for m in modules:
        if w0[m].dim() != 2:
            raise ValueError(f"weights[{m!r}] must be (K, in) rows, got shape {tuple(w0[m].shape)}")
    shape = lambda m: w0[m].shape if kind == "full" else (w0[m].shape[0], rank)  # noqa: E731
    walks = {m: torch.zeros(shape(m), dtype=torch.float64) for m in modules}
    lora_a = {m: torch.randn(rank, w0[m].shape[1], generator=generator, dtype=torch.float64) / w0[m].shape[1] ** 0.5
              for m in modules} if kind != "full" else {}
    magnitude = {m: torch.zeros(w0[m].shape[0], dtype=torch.float64) for m in modules}
    row0 = DecompositionRow
    out: list[DecompositionRow] = []
    for step in steps:
        for m in modules:
            walks[m] += torch.randn(walks[m].shape, generator=generator, dtype=torch.float64)
            magnitude[m] += torch.randn(magnitude[m].shape, generator=generator, dtype=torch.float64)
        here = [m for m in modules if (m, step) in measured]
        if step == 0:
            out.extend(row0(measured[(m, 0)].run, measured[(m, 0)].method, 0, m, measured[(m, 0)].layer, 0.0, 0.0)
                       for m in here)
            continue
        target_dd = sum(measured[(m, step)].dD for m in here) / len(here)
        target_dm = sum(measured[(m, step)].dM for m in here) / len(here)

        mean_dd = _mean_direction_change(
            [w0[m] for m in here], [walks[m] if kind == "full" else walks[m] @ lora_a[m] for m in here])
        scale = calibrate_scale(mean_dd, target_dd)
        tau = 0.0
        if kind == "dora":  # ΔM of m·V/||V|| is mean |m − ||W_0|||, linear in τ
            spread = sum(float(magnitude[m].abs().mean()) for m in here) / len(here)
            tau = target_dm / spread if spread > 0 else 0.0
        for m in here:
            wt = random_weight(w0[m], kind, walks[m], scale, lora_a.get(m), magnitude[m], tau)
            d_m, d_d = magnitude_direction_change(w0[m], wt)
            ref = measured[(m, step)]
            out.append(row0(ref.run, ref.method, step, m, ref.layer, d_m, d_d))
    return out
