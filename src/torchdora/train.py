"""``torchdora train``: fine-tune a causal LM with DoRA, LoRA or full fine-tuning, offline, on CPU or GPU.

With no arguments it fine-tunes the embedded SmolLM2-135M-Instruct with DoRA (rank 16, alpha 32) on
q/k/v/up/down projections (the paper's recipe at half rank, REFERENCE §3) on Rotten Tomatoes sentiment,
evaluates held-out test accuracy before and after, and writes a run folder::

    <output_dir>/config.json        the resolved configuration
    <output_dir>/metrics.jsonl      one JSON object per step (loss, lr, tokens/s) and per evaluation
    <output_dir>/summary.json       accuracy before/after, wall time, peak memory (RSS), trainable parameters
    <output_dir>/training.png       loss and validation accuracy curves
    <output_dir>/adapter/           the adapter in torchdora format (``torchdora.load_adapter``)
    <output_dir>/adapter-peft/      the same adapter in PEFT's format (``PeftModel.from_pretrained``)
    <output_dir>/model/             full fine-tuning only: the whole model (``save_pretrained``)
    <output_dir>/checkpoint/        the latest resume checkpoint (see :mod:`torchdora.checkpoint`)
    <output_dir>/snapshots/step-NNNNNN/   with ``--save-every N``: adapters (or ``model.safetensors``) for the
                                    weight-decomposition analysis (``torchdora analyze``)

The loop runs on Hugging Face ``accelerate``: mixed precision (``--dtype bfloat16``) and several processes
(``torchrun`` / ``accelerate launch``, DDP) come from it. ``batch_size`` counts the examples of one
micro-batch over all processes (each process takes ``batch_size / processes`` of them), so the global batch
``batch_size × grad_accum`` and the data order do not depend on the number of processes, and a checkpoint
written by N processes resumes on M. Each process averages the loss over its own completion tokens, so 1 and N
processes give the same losses (to round-off) when completions have equal lengths (e.g. one-token labels).
Logging, the progress bar and every file are written by the main process only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from torchdora.checkpoint import (
    TMP_CHECKPOINT_DIR,
    begin_checkpoint,
    commit_checkpoint,
    find_checkpoint,
    load_optimizer,
    load_rng_state,
    read_trainer_state,
    save_optimizer,
    save_rng_state,
)
from torchdora.config import ALL_LINEAR, DoraConfig
from torchdora.evaluate import EvalResult, evaluate_examples, selected_logits
from torchdora.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, replace_dir

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "DEFAULT_STEPS",
    "RUN_FIELDS",
    "lr_factor",
    "load_config_file",
    "config_differences",
    "train",
    "main",
]

DEFAULT_STEPS = 120
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,up_proj,down_proj"
METHODS = ("dora", "lora", "full")
SCHEDULES = ("linear", "cosine", "constant")
DTYPES = ("float32", "bfloat16")
#: fields that define what a run computes; a checkpoint only resumes a run that agrees on all of them
RUN_FIELDS = (
    "method", "model", "data", "targets", "rank", "alpha", "dropout", "lr", "schedule", "warmup_steps",
    "steps", "epochs", "batch_size", "grad_accum", "max_length", "dtype", "seed", "max_train",
    "magnitude_only", "detach_norm", "max_grad_norm", "weight_decay",
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint after it."""


def _names(text: str) -> list[str]:
    """The non-empty entries of a comma-separated list of module names."""
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``torchdora train`` does, as one validated, JSON-ready dataclass.

    Args:
        method: ``"dora"`` (paper), ``"lora"`` (same code, no magnitude) or ``"full"`` (every parameter trains).
        model: model name or local folder (:func:`torchdora.assets.resolve_model`); ``None``: SmolLM2-135M-Instruct.
        data: dataset name or path (:func:`torchdora.data.load_dataset`); ``None``: Rotten Tomatoes.
        targets: comma-separated module names/suffixes, or ``"all-linear"``.
        rank, alpha, dropout: the adapter's ``r``, ``alpha`` (scale ``alpha / r``) and input dropout (the paper
            uses 0.05; the default 0 keeps DoRA's single base product, REFERENCE §1, which matters on a CPU).
        lr, schedule, warmup_steps: AdamW learning rate, its decay after a linear warm-up.
        steps / epochs: optimizer steps to run, or full passes over the training data (not both);
            neither means :data:`DEFAULT_STEPS` steps.
        batch_size, grad_accum: examples per micro-batch over all processes (divisible by the number of
            processes), micro-batches per optimizer step. Global batch = ``batch_size × grad_accum``.
        max_length: token budget per example (prompts are cut from the left, completions kept).
        dtype: ``"float32"`` or ``"bfloat16"`` (mixed precision through accelerate; weights stay fp32).
        seed: seeds the data split, the data order and the adapter initialisation.
        eval_every: validation accuracy every N steps (0: never; the test split is scored at the end).
        save_every: snapshot the adapter (full: the model) every N steps (0: never), for ``torchdora analyze``.
        checkpoint_every: resume checkpoint every N steps (0: only at the end).
        output_dir: run folder; ``None``: ``runs/<method>-<timestamp>`` (or the ``resume`` run's folder).
        resume: an earlier run's folder (or its ``checkpoint/``) to continue from; it must have the same
            :data:`RUN_FIELDS`.
        max_train, max_eval: keep at most this many training / validation and test examples.
        magnitude_only: comma-separated modules that train only the magnitude (paper §5.6); they are added
            to ``targets``. DoRA only.
        detach_norm: treat ``||W + s·B·A||`` as a constant in back-propagation (paper §4.3).
        recompute: comma-separated DoRA modules that recompute ``x Wᵀ`` in backward rather than keep their
            output (:attr:`torchdora.DoraConfig.recompute_modules`): less memory, a little more time.
        max_grad_norm: gradient clipping (0: off). weight_decay: AdamW weight decay.
        eval_batch_size: sequences per forward pass when scoring.
        val_examples: validation examples scored at each periodic evaluation (a prefix of the split, at most
            ``max_eval``); the test split is scored in full (``max_eval``) before and after training.
    """

    method: str = "dora"
    model: str | None = None
    data: str | None = None
    targets: str = DEFAULT_TARGETS
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    lr: float = 3e-4
    schedule: str = "linear"
    warmup_steps: int = 20
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 96
    dtype: str = "float32"
    seed: int = 0
    eval_every: int = 60
    save_every: int = 0
    checkpoint_every: int = 50
    output_dir: str | None = None
    resume: str | None = None
    max_train: int | None = None
    max_eval: int | None = 200
    magnitude_only: str = ""
    detach_norm: bool = True
    recompute: str = ""
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    eval_batch_size: int = 16
    val_examples: int = 100

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in ("targets", "magnitude_only", "recompute"):  # YAML/JSON lists are welcome too
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                set_(name, ",".join(str(v).strip() for v in value))
            elif not isinstance(value, str):
                raise TypeError(f"{name} must be a comma-separated string or a list, got {name}={value!r}")
        _choice("method", self.method, METHODS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("dtype", self.dtype, DTYPES)
        for name in ("rank", "batch_size", "grad_accum", "max_length", "eval_batch_size", "val_examples"):
            _integer(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_every", "save_every", "checkpoint_every", "seed"):
            _integer(name, getattr(self, name), minimum=0)
        for name in ("steps", "epochs", "max_train", "max_eval"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), minimum=1)
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"give steps or epochs, not both (steps={self.steps}, epochs={self.epochs})")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got max_length={self.max_length}")
        for name, low in (("alpha", 0.0), ("lr", 0.0)):
            value = _number(name, getattr(self, name))
            if value <= low:
                raise ValueError(f"{name} must be positive, got {name}={value!r}")
            set_(name, value)
        for name in ("dropout", "max_grad_norm", "weight_decay"):
            set_(name, _number(name, getattr(self, name)))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout!r}")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError(f"max_grad_norm and weight_decay must be >= 0, got {self.max_grad_norm}, {self.weight_decay}")
        if not isinstance(self.detach_norm, bool):
            raise TypeError(f"detach_norm must be true or false, got detach_norm={self.detach_norm!r}")
        if not self.target_list and self.method != "full":
            raise ValueError("targets is empty: name modules, e.g. --targets q_proj,v_proj, or 'all-linear'")
        for name in ("magnitude_only", "recompute"):
            if getattr(self, name) and self.method != "dora":
                raise ValueError(f"{name}={getattr(self, name)!r} needs --method dora: {self.method} has no magnitude")
        set_("model", None if self.model in (None, "") else str(self.model))
        set_("data", None if self.data in (None, "") else str(self.data))

    @property
    def target_list(self) -> list[str]:
        return _names(self.targets)

    @property
    def magnitude_only_list(self) -> list[str]:
        return _names(self.magnitude_only)

    @property
    def recompute_list(self) -> list[str]:
        return _names(self.recompute)

    def dora_config(self) -> DoraConfig:
        """The adapter configuration of a ``dora``/``lora`` run; magnitude-only modules are targeted too."""
        if self.method == "full":
            raise ValueError("method='full' trains every parameter and has no adapter config")
        targets: str | tuple[str, ...]
        if self.targets.strip() == ALL_LINEAR:
            targets = ALL_LINEAR
        else:
            targets = tuple(dict.fromkeys(self.target_list + self.magnitude_only_list))
        return DoraConfig(
            r=self.rank, alpha=self.alpha, dropout=self.dropout, target_modules=targets,
            magnitude_only_modules=tuple(self.magnitude_only_list), use_dora=self.method == "dora",
            detach_norm=self.detach_norm, recompute_modules=tuple(self.recompute_list),
        )

    def resolved(self) -> "TrainConfig":
        """Defaults filled in: model and data names, step count when neither steps nor epochs is given."""
        from torchdora.assets import DEFAULT_MODEL
        from torchdora.data import DEFAULT_DATASET

        steps = self.steps if (self.steps is not None or self.epochs is not None) else DEFAULT_STEPS
        return dataclasses.replace(self, model=self.model or DEFAULT_MODEL, data=self.data or DEFAULT_DATASET,
                                   steps=steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a dict (a config file or saved ``config.json``); keys may use ``-`` or ``_``."""
        known = {f.name for f in dataclasses.fields(cls)}
        normalized = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalized) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {source}; known keys are {sorted(known)}")
        return cls(**normalized)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {name}={value!r}")


def _integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {name}={value!r}")
    return float(value)


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


# ---- configuration sources -------------------------------------------------------------------------------
def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or JSON config file as a dict of :class:`TrainConfig` fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml.YAMLError / json.JSONDecodeError: both say where
        raise ValueError(f"config file {path} could not be parsed: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of options, got {type(data).__name__}")
    TrainConfig.from_mapping(data, source=str(path))  # unknown keys and bad values fail here, early
    return data


def config_differences(current: TrainConfig, saved: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (checkpoint value, this run's value)}`` for every :data:`RUN_FIELDS` entry that differs."""
    ours = current.resolved().to_dict()
    theirs = TrainConfig.from_mapping(saved, source="checkpoint config").resolved().to_dict()
    return {k: (theirs[k], ours[k]) for k in RUN_FIELDS if theirs[k] != ours[k]}


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

    Logits are computed only where a completion token follows (see :func:`selected_logits`).
    """
    labels = batch["labels"]  # (B, T), -100 on prompt and padding
    targets_follow = labels[:, 1:] != -100  # position t predicts token t + 1
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets_follow
    logits = selected_logits(model, batch["input_ids"], batch["attention_mask"], keep)  # (N, V)
    targets = labels[:, 1:][targets_follow]  # (N,)
    return torch.nn.functional.cross_entropy(logits.float(), targets), int(targets.numel())


# ---- small helpers ------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _default_output_dir(method: str) -> str:
    return str(Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}")


def _run_folder_of(checkpoint: Path) -> Path:
    return checkpoint.parent if checkpoint.name in ("checkpoint", ".checkpoint.old") else checkpoint


def _check_output_dir(path: Path, resuming: bool) -> None:
    if resuming or not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"--output-dir {path} is a file; pass a folder")
    markers = [n for n in ("checkpoint", "summary.json", "config.json") if (path / n).exists()]
    if markers:
        raise ValueError(
            f"--output-dir {path} already holds a run ({', '.join(markers)}); pass --resume {path} to continue "
            "it, or choose another --output-dir"
        )


def _check_model_before_loading(source: Path | str, config: TrainConfig) -> None:
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


def _shared_state_reset() -> None:
    """Let several runs share one process (tests, notebooks) unless a distributed group is up."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    if not (dist.is_available() and dist.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


class _Metrics:
    """Metrics records, rewritten atomically to ``metrics.jsonl`` (a killed run never leaves a torn line)."""

    def __init__(self, path: Path, records: list[dict[str, Any]] | None = None) -> None:
        self.path, self.records = path, list(records or [])

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def flush(self) -> None:
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())


def _named_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_model_tensors(model: nn.Module, path: Path) -> None:
    """The model's ``state_dict()`` under its HF key names; tied tensors (shared storage) saved as copies."""
    seen: set[int] = set()
    tensors: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        ptr = value.data_ptr()
        tensors[key] = value.detach().clone() if ptr in seen else value.detach()
        seen.add(ptr)
    atomic_save_safetensors(tensors, path, {"format": "pt"})


def _save_snapshot(model: nn.Module, config: TrainConfig, output_dir: Path, step: int) -> Path:
    """``snapshots/step-NNNNNN/``: a torchdora adapter, or ``model.safetensors`` for full fine-tuning."""
    from torchdora.io import save_adapter

    final = output_dir / "snapshots" / f"step-{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if config.method == "full":
        _save_model_tensors(model, tmp / "model.safetensors")
    else:
        save_adapter(model, tmp, base_model_name_or_path=config.resolved().model)
    return replace_dir(tmp, final)


# ---- the run ---------------------------------------------------------------------------------------------------
@dataclass
class _Position:
    """Where training stands: optimizer steps done, and the data position (epoch, micro-batches into it)."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0


@dataclass
class _Run:
    """The moving parts of one run, shared by the loop, evaluation and checkpointing."""

    config: TrainConfig
    accelerator: Any
    model: nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    raw_model: nn.Module
    tokenizer: Any
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    names: dict[nn.Parameter, str]
    output_dir: Path
    total_steps: int
    micro_per_epoch: int
    metrics: _Metrics

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, text: str) -> None:
        if self.main_process:
            print(text, flush=True)

    def evaluate(self, examples: list) -> EvalResult:
        """Accuracy/perplexity sums over ``examples``, each process scoring its own shard."""
        acc = self.accelerator
        shard = examples[acc.process_index :: acc.num_processes]
        local = evaluate_examples(self.raw_model, self.tokenizer, shard, self.config.max_length,
                                  self.config.eval_batch_size, acc.autocast)
        sums = torch.tensor([local.n_correct, local.n_scored, local.nll_sum, local.n_tokens],
                            dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            sums = acc.reduce(sums, reduction="sum")
        n_correct, n_scored, nll, n_tokens = sums.tolist()
        return EvalResult(int(n_correct), int(n_scored), nll, int(n_tokens))

    def save_checkpoint(self, position: _Position, before: EvalResult) -> None:
        """Every process writes its RNG state, the main process the rest; then the folder is swapped in."""
        acc, config = self.accelerator, self.config
        at_epoch_end = position.micro_in_epoch >= self.micro_per_epoch
        state = {
            "step": position.step, "epoch": position.epoch + int(at_epoch_end),
            "micro_in_epoch": 0 if at_epoch_end else position.micro_in_epoch, "seed": config.seed,
            "num_processes": acc.num_processes, "total_steps": self.total_steps, "config": config.to_dict(),
            "metrics": self.metrics.records, "before": dataclasses.asdict(before),
        }
        tmp = begin_checkpoint(self.output_dir) if self.main_process else None
        acc.wait_for_everyone()
        tmp = tmp or self.output_dir / TMP_CHECKPOINT_DIR
        save_rng_state(tmp, acc.process_index)
        acc.wait_for_everyone()
        if self.main_process:
            if config.method == "full":
                atomic_save_safetensors(_named_trainable(self.raw_model), tmp / "model.safetensors")
            else:
                from torchdora.io import save_adapter

                save_adapter(self.raw_model, tmp / "adapter", base_model_name_or_path=config.model)
            save_optimizer(tmp, self.optimizer, self.names)
            atomic_write_json(tmp / "scheduler.json", self.scheduler.state_dict())
            commit_checkpoint(self.output_dir, tmp, state)
            self.metrics.flush()
        acc.wait_for_everyone()

    def restore(self, checkpoint_dir: Path, saved: Mapping[str, Any]) -> tuple[_Position, EvalResult | None]:
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
                for name, param in _named_trainable(self.raw_model).items():
                    param.copy_(stored[name])
        else:
            from torchdora.io import load_adapter

            load_adapter(self.raw_model, checkpoint_dir / "adapter")
        load_optimizer(checkpoint_dir, self.optimizer, self.names)
        self.scheduler.load_state_dict(json.loads((checkpoint_dir / "scheduler.json").read_text()))
        load_rng_state(checkpoint_dir, acc.process_index)
        position = _Position(saved["step"], saved["epoch"], saved["micro_in_epoch"])
        self.metrics.records = [r for r in saved.get("metrics", []) if r.get("step", 0) <= position.step]
        before = EvalResult(**saved["before"]) if saved.get("before") is not None else None
        self.say(f"resumed from {checkpoint_dir} at step {position.step}")
        return position, before

    def diverged(self, loss: Tensor, step: int) -> TrainingDiverged:
        last = find_checkpoint(self.output_dir) if (self.output_dir / "checkpoint").exists() else None
        return TrainingDiverged(
            f"the loss became {loss.item()} at step {step} (lr {self.scheduler.get_last_lr()[0]:.3g}). "
            f"The last good checkpoint is {last or 'not written yet'} and was kept. Try a lower --lr "
            f"(now {self.config.lr:g}), more --warmup-steps, --dtype float32, or --max-grad-norm 1"
        )


def _check_resume(config: TrainConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint folder and trainer state of ``config.resume``, refused if its run fields differ."""
    if config.resume is None:
        return None, None
    checkpoint_dir = find_checkpoint(config.resume)
    saved = read_trainer_state(checkpoint_dir)
    differences = config_differences(config, saved["config"])
    if differences:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differences.items())
        raise ValueError(
            f"--resume {config.resume} was written by a different configuration ({listed}). Resume with the "
            "same settings, or start a new run with another --output-dir"
        )
    return checkpoint_dir, saved


def train(config: TrainConfig) -> TrainResult:
    """Run one fine-tuning job as ``config`` says and write its run folder; see the module docstring.

    Cheap checks come first (config, resume compatibility, output folder, data, model name, targets on a
    weightless model), so bad input fails before the model loads.

    Raises:
        ValueError / FileNotFoundError / TypeError: bad input, with the value and the fix.
        TrainingDiverged: the loss became NaN or infinite (the last good checkpoint is kept).
    """
    start_wall = time.perf_counter()
    from accelerate import Accelerator

    from torchdora.assets import load_model_and_tokenizer, resolve_model
    from torchdora.data import Collator, load_dataset, tokenize_examples
    from torchdora.inject import inject, trainable_parameter_count

    checkpoint_dir, saved_state = _check_resume(config)
    output_dir = Path(config.output_dir or (_run_folder_of(checkpoint_dir) if checkpoint_dir else
                                            _default_output_dir(config.method)))
    _check_output_dir(output_dir, resuming=checkpoint_dir is not None)
    config = dataclasses.replace(config.resolved(), output_dir=str(output_dir))
    splits = load_dataset(config.data, seed=config.seed, max_train=config.max_train, max_eval=config.max_eval)
    source = resolve_model(config.model)
    _check_model_before_loading(source, config)

    _shared_state_reset()
    # accelerate treats a multi-process launch without CUDA as distributed only when told it runs on the CPU
    # (then it uses gloo); without this each torchrun process would train alone on the full batch.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=cpu_processes,
                              mixed_precision="bf16" if config.dtype == "bfloat16" else "no")
    accelerator.wait_for_everyone()  # every process checked the output folder before the main one fills it
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / "config.json", config.to_dict())
        print("torchdora train: resolved config\n" + json.dumps(config.to_dict(), indent=2), flush=True)

    random.seed(config.seed)
    torch.manual_seed(config.seed)  # the adapter's A initialisation
    model, tokenizer = load_model_and_tokenizer(source)
    if config.method == "full":
        model.requires_grad_(True)
    else:
        inject(model, config.dora_config())
    trainable, total = trainable_parameter_count(model)

    train_items = tokenize_examples(tokenizer, splits.train, config.max_length)
    sampler = EpochSampler(len(train_items), config.seed)
    # Its own generator: starting a loader iteration (also when resuming mid-epoch) then leaves the global
    # RNG, which drives dropout, untouched, so a resumed run draws the same dropout masks.
    if config.batch_size % accelerator.num_processes:
        raise ValueError(
            f"--batch-size {config.batch_size} does not split over {accelerator.num_processes} processes; "
            f"use a multiple of {accelerator.num_processes} (it counts the examples of all processes together)"
        )
    # accelerate hands process p the batches p, p + N, ... of this loader: with batch_size / N examples each,
    # the N processes together see the same consecutive examples a single process would.
    loader = torch.utils.data.DataLoader(train_items, batch_size=config.batch_size // accelerator.num_processes,
                                         sampler=sampler,
                                         collate_fn=Collator(tokenizer.pad_token_id),
                                         generator=torch.Generator().manual_seed(config.seed))
    names = {p: n for n, p in _named_trainable(model).items()}
    optimizer = torch.optim.AdamW(list(names), lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    # Stepped once per optimizer step by the loop (not prepared: accelerate would step it once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        getattr(optimizer, "optimizer", optimizer),
        lambda step: lr_factor(step, config.schedule, config.warmup_steps, total_steps),
    )
    run = _Run(config, accelerator, model, accelerator.unwrap_model(model), tokenizer, optimizer, scheduler, names,
               output_dir, total_steps, len(loader), _Metrics(output_dir / "metrics.jsonl"))
    run.say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f} %)\n"
            f"steps: {total_steps}, global batch {config.batch_size} x {config.grad_accum} "
            f"({config.batch_size // accelerator.num_processes} per process per micro-batch on "
            f"{accelerator.num_processes} process(es)), {len(train_items)} training examples "
            f"({steps_per_epoch} steps per epoch)")

    position, before = _Position(), None
    if checkpoint_dir is not None and saved_state is not None:
        position, before = run.restore(checkpoint_dir, saved_state)
    if before is None:
        before = run.evaluate(splits.test)
        run.metrics.add({"step": 0, "split": "test", "accuracy": before.accuracy, "perplexity": before.perplexity})
        run.say(f"test accuracy before training: {before.accuracy:.4f} (perplexity {before.perplexity:.3f}, "
                f"{before.n_scored} examples)")

    train_start = time.perf_counter()
    _train_loop(run, sampler, loader, position, before, splits.validation[: config.val_examples])
    train_time = time.perf_counter() - train_start

    after = run.evaluate(splits.test)
    run.metrics.add({"step": position.step, "split": "test", "accuracy": after.accuracy,
                     "perplexity": after.perplexity})
    losses = [r["loss"] for r in run.metrics.records if "loss" in r]
    result = TrainResult(
        output_dir=output_dir, steps=position.step, accuracy_before=before.accuracy, accuracy_after=after.accuracy,
        perplexity_before=before.perplexity, perplexity_after=after.perplexity,
        final_loss=losses[-1] if losses else float("nan"), wall_time_s=time.perf_counter() - start_wall,
        train_time_s=train_time, peak_rss_mb=_peak_rss_mb(), trainable_params=trainable, total_params=total,
        losses=losses,
    )
    if run.main_process:
        _write_outputs(run.raw_model, tokenizer, config, result, run.metrics, after)
        _print_summary(config, result, after)
    accelerator.wait_for_everyone()
    return result


def _train_loop(run: _Run, sampler: EpochSampler, loader: Any, position: _Position, before: EvalResult,
                validation: list) -> None:
    """Optimizer steps from ``position`` to ``run.total_steps``; logs, validates, snapshots and checkpoints."""
    from tqdm.auto import tqdm

    acc, config, model = run.accelerator, run.config, run.model
    trainable = list(run.names)
    progress = tqdm(total=run.total_steps, initial=position.step, desc="train", disable=not run.main_process,
                    dynamic_ncols=True)
    micro_losses: list[float] = []
    tokens = 0
    step_start = time.perf_counter()
    model.train()
    while position.step < run.total_steps:
        sampler.start_epoch(position.epoch)
        skip = position.micro_in_epoch
        for batch in (loader if skip == 0 else acc.skip_first_batches(loader, skip)):
            with acc.accumulate(model):
                loss, _ = compute_loss(model, batch)
                if not bool(acc.gather(torch.isfinite(loss.detach()).float().reshape(1)).all()):  # all stop together
                    progress.close()
                    raise run.diverged(loss, position.step + 1)
                acc.backward(loss)  # divided by grad_accum by accelerate
                if acc.sync_gradients and config.max_grad_norm > 0:
                    acc.clip_grad_norm_(trainable, config.max_grad_norm)
                run.optimizer.step()  # a no-op until the last micro-batch of the step
                run.optimizer.zero_grad(set_to_none=True)
            position.micro_in_epoch += 1
            micro_losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
            if not acc.sync_gradients:
                continue
            lr = run.scheduler.get_last_lr()[0]
            run.scheduler.step()
            position.step += 1
            numbers = acc.gather(torch.tensor([[sum(micro_losses) / len(micro_losses), tokens]],
                                              dtype=torch.float64, device=acc.device))
            step_loss, step_tokens = float(numbers[:, 0].mean()), int(numbers[:, 1].sum())
            speed = step_tokens / max(time.perf_counter() - step_start, 1e-9)
            run.metrics.add({"step": position.step, "epoch": position.epoch, "loss": step_loss, "lr": lr,
                             "tokens": step_tokens, "tokens_per_s": speed})
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
            progress.update(1)
            micro_losses, tokens = [], 0
            _after_step(run, position, before, validation, progress)
            step_start = time.perf_counter()
            if position.step >= run.total_steps:
                break
        else:
            position.epoch, position.micro_in_epoch = position.epoch + 1, 0
    progress.close()


def _after_step(run: _Run, position: _Position, before: EvalResult, validation: list, progress: Any) -> None:
    """Periodic validation, snapshot and checkpoint after optimizer step ``position.step``."""
    config, step = run.config, position.step
    if config.eval_every and step % config.eval_every == 0:
        result = run.evaluate(validation)
        run.metrics.add({"step": step, "split": "validation", "accuracy": result.accuracy,
                         "perplexity": result.perplexity})
        if run.main_process:
            progress.write(f"step {step}: validation accuracy {result.accuracy:.4f}")
        run.model.train()
    if config.save_every and step % config.save_every == 0 and run.main_process:
        _save_snapshot(run.raw_model, config, run.output_dir, step)
    if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == run.total_steps:
        run.save_checkpoint(position, before)


def _write_outputs(model: nn.Module, tokenizer: Any, config: TrainConfig, result: TrainResult, metrics: _Metrics,
                   after: EvalResult) -> None:
    from torchdora.io import save_adapter
    from torchdora.plotting import plot_training

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


def _print_summary(config: TrainConfig, result: TrainResult, after: EvalResult) -> None:
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


# ---- command line --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS  # only options the user gives override the config file / resumed run
    p = argparse.ArgumentParser(
        prog="torchdora train", argument_default=S,
        description="Fine-tune a causal LM with DoRA, LoRA or full fine-tuning (defaults: DoRA on the embedded "
                    "SmolLM2-135M-Instruct, Rotten Tomatoes sentiment). Global batch = batch-size x grad-accum, "
                    "split over the processes of torchrun / accelerate launch.",
    )
    p.add_argument("--config", help="YAML or JSON file of options; command-line options override it")
    p.add_argument("--method", choices=METHODS, help="dora (default), lora or full")
    p.add_argument("--model", help="model name or local folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="dataset name, file or folder (default: rotten_tomatoes)")
    p.add_argument("--targets", help=f"comma-separated module names, or all-linear (default: {DEFAULT_TARGETS})")
    p.add_argument("--rank", type=int, help="adapter rank r (default 16)")
    p.add_argument("--alpha", type=float, help="adapter alpha, scale alpha/r (default 32)")
    p.add_argument("--dropout", type=float, help="adapter input dropout (default 0)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-4)")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning-rate decay after warm-up (default linear)")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int, help="linear warm-up steps (default 20)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS})")
    steps.add_argument("--epochs", type=int, help="passes over the training data instead of --steps")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="examples per micro-batch, all processes together (default 8)")
    p.add_argument("--grad-accum", dest="grad_accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-length", dest="max_length", type=int, help="tokens per example (default 96)")
    p.add_argument("--dtype", choices=DTYPES, help="float32 (default) or bfloat16 mixed precision")
    p.add_argument("--seed", type=int, help="data split, order and initialisation seed (default 0)")
    p.add_argument("--eval-every", dest="eval_every", type=int, help="validation accuracy every N steps, 0: never (default 60)")
    p.add_argument("--save-every", dest="save_every", type=int,
                   help="snapshot to snapshots/step-NNNNNN every N steps for torchdora analyze (default 0: off)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                   help="resume checkpoint every N steps, 0: at the end only (default 50)")
    p.add_argument("--output-dir", dest="output_dir", help="run folder (default runs/<method>-<time>)")
    p.add_argument("--resume", help="continue the run in this folder (same settings required)")
    p.add_argument("--max-train", dest="max_train", type=int, help="use at most N training examples")
    p.add_argument("--max-eval", dest="max_eval", type=int, help="use at most N validation and test examples (default 200)")
    p.add_argument("--magnitude-only", dest="magnitude_only",
                   help="comma-separated modules that train only the magnitude (paper section 5.6)")
    p.add_argument("--no-detach-norm", dest="detach_norm", action="store_const", const=False,
                   help="keep ||W + sBA|| in the backward pass (exact gradient; paper section 4.3 ablation)")
    p.add_argument("--recompute", help="comma-separated DoRA modules that recompute x·Wᵀ in backward instead of "
                   "keeping their output: less memory, one more matrix product each (e.g. q_proj,k_proj,v_proj)")
    p.add_argument("--max-grad-norm", dest="max_grad_norm", type=float, help="gradient clipping, 0: off (default 1)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, help="AdamW weight decay (default 0)")
    p.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, help="sequences per scoring pass (default 16)")
    p.add_argument("--val-examples", dest="val_examples", type=int,
                   help="validation examples per periodic evaluation (default 100)")
    return p


def config_from_args(argv: list[str] | None) -> TrainConfig:
    """Defaults ← the ``--resume`` run's saved config ← ``--config`` file ← command-line options.

    So ``--resume DIR`` alone continues a run as it was configured; an option given that changes one of
    :data:`RUN_FIELDS` is refused by :func:`train`.
    """
    given = vars(_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_file = given.pop("config", None)
    if config_file is not None:
        values.update({k.replace("-", "_"): v for k, v in load_config_file(config_file).items()})
    values.update(given)
    if values.get("resume"):
        saved = read_trainer_state(find_checkpoint(values["resume"]))["config"]
        base = {k: v for k, v in saved.items() if k not in ("resume", "output_dir")}
        values = {**base, **values}
    return TrainConfig.from_mapping(values, source=config_file or "the command line")


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
        train(config)
    except TrainingDiverged as err:
        print(f"torchdora train: stopped: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"torchdora train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
