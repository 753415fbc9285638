"""Resume checkpoints: safetensors + JSON only, written to a temporary folder and swapped in.

Layout of ``<output_dir>/checkpoint/``::

    adapter/                   torchdora adapter (DoRA/LoRA runs), or
    model.safetensors          the trainable parameters by name (full fine-tuning)
    optimizer.safetensors      every optimizer state tensor, keys ``state/<param name>/<field>``
    optimizer.json             param groups (by parameter name) and the non-tensor state: the index
    scheduler.json             the learning-rate scheduler's ``state_dict()``
    rng-rank<R>.safetensors    torch (and CUDA, numpy) generator states of process R
    rng-rank<R>.json           Python ``random`` state (and numpy's scalars) of process R
    trainer_state.json         step, data position, resolved config, history of resume-time changes
    manifest.json              size and SHA-256 of every other file; written last, marks completeness

No pickle anywhere: a checkpoint cannot run code when loaded. Writing goes to ``.checkpoint.tmp``; once its
manifest is written the previous checkpoint is renamed to ``.checkpoint.old``, the new one to ``checkpoint``,
and the old one removed (manifest first). :func:`find_checkpoint` verifies every candidate of the three names
against its manifest and takes the newest complete one, so a run killed at any moment, also twice in a row,
leaves a complete checkpoint, and a half-deleted or edited one is never resumed from silently.
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

from torchdora.files import atomic_save_safetensors, atomic_write_json, file_sha256

__all__ = [
    "CHECKPOINT_DIR",
    "TMP_CHECKPOINT_DIR",
    "TRAINER_STATE",
    "MANIFEST",
    "OLD_CHECKPOINT_DIR",
    "optimizer_state_to_flat",
    "optimizer_state_from_flat",
    "save_optimizer",
    "load_optimizer",
    "save_rng_state",
    "load_rng_state",
    "begin_checkpoint",
    "commit_checkpoint",
    "discard_checkpoint",
    "find_checkpoint",
    "latest_checkpoint",
    "checkpoint_problem",
    "write_manifest",
    "read_trainer_state",
]

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
TMP_CHECKPOINT_DIR = ".checkpoint.tmp"
OLD_CHECKPOINT_DIR = ".checkpoint.old"
_NAMES = (CHECKPOINT_DIR, TMP_CHECKPOINT_DIR, OLD_CHECKPOINT_DIR)
CHECKPOINT_FORMAT = 2  # 2: with manifest.json


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


def load_rng_state(folder: Path, rank: int = 0, num_saved: int = 1) -> bool:
    """Restore what :func:`save_rng_state` saved for process ``rank``; ``False`` if the checkpoint has none.

    A checkpoint written by ``num_saved`` processes has no state for ranks ``>= num_saved`` (their generators
    then keep their fresh seeds: the caller says so); a missing file of a rank it had is an error.
    """
    path = folder / f"rng-rank{rank}.safetensors"
    if not path.is_file():
        if rank < num_saved:
            raise FileNotFoundError(
                f"{path} is missing although the checkpoint was written by {num_saved} process(es); "
                "the checkpoint is incomplete: resume from an intact copy"
            )
        return False
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
    return True


# ---- the folder swap -----------------------------------------------------------------------------------------
def write_manifest(folder: Path) -> None:
    """``manifest.json``: size and SHA-256 of every file in ``folder``; written last, it marks completeness."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    atomic_write_json(folder / MANIFEST, {"format": "torchdora-checkpoint", "files": entries})


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (``None``: it is). Every file is checked against the manifest.

    A checkpoint from before manifests (its trainer state has no ``checkpoint_format``) is accepted unchecked.
    """
    if not folder.is_dir():
        return "it does not exist"
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        try:
            legacy = "checkpoint_format" not in json.loads((folder / TRAINER_STATE).read_text())
        except (OSError, ValueError):
            legacy = False
        return None if legacy else f"it has no {MANIFEST} (its write or deletion did not finish)"
    try:
        entries = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']}"
        if file_sha256(path) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (the file changed or is corrupt)"
    return None


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder, its manifest first: a deletion cut short never leaves a 'complete' folder."""
    if not folder.exists():
        return
    (folder / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(folder)


def _swap_in(output_dir: Path, tmp: Path) -> Path:
    """Make the complete folder ``tmp`` the run's ``checkpoint``; the previous one waits as ``.checkpoint.old``.

    ``tmp`` stays complete until the rename that makes it ``checkpoint``, and :func:`find_checkpoint` looks
    at all three names, so a kill between any two of these operations leaves a complete checkpoint.
    """
    final, old = output_dir / CHECKPOINT_DIR, output_dir / OLD_CHECKPOINT_DIR
    _remove(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)
    return final


def begin_checkpoint(output_dir: str | os.PathLike) -> Path:
    """A fresh, empty temporary folder to write the next checkpoint into (main process only).

    A complete ``.checkpoint.tmp`` left by a run killed before its swap is swapped in first (it is the newest
    checkpoint and may be the one this run resumed from); an incomplete one is deleted.
    """
    output_dir = Path(output_dir)
    tmp = output_dir / TMP_CHECKPOINT_DIR
    if tmp.exists() and (tmp / MANIFEST).is_file() and checkpoint_problem(tmp) is None:
        _swap_in(output_dir, tmp)
    _remove(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(output_dir: str | os.PathLike, tmp: Path, trainer_state: Mapping[str, Any]) -> Path:
    """Write ``trainer_state.json`` and the manifest into ``tmp`` and swap it in as ``<output_dir>/checkpoint``."""
    atomic_write_json(tmp / TRAINER_STATE, {**trainer_state, "checkpoint_format": CHECKPOINT_FORMAT})
    write_manifest(tmp)
    return _swap_in(Path(output_dir), tmp)


def discard_checkpoint(tmp: Path) -> None:
    """Delete an unfinished temporary checkpoint (after a failed write, e.g. a full disk, to free its space)."""
    _remove(tmp)


def _run_folder(path: Path) -> Path:
    return path.parent if path.name in _NAMES else path


def latest_checkpoint(path: str | os.PathLike, warn: bool = False) -> Path | None:
    """The newest complete checkpoint of the run folder ``path`` (or of a checkpoint folder given directly).

    Looks at ``checkpoint``, ``.checkpoint.tmp`` (complete when a kill came between its manifest and its swap)
    and ``.checkpoint.old``; the newest by step wins. ``warn``: say on stderr which incomplete ones were skipped.
    """
    path = Path(path)
    if path.name not in _NAMES and (path / TRAINER_STATE).is_file():  # a checkpoint folder copied elsewhere
        candidates = [path]
    else:
        run = _run_folder(path)
        candidates = [run / name for name in _NAMES]
    found: list[tuple[int, Path]] = []
    for candidate in candidates:
        if not candidate.exists():
            continue
        problem = checkpoint_problem(candidate)
        if problem is None:
            try:
                found.append((int(read_trainer_state(candidate)["step"]), candidate))
                continue
            except (ValueError, OSError) as err:
                problem = str(err)
        if warn and candidate.name != TMP_CHECKPOINT_DIR:  # an unfinished .tmp is the normal trace of a kill
            print(f"torchdora: skipping {candidate}: incomplete checkpoint ({problem})", file=sys.stderr)
    if not found:
        return None
    return max(found, key=lambda item: item[0])[1]


def find_checkpoint(path: str | os.PathLike, warn: bool = False) -> Path:
    """The newest complete checkpoint of a run (see :func:`latest_checkpoint`).

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no complete checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--resume folder {path} does not exist; pass the output folder of an earlier run")
    found = latest_checkpoint(path, warn=warn)
    if found is None:
        raise FileNotFoundError(
            f"{path} holds no complete checkpoint ({CHECKPOINT_DIR}/ with a verified {MANIFEST}); checkpoints are "
            "written every --checkpoint-every steps, so the run may have stopped before the first one"
        )
    return found


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The JSON trainer state of a checkpoint folder (step, data position, resolved config)."""
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder / TRAINER_STATE} is missing; the checkpoint is incomplete") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / TRAINER_STATE} is not valid JSON ({err}); the checkpoint is corrupt") from None
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise ValueError(f"{folder / TRAINER_STATE} is not a torchdora trainer state (no 'step'/'config')")
    return state
