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
from torchdora.analysis.stats import fit_rows, module_type
from torchdora.io import atomic_write_bytes

__all__ = ["write_csv", "read_csv", "write_json", "plot_scatter", "plot_layers"]


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


def _save_figure(figure: Any, path: str | os.PathLike[str]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # Agg, whatever pyplot's global backend is
    suffix = Path(path).suffix.lstrip(".") or "png"
    buffer = io.BytesIO()
    figure.savefig(buffer, format=suffix, dpi=130, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:+.2f}"


def plot_scatter(rows: Sequence[DecompositionRow], path: str | os.PathLike[str], color_by: str = "step") -> Path:
    """The paper's Figure 2: ΔD on x, ΔM on y, a panel per run (columns) and module type (rows).

    One marker per method, colour by ``"step"`` or ``"layer"``, the least-squares line dashed, and its slope and
    Pearson correlation in the legend. Step 0 is not drawn (it is the origin for every method).
    """
    if color_by not in ("step", "layer"):
        raise ValueError(f"color_by must be 'step' or 'layer', got {color_by!r}")
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    rows = [r for r in rows if r.step != 0]
    if not rows:
        raise ValueError("nothing to plot: every row is step 0 (the pre-trained weight)")
    runs = list(dict.fromkeys(r.run for r in rows))
    types = list(dict.fromkeys(module_type(r.module) for r in rows))
    fits = {(f.run, f.modules): f for f in fit_rows(rows)}
    values = [getattr(r, color_by) or 0 for r in rows]
    norm = Normalize(min(values), max(values) if max(values) > min(values) else min(values) + 1)
    cmap = colormaps["viridis"]
    figure = Figure(figsize=(4.2 * len(runs), 3.6 * len(types)), layout="constrained")
    axes = figure.subplots(len(types), len(runs), squeeze=False)
    scatter = None
    for i, kind in enumerate(types):
        for j, run in enumerate(runs):
            ax = axes[i][j]
            points = [r for r in rows if r.run == run and module_type(r.module) == kind]
            if not points:
                ax.set_visible(False)
                continue
            method = points[0].method
            fit = fits.get((run, kind))
            label = run if fit is None else f"{run}: slope {fit.slope:.3g}, r = {_fmt(fit.pearson)}"
            xs, ys = [p.dD for p in points], [p.dM for p in points]
            scatter = ax.scatter(xs, ys, c=[getattr(p, color_by) or 0 for p in points], cmap=cmap, norm=norm,
                                 marker=_marker(method, j), s=28, edgecolors="black", linewidths=0.3, label=label)
            if fit is not None and math.isfinite(fit.slope):
                lo, hi = min(xs), max(xs)
                ax.plot([lo, hi], [fit.slope * lo + fit.intercept, fit.slope * hi + fit.intercept], "k--", lw=1)
            ax.set_title(f"{run} ({kind})")
            ax.set_xlabel("ΔD (1 − cos)")
            ax.set_ylabel("ΔM (|Δ row norm|)")
            ax.ticklabel_format(axis="both", style="sci", scilimits=(-2, 3))
            ax.legend(loc="best", fontsize=7)
    if scatter is not None:
        figure.colorbar(scatter, ax=axes, label=color_by, shrink=0.8)
    return _save_figure(figure, path)


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
    return _save_figure(figure, path)
