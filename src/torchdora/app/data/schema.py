"""What a row of fine-tuning data becomes: :class:`Example`, the three splits, and the row schemas understood.

A row (a JSON object, a CSV row, a Hugging Face dataset row) is one of :data:`SCHEMAS`; :func:`parse_row` turns it
into an :class:`Example`, or into a :class:`LabeledRow` for ``text``/``label`` rows, whose prompt lists every label
of the dataset and so is built by :func:`resolve_labels` once all rows are read.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torchdora.app.data.chat import parse_messages

__all__ = ["IGNORE_INDEX", "SCHEMAS", "Example", "DatasetSplits", "LabeledRow", "Row", "class_counts", "parse_row",
           "resolve_labels"]

IGNORE_INDEX = -100
"""Label value ignored by PyTorch's cross-entropy (prompt and padding tokens)."""

SCHEMAS = "messages | prompt+completion[+options] | instruction+output[+input] | text+label"

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
            (rows with the same transcript stay in one split) and ``completion`` the last assistant turn's content.
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
class LabeledRow:
    """A ``text``/``label`` row, turned into an Example once all labels are known (:func:`resolve_labels`)."""

    text: str
    label: str


Row = Example | LabeledRow


def class_counts(examples: Iterable[Example]) -> dict[str, int]:
    """Count examples per completion, most common first (for reporting balance)."""
    return dict(Counter(example.completion for example in examples).most_common())


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


def parse_row(row: Any, where: str) -> Row:
    """Turn one JSON object or CSV row into an Example (or a pending label row); errors start with ``where``."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object with fields {SCHEMAS}, got {type(row).__name__}")
    keys = {key for key, value in row.items() if value is not None}
    try:
        if "messages" in keys:
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
            return LabeledRow(_field(row, "text", where), _field(row, "label", where))
    except ValueError as error:
        if str(error).startswith(where):
            raise
        raise ValueError(f"{where}: {error}") from None  # Example's own checks
    raise ValueError(f"{where}: row has fields {sorted(keys)}; expected one of {SCHEMAS}")


def resolve_labels(parts: Sequence[list[Row]]) -> list[list[Example]]:
    """Build the prompts of ``text``/``label`` rows once every label (of every split in ``parts``) is known."""
    labels = sorted({row.label for part in parts for row in part if isinstance(row, LabeledRow)})
    options = tuple(f" {label}" for label in labels)
    listed = ", ".join(labels)

    def convert(row: Row) -> Example:
        if isinstance(row, Example):
            return row
        return Example(_LABEL_PROMPT.format(text=row.text, labels=listed), f" {row.label}", options)

    return [[convert(row) for row in part] for part in parts]
