"""``torchdora train``: fine-tune a causal LM with DoRA, LoRA or full fine-tuning, offline, on CPU or GPU.

With no arguments it fine-tunes the embedded SmolLM2-135M-Instruct with DoRA (rank 16, alpha 32) on
q/k/v/up/down projections (the paper's commonsense recipe at half rank, its DoRA†) on Rotten Tomatoes sentiment,
evaluates held-out test accuracy before and after, and writes a run folder::

    <output_dir>/config.json        the resolved configuration
    <output_dir>/metrics.jsonl      one JSON object per step (loss, lr, tokens/s) and per evaluation (val_loss,
                                    accuracy, ..., and sample generations: :mod:`~torchdora.app.train.evaluation`), appended
                                    and flushed as the run goes (``tail -f``); NaN is written as null
    <output_dir>/summary.json       accuracy (null with a note when no example has options), perplexity, exact
                                    match of short answers, wall time, peak memory (RSS), trainable parameters
    <output_dir>/trackers/          with ``--report-to tensorboard`` / ``wandb``: the accelerate trackers' files
    <output_dir>/training.png       loss and validation accuracy curves
    <output_dir>/adapter/           the adapter in torchdora format (``torchdora.load_adapter``)
    <output_dir>/adapter-peft/      the same adapter in PEFT's format (``PeftModel.from_pretrained``)
    <output_dir>/best-adapter/      the adapter of the best evaluation on ``--metric-for-best`` (``val_loss``)
    <output_dir>/*/README.md        model cards of the adapter folders and model/ (:mod:`torchdora.app.model_card`)
    <output_dir>/model/             full fine-tuning only: the whole model (``save_pretrained``)
    <output_dir>/checkpoint/        the latest resume checkpoint (see :mod:`torchdora.app.checkpoint`)
    <output_dir>/snapshots/step-NNNNNN/   with ``--save-every N``: adapters (or ``model.safetensors``) for the
                                    weight-decomposition analysis (``torchdora analyze``)
    <output_dir>/.torchdora.lock    while the run runs: its lock (the process id), so no second run writes here

The loop runs on Hugging Face ``accelerate``: mixed precision (``--dtype bfloat16``) and several processes
(``torchrun`` / ``accelerate launch``, DDP) come from it. ``batch_size`` counts the examples of one
micro-batch over all processes (each process takes ``batch_size / processes`` of them), so the global batch
``batch_size × grad_accum`` and the data order do not depend on the number of processes, and a checkpoint
written by N processes resumes on M. Each process averages the loss over its own completion tokens, so 1 and N
processes give the same losses (to round-off) when completions have equal lengths (e.g. one-token labels).
Logging, the progress bar and every file are written by the main process only.

The pieces: ``config.py`` (:class:`TrainConfig`, config files, the parser), ``run.py`` (one run's moving parts:
evaluation, checkpoints, schedule, data order), ``preflight.py`` (the run folder's lock, the data fingerprint a resume
checks, warnings about settings beyond the run's length), ``loop.py`` (:func:`train`), ``outputs.py`` (the run
folder's files), ``evaluation.py`` (validation loss, samples, custom metrics, best adapter, early stopping) and
``best.py`` (the best evaluation's record).
"""

from __future__ import annotations

import sys

from torchdora.app.train.config import DEFAULT_STEPS, RESUME_CHANGEABLE, RUN_FIELDS, TrainConfig, config_differences
from torchdora.app.train.options import command_from_args, config_from_args, config_to_yaml, load_config_file
from torchdora.app.train.loop import LossFn, train
from torchdora.app.train.outputs import TrainResult
from torchdora.app.train.run import (
    TrainingDiverged,
    TrainingInterrupted,
    compute_loss,
    leave_process_group,
    lr_factor,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "DEFAULT_STEPS",
    "RUN_FIELDS",
    "RESUME_CHANGEABLE",
    "lr_factor",
    "compute_loss",
    "load_config_file",
    "config_differences",
    "config_from_args",
    "train",
    "main",
]


def main(argv: list[str] | None = None, loss: LossFn = compute_loss) -> int:
    """``torchdora train``: 0 done, 1 diverged, 2 bad input or environment, 128 + signal number when stopped.

    ``loss`` is passed on to :func:`train` (tests wrap the default to inject faults)."""
    from torchdora.app.extras import install_hint, missing_assets

    try:
        config, print_only = command_from_args(argv)
        if print_only:
            from torchdora.distributed import world_size

            print(config_to_yaml(config.resolved(world_size())), end="")
            return 0
        missing = missing_assets(config.model, min(config.data_sources, key=lambda d: d != "rotten_tomatoes"))
        if missing is not None:
            print(f"torchdora train: {missing}", file=sys.stderr)
            return 2
        train(config, loss)
        leave_process_group()  # torchrun / accelerate launch: every process ends here together
    except TrainingDiverged as err:  # every process stops at the same step (the checks are collective)
        leave_process_group()
        print(f"torchdora train: stopped: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        leave_process_group()
        print(f"torchdora train: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C while loading, or a second Ctrl-C: no time to save
        print("torchdora train: interrupted; the last complete checkpoint, if any, is kept", file=sys.stderr)
        return 130
    except ImportError as err:  # ModuleNotFoundError too: a missing extra gets its pip command
        print(f"torchdora train: error: {install_hint(err) or err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"torchdora train: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the environment (a full disk, a read-only or foreign folder): one line
        from torchdora.app.cli import environment_error, os_error_of

        cause = os_error_of(err)  # an OSError, or safetensors' report of one
        if cause is None:
            raise
        print(f"torchdora train: error: {environment_error(cause, 'train')}", file=sys.stderr)
        return 2
    return 0
