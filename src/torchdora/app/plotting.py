"""The training curves of a run as a PNG (matplotlib, headless Agg backend)."""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

from torchdora.files import atomic_write_bytes

__all__ = ["plot_training", "moving_average"]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training(records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Loss per step (raw and smoothed) and validation/test accuracy from ``metrics.jsonl`` records.

    Step records carry ``loss``; evaluation records carry ``split`` and ``accuracy``. Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede the pyplot import
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    fig, ax_loss = plt.subplots(figsize=(8, 4.5), dpi=110)
    if steps:
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
        ax_loss.plot(steps, moving_average(losses, max(1, len(losses) // 20)), color="tab:blue",
                     label="loss (moving average)")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss (completion tokens)", color="tab:blue")
    ax_acc = ax_loss.twinx()
    # generative data has no accuracy (null in metrics.jsonl); exact match of short answers takes its place
    has_accuracy = any(r.get("accuracy") is not None for r in records if "split" in r)
    metric = "accuracy" if has_accuracy else "exact_match"
    for split, style in (("validation", "o-"), ("test", "s--")):
        points = [(r["step"], r[metric]) for r in records if r.get("split") == split and r.get(metric) is not None]
        if points:
            xs, ys = zip(*points)
            ax_acc.plot(xs, ys, style, color="tab:orange" if split == "validation" else "tab:red",
                        label=f"{split} {metric.replace('_', ' ')}")
    ax_acc.set_ylabel(metric.replace("_", " "), color="tab:orange")
    ax_acc.set_ylim(0.0, 1.0)
    handles = ax_loss.get_legend_handles_labels()[0] + ax_acc.get_legend_handles_labels()[0]
    if handles:
        ax_loss.legend(handles=handles, loc="center right", fontsize=8)
    ax_loss.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
