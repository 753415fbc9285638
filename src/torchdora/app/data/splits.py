"""Train/validation/test splits that keep every row and never put one prompt in two splits.

Rows that share a prompt (several answers to one question, or chat rows whose turns before the last are the
same) form a group, and a group goes to one split whole: a model is never tested on a prompt it was trained on,
and no row is dropped. The validation and test sizes (``val_size``/``test_size``, ``--val-size``/``--test-size``)
are each a fraction of the rows in (0, 1), a count of rows, or 0 for no such split; the default, 0.1 and 0.1, cuts
80/10/10. Splits are drawn by group; option data is stratified by answer.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence

from torchdora.app.data.schema import DatasetSplits, Example

__all__ = ["SPLIT_STEMS", "VALIDATION_FRACTION", "TEST_FRACTION", "Size", "check_size", "rows_for", "check_limit",
           "split", "finish", "fill_missing_splits", "describe_splits"]

VALIDATION_FRACTION = 0.1
SPLIT_STEMS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}
"""Names under which each split is found: file stems of a data folder, split names of a Hugging Face dataset (the
keywords ``datasets`` itself maps to train/validation/test: ``eval`` names a test split there, and so here)."""
TEST_FRACTION = 0.1

Size = float | int
"""A split size: a fraction of the rows in (0, 1), a whole number of rows, or 0 for no such split."""


def check_size(name: str, value: object) -> Size:
    """``value`` as a split size (text from a command line or a ``key=value`` override is read as a number);
    a ``ValueError`` naming ``name`` for anything else."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise ValueError(f"{name} must be a fraction in (0, 1) or a whole number of rows, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a fraction in (0, 1) or a whole number of rows, got {value!r}")
    if value < 0 or value != value:
        raise ValueError(f"{name} must be >= 0 (a fraction in (0, 1), a number of rows, or 0 for none), got {value!r}")
    if isinstance(value, float) and value >= 1:
        raise ValueError(f"{name}={value!r}: a fraction must be below 1; give a whole number (e.g. "
                         f"{int(value) if value.is_integer() else round(value)}) for a count of rows")
    return 0 if value == 0 else value


def rows_for(size: Size, rows: int) -> int:
    """The rows a split of ``size`` asks for out of ``rows`` (a fraction rounds, with at least one row)."""
    if size == 0:
        return 0
    return max(1, round(rows * size)) if isinstance(size, float) else int(size)


def check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def _order(heads: list[Example], rng: random.Random) -> list[Example]:
    """``heads`` shuffled; for option data stratified by answer.

    Stratification: every class is shuffled and each member gets the key
    ``(rank + 0.5) / class size``; sorting all examples by that key (ties
    broken at random) interleaves the classes in proportion, so the test and
    validation slices taken from the front, and any prefix of a split, have
    the overall class ratio.
    """
    if not all(example.options for example in heads):
        ordered = list(heads)
        rng.shuffle(ordered)
        return ordered
    classes: dict[str, list[Example]] = {}
    for example in heads:
        classes.setdefault(example.completion, []).append(example)
    keyed = []
    for completion in sorted(classes):
        members = classes[completion]
        rng.shuffle(members)
        keyed += [((i + 0.5) / len(members), rng.random(), e) for i, e in enumerate(members)]
    keyed.sort(key=lambda item: item[:2])
    return [example for _, _, example in keyed]


def split(examples: Sequence[Example], seed: int, source: str, val_size: Size = VALIDATION_FRACTION,
          test_size: Size = TEST_FRACTION) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle and split by rows into train/validation/test, each prompt's rows in one split (module docstring).

    The groups are ordered by their first row (stratified by its answer for option data); test, then validation
    take whole groups from the front until they hold their share of rows (at least one group each, none for a
    size 0), and train the rest. With every prompt distinct this is a plain row split.
    """
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.prompt, []).append(example)
    n = len(examples)
    targets = (rows_for(test_size, n), rows_for(val_size, n))
    wanted = [name for name, target in zip(("test", "validation"), targets, strict=True) if target]
    if len(groups) < 1 + len(wanted):
        raise ValueError(
            f"{source} has only {len(groups)} distinct prompt(s); at least {1 + len(wanted)} are needed to make "
            f"train/{'/'.join(reversed(wanted))} splits (rows that share a prompt stay in one split). Add rows, "
            "pass --val-size 0 / --test-size 0 for no such split, or give --eval-data / --test-data files."
        )
    if sum(targets) >= n:
        raise ValueError(
            f"--val-size {val_size} and --test-size {test_size} ask for {targets[1]} + {targets[0]} of the {n} rows "
            f"of {source}, which leaves no training rows; give smaller sizes (a fraction such as 0.1, or a count "
            f"below {n})"
        )
    ordered = [groups[head.prompt] for head in _order([members[0] for members in groups.values()],
                                                        random.Random(seed))]
    taken: list[list[Example]] = [[], []]
    index = 0
    for part, (target, keep_after) in enumerate(zip(targets, (1 + bool(targets[1]), 1), strict=True)):
        # keep_after: groups left for the splits still to fill (validation, train), one at least each
        while target and (not taken[part] or len(taken[part]) < target) and len(ordered) - index > keep_after:
            taken[part] += ordered[index]
            index += 1
    # No reshuffle afterwards: keeping the interleaved order means every prefix
    # (max_train/max_eval truncation) keeps the class ratio too.
    train = [example for members in ordered[index:] for example in members]
    return train, taken[1], taken[0]


def finish(
    train: list[Example],
    validation: list[Example],
    test: list[Example],
    source: str,
    max_train: int | None,
    max_eval: int | None,
    val_size: Size = VALIDATION_FRACTION,
    test_size: Size = TEST_FRACTION,
) -> DatasetSplits:
    """Check that no split is empty (but one of size 0), then truncate (prefixes, so test stays fixed)."""
    for name, part, size in (("train", train, 1), ("validation", validation, val_size), ("test", test, test_size)):
        if not part and size:
            fix = (
                "Add rows to it."
                if name == "train"
                else ("Add rows to it, or delete that split's file so it is carved out of the train data instead.")
            )
            raise ValueError(f"The {name} split of {source} is empty. {fix}")
    return DatasetSplits(
        train=train[:max_train] if max_train else train,
        validation=validation[:max_eval] if max_eval else validation,
        test=test[:max_eval] if max_eval else test,
    )


def fill_missing_splits(parts: dict[str, list[Example]], seed: int, source: str,
                        val_size: Size = VALIDATION_FRACTION, test_size: Size = TEST_FRACTION
                        ) -> dict[str, list[Example]]:
    """Carve missing validation/test splits out of train (none for a size 0); warn about train/test overlap.

    A split that has its own file is carved with the default share all the same and that piece given back to train,
    so the default sizes split as they always did.
    """
    train = parts["train"]
    missing = {name: size for name, size in (("validation", val_size), ("test", test_size))
               if name not in parts and size}
    if missing:
        carved_train, carved_val, carved_test = split(
            train, seed, f"{source} (train)", missing.get("validation", VALIDATION_FRACTION),
            missing.get("test", TEST_FRACTION))
        # Carved pieces that are not needed go back into train.
        train = carved_train
        train += carved_val if "validation" not in missing else []
        train += carved_test if "test" not in missing else []
        carved = {"validation": carved_val if "validation" in missing else [],
                  "test": carved_test if "test" in missing else []}
        parts = {**carved, **parts, "train": train}
    else:
        train = list(train)
        random.Random(seed).shuffle(train)
        parts = {"validation": [], "test": [], **parts, "train": train}
    overlap = {e.prompt for e in train} & {e.prompt for e in parts["test"]}
    if overlap:
        warnings.warn(
            f"{len(overlap)} test prompt(s) of {source} also appear in its train split",
            stacklevel=4,
        )
    return parts


def describe_splits(splits: DatasetSplits) -> str:
    """One line: the size of each split and, when rows share prompts, how many distinct prompts they hold."""
    sizes = " / ".join(f"{len(part)} {name}" for name, part in splits.items())
    rows = sum(len(part) for _, part in splits.items())
    distinct = len({example.prompt for _, part in splits.items() for example in part})
    if distinct == rows:
        return f"data: {sizes} examples"
    return (f"data: {sizes} examples; {rows} rows with {distinct} distinct prompts, every row kept, rows that "
            "share a prompt in the same split")
