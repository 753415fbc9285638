"""The weight-decomposition analysis of the DoRA paper (section 3, Figure 2), built on the adapter library.

- ``decomposition.py``: ΔM and ΔD per (module, checkpoint), streamed from training snapshots.
- ``stats.py``: the fitted lines and correlations of ΔM on ΔD, across layers within snapshots, with
  bootstrap intervals and a verdict against the null.
- ``null.py``: the null baseline, random updates of the measured size (full-rank, LoRA-like, DoRA-like).
- ``report.py``: CSV/JSON files and the figures.
- ``cli.py``: ``torchdora analyze``.
"""

from torchdora.analysis.decomposition import (
    CSV_COLUMNS,
    DEFAULT_MODULES,
    BaseWeights,
    Checkpoint,
    DecompositionRow,
    analyze,
    checkpoint_weight,
    discover_checkpoints,
    layer_index,
    magnitude_direction_change,
    row_changes,
)
from torchdora.analysis.report import plot_layers, plot_scatter, read_csv, write_csv, write_json
from torchdora.analysis.stats import (
    STATISTIC_NAMES, STATISTICS, Interval, LineFit, Verdict, compare_to_null, fit_line, fit_rows, grid_statistics,
)
from torchdora.analysis.null import random_update_rows

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_MODULES",
    "Checkpoint",
    "DecompositionRow",
    "LineFit",
    "BaseWeights",
    "magnitude_direction_change",
    "row_changes",
    "layer_index",
    "discover_checkpoints",
    "checkpoint_weight",
    "analyze",
    "fit_line",
    "fit_rows",
    "STATISTICS",
    "STATISTIC_NAMES",
    "Interval",
    "Verdict",
    "grid_statistics",
    "compare_to_null",
    "random_update_rows",
    "write_csv",
    "write_json",
    "read_csv",
    "plot_scatter",
    "plot_layers",
]
