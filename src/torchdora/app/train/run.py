"""The moving parts of one run (:class:`Run`): evaluation, checkpoint save and restore, the loss, the data
order and the learning-rate schedule, and the checks made before anything loads."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from torchdora.app.checkpoint import (
    TMP_CHECKPOINT_DIR,
    begin_checkpoint,
    commit_checkpoint,
    discard_checkpoint,
    find_checkpoint,
    latest_checkpoint,
    load_rng_state,
    read_trainer_state,
    save_rng_state,
)
from torchdora.app.evaluate import EvalResult, evaluate_examples, selected_logits
from torchdora.app.train import sharding
from torchdora.app.train.config import TrainConfig, config_differences, resume_changes
from torchdora.app.train.best import Best
from torchdora.app.train.optim import apply_group_settings
from torchdora.app.train.loss import cross_entropy
from torchdora.app.train.outputs import Metrics, named_trainable
from torchdora.app.train.preflight import data_changes
from torchdora.files import atomic_write_json

__all__ = ["Run", "Position", "TrainingDiverged", "TrainingInterrupted", "StopSignals", "lr_factor",
           "train_only_weights", "EpochSampler", "compute_loss", "check_resume", "leave_process_group"]


class TrainingDiverged(RuntimeError):
    """The loss, the gradient or the weights became NaN or infinite; no checkpoint was written after it."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; the run saved a checkpoint at the step boundary and stopped.

    ``exit_code`` is the shell's convention for a process ended by that signal (128 + its number).
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


# ---- signals ---------------------------------------------------------------------------------------------------
class StopSignals:
    """While active, SIGINT/SIGTERM only set :attr:`signum`; the loop saves and stops at the next step boundary.

    A second signal restores the previous handlers and calls the previous one directly (Python's raises
    ``KeyboardInterrupt`` there and then; the default action ends the process): it stops at once, and a
    checkpoint write it cuts short is never taken for complete. Handlers can only be set from the main
    thread; elsewhere (a notebook's worker thread) signals keep their usual effect.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\ntorchdora train: second {name}: stopping now, without a checkpoint", file=sys.stderr, flush=True)
            previous = self._previous.get(signum, signal.SIG_DFL)
            self.restore()
            if callable(previous):  # not re-sent: a re-sent signal waits on its next delivery
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signum)
            return
        self.signum = signum
        print(f"\ntorchdora train: {name} received: stopping after the current step, with a checkpoint of it "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)


# ---- learning rate ------------------------------------------------------------------------------------------
def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (never exactly 0, so no step is wasted), then ``constant``,
    ``linear`` decay to 0 at ``total_steps`` or half a ``cosine``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, progress)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- data order ---------------------------------------------------------------------------------------------
class EpochSampler(torch.utils.data.Sampler[int]):
    """A permutation per epoch that depends only on ``(seed, epoch)``, so a resumed run sees the same order.

    The epoch is chosen with :meth:`start_epoch` (deliberately not ``set_epoch``, which accelerate calls
    with its own per-loader iteration count).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


# ---- the loss ------------------------------------------------------------------------------------------------
def compute_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, int]:
    """Mean cross-entropy over the completion tokens of a batch, and their number.

    Logits are computed only where a completion token follows (see :func:`selected_logits`); the loss keeps only
    them and one number per token for backward (:func:`torchdora.app.train.loss.cross_entropy`).
    """
    labels = batch["labels"]  # (B, T), -100 on prompt and padding
    targets_follow = labels[:, 1:] != -100  # position t predicts token t + 1
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets_follow
    logits = selected_logits(model, batch["input_ids"], batch["attention_mask"], keep,
                             batch.get("position_ids"))  # (N, V); position_ids: packed rows
    targets = labels[:, 1:][targets_follow]  # (N,)
    return cross_entropy(logits, targets), int(targets.numel())




def default_output_dir(method: str) -> str:
    return str(Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_folder_of(checkpoint: Path) -> Path:
    return checkpoint.parent if checkpoint.name in ("checkpoint", ".checkpoint.old", TMP_CHECKPOINT_DIR) else checkpoint


def check_output_dir(path: Path, resume_run: Path | None = None) -> None:
    """Refuse an output folder holding another run (a complete checkpoint or ``summary.json``).

    ``resume_run``: the run folder being resumed, which may of course be the output folder. A folder whose run
    failed before its first checkpoint (only ``config.json``/``metrics.jsonl``) holds nothing to lose: it is
    reused.
    """
    if not path.exists():
        return
    if resume_run is not None and path.resolve() == resume_run.resolve():
        return
    if not path.is_dir():
        raise ValueError(f"--output-dir {path} is a file; pass a folder")
    checkpoint = latest_checkpoint(path)
    markers = [str(m.relative_to(path)) for m in (checkpoint, path / "summary.json") if m is not None and m.exists()]
    if markers:
        hint = (f"resume {resume_run} into its own folder (drop --output-dir) or into a new --output-dir"
                if resume_run is not None else
                f"pass --resume {path} to continue it, or choose another --output-dir")
        raise ValueError(f"--output-dir {path} already holds a run ({', '.join(markers)}); {hint}")
    if (path / "config.json").exists():
        print(f"torchdora train: reusing {path}: the run there stopped before its first checkpoint", flush=True)


def check_model_before_loading(source: Path | str, config: TrainConfig) -> None:
    """Inject the adapters into a weightless (meta-device) copy: bad targets fail before any weight loads."""
    if config.method == "full":
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from torchdora.inject import inject

    try:
        model_config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config)
    except (OSError, ValueError, KeyError):  # an unusual model: the real injection below will check
        return
    inject(skeleton, config.dora_config())


def train_only_weights(model: nn.Module, names: list[str]) -> list[str]:
    """Let only the ``weight`` of the modules named (exact dotted names or suffixes) train; returns them.

    Full fine-tuning restricted to some matrices, e.g. ``q_proj,v_proj``: the control that tells what the
    adapters' parametrisation changes from what training those matrices changes.
    """
    from torchdora.config import module_matches
    from torchdora.inject import closest_names

    chosen = [n for n, m in model.named_modules()
              if module_matches(n, tuple(names)) and isinstance(getattr(m, "weight", None), nn.Parameter)]
    if not chosen:
        modules = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"--train-only {','.join(names)!r} matches no module with a weight; closest names: "
                         f"{closest_names(names, modules)}")
    model.requires_grad_(False)
    for name in chosen:
        model.get_submodule(name).weight.requires_grad_(True)
    return chosen


def shared_state_reset() -> None:
    """Let several runs share one process (tests, notebooks) unless a distributed group is up."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    if not (dist.is_available() and dist.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def leave_process_group() -> None:
    """End a multi-process run together: a barrier, then the group destroyed while every process is still alive.

    Without it the group is torn down in interpreter shutdown, each process on its own; gloo has aborted a process
    whose peer had already closed its connections ("terminate called without an active exception"). Every process
    must call it (after a run that ended on all of them: finished, diverged or stopped by a signal).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:  # a peer is gone: the run's outcome is already decided and reported
            pass
        dist.destroy_process_group()


# ---- the run ---------------------------------------------------------------------------------------------------
@dataclass
class Position:
    """Where training stands: optimizer steps done, and the data position (epoch, micro-batches into it)."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0


@dataclass
class Run:
    """The moving parts of one run, shared by the loop, evaluation and checkpointing."""

    config: TrainConfig
    accelerator: Any
    model: nn.Module  # as prepared by accelerate (DDP-wrapped with several processes), or FSDP2-sharded
    raw_model: nn.Module
    tokenizer: Any
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    names: dict[nn.Parameter, str]
    output_dir: Path
    total_steps: int
    micro_per_epoch: int
    metrics: Metrics
    history: list[dict[str, Any]] = field(default_factory=list)  # resume-time setting changes, oldest first
    data_fingerprint: dict[str, str] = field(default_factory=dict)  # SHA-256 per split (preflight.data_fingerprint)
    custom_metrics: dict[str, Any] = field(default_factory=dict)  # name -> fn(model, tokenizer, examples) -> float
    validation_by_source: dict[str, list] = field(default_factory=dict)  # several --data: each one's validation
    best: Best = None  # type: ignore[assignment]  # the best evaluation so far (set in __post_init__)

    def __post_init__(self) -> None:
        if self.best is None:
            self.best = Best(self.config.best_metric)

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sharded(self) -> bool:
        """FSDP2: saving and evaluation are collectives that every process takes part in."""
        return sharding.use_fsdp(self.config, self.accelerator.num_processes, None)

    def say(self, text: str) -> None:
        if self.main_process:
            print(text, flush=True)

    def evaluate(self, examples: list) -> EvalResult:
        """Accuracy/perplexity sums over ``examples``, each process scoring its own shard."""
        acc = self.accelerator
        shard = examples[acc.process_index :: acc.num_processes]
        score = sharding.evaluate_in_lockstep if self.sharded else evaluate_examples
        local = score(self.raw_model, self.tokenizer, shard, self.config.max_length, self.config.eval_batch_size,
                      acc.autocast)
        sums = torch.tensor(local.sums(), dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            sums = acc.reduce(sums, reduction="sum")
        return EvalResult.from_sums(sums.tolist())

    def weights_finite(self) -> bool:
        """Whether every trainable parameter and optimizer state tensor is finite, on every process."""
        tensors = list(self.names) + [v for state in self.optimizer.state.values() for v in state.values()
                                      if isinstance(v, Tensor) and v.is_floating_point()]
        local = all(bool(torch.isfinite(getattr(t, "_local_tensor", t)).all()) for t in tensors)
        flag = torch.tensor([float(local)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum") / self.accelerator.num_processes
        return bool(flag.item() == 1.0)

    def save_checkpoint(self, position: Position, before: EvalResult) -> None:
        """Every process writes its RNG state and takes part in gathering sharded tensors (FSDP2), the main
        process writes the rest; then the folder is swapped in.

        Refused (:class:`TrainingDiverged`) if a weight or optimizer state is not finite: the checkpoint kept is
        always one that can be resumed. A failed write (a full disk) deletes the unfinished folder and leaves the
        previous checkpoint as it was.
        """
        acc, config = self.accelerator, self.config
        if not self.weights_finite():
            raise self.diverged(f"the weights became NaN or infinite by step {position.step} (the loss was finite)",
                                position.step)
        at_epoch_end = position.micro_in_epoch >= self.micro_per_epoch
        state = {
            "step": position.step, "epoch": position.epoch + int(at_epoch_end),
            "micro_in_epoch": 0 if at_epoch_end else position.micro_in_epoch, "seed": config.seed,
            "num_processes": acc.num_processes, "total_steps": self.total_steps, "config": config.to_dict(),
            "metrics": self.metrics.records, "before": dataclasses.asdict(before), "history": self.history,
            "data_fingerprint": self.data_fingerprint, "best": self.best.to_dict(),
        }
        tmp = begin_checkpoint(self.output_dir) if self.main_process else None
        acc.wait_for_everyone()
        tmp = tmp or self.output_dir / TMP_CHECKPOINT_DIR
        try:
            save_rng_state(tmp, acc.process_index)
            sharding.save_trainable(tmp, self.raw_model, self.optimizer, self.names, config)
            acc.wait_for_everyone()
            if self.main_process:
                atomic_write_json(tmp / "scheduler.json", self.scheduler.state_dict())
                commit_checkpoint(self.output_dir, tmp, state)
                self.metrics.flush()
        except Exception:  # a full disk (an OSError, or safetensors' SafetensorError): free the unfinished folder
            if self.main_process:
                discard_checkpoint(tmp)
            raise
        acc.wait_for_everyone()

    def restore(self, checkpoint_dir: Path, saved: Mapping[str, Any]) -> tuple[Position, EvalResult | None]:
        """Load weights, optimizer, scheduler, RNG and metrics of a checkpoint; returns where it stopped."""
        acc = self.accelerator
        if saved.get("num_processes", 1) != acc.num_processes:
            # The data position counts micro-batches, the same on any number of processes; only the RNG
            # streams of processes the checkpoint did not have start afresh (dropout masks differ from there).
            self.say(f"resuming a {saved.get('num_processes')}-process checkpoint on {acc.num_processes} process(es)")
        if self.config.method == "full":
            from safetensors.torch import load_file

            stored = load_file(checkpoint_dir / "model.safetensors")
            with torch.no_grad():
                for name, param in named_trainable(self.raw_model).items():
                    param.copy_(stored[name])
        else:
            from torchdora.io import load_adapter

            load_adapter(self.raw_model, checkpoint_dir / "adapter")
        sharding.load_optimizer(checkpoint_dir, self.optimizer, self.names)
        self.scheduler.load_state_dict(json.loads((checkpoint_dir / "scheduler.json").read_text()))
        if not load_rng_state(checkpoint_dir, acc.process_index, saved.get("num_processes", 1)):
            print(f"torchdora train: warning: process {acc.process_index} has no random-number state in "
                  f"{checkpoint_dir}; its dropout masks start from a fresh seed", file=sys.stderr, flush=True)
        position = Position(saved["step"], saved["epoch"], saved["micro_in_epoch"])
        self.history = list(saved.get("history", []))
        changes = resume_changes(self.config, saved["config"])
        if changes:
            self.apply_optimisation_settings()
            self.history.append({"step": position.step, "changed": {k: list(v) for k, v in changes.items()}})
            listed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())
            self.say(f"resuming with changed settings: {listed} (recorded in the checkpoint's history)")
        data_changed = data_changes(saved.get("data_fingerprint"), self.data_fingerprint)
        if data_changed:  # allowed by --allow-data-change, else check_data_unchanged refused before loading
            self.history.append({"step": position.step, "data_changed": data_changed})
            self.say(f"resuming on changed data ({', '.join(data_changed)} split(s) differ; recorded in the "
                     "checkpoint's history)")
        self.metrics.reset([r for r in saved.get("metrics", []) if r.get("step", 0) <= position.step])
        if saved.get("best") and saved["best"]["metric"] == self.config.best_metric:
            self.best = Best(**saved["best"])
        before = EvalResult(**saved["before"]) if saved.get("before") is not None else None
        self.say(f"resumed from {checkpoint_dir} at step {position.step}")
        return position, before

    def apply_optimisation_settings(self) -> None:
        """Put this run's ``lr``/``weight_decay`` (and schedule) into the optimizer after a checkpoint loaded its own.

        The scheduler's lambda already reads this config; its base rates and the current rate are set the way
        ``LambdaLR`` computes them (``base · λ(step)``).
        """
        groups = self.scheduler.optimizer.param_groups
        self.scheduler.base_lrs = apply_group_settings(groups, self.config.lr, self.config.weight_decay,
                                                       self.config.magnitude_weight_decay)
        for group, fn in zip(groups, self.scheduler.lr_lambdas):
            group["lr"] = group["initial_lr"] * fn(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in groups]

    def diverged(self, what: str, step: int) -> TrainingDiverged:
        """The error for a non-finite loss, gradient or weight: where the finite checkpoint is, and what to change."""
        config = self.config
        last = latest_checkpoint(self.output_dir)
        if last is not None:
            where = (f"The last checkpoint, with finite weights, is {last} (step {read_trainer_state(last)['step']}); "
                     f"resume from it with a lower learning rate: torchdora train --resume {self.output_dir} "
                     f"--lr {config.lr / 4:g}")
        else:
            where = (f"No checkpoint was written yet; start again with a lower learning rate: --lr {config.lr / 4:g} "
                     f"(the folder {self.output_dir} can be reused)")
        others = [f"more --warmup-steps (now {config.warmup_steps})"]
        if config.max_grad_norm == 0:
            others.append("--max-grad-norm 1")
        if config.dtype != "float32":
            others.append("--dtype float32")
        return TrainingDiverged(f"{what} at step {step} (lr {self.scheduler.get_last_lr()[0]:.3g}). {where}. "
                                f"Also worth trying: {', '.join(others)}")


def check_resume(config: TrainConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint folder and trainer state of ``config.resume``, refused if its run fields differ."""
    if config.resume is None:
        return None, None
    checkpoint_dir = find_checkpoint(config.resume, warn=True)
    saved = read_trainer_state(checkpoint_dir)
    differences = config_differences(config, saved["config"])
    if differences:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differences.items())
        raise ValueError(
            f"--resume {config.resume} was written by a different configuration ({listed}). Resume with the "
            "same settings, or start a new run with another --output-dir"
        )
    return checkpoint_dir, saved
