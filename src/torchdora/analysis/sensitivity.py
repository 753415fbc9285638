"""How much a verdict of :mod:`torchdora.analysis.stats` depends on its choices: runs as units, the scale of ΔM,
logarithms, rank correlation, and single layers.

The layer bootstrap of :func:`~torchdora.analysis.stats.compare_to_null` resamples layers and pools a method's
seeds as extra snapshots, so it says nothing about how much a second training run would differ. Here:

- :func:`run_curves`: the across-layer Pearson r of every snapshot of every run (its null beside it), to see
  each seed's course over training;
- :func:`seed_statistics`: one statistic per run (seed), measured and null, and a Student-t interval with runs
  as the units (:func:`~torchdora.analysis.stats.paired_difference`): with 2–3 runs its width is the message;
- :func:`normalized_rows` / :func:`log_rows`: ΔM divided by the matrix's mean pre-trained row norm, or
  ``(log ΔD, log ΔM)``, to be fed to ``compare_to_null`` like the raw rows;
- :func:`leave_one_layer_out`: the statistic with each layer left out in turn.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from torchdora.analysis.decomposition import DecompositionRow
from torchdora.analysis.stats import (
    STATISTICS, Interval, decomposition_grid, grid_statistics, module_type, paired_difference, pearson,
)

__all__ = ["CurvePoint", "run_curves", "SeedStatistic", "seed_statistics", "normalized_rows", "log_rows",
           "leave_one_layer_out", "row_norm_means"]


@dataclass(frozen=True)
class CurvePoint:
    """The across-layer Pearson r of ΔM on ΔD at one snapshot of one run, measured and of its null."""

    run: str
    method: str
    modules: str
    step: int
    r: float
    null_r: float


def _by_run(rows: Sequence[DecompositionRow]) -> dict[str, list[DecompositionRow]]:
    out: dict[str, list[DecompositionRow]] = {}
    for r in rows:
        out.setdefault(r.run, []).append(r)
    return out


def run_curves(rows: Sequence[DecompositionRow], null_rows: Sequence[DecompositionRow],
               modules: Sequence[str] = ("q_proj", "v_proj")) -> list[CurvePoint]:
    """For every run, module type and snapshot (step 0 left out): Pearson r across layers, and the same of the
    null run (same run label in ``null_rows``)."""
    null_by_run = _by_run(null_rows)
    out = []
    for run, members in _by_run(rows).items():
        for kind in modules:
            if not any(module_type(r.module) == kind for r in members):
                continue
            x, y, snaps, _ = decomposition_grid(members, run, kind, key="run")
            nx, ny, nsnaps, _ = decomposition_grid(null_by_run[run], run, kind, key="run")
            if [s[1] for s in nsnaps] != [s[1] for s in snaps]:
                raise ValueError(f"the null of run {run!r} has other snapshots than the run")
            r, null_r = pearson(x, y), pearson(nx, ny)  # (S,) each
            for i, (_, step) in enumerate(snaps):
                out.append(CurvePoint(run, members[0].method, kind, int(step), float(r[i]), float(null_r[i])))
    return out


@dataclass(frozen=True)
class SeedStatistic:
    """One statistic of one method and module type with runs (seeds) as the units.

    ``per_run``/``null_per_run``: the statistic of each run and of its null, in ``runs`` order; ``mean`` and
    ``difference``: mean over runs, and mean of (measured − null), with 95 % Student-t intervals over runs
    (NaN bounds with a single run).
    """

    method: str
    modules: str
    statistic: str
    runs: tuple[str, ...]
    per_run: tuple[float, ...]
    null_per_run: tuple[float, ...]
    mean: Interval
    difference: Interval


def seed_statistics(rows: Sequence[DecompositionRow], null_rows: Sequence[DecompositionRow], method: str,
                    modules: str, statistic: str = "partial") -> SeedStatistic:
    """:func:`~torchdora.analysis.stats.grid_statistics` ``[statistic]`` of each run of ``method`` (its snapshots ×
    layers grid alone) and of its null; intervals over runs."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    runs = list(dict.fromkeys(r.run for r in rows if r.method == method))
    if not runs:
        raise ValueError(f"no rows of method {method!r}")
    null_by_run = _by_run(null_rows)
    measured, null = [], []
    for run in runs:
        x, y, _, _ = decomposition_grid(rows, run, modules, key="run")
        nx, ny, _, _ = decomposition_grid(null_by_run[run], run, modules, key="run")
        measured.append(float(grid_statistics(x, y)[statistic]))
        null.append(float(grid_statistics(nx, ny)[statistic]))
    mean = paired_difference(measured, [0.0] * len(measured))
    return SeedStatistic(method, modules, statistic, tuple(runs), tuple(measured), tuple(null), mean,
                         paired_difference(measured, null))


def row_norm_means(weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Module name → mean over its rows of ``||W0[n]||`` (rows as :meth:`BaseWeights.rows` gives them), in fp64."""
    return {m: float(torch.linalg.vector_norm(w.to(torch.float64), dim=1).mean()) for m, w in weights.items()}


def normalized_rows(rows: Sequence[DecompositionRow], norm_means: Mapping[str, float]) -> list[DecompositionRow]:
    """ΔM divided by the module's mean pre-trained row norm: ``ΔM_t / mean_n ||W0[n]||`` (a relative change of
    size, so that layers with larger rows do not get a larger ΔM for the same relative rescaling); ΔD as is."""
    missing = sorted({r.module for r in rows} - set(norm_means))
    if missing:
        raise ValueError(f"no pre-trained row norm for modules {missing[:3]} ...: pass every module's mean row norm")
    return [dataclasses.replace(r, dM=r.dM / norm_means[r.module]) for r in rows]


def log_rows(rows: Sequence[DecompositionRow]) -> list[DecompositionRow]:
    """``(log ΔD, log ΔM)`` in place of ``(ΔD, ΔM)``, step 0 (ΔM = ΔD = 0) kept as is for the statistics to skip;
    a zero at a later step is an error (no logarithm)."""
    out = []
    for r in rows:
        if r.step == 0:
            out.append(r)
            continue
        if not (r.dM > 0 and r.dD > 0):
            raise ValueError(f"log scale needs ΔM > 0 and ΔD > 0, got {r.dM}, {r.dD} at {r.run} step {r.step} {r.module}")
        out.append(dataclasses.replace(r, dM=math.log(r.dM), dD=math.log(r.dD)))
    return out


def leave_one_layer_out(rows: Sequence[DecompositionRow], method: str, modules: str,
                        statistic: str = "partial") -> dict[int, float]:
    """Layer → the statistic of ``method`` (all its runs, as :func:`compare_to_null` pools them) without that layer."""
    x, y, _, layers = decomposition_grid(rows, method, modules)
    out = {}
    for i, layer in enumerate(layers):
        keep = [j for j in range(len(layers)) if j != i]
        out[layer] = float(grid_statistics(x[:, keep], y[:, keep])[statistic])
    return out
