"""The configuration of ``torchdora train``: :class:`TrainConfig`, validated, and what a resume may change.

The command line and config files that fill it are in :mod:`torchdora.app.train.options`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torchdora.app.assets import BASE_DTYPES, GRADIENT_CHECKPOINTING, QUANTIZE
from torchdora.config import ALL_LINEAR, DoraConfig

__all__ = ["TrainConfig", "DEFAULT_STEPS", "RUN_FIELDS", "RESUME_CHANGEABLE", "config_differences", "resume_changes"]

DEFAULT_STEPS = 120
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,up_proj,down_proj"
METHODS = ("dora", "lora", "vera", "dvora", "full")
SCHEDULES = ("linear", "cosine", "constant")
DTYPES = ("float32", "bfloat16")
#: dtypes of the trained adapter parameters (and so of their gradients and AdamW state); "base": the base's
ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "base")
REPORT_TO = ("none", "tensorboard", "wandb")
#: the configs installed with the package, nameable as ``--config <name>``
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SHARDINGS = ("none", "fsdp")
METRICS_FOR_BEST = ("val_loss", "val_accuracy")
DEFAULT_BATCH_SIZE = 8
#: fields that define what a run computes; a checkpoint only resumes a run that agrees on all of them
#: (``max_eval``: the accuracy before and after training must come from the same test examples)
RUN_FIELDS = (
    "method", "model", "data", "targets", "rank", "alpha", "dropout", "steps", "epochs", "batch_size",
    "grad_accum", "max_length", "dtype", "seed", "max_train", "max_eval", "magnitude_only", "detach_norm",
    "packing", "train_only", "d_initial", "projection_seed",
    "base_dtype", "quantize", "adapter_dtype", "magnitude_lr_ratio", "magnitude_weight_decay",
)
#: optimisation settings a resume may change on purpose (e.g. a lower ``lr`` after a divergence); each
#: change is recorded in the checkpoint's ``history``
RESUME_CHANGEABLE = ("lr", "schedule", "warmup_steps", "max_grad_norm", "weight_decay")


def _names(text: str) -> list[str]:
    """The non-empty entries of a comma-separated list of module names."""
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``torchdora train`` does, as one validated, JSON-ready dataclass.

    Args:
        method: ``"dora"`` (paper), ``"lora"`` (same code, no magnitude), ``"vera"`` (VeRA: frozen shared random
            ``A``/``B``, trained vectors ``d``, ``b``), ``"dvora"`` (VeRA's update with DoRA's magnitude, DoRA paper
            §5.4) or ``"full"`` (every parameter trains). VeRA/DVoRA have no scale: ``alpha`` does not apply.
        model: model name or local folder (:func:`torchdora.app.assets.resolve_model`); ``None``: SmolLM2-135M-Instruct.
        data: dataset name or path (:func:`torchdora.app.data.load_dataset`); ``None``: Rotten Tomatoes. A list
            of several (names or paths, or ``{path, weight}`` mappings in a config file) mixes them
            (:mod:`torchdora.app.data.mixture`).
        data_weights: with several ``data`` sources, the share of the training mixture each gives (positive
            numbers, one per source, normalised to sum to 1); ``None``: every training example once.
        val_size, test_size: the validation and test splits cut from the training data: a fraction of the rows in
            (0, 1), a number of rows, or 0 for none (0.1 each by default: 80/10/10).
        eval_data, test_data: a file (or name) whose rows are the validation / test split instead; then that split
            is not cut from ``data``.
        targets: comma-separated module names/suffixes, or ``"all-linear"``.
        rank, alpha, dropout: the adapter's ``r``, ``alpha`` (scale ``alpha / r``) and input dropout (the paper
            uses 0.05; the default 0 keeps DoRA's single base product, which matters on a CPU).
        lr, schedule, warmup_steps: AdamW learning rate, its decay after a linear warm-up.
        steps / epochs: optimizer steps to run, or full passes over the training data (not both);
            neither means :data:`DEFAULT_STEPS` steps.
        batch_size, grad_accum: examples per micro-batch over all processes together (divisible by the number
            of processes), micro-batches per optimizer step. Global batch = ``batch_size × grad_accum``.
        per_device_batch_size: examples per micro-batch on each process (Trainer's
            ``per_device_train_batch_size``), instead of ``batch_size``; :meth:`resolved` turns it into
            ``batch_size = per_device_batch_size × processes``. Neither: ``batch_size`` 8.
        sharding: ``"none"`` (every process holds the whole model, DDP averages gradients) or ``"fsdp"``
            (FSDP2 ``fully_shard`` per decoder block and the root; :mod:`torchdora.app.train.sharding`).
            Not a run field: a checkpoint resumes under either, on any number of processes.
        compile: run the model through ``torch.compile`` (``nn.Module.compile``: state-dict keys unchanged); the
            first steps take longer while it compiles. Not a run field.
        max_length: token budget per example (prompts are cut from the left, completions kept).
        dtype: ``"float32"`` or ``"bfloat16"`` (mixed precision through accelerate; weights stay fp32).
        base_dtype: dtype of the frozen base weights, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (adapters stay
            fp32; with ``"float16"`` gradients are not loss-scaled).
        quantize: ``"nf4"``: the base's linear layers in 4 bits (bitsandbytes NF4, QDoRA/QLoRA); ``"int8"``: in 8
            bits (torchao, weight only); ``None``: none.
        adapter_dtype: dtype of the adapter parameters, their gradients and optimizer state: ``"float32"``
            (default), ``"bfloat16"``, ``"float16"`` or ``"base"`` (the base weights' dtype). The DoRA norm is
            accumulated in fp32 whatever it is.
        gradient_checkpointing: ``"off"``, ``"reentrant"`` or ``"non-reentrant"``: recompute each decoder block's
            activations in backward (less memory, about one more forward pass of time).
        seed: seeds the data split, the data order and the adapter initialisation.
        eval_every: validation loss, accuracy and samples every N steps (0: never; the test split is scored at the
            end); see :mod:`torchdora.app.train.evaluation`.
        save_every: snapshot the adapter (full: the model) every N steps (0: never), for ``torchdora analyze``.
        checkpoint_every: resume checkpoint every N steps (0: only at the end).
        output_dir: run folder; ``None``: ``runs/<method>-<timestamp>`` (or the ``resume`` run's folder).
        resume: an earlier run's folder (or its ``checkpoint/``) to continue from; it must have the same
            :data:`RUN_FIELDS`; the :data:`RESUME_CHANGEABLE` settings (``lr``, ...) may differ, on purpose.
        max_train, max_eval: keep at most this many training / validation and test examples.
        magnitude_only: comma-separated modules that train only the magnitude (paper §5.6); they are added
            to ``targets``. DoRA only.
        detach_norm: treat ``||W + s·B·A||`` as a constant in back-propagation (paper §4.3).
        recompute: comma-separated DoRA modules that recompute ``x Wᵀ`` in backward rather than keep their
            output (:attr:`torchdora.DoraConfig.recompute_modules`): less memory, a little more time; ``"auto"``
            (default): the layers whose output nothing else keeps and whose input is narrowest, found by one short
            forward (:func:`torchdora.recompute.choose_recompute`); ``"none"``: never.
        max_grad_norm: gradient clipping (0: off). weight_decay: AdamW weight decay.
        magnitude_lr_ratio, magnitude_weight_decay: DoRA/DVoRA: the magnitude ``m`` trains with learning rate
            ``lr × magnitude_lr_ratio`` and this weight decay (``None``: ``weight_decay``), in its own AdamW
            parameter group (:func:`torchdora.app.train.optim.param_groups`).
        train_only: ``method="full"`` only: comma-separated module names/suffixes whose weights alone train
            (e.g. ``q_proj,v_proj``, the control of the decomposition analysis); empty: every parameter.
        eval_batch_size: sequences per forward pass when scoring.
        val_examples: validation examples scored at each periodic evaluation (a prefix of the split, at most
            ``max_eval``); the test split is scored in full (``max_eval``) before and after training.
        packing: concatenate short training examples into rows of ``max_length`` tokens, with position ids
            restarting at each example so attention stays inside it (:mod:`torchdora.app.data.packing`).
        report_to: ``"none"``, ``"tensorboard"`` or ``"wandb"`` (comma-separated for several): accelerate trackers
            that receive every ``metrics.jsonl`` record; files go to ``<output_dir>/trackers``.
        log_every: a non-terminal log gets one line every N steps (and at least one a minute); a terminal
            gets a progress bar. ``metrics.jsonl`` has a record for every step regardless.
        d_initial, projection_seed: VeRA/DVoRA's initial ``d`` and the seed of the shared random ``A``/``B``
            (:attr:`torchdora.DoraConfig.d_initial`, ``projection_prng_key``).
        early_stopping_patience: end the run after this many evaluations in a row without a ``metric_for_best``
            improvement (0: never); needs ``eval_every``.
        metric_for_best: ``"val_loss"`` (lower is better) or ``"val_accuracy"`` (higher; needs validation examples
            with options): the best evaluation keeps its adapter in ``best-adapter/`` and its step in ``summary.json``.
            ``None`` (default): ``val_loss`` (:attr:`best_metric`), and no error when the data has no validation split
            (given explicitly, a metric the data cannot produce is refused).
        sample_prompts, sample_max_new_tokens: greedy generations of the first N validation prompts (up to this many
            tokens) at every evaluation, in ``metrics.jsonl`` and the trackers' tables (0: none).
        allow_data_change: with ``resume``, continue although the data's fingerprint differs from the checkpoint's
            (recorded in its history); otherwise such a resume is refused. Never carried over to a later resume.
    """

    method: str = "dora"
    model: str | None = None
    data: str | list[Any] | None = None
    targets: str = DEFAULT_TARGETS
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    lr: float = 3e-4
    schedule: str = "linear"
    warmup_steps: int = 20
    steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
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
    recompute: str = "auto"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    magnitude_lr_ratio: float = 1.0
    magnitude_weight_decay: float | None = None
    eval_batch_size: int = 16
    val_examples: int = 100
    packing: bool = False
    report_to: str = "none"
    log_every: int = 10
    train_only: str = ""
    d_initial: float = 0.1
    projection_seed: int = 0
    base_dtype: str = "float32"
    quantize: str | None = None
    adapter_dtype: str = "float32"
    gradient_checkpointing: str = "off"
    per_device_batch_size: int | None = None
    sharding: str = "none"
    allow_data_change: bool = False
    early_stopping_patience: int = 0
    metric_for_best: str | None = None
    sample_prompts: int = 3
    sample_max_new_tokens: int = 32
    compile: bool = False
    data_weights: list[float] | None = None
    val_size: float | int = 0.1
    test_size: float | int = 0.1
    eval_data: str | None = None
    test_data: str | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in ("targets", "magnitude_only", "recompute", "train_only"):  # YAML/JSON lists are welcome too
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                set_(name, ",".join(str(v).strip() for v in value))
            elif not isinstance(value, str):
                raise TypeError(f"{name} must be a comma-separated string or a list, got {name}={value!r}")
        _choice("method", self.method, METHODS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("base_dtype", self.base_dtype, tuple(BASE_DTYPES))
        set_("quantize", None if self.quantize in (None, "", "none") else self.quantize)
        if self.quantize is not None:
            _choice("quantize", self.quantize, QUANTIZE)
            if self.method == "full":
                raise ValueError(f"quantize={self.quantize!r} freezes the base quantized; --method full would train "
                                 "it: use --method dora or lora")
        _choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        if self.adapter_dtype != "float32" and self.method == "full":
            raise ValueError(f"adapter_dtype={self.adapter_dtype!r} sets the adapters' dtype; --method full has no "
                             "adapter and trains the base in its --base-dtype: drop --adapter-dtype")
        _choice("gradient_checkpointing", self.gradient_checkpointing, GRADIENT_CHECKPOINTING)
        _choice("sharding", self.sharding, SHARDINGS)
        if self.metric_for_best is not None:
            _choice("metric_for_best", self.metric_for_best, METRICS_FOR_BEST)
        for name in ("rank", "grad_accum", "max_length", "eval_batch_size", "val_examples", "log_every",
                     "sample_max_new_tokens"):
            set_(name, _integer(name, getattr(self, name), minimum=1))
        for name in ("warmup_steps", "eval_every", "save_every", "checkpoint_every", "seed", "projection_seed",
                     "early_stopping_patience", "sample_prompts"):
            set_(name, _integer(name, getattr(self, name), minimum=0))
        for name in ("steps", "epochs", "max_train", "max_eval", "batch_size", "per_device_batch_size"):
            if getattr(self, name) is not None:
                set_(name, _integer(name, getattr(self, name), minimum=1))
        if self.batch_size is not None and self.per_device_batch_size is not None:
            raise ValueError(
                f"give batch_size (all processes together) or per_device_batch_size (each process), not both "
                f"(batch_size={self.batch_size}, per_device_batch_size={self.per_device_batch_size})"
            )
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError(f"early_stopping_patience={self.early_stopping_patience} needs evaluations: set "
                             "--eval-every N (> 0)")
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"give steps or epochs, not both (steps={self.steps}, epochs={self.epochs})")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got max_length={self.max_length}")
        for name, low in (("alpha", 0.0), ("lr", 0.0)):
            value = _number(name, getattr(self, name))
            if value <= low:
                raise ValueError(f"{name} must be positive, got {name}={value!r}")
            set_(name, value)
        for name in ("dropout", "max_grad_norm", "weight_decay", "d_initial"):
            set_(name, _number(name, getattr(self, name)))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout!r}")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError(f"max_grad_norm and weight_decay must be >= 0, got {self.max_grad_norm}, {self.weight_decay}")
        self._check_magnitude_optimizer()
        for name in ("detach_norm", "packing", "allow_data_change"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {name}={getattr(self, name)!r}")
        for tracker in _names(self.report_to):
            _choice("report_to", tracker, REPORT_TO)
        if "none" in _names(self.report_to) and len(_names(self.report_to)) > 1:
            raise ValueError(f"report_to={self.report_to!r} lists 'none' with trackers; give one or the other")
        if not self.target_list and self.method != "full":
            raise ValueError("targets is empty: name modules, e.g. --targets q_proj,v_proj, or 'all-linear'")
        if self.recompute.strip() in ("", "none"):
            set_("recompute", "none")
        for name in ("magnitude_only", "recompute"):
            if getattr(self, name) and getattr(self, name) not in ("auto", "none") and self.method != "dora":
                raise ValueError(f"{name}={getattr(self, name)!r} needs --method dora: {self.method} has no magnitude")
        if self.train_only and self.method != "full":
            raise ValueError(f"train_only={self.train_only!r} needs --method full; adapters train --targets")
        set_("model", None if self.model in (None, "") else str(self.model))
        self._check_data()

    def _check_data(self) -> None:
        """``data`` as one name or a list of two or more, ``data_weights`` as positive floats, one per source."""
        from torchdora.app.data.mixture import check_sources
        from torchdora.app.data.splits import check_size

        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        data, weights = check_sources(self.data, self.data_weights)
        set_("data", data)
        set_("data_weights", weights)
        set_("val_size", check_size("val_size", self.val_size))
        set_("test_size", check_size("test_size", self.test_size))
        for name in ("eval_data", "test_data"):
            set_(name, None if getattr(self, name) in (None, "") else str(getattr(self, name)))

    @property
    def best_metric(self) -> str:
        """The metric that picks the best evaluation: ``metric_for_best``, else ``val_loss``."""
        return self.metric_for_best or "val_loss"

    @property
    def data_sources(self) -> list[str]:
        """The training data's sources (one name or path, or the several mixed)."""
        return list(self.data) if isinstance(self.data, list) else [self.data or "rotten_tomatoes"]

    def _check_magnitude_optimizer(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("magnitude_lr_ratio", _number("magnitude_lr_ratio", self.magnitude_lr_ratio))
        if self.magnitude_lr_ratio <= 0:
            raise ValueError(f"magnitude_lr_ratio must be positive, got magnitude_lr_ratio={self.magnitude_lr_ratio!r}")
        if self.magnitude_weight_decay in ("", "none"):
            set_("magnitude_weight_decay", None)
        if self.magnitude_weight_decay is not None:
            set_("magnitude_weight_decay", _number("magnitude_weight_decay", self.magnitude_weight_decay))
            if self.magnitude_weight_decay < 0:
                raise ValueError(f"magnitude_weight_decay must be >= 0, got {self.magnitude_weight_decay!r}")
        changed = self.magnitude_lr_ratio != 1.0 or self.magnitude_weight_decay is not None
        if changed and self.method not in ("dora", "dvora"):
            raise ValueError(f"magnitude_lr_ratio/magnitude_weight_decay need --method dora or dvora: {self.method} "
                             "has no magnitude; drop --magnitude-lr-ratio/--magnitude-weight-decay")

    @property
    def target_list(self) -> list[str]:
        return _names(self.targets)

    @property
    def magnitude_only_list(self) -> list[str]:
        return _names(self.magnitude_only)

    @property
    def recompute_list(self) -> list[str]:
        """The modules named by ``recompute`` (none for ``"auto"``, chosen after loading, or ``"none"``)."""
        return [] if self.recompute in ("auto", "none") else _names(self.recompute)

    @property
    def trackers(self) -> list[str]:
        """The accelerate trackers of ``report_to`` (empty for ``"none"``)."""
        return [t for t in _names(self.report_to) if t != "none"]

    @property
    def train_only_list(self) -> list[str]:
        return _names(self.train_only)

    def dora_config(self) -> DoraConfig:
        """The adapter configuration of a ``dora``/``lora``/``vera``/``dvora`` run; magnitude-only modules are targeted too."""
        if self.method == "full":
            raise ValueError("method='full' trains every parameter and has no adapter config")
        targets: str | tuple[str, ...]
        if self.targets.strip() == ALL_LINEAR:
            targets = ALL_LINEAR
        else:
            targets = tuple(dict.fromkeys(self.target_list + self.magnitude_only_list))
        return DoraConfig(
            r=self.rank, alpha=self.alpha, dropout=self.dropout, target_modules=targets,
            magnitude_only_modules=tuple(self.magnitude_only_list), use_dora=self.method in ("dora", "dvora"),
            detach_norm=self.detach_norm, recompute_modules=tuple(self.recompute_list),
            dtype=self.base_dtype if self.adapter_dtype == "base" else self.adapter_dtype, **self._vera_options(),
        )

    def _vera_options(self) -> dict[str, Any]:
        if self.method not in ("vera", "dvora"):
            return {}
        return {"use_vera": True, "d_initial": self.d_initial, "projection_prng_key": self.projection_seed}

    def resolved(self, num_processes: int = 1) -> "TrainConfig":
        """Defaults filled in: model and data names, step count when neither steps nor epochs is given, and
        ``batch_size`` over ``num_processes`` processes (a per-device size is multiplied out, then cleared, so
        the saved config names the global micro-batch that any process count resumes with)."""
        from torchdora.app.assets import DEFAULT_MODEL
        from torchdora.app.data import DEFAULT_DATASET

        steps = self.steps if (self.steps is not None or self.epochs is not None) else DEFAULT_STEPS
        batch_size = self.batch_size
        if self.per_device_batch_size is not None:
            batch_size = self.per_device_batch_size * num_processes
        return dataclasses.replace(self, model=self.model or DEFAULT_MODEL, data=self.data or DEFAULT_DATASET,
                                   steps=steps, batch_size=batch_size or DEFAULT_BATCH_SIZE,
                                   per_device_batch_size=None)

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


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, str):  # `key=8` overrides and quoted YAML values arrive as text
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, str):
        # PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string, not a float; accept what float() reads.
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a finite number such as 1.0e-4, got {name}={value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {name}={value!r}")
    return float(value)


# ---- configuration sources -------------------------------------------------------------------------------
def config_differences(current: TrainConfig, saved: Mapping[str, Any],
                       num_processes: int = 1) -> dict[str, tuple[Any, Any]]:
    """``{field: (checkpoint value, this run's value)}`` for every :data:`RUN_FIELDS` entry that differs."""
    ours = current.resolved(num_processes).to_dict()
    theirs = TrainConfig.from_mapping(saved, source="checkpoint config").resolved().to_dict()
    return {k: (theirs[k], ours[k]) for k in RUN_FIELDS if theirs[k] != ours[k]}


def resume_changes(current: TrainConfig, saved: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (checkpoint value, this run's value)}`` for the :data:`RESUME_CHANGEABLE` settings changed."""
    ours = current.resolved().to_dict()
    theirs = TrainConfig.from_mapping(saved, source="checkpoint config").resolved().to_dict()
    return {k: (theirs[k], ours[k]) for k in RESUME_CHANGEABLE if theirs[k] != ours[k]}


# ---- command line --------------------------------------------------------------------------------------------
