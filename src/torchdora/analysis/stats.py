"""Statistics of the decomposition rows: least-squares lines and correlations of ΔM on ΔD.

The paper (section 3, Figure 2) pools every (layer, checkpoint) point into one correlation. Because every
layer's ΔM and ΔD grow together over training, that pooled number is positive for random updates too; so
besides it this module gives correlations across layers within a snapshot, with bootstrap intervals over
layers, and compares each to the same statistic of random updates of the same size (:func:`compare_to_null`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from torchdora.analysis.decomposition import DecompositionRow

__all__ = [
    "LineFit", "fit_line", "fit_rows", "module_type", "STATISTICS", "STATISTIC_NAMES", "VERDICTS", "pearson",
    "average_ranks", "grid_statistics", "bootstrap_layers", "Interval", "percentile_interval", "decide",
    "decomposition_grid", "Verdict", "compare_to_null", "t_quantile_975", "paired_difference", "binomial_se",
    "describe_difference",
]


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


# ---- correlations that separate layers from time -------------------------------------------------------------
#
# A run's points form a grid: S snapshots × L layers (one module type). ΔM and ΔD of every layer grow with every
# snapshot, so a correlation pooled over the grid is positive for any training, learned or random. The
# statistics below look across layers *within* a snapshot instead, and their intervals resample layers (the unit
# that repeats across snapshots), never single points.

STATISTICS = ("pooled", "within", "partial", "spearman")
STATISTIC_NAMES = {
    "pooled": "pooled Pearson r (all layers × snapshots)",
    "within": "across-layer Pearson r within each snapshot, averaged",
    "partial": "step-centred (partial) Pearson r",
    "spearman": "across-layer Spearman ρ within each snapshot, averaged",
}
VERDICTS = ("negative", "positive", "not distinguishable from the null", "below the null", "above the null")


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation along the last dim: ``Σ x̃ỹ / sqrt(Σ x̃² Σ ỹ²)`` with ``x̃ = x − mean(x)``.

    ``x``, ``y``: ``(..., L)`` float64; returns ``(...)``; NaN where either has no spread.
    """
    dx = x - x.mean(dim=-1, keepdim=True)
    dy = y - y.mean(dim=-1, keepdim=True)
    return (dx * dy).sum(-1) / ((dx * dx).sum(-1) * (dy * dy).sum(-1)).sqrt()


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..L along the last dim, ties sharing their mean rank (as ``scipy.stats.rankdata``): ``(..., L)``.

    ``rank_i = #{j: x_j < x_i} + (#{j: x_j = x_i} + 1) / 2``; O(L²), fine for tens of layers.
    """
    below = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1)  # (..., L): how many x_j lie below x_i
    equal = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1)  # (..., L), counts x_i itself
    return below.to(torch.float64) + (equal.to(torch.float64) + 1) / 2


def grid_statistics(d_dir: Tensor, d_mag: Tensor) -> dict[str, Tensor]:
    """The four correlations of ΔM on ΔD over a ``(..., S, L)`` grid of S snapshots × L layers.

    - ``pooled``: Pearson r of all S·L points (what the paper reports; inflated by the shared growth over time).
    - ``within``: mean over snapshots of the across-layer Pearson r of each snapshot.
    - ``partial``: Pearson r of the points after subtracting each snapshot's mean ΔD and ΔM, i.e. the partial
      correlation given the snapshot (snapshots with larger updates weigh more).
    - ``spearman``: mean over snapshots of the across-layer Spearman ρ (Pearson r of average ranks).

    Returns ``{name: (...)}`` float64 tensors.
    """
    x, y = d_dir.to(torch.float64), d_mag.to(torch.float64)
    flat = lambda t: t.flatten(-2)  # noqa: E731  (..., S·L)
    xc = x - x.mean(dim=-1, keepdim=True)
    yc = y - y.mean(dim=-1, keepdim=True)
    return {
        "pooled": pearson(flat(x), flat(y)),
        "within": pearson(x, y).mean(dim=-1),
        "partial": (flat(xc) * flat(yc)).sum(-1) / ((flat(xc) ** 2).sum(-1) * (flat(yc) ** 2).sum(-1)).sqrt(),
        "spearman": pearson(average_ranks(x), average_ranks(y)).mean(dim=-1),
    }


def bootstrap_layers(
    grids: Sequence[tuple[Tensor, Tensor]], n_boot: int = 2000, seed: int = 0, chunk: int = 250
) -> list[dict[str, Tensor]]:
    """:func:`grid_statistics` of each ``(ΔD, ΔM)`` grid on ``n_boot`` resamples of its layers: ``{name: (n_boot,)}``.

    Every grid must have the same L layers in the same order: one draw of L layer indices (with replacement)
    is applied to all of them, so statistics of a run and of its null stay paired by layer.
    """
    layers = {g[0].shape[-1] for g in grids}
    if len(layers) != 1:
        raise ValueError(f"grids to resample together need the same layers, got layer counts {sorted(layers)}")
    (n_layers,) = layers
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, n_layers, (n_boot, n_layers), generator=generator)  # (B, L)
    out: list[dict[str, list[Tensor]]] = [{k: [] for k in STATISTICS} for _ in grids]
    for start in range(0, n_boot, chunk):
        idx = index[start:start + chunk]  # (b, L)
        for g, (x, y) in enumerate(grids):
            # (S, L) -> (b, S, L)
            stats = grid_statistics(x.to(torch.float64)[:, idx].transpose(0, 1), y.to(torch.float64)[:, idx].transpose(0, 1))
            for k in STATISTICS:
                out[g][k].append(stats[k])
    return [{k: torch.cat(v) for k, v in o.items()} for o in out]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95 % percentile-bootstrap interval ``[low, high]``."""

    estimate: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.estimate:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def percentile_interval(estimate: float, draws: Tensor, level: float = 0.95) -> Interval:
    """``estimate`` with the ``(1 ± level)/2`` quantiles of its bootstrap ``draws`` (NaN draws dropped)."""
    draws = draws[torch.isfinite(draws)]
    if draws.numel() == 0:
        return Interval(estimate, math.nan, math.nan)
    tail = (1 - level) / 2
    low, high = torch.quantile(draws, torch.tensor([tail, 1 - tail], dtype=draws.dtype)).tolist()
    return Interval(float(estimate), low, high)


def decide(measured: Interval, difference: Interval) -> str:
    """The verdict on one statistic (one of :data:`VERDICTS`).

    ``"negative"``/``"positive"``: the measured interval excludes 0 on that side *and* the interval of
    (measured − null) excludes 0 on the same side. ``"not distinguishable from the null"``: the interval of
    (measured − null) contains 0. ``"below the null"``/``"above the null"``: it differs from the null, but its
    own sign is not resolved (or is the other one, e.g. positive but less so than random updates).
    """
    if difference.low <= 0 <= difference.high or not math.isfinite(difference.low):
        return "not distinguishable from the null"
    if measured.high < 0 and difference.high < 0:
        return "negative"
    if measured.low > 0 and difference.low > 0:
        return "positive"
    return "below the null" if difference.high < 0 else "above the null"


def decomposition_grid(
    rows: Sequence[DecompositionRow], group: str, modules: str, key: str = "method"
) -> tuple[Tensor, Tensor, list[tuple[str, int | None]], list[int]]:
    """``(ΔD, ΔM)`` as ``(S, L)`` float64 grids of the rows whose ``key`` (``"method"`` or ``"run"``) is ``group``
    and whose module type is ``modules`` (or ``"all"``: each module type of a snapshot becomes its own row of
    the grid); snapshots are ``(run, step)`` pairs, step 0 left out. Also returns the snapshots and layers.
    Every snapshot must cover the same layers."""
    chosen = [r for r in rows if getattr(r, key) == group and r.step != 0 and r.layer is not None
              and (modules == "all" or module_type(r.module) == modules)]
    if not chosen:
        raise ValueError(f"no rows with {key}={group!r} and module type {modules!r}")
    layers = sorted({r.layer for r in chosen})
    cells: dict[tuple[str, int | None, str], dict[int, DecompositionRow]] = {}
    for r in chosen:
        cells.setdefault((r.run, r.step, module_type(r.module)), {})[r.layer] = r
    snapshots = sorted(cells, key=lambda c: (c[0], c[1] is None, c[1] or 0, c[2]))
    for snap in snapshots:
        if sorted(cells[snap]) != layers:
            missing = sorted(set(layers) - set(cells[snap]))
            raise ValueError(f"snapshot {snap} lacks layers {missing}: the across-layer statistics need every layer")
    d_dir = torch.tensor([[cells[s][l].dD for l in layers] for s in snapshots], dtype=torch.float64)
    d_mag = torch.tensor([[cells[s][l].dM for l in layers] for s in snapshots], dtype=torch.float64)
    return d_dir, d_mag, [(s[0], s[1]) for s in snapshots], layers


@dataclass(frozen=True)
class Verdict:
    """One method's correlations of ΔM on ΔD, those of random updates of the same size, and the verdict.

    ``statistics[name]``, ``null[name]``, ``difference[name]`` (measured − null, paired by layer) are
    :class:`Interval` s for each name in :data:`STATISTICS`; ``verdicts[name]`` one of :data:`VERDICTS`;
    ``statistic``/``verdict``: the headline (the step-centred partial correlation).
    """

    method: str
    modules: str
    snapshots: int
    layers: int
    statistics: dict[str, Interval]
    null: dict[str, Interval]
    difference: dict[str, Interval]
    verdicts: dict[str, str]
    statistic: str = "partial"

    @property
    def verdict(self) -> str:
        return self.verdicts[self.statistic]


def compare_to_null(
    rows: Sequence[DecompositionRow], null_rows: Sequence[DecompositionRow], modules: Sequence[str] | None = None,
    n_boot: int = 2000, seed: int = 0, headline: str = "partial",
) -> list[Verdict]:
    """Per method (all its runs/seeds together) and module type: the four statistics of :func:`grid_statistics`
    on the measured rows and on ``null_rows`` (the same methods, random updates of the measured size, e.g. from
    :func:`torchdora.analysis.null.random_update_rows`), with paired layer-bootstrap intervals and a verdict.
    """
    if headline not in STATISTICS:
        raise ValueError(f"headline must be one of {STATISTICS}, got {headline!r}")
    methods = list(dict.fromkeys(r.method for r in rows if r.step != 0))
    types = list(modules) if modules is not None else list(dict.fromkeys(module_type(r.module) for r in rows))
    verdicts = []
    for method in methods:
        for kind in types:
            x, y, snaps, layers = decomposition_grid(rows, method, kind)
            nx, ny, _, null_layers = decomposition_grid(null_rows, method, kind)
            if null_layers != layers:
                raise ValueError(f"the null rows of {method!r} cover layers {null_layers}, the measured ones {layers}")
            point, null_point = grid_statistics(x, y), grid_statistics(nx, ny)
            boot, null_boot = bootstrap_layers([(x, y), (nx, ny)], n_boot=n_boot, seed=seed)
            stats, null, diff, said = {}, {}, {}, {}
            for k in STATISTICS:
                stats[k] = percentile_interval(float(point[k]), boot[k])
                null[k] = percentile_interval(float(null_point[k]), null_boot[k])
                diff[k] = percentile_interval(float(point[k] - null_point[k]), boot[k] - null_boot[k])
                said[k] = decide(stats[k], diff[k])
            verdicts.append(Verdict(method, kind, len(snaps), len(layers), stats, null, diff, said, headline))
    return verdicts


# ---- comparisons of accuracies -------------------------------------------------------------------------------
#: two-sided 95 % quantiles t_{0.975, df} of Student's t for df = 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """Student's ``t_{0.975}`` with ``df`` degrees of freedom: a table to 30, then the Cornish-Fisher expansion
    ``z + (z³ + z)/(4 df) + (5z⁵ + 16z³ + 3z)/(96 df²)`` around ``z = 1.959964`` (error < 1e-4 for df > 30)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Interval:
    """Mean of ``a[i] − b[i]`` (paired, e.g. by seed) with its 95 % Student-t interval
    ``mean ± t_{0.975, n−1} · sd / sqrt(n)``; the interval is NaN with fewer than 2 pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same length, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("no pairs to compare")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    mean = float(d.mean())
    if d.numel() < 2:
        return Interval(mean, math.nan, math.nan)
    half = t_quantile_975(d.numel() - 1) * float(d.std(unbiased=True)) / math.sqrt(d.numel())
    return Interval(mean, mean - half, mean + half)


def binomial_se(accuracy: float, n: int) -> float:
    """Standard error ``sqrt(p (1 − p) / n)`` of an accuracy ``p`` measured on ``n`` examples."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)


def describe_difference(interval: Interval, unit: float = 100.0, what: str = "points") -> str:
    """``+2.2 points [−1.0, +5.4], not distinguishable`` (``unit`` scales fractions to percentage points)."""
    est, low, high = (unit * v for v in (interval.estimate, interval.low, interval.high))
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{est:+.1f} {what} (one pair: no interval)"
    verdict = "not distinguishable" if low <= 0 <= high else ("higher" if low > 0 else "lower")
    return f"{est:+.1f} {what} [{low:+.1f}, {high:+.1f}], {verdict}"
