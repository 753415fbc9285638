""":func:`load_dataset`: a dataset name or path to train/validation/test splits (see :mod:`torchdora.app.data`).

This module picks the source; the pieces live by concern: ``schema.py`` (:class:`Example`, row schemas),
``readers.py`` (data files), ``splits.py`` (group-aware splits), ``builtin.py`` (Rotten Tomatoes, BIG-bench),
``hub.py`` (Hugging Face datasets), ``tokenization.py`` (token ids and batches). The public names of all of them
stay importable from here, where they used to live.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from torchdora.app.assets import looks_like_path
from torchdora.app.data.builtin import (
    DEFAULT_DATASET,
    bigbench_dir,
    load_bigbench_task,
    load_rotten_tomatoes,
)
from torchdora.app.data.hub import is_saved_dataset, load_hub_dataset, load_saved_dataset
from torchdora.app.data.readers import SUFFIXES, load_file, read_rows
from torchdora.app.data.schema import IGNORE_INDEX, DatasetSplits, Example, class_counts, resolve_labels
from torchdora.app.data.splits import (
    SPLIT_STEMS, TEST_FRACTION, VALIDATION_FRACTION, Size, check_limit, check_size, describe_splits,
    fill_missing_splits, finish, split,
)
from torchdora.app.data.tokenization import (
    Collator,
    collate,
    tokenize_example,
    tokenize_examples,
    tokenize_with_cuts,
)

__all__ = [
    "DEFAULT_DATASET",
    "IGNORE_INDEX",
    "Example",
    "DatasetSplits",
    "load_dataset",
    "load_rotten_tomatoes",
    "load_file",
    "load_bigbench_task",
    "class_counts",
    "describe_splits",
    "tokenize_example",
    "tokenize_examples",
    "tokenize_with_cuts",
    "collate",
    "Collator",
]


def _split_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for name, stems in SPLIT_STEMS.items():
        candidates = [folder / f"{stem}{suffix}" for stem in stems for suffix in SUFFIXES]
        existing = [candidate for candidate in candidates if candidate.exists()]
        if len(existing) > 1:
            raise ValueError(
                f"{folder} has several {name} files ({', '.join(p.name for p in existing)}); keep only one"
            )
        if existing:
            found[name] = existing[0]
    if "train" not in found:
        raise FileNotFoundError(
            f"{folder} has no train file; expected train.jsonl, .json, .csv, .parquet or .arrow "
            "(plus optional validation/val/dev and test files)"
        )
    return found


def _load_folder(folder: Path, seed: int, max_train: int | None, max_eval: int | None,
                 sizes: tuple[Size, Size]) -> DatasetSplits:
    """A folder of split files; missing validation/test splits are carved from train."""
    files = _split_files(folder)
    names = list(files)
    parts = dict(zip(names, resolve_labels([read_rows(files[name]) for name in names]), strict=True))
    if not parts["train"]:
        raise ValueError(f"The train split of {folder} ({files['train']}) is empty. Add rows to it.")
    parts = fill_missing_splits(parts, seed, str(folder), *sizes)
    return finish(parts["train"], parts["validation"], parts["test"], str(folder), max_train, max_eval, *sizes)


def _load_path(path: Path, seed: int, max_train: int | None, max_eval: int | None,
               sizes: tuple[Size, Size]) -> DatasetSplits:
    if path.is_dir() and is_saved_dataset(path):
        return load_saved_dataset(path, seed, max_train, max_eval, sizes)
    if path.is_dir():
        return _load_folder(path, seed, max_train, max_eval, sizes)
    return finish(*split(load_file(path), seed, str(path), *sizes), str(path), max_train, max_eval, *sizes)


def load_dataset(
    name_or_path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    val_size: Size = VALIDATION_FRACTION,
    test_size: Size = TEST_FRACTION,
) -> DatasetSplits:
    """Load a dataset as train/validation/test :class:`Example` lists.

    Every row is kept; rows that share a prompt are kept in one split (:mod:`torchdora.app.data.splits`).

    Args:
        name_or_path: ``None``/``"rotten_tomatoes"``, a file or folder path,
            ``"bigbench:<task>"`` (or a bare BIG-bench task name), or a
            Hugging Face dataset name; see the module docstring.
        seed: seeds shuffling and splitting; the same seed gives the same
            splits.
        max_train: keep at most this many training examples.
        max_eval: keep at most this many validation and test examples each.
            Truncation keeps a prefix, so a smaller limit gives a subset of
            the same test split.
        val_size, test_size: the validation and test splits cut from the training data (from a single file, or
            where a folder or dataset has no such split): a fraction of the rows in (0, 1), a number of rows, or 0
            for no such split (:mod:`torchdora.app.data.splits`). A split that has its own file is used whole.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: malformed files (naming file and line), a path that is not a regular file, empty splits.
        ModuleNotFoundError: an optional package the source needs is missing.
    """
    check_limit("max_train", max_train)
    check_limit("max_eval", max_eval)
    sizes = (check_size("val_size", val_size), check_size("test_size", test_size))
    if name_or_path is None or str(name_or_path) == DEFAULT_DATASET:
        return load_rotten_tomatoes(seed=seed, max_train=max_train, max_eval=max_eval, val_size=sizes[0],
                                    test_size=sizes[1])
    name = os.fspath(name_or_path)
    if name.startswith("bigbench:"):
        return load_bigbench_task(name.removeprefix("bigbench:"), seed, max_train, max_eval, *sizes)
    path = Path(name).expanduser()
    if path.exists() or path.is_symlink():
        return _load_path(path, seed, max_train, max_eval, sizes)
    if looks_like_path(name, SUFFIXES):
        raise FileNotFoundError(f"Dataset path {name!r} does not exist")
    tasks = bigbench_dir()
    if tasks is not None and (tasks / name / "task.json").is_file():
        return load_bigbench_task(name, seed, max_train, max_eval, *sizes)
    if importlib.util.find_spec("datasets") is not None:
        return load_hub_dataset(name, seed, max_train, max_eval, sizes)
    raise ValueError(
        f"Unknown dataset {name!r}. Pass {DEFAULT_DATASET!r} (the default), a .jsonl/.json/.csv/.parquet/.arrow "
        "file, a save_to_disk folder or a folder of train/validation/test files, or 'bigbench:<task>' for BIG-bench "
        "tasks such as social_iqa (`pip install --no-deps bigbench`). Hugging Face hub "
        "datasets need `pip install 'torchdora[data]'` and network access."
    )
