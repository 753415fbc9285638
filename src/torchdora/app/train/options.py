"""The command line and config files of ``torchdora train``: the parser, ``--config`` files, ``key=value`` overrides.

Sources, later ones winning: defaults, the ``--resume`` run's saved config, a ``--config`` file (a path, or the
name of a config shipped in ``torchdora/app/configs/``, e.g. ``--config default``), options given, then
``key=value`` overrides. ``--print-config`` prints the result as YAML (a valid ``--config`` file) and exits.
The options become a :class:`~torchdora.app.train.config.TrainConfig`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Mapping

from torchdora.app.assets import GRADIENT_CHECKPOINTING, add_base_options
from torchdora.app.checkpoint import find_checkpoint, read_trainer_state
from torchdora.app.train.config import (
    ADAPTER_DTYPES, CONFIG_DIR, DEFAULT_STEPS, DEFAULT_TARGETS, DTYPES, METHODS, METRICS_FOR_BEST, SCHEDULES,
    SHARDINGS, TrainConfig,
)

__all__ = ["shipped_configs", "load_config_file", "config_to_yaml", "config_from_args", "command_from_args"]


def shipped_configs() -> dict[str, Path]:
    """``{name: path}`` of the configs installed with the package (``--config <name>``)."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def _config_path(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = shipped_configs()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise FileNotFoundError(
        f"config file {path} does not exist, and {str(name_or_path)!r} is not one of the shipped configs "
        f"{sorted(shipped)} (use e.g. --config default)"
    )


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or JSON config file, or a shipped config's name, as a dict of fields."""
    import yaml

    from torchdora.app.data.readers import unique_keys

    class UniqueKeyLoader(yaml.SafeLoader):
        """``yaml.safe_load``, refusing a mapping that repeats a key (YAML would keep the last silently)."""

        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"option {key!r} is given twice; keep one", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    path = _config_path(path)
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        else:
            data = json.loads(text, object_pairs_hook=unique_keys)
    except Exception as err:  # yaml.YAMLError / json.JSONDecodeError / a repeated key: each says where or which
        raise ValueError(f"config file {path} could not be parsed: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of options, got {type(data).__name__}")
    TrainConfig.from_mapping(data, source=str(path))  # unknown keys and bad values fail here, early
    return data


def _parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS  # only options the user gives override the config file / resumed run
    p = argparse.ArgumentParser(
        prog="torchdora train", argument_default=S,
        description="Fine-tune a causal LM with DoRA, LoRA or full fine-tuning (defaults: DoRA on the embedded "
                    "SmolLM2-135M-Instruct, Rotten Tomatoes sentiment). Global batch = batch-size x grad-accum, "
                    "split over the processes of torchrun / accelerate launch.",
    )
    p.add_argument("--config", help="YAML or JSON file of options, or a shipped config's name "
                   f"({', '.join(shipped_configs()) or 'none installed'}); command-line options override it")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override any config value, e.g. lr=1e-4 packing=true (applied last)")
    p.add_argument("--print-config", dest="print_config", action="store_true",
                   help="print the resolved config as YAML (a valid --config file) and exit")
    p.add_argument("--method", choices=METHODS, help="dora (default), lora, vera, dvora (VeRA + DoRA magnitude) or full")
    p.add_argument("--model", help="model name or local folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", action="append",
                   help="dataset name, file or folder (default: rotten_tomatoes); repeat it to mix several")
    p.add_argument("--data-weights", dest="data_weights", nargs="+", type=float, metavar="W",
                   help="with several --data: each one's share of the training mixture, in order (e.g. 0.7 0.3; "
                        "normalised to sum to 1). Default: every training example once")
    p.add_argument("--val-size", dest="val_size",
                   help="validation split cut from the data: a fraction in (0, 1), a number of rows, or 0 for none "
                        "(default 0.1)")
    p.add_argument("--test-size", dest="test_size",
                   help="test split cut from the data: a fraction in (0, 1), a number of rows, or 0 for none "
                        "(default 0.1); --val-size 0 --test-size 0 trains on everything")
    p.add_argument("--eval-data", dest="eval_data",
                   help="a file of validation rows (same formats as --data); then none is cut from --data")
    p.add_argument("--test-data", dest="test_data",
                   help="a file of test rows (same formats as --data); then none is cut from --data")
    p.add_argument("--targets", help=f"comma-separated module names, or all-linear (default: {DEFAULT_TARGETS})")
    p.add_argument("--rank", type=int, help="adapter rank r (default 16; VeRA/DVoRA usually take a larger r, e.g. 256)")
    p.add_argument("--alpha", type=float, help="adapter alpha, scale alpha/r (default 32)")
    p.add_argument("--dropout", type=float, help="adapter input dropout (default 0)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-4)")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning-rate decay after warm-up (default linear)")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int, help="linear warm-up steps (default 20)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS})")
    steps.add_argument("--epochs", type=int, help="passes over the training data instead of --steps")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", dest="batch_size", type=int,
                       help="examples per micro-batch over ALL processes together, split evenly between them "
                            "(default 8)")
    batch.add_argument("--per-device-batch-size", dest="per_device_batch_size", type=int,
                       help="examples per micro-batch on EACH process instead (like Trainer's "
                            "per_device_train_batch_size): batch-size = this x processes")
    p.add_argument("--grad-accum", dest="grad_accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-length", dest="max_length", type=int, help="tokens per example (default 96)")
    p.add_argument("--dtype", choices=DTYPES, help="float32 (default) or bfloat16 mixed precision")
    p.add_argument("--seed", type=int, help="data split, order and initialisation seed (default 0)")
    p.add_argument("--eval-every", dest="eval_every", type=int, help="validation loss, accuracy and samples every N steps, 0: never (default 60)")
    p.add_argument("--save-every", dest="save_every", type=int,
                   help="snapshot to snapshots/step-NNNNNN every N steps for torchdora analyze (default 0: off)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                   help="resume checkpoint every N steps, 0: at the end only (default 50)")
    p.add_argument("--output-dir", dest="output_dir", help="run folder (default runs/<method>-<time>)")
    p.add_argument("--resume", help="continue the run in this folder (same settings, except that --lr, --schedule, "
                   "--warmup-steps, --max-grad-norm and --weight-decay may change)")
    p.add_argument("--allow-data-change", dest="allow_data_change", action="store_const", const=True,
                   help="with --resume: continue although the data changed since the checkpoint (recorded in its "
                        "history; the run is then no longer the one it started as)")
    p.add_argument("--max-train", dest="max_train", type=int, help="use at most N training examples")
    p.add_argument("--max-eval", dest="max_eval", type=int, help="use at most N validation and test examples (default 200)")
    p.add_argument("--magnitude-only", dest="magnitude_only",
                   help="comma-separated modules that train only the magnitude (paper section 5.6)")
    p.add_argument("--no-detach-norm", dest="detach_norm", action="store_const", const=False,
                   help="keep ||W + sBA|| in the backward pass (exact gradient; paper section 4.3 ablation)")
    p.add_argument("--recompute", help="DoRA modules that recompute x·Wᵀ in backward instead of keeping their "
                   "output: auto (default: where nothing else keeps the output and the input is narrowest, e.g. "
                   "q,k,v,o in a Llama), none, or comma-separated names (e.g. q_proj,k_proj,v_proj)")
    p.add_argument("--max-grad-norm", dest="max_grad_norm", type=float, help="gradient clipping, 0: off (default 1)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, help="AdamW weight decay (default 0)")
    p.add_argument("--magnitude-lr-ratio", dest="magnitude_lr_ratio", type=float,
                   help="dora/dvora: the magnitude's learning rate is lr x this (own AdamW group; default 1)")
    p.add_argument("--magnitude-weight-decay", dest="magnitude_weight_decay", type=float,
                   help="dora/dvora: AdamW weight decay of the magnitude (default: --weight-decay)")
    p.add_argument("--sharding", choices=SHARDINGS,
                   help="none (default): each process holds the whole model, DDP averages gradients; fsdp: FSDP2 "
                        "shards the model over the processes (one fully_shard per decoder block and the root)")
    p.add_argument("--compile", action="store_const", const=True,
                   help="compile the model with torch.compile (slower start, faster steps on a GPU)")
    p.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, help="sequences per scoring pass (default 16)")
    p.add_argument("--val-examples", dest="val_examples", type=int,
                   help="validation examples per periodic evaluation (default 100)")
    p.add_argument("--early-stopping-patience", dest="early_stopping_patience", type=int,
                   help="stop after N evaluations in a row without a --metric-for-best improvement (default 0: never)")
    p.add_argument("--metric-for-best", dest="metric_for_best", choices=METRICS_FOR_BEST,
                   help="val_loss (the default when there is validation data; lower is better) or val_accuracy: "
                        "picks best-adapter/ and early stopping")
    p.add_argument("--sample-prompts", dest="sample_prompts", type=int,
                   help="greedy generations of the first N validation prompts at every evaluation (default 3, 0: off)")
    p.add_argument("--sample-max-new-tokens", dest="sample_max_new_tokens", type=int,
                   help="tokens per sample generation (default 32)")
    p.add_argument("--packing", action="store_const", const=True,
                   help="pack short training examples into full max-length rows (attention stays per example)")
    p.add_argument("--report-to", dest="report_to",
                   help="none (default), tensorboard or wandb: accelerate trackers fed every metrics record")
    p.add_argument("--log-every", dest="log_every", type=int,
                   help="without a terminal: one log line every N steps (default 10; a progress bar otherwise)")
    p.add_argument("--train-only", dest="train_only",
                   help="with --method full: train only these modules' weights, e.g. q_proj,v_proj (default: all)")
    p.add_argument("--d-initial", dest="d_initial", type=float,
                   help="vera/dvora: initial value of the trained vector d (default 0.1, as PEFT)")
    p.add_argument("--projection-seed", dest="projection_seed", type=int,
                   help="vera/dvora: seed of the shared frozen random A and B (PEFT's projection_prng_key, default 0)")
    add_base_options(p, base_dtype=S, quantize=S)
    p.add_argument("--adapter-dtype", dest="adapter_dtype", choices=ADAPTER_DTYPES,
                   help="dtype of the adapter weights, their gradients and AdamW state: float32 (default), bfloat16, "
                        "float16 (no loss scaling) or base (the --base-dtype)")
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", nargs="?", const="non-reentrant",
                   choices=GRADIENT_CHECKPOINTING,
                   help="recompute each decoder block's activations in backward: non-reentrant (the default when "
                        "given without a value), reentrant, or off (default)")
    return p


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "packing=true"]`` -> ``{"lr": "1e-4", "packing": True}`` (values read as YAML scalars)."""
    import yaml

    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is neither an option nor a key=value override (e.g. lr=1e-4)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        values[key.strip().replace("-", "_")] = value
    return values


def config_to_yaml(config: TrainConfig) -> str:
    """The config as YAML, in field order, readable back by ``--config``."""
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def _override(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``values``; a batch size given in either form replaces the other form in ``base``."""
    base = dict(base)
    for given, other in (("batch_size", "per_device_batch_size"), ("per_device_batch_size", "batch_size")):
        if values.get(given) is not None:
            base.pop(other, None)
    return {**base, **values}


def config_from_args(argv: list[str] | None) -> TrainConfig:
    """Defaults ← the ``--resume`` run's saved config ← ``--config`` file ← command-line options.

    So ``--resume DIR`` alone continues a run as it was configured; an option given that changes one of
    :data:`RUN_FIELDS` is refused by :func:`train`, one of :data:`RESUME_CHANGEABLE` is applied and recorded.
    """
    return command_from_args(argv)[0]


def command_from_args(argv: list[str] | None) -> tuple[TrainConfig, bool]:
    """The config of :func:`config_from_args`, and whether ``--print-config`` was given."""
    given = vars(_parser().parse_intermixed_args(argv))
    print_config = given.pop("print_config", False)
    overrides = _parse_overrides(given.pop("overrides", []))
    values: dict[str, Any] = {}
    config_file = given.pop("config", None)
    if config_file is not None:
        values.update({k.replace("-", "_"): v for k, v in load_config_file(config_file).items()})
    values = _override(values, given)
    values = _override(values, overrides)
    if values.get("resume"):
        saved = read_trainer_state(find_checkpoint(values["resume"]))["config"]
        once = ("resume", "output_dir", "allow_data_change")  # options of one command, not of the run
        values = _override({k: v for k, v in saved.items() if k not in once}, values)
    return TrainConfig.from_mapping(values, source=config_file or "the command line"), print_config
