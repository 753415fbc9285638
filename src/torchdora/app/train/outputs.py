"""What a run leaves behind: metrics, snapshots, the final adapter (or model), ``summary.json``, the plot."""

from __future__ import annotations

import json
import resource
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from torchdora.app.evaluate import EvalResult
from torchdora.app.train.config import TrainConfig
from torchdora.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, replace_dir

__all__ = ["TrainResult", "Metrics", "peak_rss_mb", "named_trainable", "save_snapshot", "write_outputs",
           "print_summary"]


@dataclass
class TrainResult:
    """What a run measured; the same numbers are in ``summary.json``."""

    output_dir: Path
    steps: int
    accuracy_before: float
    accuracy_after: float
    perplexity_before: float
    perplexity_after: float
    final_loss: float
    wall_time_s: float
    train_time_s: float
    peak_rss_mb: float
    trainable_params: int
    total_params: int
    losses: list[float] = field(default_factory=list)


# ---- small helpers ------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class Metrics:
    """Metrics records, rewritten atomically to ``metrics.jsonl`` (a killed run never leaves a torn line)."""

    def __init__(self, path: Path, records: list[dict[str, Any]] | None = None) -> None:
        self.path, self.records = path, list(records or [])

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def flush(self) -> None:
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())


def named_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_model_tensors(model: nn.Module, path: Path) -> None:
    """The model's ``state_dict()`` under its HF key names; tied tensors (shared storage) saved as copies."""
    seen: set[int] = set()
    tensors: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        ptr = value.data_ptr()
        tensors[key] = value.detach().clone() if ptr in seen else value.detach()
        seen.add(ptr)
    atomic_save_safetensors(tensors, path, {"format": "pt"})


def save_snapshot(model: nn.Module, config: TrainConfig, output_dir: Path, step: int) -> Path:
    """``snapshots/step-NNNNNN/``: a torchdora adapter, or ``model.safetensors`` for full fine-tuning."""
    from torchdora.io import save_adapter

    final = output_dir / "snapshots" / f"step-{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if config.method == "full":
        save_model_tensors(model, tmp / "model.safetensors")
    else:
        save_adapter(model, tmp, base_model_name_or_path=config.resolved().model)
    return replace_dir(tmp, final)


def write_outputs(model: nn.Module, tokenizer: Any, config: TrainConfig, result: TrainResult, metrics: Metrics,
                   after: EvalResult) -> None:
    from torchdora.io import save_adapter
    from torchdora.app.plotting import plot_training

    output_dir = result.output_dir
    metrics.flush()
    if config.method == "full":
        tmp = output_dir / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, output_dir / "model")
    else:
        save_adapter(model, output_dir / "adapter", base_model_name_or_path=config.model)
        if config.magnitude_only:
            print("adapter-peft/ not written: PEFT's format has no magnitude-only modules (adapter/ has them)")
        else:
            save_adapter(model, output_dir / "adapter-peft", format="peft", base_model_name_or_path=config.model)
    summary = {
        "method": config.method, "model": config.model, "data": config.data, "steps": result.steps,
        "test_examples": after.n_scored,
        "accuracy_before": result.accuracy_before, "accuracy_after": result.accuracy_after,
        "perplexity_before": result.perplexity_before, "perplexity_after": result.perplexity_after,
        "final_loss": result.final_loss, "wall_time_s": result.wall_time_s, "train_time_s": result.train_time_s,
        "peak_rss_mb": result.peak_rss_mb, "trainable_params": result.trainable_params,
        "total_params": result.total_params,
    }
    atomic_write_json(output_dir / "summary.json", summary)
    plot_training(metrics.records, output_dir / "training.png",
                  title=f"{config.method} on {Path(str(config.model)).name} / {Path(str(config.data)).name}")


def print_summary(config: TrainConfig, result: TrainResult, after: EvalResult) -> None:
    print(
        f"\n== torchdora train: {config.method}, {result.steps} steps ==\n"
        f"test accuracy   {result.accuracy_before:.4f} -> {result.accuracy_after:.4f}  ({after.n_scored} examples)\n"
        f"perplexity      {result.perplexity_before:.3f} -> {result.perplexity_after:.3f}\n"
        f"final loss      {result.final_loss:.4f}\n"
        f"wall time       {result.wall_time_s:.1f} s (training {result.train_time_s:.1f} s)\n"
        f"peak RSS        {result.peak_rss_mb:.0f} MiB\n"
        f"trainable       {result.trainable_params:,} of {result.total_params:,} parameters\n"
        f"run folder      {result.output_dir}",
        flush=True,
    )
