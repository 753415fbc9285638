"""Magnitude/direction weight-decomposition analysis (DoRA paper, section 3 and Figure 2).

For a weight ``W_t`` after ``t`` training steps (for LoRA and DoRA: the *merged* weight) and the pre-trained
``W_0``, both seen as ``(K, in)`` matrices of output-feature rows::

    ΔM_t = (1/K) Σ_n | ||W_t[n]|| − ||W_0[n]|| |
    ΔD_t = (1/K) Σ_n ( 1 − cos(W_t[n], W_0[n]) )

The paper plots one point ``(ΔD, ΔM)`` per (layer, checkpoint) of the query matrices and fits a line: full
fine-tuning has a negative slope (correlation −0.62), LoRA a positive one (+0.83), DoRA a negative one
(−0.31), i.e. DoRA learns like full fine-tuning, changing magnitude and direction somewhat independently.

The driver streams module by module: for one selected module it reads the pre-trained weight once, then that
module's weight (or adapter) from every checkpoint, so at most one base weight and one checkpoint weight are
in memory, never two models. Checkpoints are the snapshots ``torchdora train --save-every N`` writes::

    <run_dir>/config.json                    the run's resolved config, with "method": "dora"|"lora"|"full"
    <run_dir>/snapshots/step-000100/         torchdora_config.json + torchdora_adapter.safetensors (dora/lora)
                                             or model.safetensors (full fine-tuning, HF key names)

A PEFT adapter folder (``adapter_config.json``) is read as well.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from torchdora.config import DoraConfig
from torchdora.functional import lora_scaling, merged_weight, vera_factors
from torchdora.io import read_adapter
from torchdora.analysis.weights import (
    FULL_INDEX, FULL_WEIGHTS, BaseWeights, TensorFiles, layer_index, rows_of,
)

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_MODULES",
    "Checkpoint",
    "DecompositionRow",
    "BaseWeights",
    "magnitude_direction_change",
    "row_changes",
    "layer_index",
    "discover_checkpoints",
    "checkpoint_weight",
    "analyze",
    "adapter_ranks",
]

#: the paper's analysis looks at the query (and value) projections
DEFAULT_MODULES = r".*\.(q_proj|v_proj)$"

RUN_CONFIG = "config.json"
SNAPSHOTS = "snapshots"
ADAPTER_FILES = ("torchdora_config.json", "adapter_config.json")
_STEP_DIR = re.compile(r"step-(\d+)$")
CSV_COLUMNS = ("run", "method", "step", "module", "layer", "dM", "dD")


# ---- the measure ---------------------------------------------------------------------------------------------
def row_changes(w0: Tensor, wt: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row ``| ||W_t[n]|| − ||W_0[n]|| |`` and ``1 − cos(W_t[n], W_0[n])``, both ``(K,)`` in float64.

    ``w0``, ``wt``: ``(K, in)``, rows are output features. ``1 − cos`` is computed as ``||u − v||² / 2`` of the
    unit rows ``u, v``, which equals it exactly but does not cancel when the angle is tiny (LoRA's early
    checkpoints move rows by ~1e-4 rad, where ``1 − cos`` is ~1e-8). A zero row has no direction: its cosine is
    taken as 0 against a non-zero row (``1 − cos = 1``, as ``torch.cosine_similarity`` gives) and as 1 against
    another zero row (unchanged).
    """
    if w0.dim() != 2 or w0.shape != wt.shape:
        raise ValueError(f"expected two (K, in) weights of one shape, got {tuple(w0.shape)} and {tuple(wt.shape)}")
    a = w0.detach().to(torch.float64)
    b = wt.detach().to(torch.float64)
    na = torch.linalg.vector_norm(a, dim=1)  # (K,)
    nb = torch.linalg.vector_norm(b, dim=1)  # (K,)
    d_mag = (nb - na).abs()
    ua = a / torch.where(na > 0, na, 1.0)[:, None]
    ub = b / torch.where(nb > 0, nb, 1.0)[:, None]
    d_dir = 0.5 * (ua - ub).square().sum(dim=1)
    one_zero = (na > 0) != (nb > 0)
    d_dir = torch.where(one_zero, torch.ones_like(d_dir), d_dir)
    d_dir = torch.where((na == 0) & (nb == 0), torch.zeros_like(d_dir), d_dir)
    return d_mag, d_dir


def magnitude_direction_change(w0: Tensor, wt: Tensor) -> tuple[float, float]:
    """``(ΔM, ΔD)`` between a pre-trained weight ``w0`` and a trained weight ``wt`` (paper section 3).

    Both are ``(K, in)`` with one output feature per row (PyTorch's Linear orientation); accumulated in float64.
    """
    d_mag, d_dir = row_changes(w0, wt)
    return float(d_mag.mean()), float(d_dir.mean())




# ---- checkpoints -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """One snapshot to measure. ``kind``: ``"adapter"`` (dora/lora, merged first) or ``"full"`` (a state dict)."""

    run: str
    method: str
    step: int | None
    path: Path
    kind: str


def _snapshot_kind(folder: Path) -> str | None:
    if any((folder / name).is_file() for name in ADAPTER_FILES):
        return "adapter"
    if (folder / FULL_WEIGHTS).is_file() or (folder / FULL_INDEX).is_file():
        return "full"
    return None


def _run_method(run_dir: Path) -> str | None:
    config = run_dir / RUN_CONFIG
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config} is not valid JSON ({err})") from None
    method = data.get("method") if isinstance(data, dict) else None
    return str(method) if method is not None else None


def _run_dir(snapshot: Path) -> Path:
    return snapshot.parent.parent if snapshot.parent.name == SNAPSHOTS else snapshot


def _inferred_method(folder: Path, kind: str) -> str:
    if kind == "full":
        return "full"
    config, _, _ = read_adapter(folder)
    if config.use_vera:
        return "dvora" if config.use_dora else "vera"
    return "dora" if config.use_dora else "lora"


def _step_of(folder: Path) -> int | None:
    match = _STEP_DIR.search(folder.name)
    return int(match.group(1)) if match else None


def discover_checkpoints(path: str | os.PathLike[str], label: str | None = None) -> list[Checkpoint]:
    """The checkpoints in a run folder (its ``snapshots/step-*``) or a single snapshot folder, by step.

    The run's label defaults to its method (``config.json``'s ``"method"``, else read from the snapshot:
    ``dora``/``lora`` for an adapter, ``full`` for a state dict).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint {folder} not found: pass a run folder or a snapshot folder")
    own_kind = _snapshot_kind(folder)
    if own_kind is not None:
        snapshots = [(folder, own_kind)]
        run_dir = _run_dir(folder)
    else:
        snap_root = folder / SNAPSHOTS
        # a snapshot still being written is a hidden ".step-*.tmp" folder: not a checkpoint yet
        candidates = sorted(p for p in snap_root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if snap_root.is_dir() else []
        snapshots = [(p, k) for p in candidates if (k := _snapshot_kind(p)) is not None]
        if not snapshots:
            raise FileNotFoundError(
                f"{folder} is neither a snapshot (no adapter files {list(ADAPTER_FILES)} or {FULL_WEIGHTS}) nor a "
                f"run folder with snapshots under {snap_root}; train with `torchdora train --save-every N`"
            )
        run_dir = folder
    method = _run_method(run_dir) or _inferred_method(*snapshots[0])
    checkpoints = [
        Checkpoint(run=label or method, method=method, step=_step_of(p), path=p, kind=k) for p, k in snapshots
    ]
    return sorted(checkpoints, key=lambda c: (c.step is None, c.step or 0, str(c.path)))


@dataclass
class _SnapshotCache:
    """Adapters are small (``r·(in + out)`` per module), so each is read once and kept; of a full snapshot only
    the index of its tensors is kept."""

    loaded: dict[Path, tuple[DoraConfig, dict[str, Tensor], dict[str, str]]] = field(default_factory=dict)
    full: dict[Path, TensorFiles] = field(default_factory=dict)

    def files(self, folder: Path) -> TensorFiles:
        if folder not in self.full:
            self.full[folder] = TensorFiles(folder)
        return self.full[folder]

    def get(self, folder: Path) -> tuple[DoraConfig, dict[str, Tensor], dict[str, str]]:
        if folder not in self.loaded:
            config, tensors, _ = read_adapter(folder)
            kinds: dict[str, str] = {}
            header = folder / ADAPTER_FILES[0]
            if header.is_file():
                modules = json.loads(header.read_text()).get("modules", {})
                kinds = {name: info.get("kind", "linear") for name, info in modules.items() if isinstance(info, dict)}
            self.loaded[folder] = (config, tensors, kinds)
        return self.loaded[folder]


def _shape_error(module: str, checkpoint: Path, what: str, got: Sequence[int], want: Sequence[int]) -> ValueError:
    return ValueError(
        f"{checkpoint} does not fit the base model at module {module!r}: {what} has shape {tuple(got)}, "
        f"the base weight needs {tuple(want)}. Was it trained from another base model? Pass that model "
        "with --model"
    )


def _vera_pair(tensors: dict[str, Tensor], module: str, shape: Sequence[int], source: Path) -> tuple[Tensor, Tensor]:
    """A VeRA/DVoRA module's update as the LoRA pair ``A' = Λ_d A``, ``B' = Λ_b B`` (scale 1), float64, from the
    shared projections the adapter saves once (``vera_A[:, :in]``, ``vera_B[:out]``)."""
    if "vera_A" not in tensors or "vera_B" not in tensors:
        raise ValueError(f"{source} holds no VeRA projections (vera_A, vera_B): save the adapter with torchdora or "
                         "with PEFT's save_projection=True to analyse it")
    out, fan_in = shape
    return vera_factors(tensors["vera_A"][:, :fan_in].double(), tensors["vera_B"][:out].double(),
                        tensors[f"{module}.vera_lambda_d"].double(), tensors[f"{module}.vera_lambda_b"].double())


def checkpoint_weight(
    checkpoint: Checkpoint, module: str, w0: Tensor, kind: str, cache: _SnapshotCache | None = None
) -> tuple[Tensor, Tensor]:
    """The pre-trained and the trained weight of ``module`` at ``checkpoint``, both as ``(out, in)`` rows, float64.

    ``w0``: the pre-trained weight as stored (its own orientation); ``kind`` its layout (see :class:`BaseWeights`),
    overridden by the layout an adapter records. For an adapter the trained weight is the merged weight
    ``(m/||W + s·B·A||)·(W + s·B·A)`` (DoRA) or ``W + s·B·A`` (LoRA) from
    :func:`torchdora.functional.merged_weight`; a module the adapter does not touch is unchanged, and a module in
    the adapter's ``modules_to_save`` is the saved weight.
    """
    cache = cache if cache is not None else _SnapshotCache()
    if checkpoint.kind == "full":
        files = cache.files(checkpoint.path)
        key = f"{module}.weight"
        if key not in files:
            raise ValueError(
                f"{checkpoint.path} has no tensor {key!r}: it is not a checkpoint of this base model's architecture"
            )
        if files.shape(key) != tuple(w0.shape):
            raise _shape_error(module, checkpoint.path, key, files.shape(key), w0.shape)
        return rows_of(w0, kind).to(torch.float64), rows_of(files.get(key), kind).to(torch.float64)

    config, tensors, kinds = cache.get(checkpoint.path)
    kind = kinds.get(module, kind)
    base = rows_of(w0, kind).to(torch.float64)  # (out, in)
    saved = tensors.get(f"modules_to_save.{module}.weight")
    if saved is not None:
        if saved.shape != w0.shape:
            raise _shape_error(module, checkpoint.path, "the saved weight", saved.shape, w0.shape)
        return base, rows_of(saved, kind).to(torch.float64)
    a = tensors.get(f"{module}.lora_A")
    b = tensors.get(f"{module}.lora_B")
    m = tensors.get(f"{module}.magnitude")
    if config.use_vera and f"{module}.vera_lambda_d" in tensors:
        a, b = _vera_pair(tensors, module, base.shape, checkpoint.path)
    if a is None and m is None:
        return base, base
    out, fan_in = base.shape
    r = config.rank_for(module)
    if a is not None:
        a = a.reshape(a.shape[0], -1).to(torch.float64)  # (r, in)
        if a.shape != (r, fan_in):
            raise _shape_error(module, checkpoint.path, f"{module}.lora_A", a.shape, (r, fan_in))
    if b is not None:
        b = b.reshape(b.shape[0], -1).to(torch.float64)  # (out, r)
        if b.shape != (out, r):
            raise _shape_error(module, checkpoint.path, f"{module}.lora_B", b.shape, (out, r))
    if m is not None:
        m = m.reshape(-1).to(torch.float64)  # (out,)
        if m.shape != (out,):
            raise _shape_error(module, checkpoint.path, f"{module}.magnitude", m.shape, (out,))
    scaling = 1.0 if config.use_vera else lora_scaling(r, config.alpha_for(module), config.use_rslora)
    merged, _ = merged_weight(base, a, b, m, scaling)
    return base, merged


def adapter_ranks(checkpoints: Iterable[Checkpoint]) -> dict[str, int]:
    """Method → the rank ``r`` of its adapters (``lora``/``dora`` checkpoints), for the null of low-rank updates.

    Several ranks for one method (different runs) are refused: the null is built per method.
    """
    ranks: dict[str, int] = {}
    for point in checkpoints:
        if point.kind != "adapter":
            continue
        config, _, _ = read_adapter(point.path)
        if ranks.setdefault(point.method, config.r) != config.r:
            raise ValueError(f"runs of method {point.method!r} have ranks {ranks[point.method]} and {config.r}; "
                             "analyse runs of one rank per method together")
    return ranks


# ---- the driver --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecompositionRow:
    """One measured point: ``dM`` = ΔM, ``dD`` = ΔD of ``module`` at ``step`` of ``run``."""

    run: str
    method: str
    step: int | None
    module: str
    layer: int | None
    dM: float
    dD: float


def _iter_rows(
    base: BaseWeights, checkpoints: Sequence[Checkpoint], modules: Sequence[str], cache: _SnapshotCache
) -> Iterator[DecompositionRow]:
    for module in modules:
        w0 = base.weight(module)  # one base weight in memory at a time
        for checkpoint in checkpoints:
            rows0, rows_t = checkpoint_weight(checkpoint, module, w0, base.kind(module), cache)
            d_m, d_d = magnitude_direction_change(rows0, rows_t)
            yield DecompositionRow(checkpoint.run, checkpoint.method, checkpoint.step, module, layer_index(module),
                                   d_m, d_d)
            del rows0, rows_t
        del w0


def analyze(
    model: str | os.PathLike[str] | None,
    checkpoints: Iterable[Checkpoint | str | os.PathLike[str]],
    modules: str = DEFAULT_MODULES,
    labels: Sequence[str | None] | None = None,
) -> list[DecompositionRow]:
    """ΔM and ΔD of every selected module at every checkpoint, sorted by run, step, layer, module.

    ``model``: see :class:`BaseWeights`. ``checkpoints``: :class:`Checkpoint` objects or run/snapshot folders
    (see :func:`discover_checkpoints`). ``modules``: a regex matched against whole dotted module names.
    ``labels``: one per item of ``checkpoints`` (``None`` keeps the default, the run's method; two runs of one
    method get their folder name appended).
    """
    items = list(checkpoints)
    if labels is not None and len(labels) != len(items):
        raise ValueError(f"got {len(labels)} labels for {len(items)} checkpoints; give one label per run or none")
    points: list[Checkpoint] = []
    for i, item in enumerate(items):
        if isinstance(item, Checkpoint):
            points.append(item)
        else:
            points.extend(discover_checkpoints(item, labels[i] if labels is not None else None))
    if labels is None:
        sources: dict[str, set[Path]] = {}
        for c in points:
            sources.setdefault(c.run, set()).add(_run_dir(c.path))
        # several runs of one method: tell them apart by their folder names
        points = [replace(c, run=f"{c.run}:{_run_dir(c.path).name}") if len(sources[c.run]) > 1 else c for c in points]
    if not points:
        raise ValueError("no checkpoints given: pass at least one run folder or snapshot folder")
    base = BaseWeights(model)
    selected = base.select(modules)
    cache = _SnapshotCache()
    for point in points:
        if point.kind != "adapter":
            continue
        _, tensors, _ = cache.get(point.path)
        adapted = sorted({k.rsplit(".", 1)[0] for k in tensors if not k.startswith("modules_to_save.")})
        if not set(adapted) & set(selected):
            raise ValueError(
                f"the adapter {point.path} adapts {adapted[:6]}{' ...' if len(adapted) > 6 else ''}, none of which "
                f"--modules {modules!r} selects (it selects {selected[:4]}...). Choose modules the adapter trained"
            )
    rows = list(_iter_rows(base, points, selected, cache))
    runs = {c.run: i for i, c in reversed(list(enumerate(points)))}
    return sorted(rows, key=lambda r: (runs[r.run], r.step is None, r.step or 0, r.layer is None, r.layer or 0,
                                       r.module))
