"""What a run leaves behind: metrics, snapshots, the final adapter (or model), ``summary.json``, the plot."""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

from torchdora.app.assets import recorded_base_name
from torchdora.app.evaluate import EvalResult
from torchdora.app.train.config import TrainConfig
from torchdora.files import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, replace_dir

__all__ = ["TrainResult", "Metrics", "Progress", "prepare_trackers", "quiet_library_bars", "json_ready", "peak_rss_mb", "named_trainable", "save_snapshot",
           "write_outputs", "print_summary", "tracker_values", "best_summary", "write_cards"]


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
    exact_match_before: float = float("nan")  # NaN (null in summary.json) when no short answer was generated
    exact_match_after: float = float("nan")
    peak_rss_mb_per_process: list[float] = field(default_factory=list)  # by rank; peak_rss_mb is this process's
    best: dict[str, Any] = field(default_factory=dict)  # train.best.Best.to_dict(): the best evaluation's step
    test_adapter: str = "last"  # the weights the test split was scored with after training: best, last or none


# ---- small helpers ------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def json_ready(value: Any) -> Any:
    """``value`` with every NaN/infinite float replaced by ``None``: JSON has no NaN (``json.dumps`` would write a
    bare ``NaN`` that strict parsers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record as tracker scalars: ``{"train/loss": ...}`` or ``{"validation/accuracy": ...}``."""
    prefix = record.get("split", "train")
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class Metrics:
    """Metrics records, each appended to ``metrics.jsonl`` as one line and flushed at once (so ``tail -f`` follows
    a run, and a crash keeps every record written so far), and handed to ``on_record`` (the trackers).

    Only the writing process (the main one) touches the file; every process keeps ``records``.
    """

    def __init__(self, path: Path, records: list[dict[str, Any]] | None = None, write: bool = True,
                 on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path, self.records, self.write, self.on_record = path, list(records or []), write, on_record
        if self.write:
            self.flush()  # a fresh run starts an empty file; a resumed one is rewritten by reset()

    def add(self, record: dict[str, Any]) -> None:
        record = json_ready(record)
        self.records.append(record)
        if self.write:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, allow_nan=False) + "\n")
                handle.flush()
        if self.on_record is not None:
            self.on_record(record)

    def reset(self, records: list[dict[str, Any]]) -> None:
        """Replace every record (a resumed run drops those after its checkpoint) and rewrite the file."""
        self.records = [json_ready(r) for r in records]
        self.flush()

    def flush(self) -> None:
        """Rewrite the whole file atomically from ``records`` (appends keep it current between calls)."""
        if self.write:
            atomic_write_bytes(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.records).encode())


def _memory_text() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB GPU"
    return f"{peak_rss_mb() / 1024:.1f} GiB RSS"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def prepare_trackers(trackers: list[str]) -> None:
    """Fail before the model loads when a tracker's package is missing; keep wandb offline unless it is set up.

    TensorBoard writes event files only (offline by nature). wandb asks for a login on first use, which would
    stall an unattended run: without ``WANDB_API_KEY`` or ``WANDB_MODE`` it runs offline (``wandb sync`` later).
    """
    import importlib.util
    import os

    for tracker in trackers:
        module = "tensorboard" if tracker == "tensorboard" else tracker
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"--report-to {tracker} needs the package {module!r}: "
                                      f"pip install 'torchdora[{tracker}]'")
    if "wandb" in trackers and not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
        print("wandb: no WANDB_API_KEY or WANDB_MODE set, logging offline (upload later with `wandb sync`)")


def quiet_library_bars() -> None:
    """Turn off the progress bars of transformers and huggingface_hub (e.g. "Loading weights") when stderr is
    not a terminal: in a log file each redraw is a line of carriage returns."""
    if sys.stderr.isatty():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class Progress:
    """A tqdm bar on a terminal; otherwise one plain line every ``every`` steps or ``seconds`` seconds (whichever
    comes first) with loss, lr, tokens/s, ETA and memory, so a redirected log stays small (a bar redraws in place
    with carriage returns, which a log file keeps)."""

    def __init__(self, total: int, initial: int, enabled: bool, every: int, seconds: float = 60.0,
                 terminal: bool | None = None) -> None:
        self.total, self.step, self.enabled, self.every, self.seconds = total, initial, enabled, every, seconds
        self.start_step, self.start_time = initial, time.perf_counter()
        self.last_line = self.start_time
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = None
        if enabled and terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def update(self, loss: float, lr: float, tokens_per_s: float) -> None:
        self.step += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter()
        if self.step % self.every and now - self.last_line < self.seconds and self.step != self.total:
            return
        self.last_line = now
        per_step = (now - self.start_time) / max(self.step - self.start_step, 1)
        print(f"step {self.step}/{self.total} loss {loss:.4f} lr {lr:.2e} tokens/s {tokens_per_s:.0f} "
              f"eta {_duration(per_step * (self.total - self.step))} mem {_memory_text()}", flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    """``snapshots/step-NNNNNN/``: a torchdora adapter, or ``model.safetensors`` for full fine-tuning.

    Every process calls it (FSDP2-sharded adapters are gathered by all); the main process writes.
    """
    from torchdora.distributed import is_main_process
    from torchdora.io import save_adapter

    final = output_dir / "snapshots" / f"step-{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp")
    main = is_main_process()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if config.method == "full":
        if main:
            save_model_tensors(model, tmp / "model.safetensors")
    else:
        save_adapter(model, tmp, base_model_name_or_path=recorded_base_name(config.model))
    return replace_dir(tmp, final) if main else final


def write_outputs(model: nn.Module, tokenizer: Any, config: TrainConfig, result: TrainResult, metrics: Metrics,
                   after: EvalResult) -> None:
    """The run folder's final files. Every process calls it (FSDP2-sharded adapters are gathered by all);
    only the main process writes."""
    from torchdora.distributed import is_main_process
    from torchdora.io import save_adapter
    from torchdora.app.plotting import plot_training

    output_dir = result.output_dir
    main = is_main_process()
    if config.method != "full":
        save_adapter(model, output_dir / "adapter", base_model_name_or_path=recorded_base_name(config.model))
        if config.magnitude_only:
            if main:
                print("adapter-peft/ not written: PEFT's format has no magnitude-only modules (adapter/ has them)")
        elif config.method == "dvora":
            if main:
                print("adapter-peft/ not written: PEFT has no DVoRA (adapter/ holds it in torchdora's format)")
        else:
            save_adapter(model, output_dir / "adapter-peft", format="peft",
                         base_model_name_or_path=recorded_base_name(config.model))
    if not main:
        return
    metrics.flush()
    if config.method == "full":
        tmp = output_dir / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, output_dir / "model")
    summary = {
        "method": config.method, "model": config.model, "data": config.data, "steps": result.steps,
        "test_examples": after.n_examples, "accuracy_examples": after.n_scored,
        **({} if after.accuracy_note is None else {"accuracy_note": after.accuracy_note}),
        "accuracy_before": result.accuracy_before, "accuracy_after": result.accuracy_after,
        "perplexity_before": result.perplexity_before, "perplexity_after": result.perplexity_after,
        "exact_match_before": result.exact_match_before, "exact_match_after": result.exact_match_after,
        "exact_match_examples": after.n_generated,
        "final_loss": result.final_loss, "wall_time_s": result.wall_time_s, "train_time_s": result.train_time_s,
        "peak_rss_mb": result.peak_rss_mb, "peak_rss_mb_per_process": result.peak_rss_mb_per_process,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        **best_summary(result.best),
        **test_adapter_summary(result),
    }
    atomic_write_json(output_dir / "summary.json", json_ready(summary))
    write_cards(config, summary, output_dir)
    plot_training(metrics.records, output_dir / "training.png",
                  title=f"{config.method} on {Path(str(config.model)).name} / {Path(str(config.data)).name}")


def test_adapter_summary(result: TrainResult) -> dict[str, Any]:
    """Which weights the ``*_after`` test numbers come from: ``best-adapter/`` (with its step) or the last step's."""
    if result.test_adapter == "none":
        return {"test_scored_with": None}
    if result.test_adapter == "best":
        return {"test_scored_with": "best-adapter", "test_scored_step": result.best["step"]}
    return {"test_scored_with": "last", "test_scored_step": result.steps}


def best_summary(best: dict[str, Any]) -> dict[str, Any]:
    """``summary.json``'s record of the best evaluation: the metric, its best value and step, where early stopping
    ended the run (``None``: it ran to the end); the adapter of that step is in ``best-adapter/``."""
    if not best or best.get("step") is None:
        return {}
    return {"metric_for_best": best["metric"], f"best_{best['metric']}": best["value"], "best_step": best["step"],
            "early_stopped_at": best.get("stopped_at")}


def write_cards(config: TrainConfig, summary: dict[str, Any], output_dir: Path) -> None:
    """The model cards (``README.md``) of the run's adapter folders or fine-tuned model (:mod:`torchdora.app.model_card`)."""
    from torchdora.app.model_card import summary_results, write_adapter_card, write_card, card_text

    results = summary_results(json_ready(summary))
    for name, peft in (("adapter", False), ("adapter-peft", True)):
        if (output_dir / name).is_dir():
            write_adapter_card(output_dir / name, config.to_dict(), results, peft=peft)
    if config.method == "full" and (output_dir / "model").is_dir():
        folder = output_dir / "model"
        usage = f"from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained({str(folder)!r})"
        write_card(folder, card_text(recorded_base_name(config.model), "transformers", config.to_dict(), results,
                                     f"Fine-tuned {Path(str(config.model)).name}", usage))


def print_summary(config: TrainConfig, result: TrainResult, after: EvalResult) -> None:
    accuracy = (f"{result.accuracy_before:.4f} -> {result.accuracy_after:.4f}  ({after.n_scored} examples)"
                if after.n_scored else "none")
    if after.accuracy_note is not None:
        accuracy += f"  (note: {after.accuracy_note})"
    print(
        f"\n== torchdora train: {config.method}, {result.steps} steps ==\n"
        f"test accuracy   {accuracy}\n"
        f"perplexity      {result.perplexity_before:.3f} -> {result.perplexity_after:.3f}\n"
        + (f"exact match     {result.exact_match_before:.4f} -> {result.exact_match_after:.4f}  "
           f"({after.n_generated} short answers, greedy)\n" if after.n_generated else "") +
        (f"scored after    with best-adapter/ (step {result.best['step']}; adapter/ is the last step's)\n"
           if result.test_adapter == "best" else "") +
        f"final loss      {result.final_loss:.4f}\n"
        f"wall time       {result.wall_time_s:.1f} s (training {result.train_time_s:.1f} s)\n"
        f"peak RSS        {result.peak_rss_mb:.0f} MiB\n"
        f"trainable       {result.trainable_params:,} of {result.total_params:,} parameters\n"
        + (f"best            {result.best['metric']} {result.best['value']:.4f} at step {result.best['step']}"
           + (f" (early stopping at step {result.best['stopped_at']})" if result.best.get("stopped_at") else "")
           + "\n" if result.best.get("step") is not None else "") +
        f"run folder      {result.output_dir}",
        flush=True,
    )
