"""Everything the decomposition results page states, computed from its committed CSVs alone (no snapshot read).

A *result set* is one folder of CSVs written by ``experiments/reproduce_decomposition.py`` for one plan:
``decomposition.csv`` and ``null.csv`` (the measured points and those of random updates, :func:`read_csv`),
``runs.csv`` (one record per training run) and the model's ``base_norms.csv`` (mean pre-trained row norm per
matrix). :func:`analyse_set` derives every statistic of the page (the verdicts of
:func:`~torchdora.analysis.stats.compare_to_null` on raw, row-norm-scaled and log values, runs as units,
per-run curves, leave-one-layer-out) and :func:`write_set_csvs` writes them beside the inputs.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torchdora.analysis.decomposition import DecompositionRow
from torchdora.analysis.report import read_csv, save_figure, write_stats_csv
from torchdora.analysis.sensitivity import (
    CurvePoint, SeedStatistic, leave_one_layer_out, log_rows, normalized_rows, run_curves, seed_statistics,
)
from torchdora.analysis.stats import Interval, Verdict, compare_to_null, decide, paired_difference
from torchdora.files import atomic_write_bytes

__all__ = ["ResultSet", "read_set", "read_norms", "write_norms", "SetAnalysis", "analyse_set", "write_set_csvs",
           "VARIANTS", "VARIANT_NAMES", "control_reproduced", "sensitivity_lines", "seed_lines", "plot_curves",
           "fmt_interval", "MODULES"]

MODULES = ("q_proj", "v_proj")
#: the transformations of (ΔD, ΔM) the verdicts are recomputed on
VARIANTS = ("raw", "normalized", "log")
VARIANT_NAMES = {"raw": "raw ΔM", "normalized": "ΔM / mean ‖W0[n]‖", "log": "log ΔM on log ΔD"}


@dataclass(frozen=True)
class ResultSet:
    """The CSVs of one plan: measured rows, null rows, run records, mean row norms by module."""

    name: str
    rows: list[DecompositionRow]
    null: list[DecompositionRow]
    runs: list[dict[str, str]]
    norms: dict[str, float]

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.rows))


def _read_records(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_norms(path: str | os.PathLike[str]) -> dict[str, float]:
    """``base_norms.csv``: module → mean pre-trained row norm."""
    return {r["module"]: float(r["mean_row_norm"]) for r in _read_records(Path(path))}


def write_norms(norms: dict[str, tuple[int | None, int, float]], path: str | os.PathLike[str]) -> Path:
    """``module, layer, rows, mean_row_norm`` from ``{module: (layer, rows, mean row norm)}``."""
    return write_table(path, ["module", "layer", "rows", "mean_row_norm"],
                       [[m, "" if layer is None else layer, n, repr(v)] for m, (layer, n, v) in norms.items()])


def read_set(folder: str | os.PathLike[str], norms: dict[str, float], name: str | None = None) -> ResultSet | None:
    """The result set in ``folder``, or ``None`` if it has no ``decomposition.csv`` yet."""
    folder = Path(folder)
    if not (folder / "decomposition.csv").is_file():
        return None
    runs = _read_records(folder / "runs.csv") if (folder / "runs.csv").is_file() else []
    return ResultSet(name or folder.name, read_csv(folder / "decomposition.csv"), read_csv(folder / "null.csv"),
                     runs, norms)


def write_table(path: str | os.PathLike[str], header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())
    return Path(path)


@dataclass
class SetAnalysis:
    """Every statistic of one result set (see the module docstring)."""

    verdicts: dict[str, list[Verdict]]  # variant -> one per method and module type
    curves: list[CurvePoint]
    seeds: dict[tuple[str, str], SeedStatistic]  # (method, modules), the step-centred r
    loo: dict[tuple[str, str], dict[int, float]]  # (method, modules) -> layer left out -> step-centred r
    seed_verdicts: dict[tuple[str, str], str] = field(default_factory=dict)

    def verdict(self, method: str, modules: str, variant: str = "raw") -> Verdict | None:
        return next((v for v in self.verdicts[variant] if v.method == method and v.modules == modules), None)


def analyse_set(rs: ResultSet, n_boot: int = 2000) -> SetAnalysis:
    transformed = {
        "raw": (rs.rows, rs.null),
        "normalized": (normalized_rows(rs.rows, rs.norms), normalized_rows(rs.null, rs.norms)),
        "log": (log_rows(rs.rows), log_rows(rs.null)),
    }
    verdicts = {k: compare_to_null(rows, null, modules=MODULES, n_boot=n_boot, seed=0)
                for k, (rows, null) in transformed.items()}
    seeds, loo, said = {}, {}, {}
    for method in rs.methods:
        for kind in MODULES:
            s = seed_statistics(rs.rows, rs.null, method, kind, "partial")
            seeds[(method, kind)] = s
            said[(method, kind)] = decide(s.mean, s.difference) if len(s.runs) > 1 else "one run: no interval"
            loo[(method, kind)] = leave_one_layer_out(rs.rows, method, kind, "partial")
    return SetAnalysis(verdicts, run_curves(rs.rows, rs.null, MODULES), seeds, loo, said)


def write_set_csvs(an: SetAnalysis, folder: str | os.PathLike[str]) -> list[Path]:
    """``stats.csv`` (raw), ``sensitivity.csv`` (every variant), ``seeds.csv``, ``curves.csv``, ``loo.csv``."""
    folder = Path(folder)
    out = [write_stats_csv(an.verdicts["raw"], folder / "stats.csv")]
    rows = []
    for variant in VARIANTS:
        for v in an.verdicts[variant]:
            for k, interval in v.statistics.items():
                rows.append([variant, v.method, v.modules, k, *_cells(interval), *_cells(v.null[k]),
                             *_cells(v.difference[k]), v.verdicts[k]])
    out.append(write_table(folder / "sensitivity.csv", ["variant", "method", "modules", "statistic", "estimate", "low",
                                                        "high", "null", "null_low", "null_high", "difference",
                                                        "difference_low", "difference_high", "verdict"], rows))
    out.append(write_table(folder / "seeds.csv", ["method", "modules", "statistic", "run", "measured", "null"],
                           [[s.method, s.modules, s.statistic, run, repr(a), repr(b)] for s in an.seeds.values()
                            for run, a, b in zip(s.runs, s.per_run, s.null_per_run)]))
    out.append(write_table(folder / "curves.csv", ["run", "method", "modules", "step", "r", "null_r"],
                           [[c.run, c.method, c.modules, c.step, repr(c.r), repr(c.null_r)] for c in an.curves]))
    out.append(write_table(folder / "loo.csv", ["method", "modules", "layer_left_out", "partial"],
                           [[m, k, layer, repr(v)] for (m, k), values in an.loo.items() for layer, v in values.items()]))
    return out


def _cells(interval: Interval) -> list[str]:
    return [repr(interval.estimate), repr(interval.low), repr(interval.high)]


# ---- wording ----------------------------------------------------------------------------------------------------
def fmt_interval(interval: Interval) -> str:
    if not math.isfinite(interval.estimate):
        return "n/a"
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return f"{interval.estimate:+.2f} (no interval)"
    return f"{interval.estimate:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]"


def control_reproduced(an: SetAnalysis, method: str = "full") -> bool:
    """Whether full fine-tuning shows the paper's negative sign on q_proj: the step-centred r's verdict against
    the null (layer bootstrap) is ``negative``."""
    v = an.verdict(method, "q_proj")
    return v is not None and v.verdicts["partial"] == "negative"


def _loo_cells(values: dict[int, float]) -> list[str]:
    """Range of the statistic over the layer left out, the layer that moves it most, and whether its sign holds."""
    if not values:
        return ["n/a", "", ""]
    full_mean = sum(values.values()) / len(values)
    layer = max(values, key=lambda k: abs(values[k] - full_mean))
    stable = all(v < 0 for v in values.values()) or all(v > 0 for v in values.values())
    return [f"{min(values.values()):+.2f} … {max(values.values()):+.2f} (without layer {layer}: {values[layer]:+.2f})",
            "", "sign stable" if stable else "**sign not stable**"]


def sensitivity_lines(an: SetAnalysis, methods: Sequence[str], names: dict[str, str]) -> list[str]:
    """The sensitivity table, q_proj and v_proj side by side: each row one statistic, each cell measured [95 %],
    null, verdict."""
    lines = ["| method | statistic (what the verdict rests on) | q_proj: measured | null | verdict | "
             "v_proj: measured | null | verdict |", "|---|---|---|---|---|---|---|---|"]
    for method in methods:
        specs = [(VARIANT_NAMES[variant] + ", step-centred r", variant, "partial") for variant in VARIANTS]
        specs.insert(1, ("raw ΔM, Spearman ρ (ranks only; the same on log scale)", "raw",
                         "spearman"))
        for label, variant, stat in specs:
            cells = []
            for kind in MODULES:
                v = an.verdict(method, kind, variant)
                cells += (["n/a"] * 3 if v is None else
                          [fmt_interval(v.statistics[stat]), fmt_interval(v.null[stat]), v.verdicts[stat]])
            lines.append(f"| {names.get(method, method)} | {label} | " + " | ".join(cells) + " |")
        cells = []
        for kind in MODULES:
            cells += _loo_cells(an.loo.get((method, kind), {}))
        lines.append(f"| {names.get(method, method)} | raw ΔM, step-centred r, each layer left out in turn "
                     "(range; the layer that moves it most) | " + " | ".join(cells) + " |")
        cells = []
        for kind in MODULES:
            s = an.seeds.get((method, kind))
            if s is None:
                cells += ["n/a"] * 3
                continue
            cells += [f"{fmt_interval(s.mean)} ({len(s.runs)} run{'s' if len(s.runs) > 1 else ''})",
                      fmt_interval(paired_mean(s.null_per_run)), an.seed_verdicts[(method, kind)]]
        lines.append(f"| {names.get(method, method)} | raw ΔM, step-centred r, runs (seeds) as units, Student t "
                     "| " + " | ".join(cells) + " |")
    return lines


def paired_mean(values: Sequence[float]) -> Interval:
    """Mean with its 95 % Student-t interval over the values (runs)."""
    return paired_difference(list(values), [0.0] * len(values))


def seed_lines(an: SetAnalysis, methods: Sequence[str], names: dict[str, str]) -> list[str]:
    """Per method and module type: the step-centred r of each run, the Student-t interval over runs and the
    layer-bootstrap interval (runs pooled), side by side, and how wide the run interval is."""
    lines = ["| method | matrices | each run (seed): measured / null | runs as units: mean [95 % t] | "
             "measured − null over runs | layers as units (bootstrap) |", "|---|---|---|---|---|---|"]
    for method in methods:
        for kind in MODULES:
            s, v = an.seeds.get((method, kind)), an.verdict(method, kind)
            if s is None or v is None:
                continue
            each = "; ".join(f"{run.rsplit('-seed', 1)[-1]}: {a:+.2f} / {b:+.2f}"
                             for run, a, b in zip(s.runs, s.per_run, s.null_per_run))
            lines.append(f"| {names.get(method, method)} | {kind} | {each} | {fmt_interval(s.mean)} | "
                         f"{fmt_interval(s.difference)} | {fmt_interval(v.statistics['partial'])} |")
    return lines


def plot_curves(sets: Sequence[tuple[str, Sequence[CurvePoint]]], path: str | os.PathLike[str],
                modules: str = "q_proj") -> Path:
    """The across-layer Pearson r of every snapshot against the step, a line per run (seed) and its null dashed;
    a row of panels per result set, a column per method."""
    from matplotlib.figure import Figure

    sets = [(name, [c for c in curves if c.modules == modules]) for name, curves in sets]
    sets = [(name, curves) for name, curves in sets if curves]
    if not sets:
        raise ValueError(f"nothing to plot: no {modules} curves")
    order = ("full", "full-qv", "lora", "dora")
    methods = sorted(dict.fromkeys(c.method for _, curves in sets for c in curves),
                     key=lambda m: (order.index(m) if m in order else len(order), m))
    figure = Figure(figsize=(3.2 * len(methods), 2.6 * len(sets)), layout="constrained")
    axes = figure.subplots(len(sets), len(methods), squeeze=False, sharey=True)
    for row, (name, curves) in enumerate(sets):
        for col, method in enumerate(methods):
            ax = axes[row][col]
            runs = list(dict.fromkeys(c.run for c in curves if c.method == method))
            for i, run in enumerate(runs):
                points = sorted((c for c in curves if c.run == run), key=lambda c: c.step)
                steps = [c.step for c in points]
                ax.plot(steps, [c.r for c in points], "-o", ms=3, color=f"C{i}", label=run.rsplit("-", 1)[-1])
                ax.plot(steps, [c.null_r for c in points], "--", color=f"C{i}", alpha=0.6, lw=1)
            ax.axhline(0, color="k", lw=0.6)
            ax.set_ylim(-1.05, 1.05)
            ax.set_title(f"{name}: {method}", fontsize=9)
            if runs:
                ax.legend(fontsize=7, loc="lower left")
            else:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="0.5")
                ax.set_xticks([])
            if row == len(sets) - 1:
                ax.set_xlabel("step")
            if col == 0:
                ax.set_ylabel(f"{modules}: across-layer r")
    figure.suptitle("within-snapshot r of ΔM on ΔD per run (solid) and its random-update null (dashed)", fontsize=9)
    return save_figure(figure, path)
