"""Reading a run folder from the outside: the run an adapter folder belongs to, and the evaluation defaults it gives.

An adapter written by ``torchdora train`` sits in its run folder (``adapter/``, ``adapter-peft/``,
``best-adapter/``) beside ``config.json`` (the resolved :class:`~torchdora.app.train.TrainConfig`) and
``summary.json``; ``eval``, ``merge`` and the model cards read them from there.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["run_of_adapter", "eval_defaults", "run_data_settings", "eval_examples"]

#: the settings of a run's config that choose its splits, as :func:`torchdora.app.data.mixture.load_training_data`
#: takes them (missing in configs written before they existed: their defaults)
DATA_SETTINGS = ("data", "data_weights", "val_size", "test_size", "eval_data", "test_data")


def run_of_adapter(adapter: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(config.json, summary.json)`` of the run folder an adapter folder sits in (``None``: not in a run)."""
    run = Path(adapter).resolve().parent
    if not (run / "config.json").is_file():
        return None
    try:
        config = json.loads((run / "config.json").read_text())
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    except (OSError, ValueError):
        return None
    return (config, summary) if isinstance(config, dict) and isinstance(summary, dict) else None


def eval_defaults(config: Any) -> tuple[Any, str | None]:
    """``torchdora eval``'s config with the data and split seed of the run the adapter was trained in, when
    ``--data`` (and ``--seed``) are not given, and a line saying so (``None``: nothing taken from a run)."""
    if config.data is not None or config.adapter is None:
        return dataclasses.replace(config, seed=0 if config.seed is None else config.seed), None
    found = run_of_adapter(config.adapter)
    if found is None or not found[0].get("data"):
        return dataclasses.replace(config, seed=0 if config.seed is None else config.seed), None
    run = found[0]
    seed = int(run.get("seed", 0)) if config.seed is None else config.seed
    note = (f"data: {run['data']} ({config.split} split, seed {seed}), from {Path(config.adapter).resolve().parent}"
            "/config.json; pass --data to evaluate on other data")
    data = run["data"] if isinstance(run["data"], str) else ",".join(map(str, run["data"]))
    return dataclasses.replace(config, data=data, seed=seed), note


def run_data_settings(adapter: str | os.PathLike | None) -> dict[str, Any] | None:
    """The data settings (:data:`DATA_SETTINGS`) of the run an adapter was trained in (``None``: not in a run)."""
    found = run_of_adapter(adapter) if adapter is not None else None
    if found is None or not found[0].get("data"):
        return None
    return {key: found[0][key] for key in DATA_SETTINGS if key in found[0]}


def eval_examples(config: Any, from_run: bool) -> list:
    """The examples ``torchdora eval`` scores: split ``config.split`` of the adapter's run's own splits (its sizes,
    eval/test files and mixture) when ``from_run`` (the data came from the run), else of ``config.data``."""
    from torchdora.app.data import load_dataset
    from torchdora.app.data.mixture import load_training_data

    settings = run_data_settings(config.adapter) if from_run else None
    if settings is not None:
        splits = load_training_data(**settings, seed=config.seed, max_eval=config.max_eval).splits
    else:
        splits = load_dataset(config.data, seed=config.seed, max_eval=config.max_eval)
    examples = getattr(splits, config.split)
    if not examples:
        raise ValueError(f"the {config.split} split of {config.data} is empty (the run cut none: --val-size or "
                         "--test-size 0); pass --split with another split or --data")
    return examples
