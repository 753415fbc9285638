"""Rows of a ``.csv``, ``.parquet`` or ``.arrow`` file read by ``datasets``' packaged builders (``csv``, ``parquet``,
``arrow``), offline, cached in a temporary folder that is deleted after the read (nothing is written to
``~/.cache/huggingface``).

:func:`builder_rows` returns ``None`` when ``datasets`` is not installed or its builder fails; then
:func:`torchdora.app.data.readers.read_rows` reads the file itself, which names the line of what is wrong (a row
with more cells than the header, a byte that is not UTF-8). A CSV header that repeats a column is refused before
the builder runs (pandas would rename the second one ``name.1``), and every CSV cell is read as text, as written
(pandas would turn ``01`` into ``1`` and an empty cell into ``NaN``).

JSON and JSON Lines stay with :mod:`~torchdora.app.data.readers`: pyarrow's JSON reader, the first step of
``datasets``' ``json`` builder, keeps one value of a key repeated inside a nested object, or splits such a line
into two rows (``{"messages": [{"role": "user", "role": "x", ...}]}`` became two rows in datasets 5.2), where
torchdora refuses the row and names its line.
"""

from __future__ import annotations

import contextlib
import csv
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["BUILDERS", "builder_rows", "check_header", "csv_header"]

#: file suffix -> ``datasets`` packaged builder
BUILDERS = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def check_header(path: Path, header: list[str]) -> list[str]:
    """``header`` (a CSV file's column names), or a ``ValueError`` naming a column given twice."""
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ValueError(f"{path}:1: the header names column {repeated[0]!r} twice; keep one")
    return header


def csv_header(path: Path) -> list[str]:
    """The column names of a CSV file (its first record), checked by :func:`check_header`."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return check_header(path, next(csv.reader(handle), []))


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No progress bars and no log lines from ``datasets`` while it reads (a failure is reported by us)."""
    from datasets.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), datasets.is_progress_bar_enabled()
    hf_logging.set_verbosity(hf_logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def builder_rows(path: Path) -> list[dict[str, Any]] | None:
    """The rows of ``path`` as ``datasets``' builder for its suffix reads them; ``None``: no ``datasets``, or the
    builder failed (then the caller's own reader reports the line)."""
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        return None
    try:
        import datasets
    except ImportError:
        return None
    options: dict[str, Any] = {}
    if builder == "csv":
        try:
            header = csv_header(path)
        except UnicodeDecodeError:
            return None
        options = {"features": datasets.Features({name: datasets.Value("string") for name in header}),
                   "keep_default_na": False, "na_filter": False, "encoding": "utf-8-sig"}
    with tempfile.TemporaryDirectory(prefix="torchdora-datasets-") as cache, _quiet(datasets):
        try:
            loaded = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                           keep_in_memory=True, **options)
        except Exception:  # noqa: BLE001 - any failure of the builder: our reader says what and where
            return None
        return loaded.to_list()
