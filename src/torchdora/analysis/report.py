"""Files of an analysis: the rows as CSV, rows and fits as JSON, and the two figures (paper Figure 2)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from torchdora.analysis.decomposition import CSV_COLUMNS, DecompositionRow
from torchdora.analysis.stats import (
    STATISTICS, Interval, Verdict, decomposition_grid, fit_rows, grid_statistics, module_type,
)
from torchdora.files import atomic_write_bytes

__all__ = [
    "write_csv", "read_csv", "write_json", "save_figure", "plot_scatter", "plot_layers", "plot_statistics", "STATS_COLUMNS",
    "write_stats_csv", "verdicts_json", "format_verdicts",
]


def _csv_bytes(rows: Sequence[DecompositionRow]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        # repr() of a float round-trips exactly, so the CSV holds the same numbers as the JSON
        writer.writerow([row.run, row.method, "" if row.step is None else row.step, row.module,
                         "" if row.layer is None else row.layer, repr(row.dM), repr(row.dD)])
    return buffer.getvalue().encode()


def write_csv(rows: Sequence[DecompositionRow], path: str | os.PathLike[str]) -> Path:
    """Columns ``run, method, step, module, layer, dM, dD``; written atomically."""
    atomic_write_bytes(path, _csv_bytes(rows))
    return Path(path)


def read_csv(path: str | os.PathLike[str]) -> list[DecompositionRow]:
    """Rows written by :func:`write_csv`."""
    with open(path, newline="") as f:
        return [
            DecompositionRow(
                run=r["run"], method=r["method"], step=int(r["step"]) if r["step"] else None, module=r["module"],
                layer=int(r["layer"]) if r["layer"] else None, dM=float(r["dM"]), dD=float(r["dD"]),
            )
            for r in csv.DictReader(f)
        ]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def write_json(rows: Sequence[DecompositionRow], path: str | os.PathLike[str],
               extra: Mapping[str, Any] | None = None) -> Path:
    """``{"rows": [...], "fits": [...], **extra}``: the CSV's numbers plus the fitted lines; written atomically."""
    fits = [{k: _finite(v) if isinstance(v, float) else v for k, v in asdict(f).items()} for f in fit_rows(rows)]
    data = {**(extra or {}), "rows": [asdict(r) for r in rows], "fits": fits}
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())
    return Path(path)


# ---- figures -----------------------------------------------------------------------------------------------
_MARKERS = {"full": "s", "ft": "s", "lora": "^", "dora": "o"}
_EXTRA_MARKERS = "DvP*Xph"


def _marker(method: str, index: int) -> str:
    return _MARKERS.get(method.lower(), _EXTRA_MARKERS[index % len(_EXTRA_MARKERS)])


def save_figure(figure: Any, path: str | os.PathLike[str]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # Agg, whatever pyplot's global backend is
    suffix = Path(path).suffix.lstrip(".") or "png"
    buffer = io.BytesIO()
    figure.savefig(buffer, format=suffix, dpi=130, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:+.2f}"


_STEP_MARKERS = "o^sDvP*Xph<>"


def _within_r(points: Sequence[DecompositionRow]) -> float:
    """The across-layer Pearson r within each snapshot, averaged (NaN when the grid is incomplete)."""
    if not points:
        return math.nan
    try:
        x, y, _, _ = decomposition_grid(points, points[0].run, module_type(points[0].module), key="run")
    except ValueError:
        return math.nan
    return float(grid_statistics(x, y)["within"]) if x.shape[-1] > 2 else math.nan


def plot_scatter(rows: Sequence[DecompositionRow], path: str | os.PathLike[str], color_by: str = "layer",
                 panels: str = "run") -> Path:
    """The paper's Figure 2: ΔD on x, ΔM on y, a panel per run or method (columns) and module type (rows).

    Both the layer and the step show: with ``color_by="layer"`` the colour is the layer and the marker shape the
    snapshot (step); with ``color_by="step"`` the colour is the step and a thin line joins each layer's points
    over the snapshots. The pooled least-squares line is dashed; the legend gives its slope, the pooled Pearson
    r and the across-layer r within snapshots (averaged). ``panels="method"`` overlays a method's runs (seeds).
    Step 0 is not drawn (it is the origin for every method).
    """
    if color_by not in ("step", "layer"):
        raise ValueError(f"color_by must be 'step' or 'layer', got {color_by!r}")
    if panels not in ("run", "method"):
        raise ValueError(f"panels must be 'run' or 'method', got {panels!r}")
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = [r for r in rows if r.step != 0]
    if not rows:
        raise ValueError("nothing to plot: every row is step 0 (the pre-trained weight)")
    columns = list(dict.fromkeys(getattr(r, panels) for r in rows))
    types = list(dict.fromkeys(module_type(r.module) for r in rows))
    fits = {(f.run, f.modules): f for f in fit_rows(rows)}
    steps = sorted({r.step or 0 for r in rows})
    values = [getattr(r, color_by) or 0 for r in rows]
    norm = Normalize(min(values), max(values) if max(values) > min(values) else min(values) + 1)
    cmap = colormaps["viridis"]
    figure = Figure(figsize=(4.2 * len(columns), 3.6 * len(types)), layout="constrained")
    axes = figure.subplots(len(types), len(columns), squeeze=False)
    mappable = None
    for i, kind in enumerate(types):
        for j, column in enumerate(columns):
            ax = axes[i][j]
            points = [r for r in rows if getattr(r, panels) == column and module_type(r.module) == kind]
            if not points:
                ax.set_visible(False)
                continue
            runs = list(dict.fromkeys(p.run for p in points))
            labels = []
            for run in runs:
                mine = [p for p in points if p.run == run]
                fit = fits.get((run, kind))
                within = _within_r(mine)
                labels.append(f"{run}: pooled r {_fmt(fit.pearson) if fit else 'n/a'}, within-step r {_fmt(within)}")
                if color_by == "step":
                    for layer in sorted({p.layer for p in mine if p.layer is not None}):
                        track = sorted((p for p in mine if p.layer == layer), key=lambda p: p.step or 0)
                        ax.plot([p.dD for p in track], [p.dM for p in track], color="0.75", lw=0.5, zorder=1)
                if fit is not None and math.isfinite(fit.slope) and len(runs) == 1:
                    lo, hi = min(p.dD for p in mine), max(p.dD for p in mine)
                    ax.plot([lo, hi], [fit.slope * lo + fit.intercept, fit.slope * hi + fit.intercept], "k--", lw=1)
            for k, step in enumerate(steps):
                group = [p for p in points if (p.step or 0) == step]
                if not group:
                    continue
                marker = _STEP_MARKERS[k % len(_STEP_MARKERS)] if color_by == "layer" else _marker(group[0].method, j)
                mappable = ax.scatter([p.dD for p in group], [p.dM for p in group],
                                      c=[getattr(p, color_by) or 0 for p in group], cmap=cmap, norm=norm,
                                      marker=marker, s=22, edgecolors="black", linewidths=0.3, zorder=2)
            handles = [Line2D([], [], ls="none", label=text) for text in labels]
            if color_by == "layer":
                handles += [Line2D([], [], ls="none", marker=_STEP_MARKERS[k % len(_STEP_MARKERS)], color="0.4",
                                   label=f"step {step}") for k, step in enumerate(steps)]
            ax.legend(handles=handles, loc="best", fontsize=6, handlelength=1)
            ax.set_title(f"{column} ({kind})")
            ax.set_xlabel("ΔD (1 − cos)")
            ax.set_ylabel("ΔM (|Δ row norm|)")
            ax.ticklabel_format(axis="both", style="sci", scilimits=(-2, 3))
    if mappable is not None:
        figure.colorbar(mappable, ax=axes, label=color_by, shrink=0.8)
    return save_figure(figure, path)


def plot_statistics(verdicts: Sequence[Verdict], path: str | os.PathLike[str]) -> Path:
    """Each method's correlations (points, 95 % bootstrap intervals) beside those of its null, one panel per
    module type: a statistic whose interval overlaps the null's grey one is not told apart from random updates."""
    from matplotlib.figure import Figure

    if not verdicts:
        raise ValueError("nothing to plot: no verdicts")
    types = list(dict.fromkeys(v.modules for v in verdicts))
    methods = list(dict.fromkeys(v.method for v in verdicts))
    figure = Figure(figsize=(4.0 * len(types), 0.9 + 0.55 * len(methods) * len(STATISTICS)), layout="constrained")
    axes = figure.subplots(1, len(types), squeeze=False)[0]
    for ax, kind in zip(axes, types):
        labels = []
        for i, v in enumerate(v for v in verdicts if v.modules == kind):
            for k, name in enumerate(STATISTICS):
                y = -(i * (len(STATISTICS) + 1) + k)
                labels.append((y, f"{v.method}: {name}"))
                for interval, colour, dy in ((v.null[name], "0.6", -0.18), (v.statistics[name], "C0", 0.18)):
                    ax.errorbar(interval.estimate, y + dy, xerr=[[interval.estimate - interval.low],
                                [interval.high - interval.estimate]], fmt="o", color=colour, ms=3, capsize=2)
        ax.axvline(0, color="k", lw=0.6)
        ax.set_yticks([y for y, _ in labels], [t for _, t in labels], fontsize=7)
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("correlation of ΔM on ΔD")
        ax.set_title(kind)
    figure.suptitle("measured (blue) and random updates of the same size (grey), 95 % intervals", fontsize=9)
    return save_figure(figure, path)


def _interval_cells(interval: Interval) -> list[str]:
    return [repr(interval.estimate), repr(interval.low), repr(interval.high)]


STATS_COLUMNS = ("method", "modules", "statistic", "snapshots", "layers", "estimate", "low", "high", "null",
                 "null_low", "null_high", "difference", "difference_low", "difference_high", "verdict")


def write_stats_csv(verdicts: Sequence[Verdict], path: str | os.PathLike[str]) -> Path:
    """One line per method, module type and statistic: estimate, null and their difference with 95 % intervals."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(STATS_COLUMNS)
    for v in verdicts:
        for name in STATISTICS:
            writer.writerow([v.method, v.modules, name, v.snapshots, v.layers, *_interval_cells(v.statistics[name]),
                             *_interval_cells(v.null[name]), *_interval_cells(v.difference[name]), v.verdicts[name]])
    atomic_write_bytes(path, buffer.getvalue().encode())
    return Path(path)


def verdicts_json(verdicts: Sequence[Verdict]) -> list[dict[str, Any]]:
    """The verdicts as JSON-ready dicts (NaN as null)."""
    out = []
    for v in verdicts:
        item: dict[str, Any] = {"method": v.method, "modules": v.modules, "snapshots": v.snapshots,
                                "layers": v.layers, "headline": v.statistic, "verdict": v.verdict}
        for part in ("statistics", "null", "difference"):
            item[part] = {k: {f: _finite(getattr(i, f)) for f in ("estimate", "low", "high")}
                          for k, i in getattr(v, part).items()}
        item["verdicts"] = dict(v.verdicts)
        out.append(item)
    return out


def format_verdicts(verdicts: Sequence[Verdict]) -> str:
    """A plain-text table: per method and module type, each statistic, its null and the verdict."""
    lines = [f"{'method':<12} {'modules':<8} {'statistic':<9} {'measured [95 % CI]':>24} {'null [95 % CI]':>24}  verdict"]
    for v in verdicts:
        for name in STATISTICS:
            lines.append(f"{v.method:<12} {v.modules:<8} {name:<9} {str(v.statistics[name]):>24} "
                         f"{str(v.null[name]):>24}  {v.verdicts[name]}")
    return "\n".join(lines)


def plot_layers(rows: Sequence[DecompositionRow], path: str | os.PathLike[str]) -> Path:
    """ΔM and ΔD per layer at each run's last checkpoint (one line per run, a column per module type)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in rows if r.layer is not None]
    if not rows:
        raise ValueError("nothing to plot per layer: no selected module name holds a layer index")
    runs = list(dict.fromkeys(r.run for r in rows))
    types = list(dict.fromkeys(module_type(r.module) for r in rows))
    figure = Figure(figsize=(4.5 * len(types), 6.0), layout="constrained")
    axes = figure.subplots(2, len(types), squeeze=False)
    for j, kind in enumerate(types):
        for k, run in enumerate(runs):
            mine = [r for r in rows if r.run == run and module_type(r.module) == kind]
            if not mine:
                continue
            last = max((r.step for r in mine if r.step is not None), default=None)
            mine = sorted((r for r in mine if r.step == last), key=lambda r: r.layer)
            label = run if last is None else f"{run} (step {last})"
            for i, metric in enumerate(("dM", "dD")):
                axes[i][j].plot([r.layer for r in mine], [getattr(r, metric) for r in mine],
                                marker=_marker(mine[0].method, k), ms=4, label=label)
        axes[0][j].set_title(kind)
        axes[0][j].set_ylabel("ΔM")
        axes[1][j].set_ylabel("ΔD")
        axes[1][j].set_xlabel("layer")
        for i in range(2):
            axes[i][j].xaxis.set_major_locator(MaxNLocator(integer=True))
        for i, metric in enumerate(("dM", "dD")):
            if all(getattr(r, metric) > 0 for r in rows if module_type(r.module) == kind):
                axes[i][j].set_yscale("log")  # methods differ by orders of magnitude
            axes[i][j].legend(fontsize=7)
    return save_figure(figure, path)
