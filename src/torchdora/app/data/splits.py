"""Train/validation/test splits that keep every row and never put one prompt in two splits.

Rows that share a prompt (several answers to one question, or chat rows whose turns before the last are the
same) form a group, and a group goes to one split whole: a model is never tested on a prompt it was trained on,
and no row is dropped. Splits are 80/10/10 by rows, drawn by group; option data is stratified by answer.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence

from torchdora.app.data.schema import DatasetSplits, Example

__all__ = ["SPLIT_STEMS", "VALIDATION_FRACTION", "TEST_FRACTION", "check_limit", "split", "finish",
           "fill_missing_splits", "describe_splits"]

VALIDATION_FRACTION = 0.1
SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "val", "dev"), "test": ("test",)}
"""Names under which each split is found: file stems of a data folder, split names of a Hugging Face dataset."""
TEST_FRACTION = 0.1


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


def split(examples: Sequence[Example], seed: int, source: str) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle and split 80/10/10 by rows, each prompt's rows in one split (see the module docstring).

    The groups are ordered by their first row (stratified by its answer for option data); test, then validation
    take whole groups from the front until they hold their share of rows (at least one group each), and train
    the rest. With every prompt distinct this is a plain row split.
    """
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.prompt, []).append(example)
    if len(groups) < 3:
        raise ValueError(
            f"{source} has only {len(groups)} distinct prompt(s); at least 3 are needed to make "
            "train/validation/test splits (rows that share a prompt stay in one split). Add rows, or pass a "
            "folder with train/validation/test files."
        )
    ordered = [groups[head.prompt] for head in _order([members[0] for members in groups.values()],
                                                        random.Random(seed))]
    n = len(examples)
    targets = (max(1, round(n * TEST_FRACTION)), max(1, round(n * VALIDATION_FRACTION)))
    taken: list[list[Example]] = [[], []]
    index = 0
    for part, (target, keep_after) in enumerate(zip(targets, (2, 1), strict=True)):
        # keep_after: groups left for the splits still to fill (validation, train), one at least each
        while (not taken[part] or len(taken[part]) < target) and len(ordered) - index > keep_after:
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
) -> DatasetSplits:
    """Check that no split is empty, then truncate (prefixes, so test stays fixed)."""
    for name, part in (("train", train), ("validation", validation), ("test", test)):
        if not part:
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


def fill_missing_splits(parts: dict[str, list[Example]], seed: int, source: str) -> dict[str, list[Example]]:
    """Carve missing validation/test splits out of train; warn about train/test overlap."""
    train = parts["train"]
    if "validation" not in parts or "test" not in parts:
        carved_train, carved_val, carved_test = split(train, seed, f"{source} (train)")
        # Carved pieces that are not needed go back into train.
        train = carved_train
        train += carved_val if "validation" in parts else []
        train += carved_test if "test" in parts else []
        parts = {"validation": carved_val, "test": carved_test, **parts, "train": train}
    else:
        train = list(train)
        random.Random(seed).shuffle(train)
        parts = {**parts, "train": train}
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
