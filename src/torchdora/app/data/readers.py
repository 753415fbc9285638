"""Data files read into rows, with every error naming the file and the line.

``.jsonl`` (one object per line), ``.json`` (a JSON array of rows, JSON Lines, or a BIG-bench ``task.json``),
``.csv`` (a header row; ``options`` cells hold a JSON list), ``.parquet`` and ``.arrow`` (need ``pyarrow``).
Text files must be UTF-8 (a leading byte-order mark is dropped). A JSON object that repeats a key, or a CSV header
that repeats a column, is refused rather than silently keeping the last value. Only regular files are opened: a
FIFO or a device (``/dev/zero``) would block or never end.

``.csv``, ``.parquet`` and ``.arrow`` files are read by ``datasets``' builders (:mod:`~torchdora.app.data.builders`)
when it is installed (the ``train`` extra has it); when a builder fails, or a row it read does not fit a schema, the
file is read again here, and the error names the line. JSON and JSON Lines are read here: ``datasets``' ``json``
builder (pyarrow) does not refuse a key repeated inside a nested object (see ``builders.py``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torchdora.app.data.builders import BUILDERS, builder_rows, check_header
from torchdora.app.data.schema import Example, Row, parse_row, resolve_labels

__all__ = ["SUFFIXES", "DuplicateKeyError", "unique_keys", "check_regular_file", "read_text", "read_rows",
           "load_file"]

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (``json`` would silently keep the last value)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} appears twice in one object; keep one (JSON keeps only the last silently)")
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :mod:`json` that refuses an object repeating a key."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKeyError(key)
        seen[key] = value
    return seen


_DECODER = json.JSONDecoder(object_pairs_hook=unique_keys)


def check_regular_file(path: Path, what: str = "Data file") -> None:
    """Raise ``FileNotFoundError`` for a missing path and ``ValueError`` for one that is not a regular file
    (a folder, FIFO, socket or device, also behind a symbolic link), before anything opens it."""
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "a FIFO, socket or device" if not path.is_symlink() \
            else f"a link to {os.path.realpath(path)}"
        raise ValueError(f"{what} {path} is not a regular file ({kind}); give a file saved on disk")


def read_text(path: Path) -> str:
    """A UTF-8 text file's content (without a byte-order mark); a byte that is not UTF-8 is an error naming the
    file, the line and the column."""
    check_regular_file(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: byte 0x{raw[err.start]:02x} at column {column} is not UTF-8 text; save the file as "
            "UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _json_error(path: Path, line: int, error: json.JSONDecodeError, hint: str = "") -> ValueError:
    return ValueError(f"{path}:{line}: invalid JSON ({error.msg}, column {error.colno}){hint}")


def _json_array(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, item)`` for each item of a top-level JSON array."""
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
            item, position = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise _json_error(path, error.lineno, error) from None
        except DuplicateKeyError as error:
            raise ValueError(f"{path}:{line}: {error}") from None
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
            yield number, _DECODER.decode(line)
        except json.JSONDecodeError as error:
            raise _json_error(path, number, error, "; JSON Lines files need one complete object per line") from None
        except DuplicateKeyError as error:
            raise ValueError(f"{path}:{number}: {error}") from None


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    check_header(path, list(reader.fieldnames or []))
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


def _one_object(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def read_rows(path: Path) -> list[Row]:
    """Parse one data file into rows (see the module docstring for formats)."""
    check_regular_file(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"Unsupported data file {path}: use .jsonl, .json, .csv, .parquet or .arrow")
    if suffix in BUILDERS:
        built = builder_rows(path)  # None: no datasets, or its builder failed; then the reading below says why
        if built is not None:
            try:
                return [parse_row(row, f"{path} row {index}") for index, row in enumerate(built, start=1)]
            except ValueError:
                pass  # read again below, for a message that names the line
    if suffix in (".parquet", ".arrow"):
        items: Iterable[tuple[int, Any]] = enumerate(_arrow_rows(path), start=1)
    elif suffix == ".csv":
        items = _csv_rows(path)
    else:
        text = read_text(path)
        head = text.lstrip()[:1]
        if suffix == ".json" and head == "[":
            items = _json_array(text, path)
        else:
            if suffix == ".json" and head == "{":
                try:
                    whole = _DECODER.decode(text)
                except json.JSONDecodeError:
                    whole = None  # several objects: JSON Lines after all
                except DuplicateKeyError as error:
                    if _one_object(text):  # else JSON Lines, whose reader names the line
                        raise ValueError(f"{path}: {error}") from None
                    whole = None
                if isinstance(whole, Mapping) and "examples" in whole:
                    return list(_bigbench_task(whole, path))
            items = _json_lines(text, path)
    where = "{path}:{line}" if suffix not in (".parquet", ".arrow") else "{path} row {line}"
    return [parse_row(row, where.format(path=path, line=line)) for line, row in items]


def load_file(path: str | os.PathLike[str]) -> list[Example]:
    """Read every example of one ``.jsonl``/``.json``/``.csv``/``.parquet``/``.arrow`` file, unsplit.

    ``text``/``label`` rows get the sorted labels of this file as options.
    """
    return resolve_labels([read_rows(Path(path))])[0]
