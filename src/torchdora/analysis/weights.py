"""Base and fine-tuned weights read tensor by tensor, for the weight-decomposition analysis (paper §3, Fig. 2).

A full model's safetensors (one file or an index of shards) is opened lazily, one tensor at a time, so the analysis
never holds a whole model; each module's weight is seen as ``(out, in)`` rows, as DoRA normalises it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from torchdora.targets import closest_names

__all__ = ["FULL_WEIGHTS", "FULL_INDEX", "layer_index", "TensorFiles", "module_kinds", "rows_of", "BaseWeights"]

FULL_WEIGHTS = "model.safetensors"
FULL_INDEX = "model.safetensors.index.json"


def layer_index(module: str) -> int | None:
    """The first integer part of a dotted module name (``model.layers.7.self_attn.q_proj`` → 7), else ``None``."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module)
    return int(match.group(1)) if match else None


class TensorFiles:
    """Single tensors from one ``.safetensors`` file or a folder's (possibly sharded) ``model.safetensors``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_file():
            files = [path]
        elif (path / FULL_WEIGHTS).is_file():
            files = [path / FULL_WEIGHTS]
        elif (path / FULL_INDEX).is_file():
            index = json.loads((path / FULL_INDEX).read_text())
            files = sorted({path / shard for shard in index.get("weight_map", {}).values()})
        else:
            raise FileNotFoundError(
                f"{path} holds no {FULL_WEIGHTS} (or {FULL_INDEX}); pass a folder written by save_pretrained() "
                "or a .safetensors state-dict file"
            )
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    self._where[key] = file
                    self._shapes[key] = tuple(f.get_slice(key).get_shape())

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> Tensor:
        with safe_open(self._where[key], framework="pt") as f:
            return f.get_tensor(key)


def module_kinds(folder: Path) -> dict[str, str]:
    """Module name → ``"linear"|"conv1d"|"conv"|"embedding"`` from the model's architecture, built on the meta
    device (no memory, no weights). Empty if ``folder`` has no transformers config or it cannot be built."""
    if not (folder / "config.json").is_file():
        return {}
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        from torchdora.layers import is_conv1d
    except ImportError:
        return {}
    # Best effort: an architecture transformers cannot build leaves every module in (out, in) orientation,
    # and an adapter's recorded layout or the shape checks still catch a transposed weight.
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError):
        return {}
    model = None
    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"):
                model = auto.from_config(config)
            break
        except (ValueError, KeyError, TypeError, ImportError):
            continue
    if model is None:
        return {}
    kinds = {}
    for name, module in model.named_modules():
        if is_conv1d(module):
            kinds[name] = "conv1d"
        elif isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            kinds[name] = "conv"
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
    return kinds


def rows_of(weight: Tensor, kind: str) -> Tensor:
    """A stored weight as ``(out, in)`` output-feature rows, as :mod:`torchdora.layers` sees it."""
    if kind in ("conv1d", "embedding"):  # Conv1D stores (in, out); Embedding (V, d) has d output features
        return weight.T
    return weight.reshape(weight.shape[0], -1)


class BaseWeights:
    """The pre-trained weights of the selected modules, read one tensor at a time.

    ``source``: a model name or folder (through :func:`torchdora.app.assets.resolve_model`; the default model
    is the embedded SmolLM2-135M-Instruct) or a ``.safetensors`` state-dict file with HF key names. A module
    is a key ``<module>.weight`` of at least 2 dims. With a model folder the architecture says which modules
    are transformers ``Conv1D`` (weight stored ``(in, out)``, transposed here); a bare state-dict file is
    read in PyTorch's ``(out, in)`` orientation unless an adapter records otherwise.
    """

    def __init__(self, source: str | os.PathLike[str] | None) -> None:
        path = Path(os.fspath(source)).expanduser() if source is not None else None
        if path is not None and path.suffix == ".safetensors":
            if not path.is_file():
                raise FileNotFoundError(f"base weights file {path} not found")
            folder = None
        else:
            from torchdora.app.assets import resolve_model

            resolved = resolve_model(source)
            if not isinstance(resolved, Path):
                raise ValueError(
                    f"model {source!r} is a hub name; the analysis reads weights tensor by tensor from local "
                    "files. Pass a local model folder (save_pretrained) or a .safetensors state-dict file"
                )
            path = folder = resolved
        self.source = path
        self._files = TensorFiles(path)
        self._kinds = module_kinds(folder) if folder is not None else {}
        self.modules = [
            key[: -len(".weight")] for key in self._files.keys()
            if key.endswith(".weight") and len(self._files.shape(key)) >= 2
        ]

    def select(self, pattern: str) -> list[str]:
        """Modules whose whole dotted name matches the regex ``pattern``, by layer then name; errors if none."""
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"--modules {pattern!r} is not a valid regular expression: {err}") from None
        selected = [m for m in self.modules if regex.fullmatch(m)]
        if not selected:
            raise ValueError(
                f"--modules {pattern!r} matches no weight of {self.source}. Closest module names that exist: "
                f"{closest_names(pattern, self.modules)} (e.g. {self.modules[:3]}); the pattern must match the whole "
                r"dotted name, e.g. '.*\.(q_proj|v_proj)$'"
            )
        return sorted(selected, key=lambda m: (layer_index(m) is None, layer_index(m) or 0, m))

    def kind(self, module: str) -> str:
        return self._kinds.get(module, "linear")

    def shape(self, module: str) -> tuple[int, ...]:
        return self._files.shape(f"{module}.weight")

    def weight(self, module: str) -> Tensor:
        """The stored weight of ``module`` (its own orientation and dtype)."""
        return self._files.get(f"{module}.weight")

    def rows(self, module: str) -> Tensor:
        """The weight of ``module`` as ``(out, in)`` output-feature rows, float64 (what ΔM and ΔD compare)."""
        return rows_of(self.weight(module), self.kind(module)).to(torch.float64)
