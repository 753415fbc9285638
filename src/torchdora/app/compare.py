"""``torchdora compare``: runs side by side, e.g. DoRA and LoRA trained on the same data.

``torchdora compare runs/dora runs/lora [--output compare.png]``

Prints a table of each run's final metrics (``summary.json``; a run still going shows its last records) and writes
one figure (matplotlib, atomically): the training loss (moving average) and the validation loss and accuracy at
each evaluation, from the runs' ``metrics.jsonl``. A folder that is not a run gets one line and is left out.
Single runs are not a comparison with uncertainty: repeat each configuration over seeds before calling a
difference real.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["RunRecord", "COLUMNS", "read_run", "table", "plot_runs", "main"]

#: table columns: ``summary.json`` keys (for a run still going, found in its ``metrics.jsonl`` where possible)
COLUMNS = ("method", "steps", "final_loss", "best_val_loss", "best_step", "accuracy_after", "perplexity_after",
           "exact_match_after", "train_time_s", "trainable_params")


@dataclass
class RunRecord:
    """One run folder: its name, config, summary (empty while it runs) and metrics records."""

    folder: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.folder.name

    def value(self, column: str) -> Any:
        if column == "method":
            return self.summary.get("method", self.config.get("method"))
        validation = [r for r in self.records if r.get("split") == "validation" and r.get("val_loss") is not None]
        if column == "best_val_loss" and "best_val_loss" not in self.summary and validation:
            return min(r["val_loss"] for r in validation)
        if column == "steps" and "steps" not in self.summary:
            return max((r["step"] for r in self.records if "loss" in r), default=None)
        if column == "final_loss" and "final_loss" not in self.summary:
            return next((r["loss"] for r in reversed(self.records) if "loss" in r), None)
        return self.summary.get(column)


def read_run(folder: str | Path) -> RunRecord:
    """A run folder's files; ``ValueError`` (one line) for a folder that is not a run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if not (folder / "metrics.jsonl").is_file() and not (folder / "summary.json").is_file():
        raise ValueError(f"{folder} is not a run folder (no metrics.jsonl or summary.json): skipped")
    try:
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
        records = []
        if (folder / "metrics.jsonl").is_file():
            for line in (folder / "metrics.jsonl").read_text().splitlines():
                if line.strip():
                    records.append(json.loads(line))
    except ValueError as err:
        raise ValueError(f"{folder}: a file of the run is not valid JSON ({err}): skipped") from None
    return RunRecord(folder, config, summary, records)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(runs: Sequence[RunRecord]) -> str:
    """The runs' :data:`COLUMNS` as an aligned text table, one row per run."""
    header = ["run", *COLUMNS]
    rows = [[run.name, *(_cell(run.value(c)) for c in COLUMNS)] for run in runs]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [header, *rows])


def plot_runs(runs: Sequence[RunRecord], path: str | Path) -> Path:
    """Training loss and validation loss/accuracy curves of every run in one figure, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from torchdora.app.plotting import moving_average
    from torchdora.files import atomic_write_bytes

    fig, (ax_loss, ax_val, ax_acc) = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110)
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        steps = [r["step"] for r in run.records if "loss" in r]
        losses = [r["loss"] for r in run.records if "loss" in r]
        if steps:
            ax_loss.plot(steps, moving_average(losses, max(1, len(losses) // 20)), color=color, label=run.name)
        for ax, key in ((ax_val, "val_loss"), (ax_acc, "accuracy")):
            points = [(r["step"], r[key]) for r in run.records
                      if r.get("split") == "validation" and r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, "o-", color=color, label=run.name)
    for ax, label in ((ax_loss, "training loss (moving average)"), (ax_val, "validation loss"),
                      (ax_acc, "validation accuracy")):
        ax.set_xlabel("optimizer step")
        ax.set_title(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchdora compare", description="Compare run folders: a table of final metrics "
                                "and one figure of loss and evaluation curves.")
    p.add_argument("runs", nargs="+", help="run folders (torchdora train --output-dir)")
    p.add_argument("--output", default="compare.png", help="the figure to write (default compare.png)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    runs = []
    for folder in args.runs:
        try:
            runs.append(read_run(folder))
        except ValueError as err:
            print(f"torchdora compare: {err}", file=sys.stderr)
    if not runs:
        print("torchdora compare: error: none of the folders is a run; pass torchdora train's --output-dir folders",
              file=sys.stderr)
        return 2
    if not str(args.output).lower().endswith((".png", ".pdf", ".svg")):
        print(f"torchdora compare: error: --output {args.output} must end in .png, .pdf or .svg", file=sys.stderr)
        return 2
    print(table(runs))
    print(f"figure written to {plot_runs(runs, args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
