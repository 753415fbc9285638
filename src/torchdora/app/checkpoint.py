"""Resume checkpoints: safetensors + JSON only, written to a temporary folder and swapped in.

Layout of ``<output_dir>/checkpoint/``::

    adapter/                   torchdora adapter (DoRA/LoRA runs), or
    model.safetensors          the trainable parameters by name (full fine-tuning)
    optimizer.safetensors      every optimizer state tensor, keys ``state/<param name>/<field>``
    optimizer.json             param groups (by parameter name) and the non-tensor state: the index
    scheduler.json             the learning-rate scheduler's ``state_dict()``
    rng-rank<R>.safetensors    torch (and CUDA, numpy) generator states of process R
    rng-rank<R>.json           Python ``random`` state (and numpy's scalars) of process R
    trainer_state.json         step, data position, resolved config; written last, marks completeness

No pickle anywhere: a checkpoint cannot run code when loaded. Writing goes to ``.checkpoint.tmp``; the
previous checkpoint is renamed to ``.checkpoint.old`` and removed only after the new one is in place, so a
run killed at any moment leaves a complete checkpoint that :func:`find_checkpoint` finds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from torchdora.io import atomic_save_safetensors, atomic_write_json, replace_dir

__all__ = [
    "CHECKPOINT_DIR",
    "TMP_CHECKPOINT_DIR",
    "TRAINER_STATE",
    "optimizer_state_to_flat",
    "optimizer_state_from_flat",
    "save_optimizer",
    "load_optimizer",
    "save_rng_state",
    "load_rng_state",
    "begin_checkpoint",
    "commit_checkpoint",
    "find_checkpoint",
    "read_trainer_state",
]

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.json"
TMP_CHECKPOINT_DIR = ".checkpoint.tmp"
_OLD_DIR = ".checkpoint.old"  # the name io.replace_dir gives the previous checkpoint while swapping


# ---- optimizer -----------------------------------------------------------------------------------------------
def _param_names(optimizer: torch.optim.Optimizer, names: Mapping[nn.Parameter, str] | Mapping[int, str]) -> list[str]:
    """Names of the optimizer's parameters in ``state_dict()`` index order (groups in order, then params)."""
    by_id = {id(k) if isinstance(k, nn.Parameter) else k: v for k, v in names.items()}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError(f"optimizer parameter of shape {tuple(p.shape)} has no name in the given mapping")
            out.append(by_id[id(p)])
    return out


def optimizer_state_to_flat(
    optimizer: torch.optim.Optimizer, names: Mapping[nn.Parameter, str] | Mapping[int, str]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` as safetensors-ready tensors plus a JSON index, keyed by parameter name.

    Names instead of positions make a mismatch (a different model or target set) a clear error on load.
    """
    order = _param_names(optimizer, names)
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    index_state: dict[str, dict[str, Any]] = {}
    for idx, fields in state["state"].items():
        name = order[idx]
        entry: dict[str, Any] = {}
        for key, value in fields.items():
            if isinstance(value, Tensor):
                tensors[f"state/{name}/{key}"] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": f"state/{name}/{key}"}
            else:
                entry[key] = {"value": value}
        index_state[name] = entry
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [order[i] for i in g["params"]]}
              for g in state["param_groups"]]
    return tensors, {"format": "torchdora-optimizer", "param_groups": groups, "state": index_state}


def optimizer_state_from_flat(
    optimizer: torch.optim.Optimizer,
    names: Mapping[nn.Parameter, str] | Mapping[int, str],
    tensors: Mapping[str, Tensor],
    index: Mapping[str, Any],
) -> None:
    """Inverse of :func:`optimizer_state_to_flat`: load the state into ``optimizer`` (same parameters by name)."""
    order = _param_names(optimizer, names)
    saved = [n for g in index["param_groups"] for n in g["params"]]
    if saved != order:
        missing, extra = sorted(set(order) - set(saved)), sorted(set(saved) - set(order))
        raise ValueError(
            "the checkpoint's optimizer holds different parameters than this run "
            f"(missing: {missing[:5]}, unexpected: {extra[:5]}); resume with the same model, method and targets"
        )
    position = {name: i for i, name in enumerate(order)}
    state: dict[int, dict[str, Any]] = {}
    for name, entry in index["state"].items():
        state[position[name]] = {
            key: tensors[spec["tensor"]] if "tensor" in spec else spec["value"] for key, spec in entry.items()
        }
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [position[n] for n in g["params"]]}
              for g in index["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_optimizer(folder: Path, optimizer: torch.optim.Optimizer, names: Mapping[Any, str]) -> None:
    tensors, index = optimizer_state_to_flat(optimizer, names)
    atomic_save_safetensors(tensors, folder / "optimizer.safetensors")
    atomic_write_json(folder / "optimizer.json", index)


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer, names: Mapping[Any, str]) -> None:
    index = json.loads((folder / "optimizer.json").read_text())
    optimizer_state_from_flat(optimizer, names, load_file(folder / "optimizer.safetensors"), index)


# ---- random number generators ----------------------------------------------------------------------------
def save_rng_state(folder: Path, rank: int = 0) -> None:
    """Torch (CPU and CUDA), Python ``random`` and, if imported, numpy generator states of this process."""
    tensors: dict[str, Tensor] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    info: dict[str, Any] = {"python": {"version": version, "state": list(internal), "gauss_next": gauss}}
    if "numpy" in sys.modules:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
        info["numpy"] = {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    atomic_save_safetensors(tensors, folder / f"rng-rank{rank}.safetensors")
    atomic_write_json(folder / f"rng-rank{rank}.json", info)


def load_rng_state(folder: Path, rank: int = 0) -> None:
    """Restore what :func:`save_rng_state` saved (missing files: a checkpoint from fewer processes, skipped)."""
    path = folder / f"rng-rank{rank}.safetensors"
    if not path.is_file():
        return
    tensors = load_file(path)
    info = json.loads((folder / f"rng-rank{rank}.json").read_text())
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = info["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "numpy" in info:
        import numpy as np

        n = info["numpy"]
        np.random.set_state((n["kind"], tensors["numpy.keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached_gaussian"]))


# ---- the folder swap -----------------------------------------------------------------------------------------
def begin_checkpoint(output_dir: str | os.PathLike) -> Path:
    """A fresh, empty temporary folder to write the next checkpoint into (main process only)."""
    tmp = Path(output_dir) / TMP_CHECKPOINT_DIR
    shutil.rmtree(tmp, ignore_errors=True)  # left over from a run killed mid-write
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(output_dir: str | os.PathLike, tmp: Path, trainer_state: Mapping[str, Any]) -> Path:
    """Write ``trainer_state.json`` into ``tmp`` and swap it in as ``<output_dir>/checkpoint``.

    The previous checkpoint moves to ``.checkpoint.old`` first and is deleted last: at every instant one
    complete checkpoint exists under one of the two names.
    """
    output_dir = Path(output_dir)
    atomic_write_json(tmp / TRAINER_STATE, dict(trainer_state))
    return replace_dir(tmp, output_dir / CHECKPOINT_DIR)  # the previous one is kept as .checkpoint.old meanwhile


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The complete checkpoint folder of a run: ``path`` itself, ``path/checkpoint``, or the kept previous one.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no complete checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--resume folder {path} does not exist; pass the output folder of an earlier run")
    for candidate in (path, path / CHECKPOINT_DIR, path / _OLD_DIR):
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    raise FileNotFoundError(
        f"{path} holds no complete checkpoint ({CHECKPOINT_DIR}/{TRAINER_STATE} is missing); "
        "checkpoints are written every --checkpoint-every steps, so the run may have stopped before the first one"
    )


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The JSON trainer state of a checkpoint folder (step, data position, resolved config)."""
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / TRAINER_STATE} is not valid JSON ({err}); the checkpoint is corrupt") from None
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise ValueError(f"{folder / TRAINER_STATE} is not a torchdora trainer state (no 'step'/'config')")
    return state
