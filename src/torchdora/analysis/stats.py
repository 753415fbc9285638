"""Statistics of the decomposition rows: least-squares lines and correlations of ΔM on ΔD."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from torchdora.analysis.decomposition import DecompositionRow

__all__ = ["LineFit", "fit_line", "fit_rows"]


@dataclass(frozen=True)
class LineFit:
    """Least-squares line ``dM ≈ slope · dD + intercept`` over ``n`` points and their Pearson correlation."""

    run: str
    method: str
    modules: str
    n: int
    slope: float
    intercept: float
    pearson: float


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """``(slope, intercept, pearson r)`` of ``y`` on ``x`` in float64; NaN where undefined (< 2 points, no spread)."""
    if len(x) != len(y):
        raise ValueError(f"x and y need the same length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan, math.nan, math.nan
    xs = torch.tensor(x, dtype=torch.float64)
    ys = torch.tensor(y, dtype=torch.float64)
    dx, dy = xs - xs.mean(), ys - ys.mean()
    sxx, syy, sxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    if sxx == 0:
        return math.nan, math.nan, math.nan
    slope = sxy / sxx
    intercept = float(ys.mean()) - slope * float(xs.mean())
    pearson = sxy / math.sqrt(sxx * syy) if syy > 0 else math.nan
    return slope, intercept, pearson


def module_type(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def fit_rows(rows: Sequence[DecompositionRow]) -> list[LineFit]:
    """One fit per run and module type (``q_proj``, ``v_proj``, ...) and one over all its selected modules.

    Step 0 (the pre-trained weight itself, ΔM = ΔD = 0) is left out: every method passes through it.
    """
    groups: dict[tuple[str, str, str], list[DecompositionRow]] = {}
    for row in rows:
        if row.step == 0:
            continue
        for modules in (module_type(row.module), "all"):
            groups.setdefault((row.run, row.method, modules), []).append(row)
    fits = []
    for (run, method, modules), members in groups.items():
        slope, intercept, pearson = fit_line([r.dD for r in members], [r.dM for r in members])
        fits.append(LineFit(run, method, modules, len(members), slope, intercept, pearson))
    types = sorted({f.modules for f in fits} - {"all"}) + ["all"]
    if len(types) == 2:  # one module type: its fit and "all" are the same
        fits = [f for f in fits if f.modules != "all"]
    runs = list(dict.fromkeys(r.run for r in rows))
    return sorted(fits, key=lambda f: (runs.index(f.run), types.index(f.modules)))
