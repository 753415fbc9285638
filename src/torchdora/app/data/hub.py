"""Hugging Face datasets: by name from the hub (needs network) or a local ``save_to_disk`` folder (offline).

Both go through the optional ``datasets`` package; their rows are parsed with the same schemas as files
(:mod:`torchdora.app.data.schema`), integer class labels turned into their names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torchdora.app.data.schema import DatasetSplits, parse_row, resolve_labels
from torchdora.app.data.splits import SPLIT_STEMS, Size, fill_missing_splits, finish, split

__all__ = ["is_saved_dataset", "load_saved_dataset", "load_hub_dataset"]


def _hf_rows(split_rows: Iterable[Mapping[str, Any]], features: Any) -> Iterator[Mapping[str, Any]]:
    """Rows of a Hugging Face split with integer class labels turned into names."""
    names = getattr((features or {}).get("label"), "names", None)
    for row in split_rows:
        label = row.get("label")
        # -1 marks hidden test labels in e.g. GLUE; leave such values alone.
        if names is not None and isinstance(label, int) and 0 <= label < len(names):
            row = {**row, "label": names[row["label"]]}
        yield row


def _hf_splits(loaded: Mapping[str, Any], where: str, seed: int, max_train: int | None,
               max_eval: int | None, sizes: tuple[Size, Size] = (0.1, 0.1)) -> DatasetSplits:
    """The splits of a ``DatasetDict`` (hub or ``save_to_disk``); missing validation/test carved from train."""
    split_names = {name: next((s for s in stems if s in loaded), None) for name, stems in SPLIT_STEMS.items()}
    if split_names["train"] is None:
        raise ValueError(f"{where} has no 'train' split (it has {sorted(loaded)})")
    present = [name for name, found in split_names.items() if found]
    rows = []
    for name in present:
        part = loaded[split_names[name]]
        features = getattr(part, "features", None)
        rows.append(
            [parse_row(row, f"{where} [{name}] row {i}") for i, row in enumerate(_hf_rows(part, features), start=1)]
        )
    parts = dict(zip(present, resolve_labels(rows), strict=True))
    if not parts["train"]:
        raise ValueError(f"The train split of {where} is empty.")
    parts = fill_missing_splits(parts, seed, where, *sizes)
    return finish(parts["train"], parts["validation"], parts["test"], where, max_train, max_eval, *sizes)


def load_hub_dataset(name: str, seed: int, max_train: int | None, max_eval: int | None,
                     sizes: tuple[Size, Size] = (0.1, 0.1)) -> DatasetSplits:
    """``datasets.load_dataset(name)``; a name that cannot be loaded (offline, unknown) is a ``ValueError``."""
    import datasets  # optional dependency

    try:
        loaded = datasets.load_dataset(name)
    except OSError as err:  # ConnectionError offline, DatasetNotFoundError for a wrong name
        raise ValueError(
            f"Hugging Face dataset {name!r} could not be loaded ({err}). Check the name, or without a network "
            "pass a local file or folder (.jsonl/.json/.csv/.parquet/.arrow, or a save_to_disk folder)"
        ) from None
    return _hf_splits(loaded, f"Hugging Face dataset {name!r}", seed, max_train, max_eval, sizes)


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return any((folder / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


def load_saved_dataset(folder: Path, seed: int, max_train: int | None, max_eval: int | None,
                       sizes: tuple[Size, Size] = (0.1, 0.1)) -> DatasetSplits:
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
        return _hf_splits(loaded, where, seed, max_train, max_eval, sizes)
    rows = [parse_row(row, f"{where} row {i}") for i, row in enumerate(_hf_rows(loaded, loaded.features), start=1)]
    return finish(*split(resolve_labels([rows])[0], seed, where, *sizes), where, max_train, max_eval, *sizes)
