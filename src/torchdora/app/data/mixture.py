"""The training data of a run: one source or several mixed with weights, validation and test splits cut from them
or read from their own files, and each source's validation split kept apart so it can be reported on its own.

* One source (``--data A``): :func:`~torchdora.app.data.loaders.load_dataset` with the run's ``--val-size`` and
  ``--test-size`` (the default 0.1 and 0.1 cut 80/10/10).
* ``--eval-data FILE`` / ``--test-data FILE``: that file's rows are the whole validation / test split, and no such
  split is cut from the sources. ``text``/``label`` rows of the two files list the labels of both.
* Several sources (``--data A --data B``, or a config's list of paths or ``{path, weight}``): each is split on its
  own (same sizes, same seed), so no prompt of a source is both trained on and tested. The validation split is
  every source's together, and each one's loss is also reported alone (``val_loss/<name>`` in ``metrics.jsonl``,
  ``<name>`` the file's stem); the test split is every source's together.
* Weights (``--data-weights 0.7 0.3``): the share of the training mixture each source gives. The mixture has as
  many examples as the sources' training splits together; a source gets ``round(share × that total)`` of them: all
  of its examples as many whole times as fit, and the rest drawn without replacement (so a small source is
  repeated, up-sampled, and a large one down-sampled). The draw and the mixture's order depend only on the seed.
  Without weights every training example of every source is used once. ``--max-train`` keeps a prefix of the
  shuffled mixture, which keeps the shares.
"""

from __future__ import annotations

import random
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchdora.app.data.loaders import load_dataset
from torchdora.app.data.readers import read_rows
from torchdora.app.data.schema import DatasetSplits, Example, resolve_labels
from torchdora.app.data.splits import TEST_FRACTION, VALIDATION_FRACTION, Size, check_limit

__all__ = ["TrainingData", "check_sources", "source_names", "mix", "load_training_data"]


@dataclass(frozen=True)
class TrainingData:
    """The run's splits (``train``: the mixture) and, with several sources, each one's validation split by name."""

    splits: DatasetSplits
    validation_by_source: dict[str, list[Example]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)  # what to tell the user about the mixture


def check_sources(data: Any, weights: Any) -> tuple[str | list[str] | None, list[float] | None]:
    """``data`` (a name, or a list of names or ``{path, weight}`` mappings) and ``data_weights`` checked: one name
    or a list of two or more, and positive weights, one per source (``ValueError`` in one line otherwise)."""
    if isinstance(weights, str):  # key=value: "0.7,0.3" or "0.7 0.3"
        weights = weights.replace(",", " ").split()
    if weights is not None and not isinstance(weights, (list, tuple)):
        weights = [weights]
    if isinstance(data, (list, tuple)):
        paths, given = [], []
        for entry in data:
            if isinstance(entry, dict):
                if sorted(set(entry) - {"path", "weight"}) or "path" not in entry:
                    raise ValueError(f"a data entry must be a path or a mapping {{path, weight}}, got {entry!r}")
                paths.append(str(entry["path"]))
                given.append(entry.get("weight"))
            else:
                paths.append(str(entry))
                given.append(None)
        if any(w is not None for w in given):
            if weights is not None:
                raise ValueError("data weights are given twice (in the data list and as data_weights); keep one")
            if any(w is None for w in given):
                raise ValueError(f"some data entries have a weight and some do not ({data!r}); give every entry a "
                                 "weight, or none")
            weights = given
        data = paths if len(paths) > 1 else (paths[0] if paths else None)
    else:
        data = None if data in (None, "") else str(data)
    if weights is None:
        return data, None
    sources = len(data) if isinstance(data, list) else 1
    try:
        numbers = [float(w) if not isinstance(w, bool) else math.nan for w in weights]
    except (TypeError, ValueError):
        numbers = [math.nan]
    if not all(math.isfinite(w) and w > 0 for w in numbers):
        raise ValueError(f"--data-weights must be positive numbers (each source's share of the training mixture), "
                         f"got {list(weights)}; drop a source from --data rather than give it weight 0")
    if len(numbers) != sources:
        raise ValueError(f"--data-weights gives {len(numbers)} weight(s) for {sources} --data source(s); give one "
                         "weight per --data, in the same order")
    return data, numbers


def source_names(sources: Sequence[str]) -> list[str]:
    """A short name per source for metric keys: the file's stem (or the name), made unique with ``-2``, ``-3``."""
    names: list[str] = []
    for source in sources:
        base = Path(str(source)).stem or str(source)
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def mix(trains: Sequence[list[Example]], weights: Sequence[float] | None, seed: int) -> list[Example]:
    """The training mixture of several sources (see the module docstring), shuffled with ``seed``."""
    rng = random.Random(seed)
    if weights is None:
        mixture = [example for part in trains for example in part]
    else:
        total, weight_sum = sum(len(part) for part in trains), sum(weights)
        mixture = []
        for part, weight in zip(trains, weights, strict=True):
            whole, rest = divmod(round(total * weight / weight_sum), len(part))
            mixture += part * whole + rng.sample(part, rest)
    rng.shuffle(mixture)
    return mixture


def _option(split: str) -> str:
    return "--eval-data" if split == "validation" else "--test-data"


def _split_files(eval_data: str | None, test_data: str | None) -> dict[str, list[Example]]:
    """The rows of the ``--eval-data`` / ``--test-data`` files (labels of ``text``/``label`` rows shared)."""
    given = {name: path for name, path in (("validation", eval_data), ("test", test_data)) if path is not None}
    rows = []
    for name, path in given.items():
        try:
            rows.append(read_rows(Path(path).expanduser()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{_option(name)} {path} does not exist; give the path of a .jsonl/.json/.csv/"
                                    ".parquet/.arrow file of rows") from None
        except PermissionError as err:
            raise ValueError(f"{_option(name)} {path} cannot be read ({err.strerror}); check its permissions") from None
    parts = dict(zip(given, resolve_labels(rows), strict=True))
    for name, part in parts.items():
        if not part:
            raise ValueError(f"{_option(name)} {given[name]} has no rows; add rows to it or drop {_option(name)}")
    return parts


def load_training_data(
    data: str | Sequence[str] | None,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    val_size: Size = VALIDATION_FRACTION,
    test_size: Size = TEST_FRACTION,
    eval_data: str | None = None,
    test_data: str | None = None,
    data_weights: Sequence[float] | None = None,
) -> TrainingData:
    """The splits a run trains and evaluates on (see the module docstring); the arguments are
    :class:`~torchdora.app.train.config.TrainConfig`'s fields of the same names."""
    check_limit("max_train", max_train)
    check_limit("max_eval", max_eval)
    sources = list(data) if isinstance(data, (list, tuple)) else [data]
    files = _split_files(eval_data, test_data)
    cut_val = 0 if "validation" in files else val_size
    cut_test = 0 if "test" in files else test_size
    several = len(sources) > 1
    loaded = [load_dataset(source, seed=seed, max_train=None if several else max_train, max_eval=max_eval,
                           val_size=cut_val, test_size=cut_test) for source in sources]
    validation = [e for part in loaded for e in part.validation]
    test = [e for part in loaded for e in part.test]
    if "validation" in files:
        validation = files["validation"][:max_eval] if max_eval else files["validation"]
    if "test" in files:
        test = files["test"][:max_eval] if max_eval else files["test"]
    if not several:
        train = loaded[0].train
    else:
        train = mix([part.train for part in loaded], data_weights, seed)
        train = train[:max_train] if max_train else train
    by_source: dict[str, list[Example]] = {}
    lines = []
    if several:
        names = source_names(sources)
        if "validation" not in files:
            by_source = {name: part.validation for name, part in zip(names, loaded, strict=True) if part.validation}
        total = sum(len(part.train) for part in loaded)
        weights = data_weights or [len(part.train) for part in loaded]
        shares = ", ".join(f"{name} {round(total * w / sum(weights))} of {len(part.train)}"
                           for name, part, w in zip(names, loaded, weights, strict=True))
        how = "weighted by --data-weights" if data_weights else "every example once"
        lines.append(f"data: {len(sources)} sources mixed ({how}): {shares} training examples")
    return TrainingData(DatasetSplits(train=train, validation=validation, test=test), by_source, lines)
