"""Adapter files: torchdora's own format and PEFT's, read and written with safetensors + JSON only.

torchdora format (a folder):
    ``torchdora_config.json``      ``{"format": "torchdora-adapter", "format_version": 1, "config": {...},
                                    "modules": {name: {"kind", "r", "alpha", "scaling", ...}}}``
    ``torchdora_adapter.safetensors``  keys ``<module>.lora_A`` ``(r, in, *k)``, ``<module>.lora_B`` ``(out, r, *1)``,
                                    ``<module>.magnitude`` ``(out,)``, and ``modules_to_save.<module>.<param>``.
    VeRA / DVoRA (``config.use_vera``): per module ``<module>.vera_lambda_d`` ``(r,)``,
    ``<module>.vera_lambda_b`` ``(out,)`` and (DVoRA) ``<module>.magnitude`` ``(out,)``; the shared frozen pair
    once, ``vera_A`` ``(r, max in)`` and ``vera_B`` ``(max out, r)`` (module ``m`` uses ``vera_A[:, :in]``,
    ``vera_B[:out]``), as drawn from ``config.projection_prng_key``.

PEFT format (``docs/formats.md``): ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` etc. Every file is written to a temporary name and renamed,
so an interrupted save never leaves a half-written file. The torchdora config also records the weights'
SHA-256, so weights and config from two different saves are detected on load (PEFT's config has no such field).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from torchdora.adapters import add_adapter, delete_adapter, list_adapters, using_adapter
from torchdora.config import DoraConfig, check_adapter_name, module_matches
from torchdora.files import (
    atomic_save_safetensors, atomic_write_bytes, atomic_write_json, file_sha256, replace_dir, staged_dir,
    tensors_sha256,
)
from torchdora.functional import lora_scaling
from torchdora.provenance import FINGERPRINT_KIND, base_difference, base_fingerprint
from torchdora.inject import adapter_config, inject, unload
from torchdora.layers import AdapterLayer, ConvAdapter, EmbeddingAdapter
from torchdora.layers.base import DEFAULT_ADAPTER
from torchdora.layers.vera import shared_projection
from torchdora.peft_format import BASE_LAYER_PREFIX, PEFT_PREFIX, SAVE_PREFIX, from_peft, to_peft
from torchdora.state import adapter_layers, state_of

__all__ = [
    "FORMAT_VERSION",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "adapter_state_dict",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_safetensors",
    "replace_dir",
    "tensors_sha256",
    "recorded_name",
    "recorded_fingerprint",
]

FORMAT_VERSION = 1
TORCHDORA_CONFIG = "torchdora_config.json"
TORCHDORA_WEIGHTS = "torchdora_adapter.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
#: keys of VeRA's shared projection pair, saved once per adapter (optional on load: a PEFT file written with
#: save_projection=False has none, and inject has already drawn them from the seed)
PROJECTION_KEYS = ("vera_A", "vera_B")

Format = Literal["torchdora", "peft"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the adapter folder is corrupt, save it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the header metadata of an adapter weights file; every float tensor must be finite."""
    if path.exists() and not path.is_file():  # a FIFO, a device, a link to /dev/zero: never opened
        raise ValueError(f"adapter weights {path} is not a regular file; point at an adapter folder holding its files")
    if not path.is_file():
        raise FileNotFoundError(f"adapter weights {path} not found; the adapter folder is incomplete")
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt") from None
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise ValueError(f"{path} holds NaN or infinite values in {', '.join(bad[:5])}"
                         f"{f' (+{len(bad) - 5} more)' if len(bad) > 5 else ''}: the file is corrupt or comes from a "
                         "diverged run; use an earlier adapter or checkpoint")
    return tensors, metadata


#: the PEFT config fields that change what an adapter computes, recorded in the weights file's metadata
_PEFT_MATH_FIELDS = ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")
_PEFT_CHECKSUM = "torchdora_tensors_sha256"
_PEFT_RECORD = "torchdora_config"


def _check_peft_record(folder: Path, peft_config: Mapping[str, Any], tensors: Mapping[str, Tensor],
                       metadata: Mapping[str, str]) -> None:
    """Where torchdora wrote a PEFT folder, its weights must match the checksum and the config the math fields
    recorded at save time (PEFT's own loader would accept flipped bytes or an edited ``lora_alpha``)."""
    if _PEFT_CHECKSUM in metadata and tensors_sha256(tensors) != metadata[_PEFT_CHECKSUM]:
        raise ValueError(f"{folder / PEFT_WEIGHTS} does not match the checksum torchdora recorded when saving it: "
                         "the file changed on disk (corrupt or edited); save the adapter again")
    if _PEFT_RECORD in metadata:
        recorded = json.loads(metadata[_PEFT_RECORD])
        changed = [f"{k}={peft_config.get(k)!r} (saved with {v!r})" for k, v in recorded.items()
                   if peft_config.get(k) != v]
        if changed:
            raise ValueError(f"{folder / PEFT_CONFIG} was edited after saving: {', '.join(changed)}; these change "
                             "what the adapter computes. Restore the saved values")


# ---- torchdora format --------------------------------------------------------------------------------------
def _kind(layer: AdapterLayer) -> str:
    if isinstance(layer, ConvAdapter):
        return "conv"
    if isinstance(layer, EmbeddingAdapter):
        return "embedding"
    return "conv1d" if getattr(layer, "fan_in_fan_out", False) else "linear"


def _modules_to_save(model: nn.Module, config: DoraConfig) -> dict[str, nn.Module]:
    if not config.modules_to_save:
        return {}
    return {n: m for n, m in model.named_modules() if n and module_matches(n, config.modules_to_save)}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors under torchdora's stable keys (independent of attribute names)."""
    out: dict[str, Tensor] = {}
    for name, layer in adapter_layers(model).items():
        for key, tensor in layer.adapter_parameters().items():
            out[f"{name}.{key}"] = tensor
    projection = shared_projection(adapter_layers(model).values())
    if projection is not None:
        out.update(vera_A=projection.vera_A, vera_B=projection.vera_B)
    for name, module in _modules_to_save(model, adapter_config(model)).items():
        for pname, tensor in module.state_dict().items():
            out[f"{SAVE_PREFIX}{name}.{pname}"] = tensor
    return out


def _module_info(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "kind": _kind(layer),
            "r": layer.r,
            "alpha": layer.lora_alpha,
            "scaling": layer.scaling,
            "use_dora": layer.use_dora,
            "magnitude_only": layer.magnitude_only,
            "weight_shape": list(layer.base.weight.shape),
        }
        for name, layer in adapter_layers(model).items()
    }


def _check_not_merged(model: nn.Module) -> None:
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise RuntimeError("the adapters are merged; call torchdora.unmerge(model) before saving or loading them")


def save_adapter(
    model: nn.Module, path: str | os.PathLike, format: Format = "torchdora",
    base_model_name_or_path: str | None = None, adapter_name: str | Sequence[str] | None = None,
) -> Path:
    """Save ``model``'s adapters (and ``modules_to_save``) to the folder ``path``; returns the folder.

    ``adapter_name``: the named adapter(s) to save (default: all). PEFT's multi-adapter layout: the adapter
    ``"default"`` goes to ``path`` itself, any other adapter ``name`` to ``path/name/``, in either format.
    """
    names = list_adapters(model) if adapter_name is None else (
        [adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
    folder = Path(path)
    for name in names:
        with using_adapter(model, name):
            _save_one(model, folder if name == DEFAULT_ADAPTER else folder / name, format, base_model_name_or_path)
    return folder


def recorded_name(model: nn.Module) -> str | None:
    """Where ``model`` was loaded from: an existing local folder as an absolute path, else the hub name."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name)


def _save_one(model: nn.Module, path: Path, format: Format, base_model_name_or_path: str | None) -> Path:
    """Save the model's one adapter (see :func:`save_adapter`).

    ``format="peft"`` writes PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` so that
    ``peft.PeftModel.from_pretrained`` loads it. Tensors are saved in fp32. ``base_model_name_or_path``
    defaults to where a transformers model was loaded from (a local folder as its absolute path).

    The folder is written beside ``path`` and swapped in (:func:`torchdora.files.staged_dir`; files of other
    formats already there are kept), so a kill at any point leaves the previous adapter or the new one. The
    torchdora config also records the weights file's SHA-256, so weights and config from two saves are detected
    on load. Under torch.distributed every rank must call this (FSDP2-sharded tensors are gathered); only rank 0
    writes.
    """
    from torchdora.distributed import full_tensor, is_main_process

    config = adapter_config(model)
    _check_not_merged(model)
    base_model_name_or_path = base_model_name_or_path or recorded_name(model)
    if format not in ("torchdora", "peft"):
        raise ValueError(f"format must be 'torchdora' or 'peft', got format={format!r}")
    folder = Path(path)
    tensors = {}
    for key, value in adapter_state_dict(model).items():
        value = full_tensor(value.detach())
        tensors[key] = value.float() if value.is_floating_point() else value
    if not is_main_process():
        return folder
    with staged_dir(folder, keep=True) as tmp:
        if format == "torchdora":
            header = {
                "format": "torchdora-adapter",
                "format_version": FORMAT_VERSION,
                "config": config.to_dict(),
                "modules": _module_info(model),
                "base_model_name_or_path": base_model_name_or_path,
                "base_fingerprint": base_fingerprint(model),
            }
            atomic_save_safetensors(tensors, tmp / TORCHDORA_WEIGHTS,
                                    {"format": "torchdora-adapter", "format_version": str(FORMAT_VERSION)})
            header["weights_sha256"] = file_sha256(tmp / TORCHDORA_WEIGHTS)
            atomic_write_json(tmp / TORCHDORA_CONFIG, header)
        else:
            peft_config, peft_tensors = to_peft(model, config, tensors, base_model_name_or_path)
            record = {k: peft_config.get(k) for k in _PEFT_MATH_FIELDS}
            atomic_save_safetensors(peft_tensors, tmp / PEFT_WEIGHTS,
                                    {"format": "pt", _PEFT_CHECKSUM: tensors_sha256(peft_tensors),
                                     _PEFT_RECORD: json.dumps(record, sort_keys=True),
                                     _PEFT_FINGERPRINT: json.dumps(base_fingerprint(model))})
            atomic_write_json(tmp / PEFT_CONFIG, peft_config)
    return folder


def read_adapter(path: str | os.PathLike) -> tuple[DoraConfig, dict[str, Tensor], Format]:
    """Read an adapter folder of either format: ``(config, torchdora-keyed tensors, format)``. No model needed."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} not found")
    if (folder / TORCHDORA_CONFIG).is_file():
        header = _read_json(folder / TORCHDORA_CONFIG)
        if header.get("format") != "torchdora-adapter":
            raise ValueError(f"{folder / TORCHDORA_CONFIG} is not a torchdora adapter config (format={header.get('format')!r})")
        version = header.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{folder} was written in adapter format version {version!r}, newer than this torchdora "
                f"supports ({FORMAT_VERSION}); upgrade torchdora to load it"
            )
        if not isinstance(header.get("config"), dict):
            raise ValueError(f"{folder / TORCHDORA_CONFIG} has no 'config' object; the adapter folder is corrupt, save it again")
        config = DoraConfig.from_dict(header["config"])
        tensors, _ = _read_safetensors(folder / TORCHDORA_WEIGHTS)
        expected_sha = header.get("weights_sha256")
        if expected_sha is not None and file_sha256(folder / TORCHDORA_WEIGHTS) != expected_sha:
            raise ValueError(
                f"{folder / TORCHDORA_WEIGHTS} does not match {TORCHDORA_CONFIG} (checksum differs): the save was "
                "interrupted or the files come from different adapters; save the adapter again"
            )
        _check_recorded_scaling(folder, config, header.get("modules"))
        return config, tensors, "torchdora"
    if (folder / PEFT_CONFIG).is_file():
        peft_config = _read_json(folder / PEFT_CONFIG)
        tensors, metadata = _read_safetensors(folder / PEFT_WEIGHTS)
        _check_peft_record(folder, peft_config, tensors, metadata)
        config, tensors = from_peft(peft_config, tensors)
        return config, tensors, "peft"
    raise FileNotFoundError(
        f"{folder} holds no adapter: expected {TORCHDORA_CONFIG} (torchdora) or {PEFT_CONFIG} (PEFT)"
    )


def _check_recorded_scaling(folder: Path, config: DoraConfig, modules: Any) -> None:
    """The config must give each module the ``r``/``alpha`` recorded beside it at save time (its scale)."""
    if not isinstance(modules, dict):
        return
    wrong = []
    for name, info in modules.items():
        if not isinstance(info, dict) or "r" not in info or "alpha" not in info:
            continue
        now = (config.rank_for(name), config.alpha_for(name))
        if now[0] != info["r"] or not math.isclose(now[1], info["alpha"], rel_tol=1e-9):
            wrong.append(f"{name} (config: r={now[0]}, alpha={now[1]:g}; saved r={info['r']}, alpha={info['alpha']:g})")
    if wrong:
        raise ValueError(f"{folder / TORCHDORA_CONFIG} was edited after saving: its r/alpha differ from those each "
                         f"module was trained with: {', '.join(wrong[:5])}. Restore the saved values")


def _like(source: Tensor, target: Tensor) -> Tensor:
    """``source`` in ``target``'s dtype and device; sharded like ``target`` when that is an FSDP2 ``DTensor``."""
    source = source.to(dtype=target.dtype, device=target.device)
    placements = getattr(target, "placements", None)
    if placements is not None:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(source, target.device_mesh, placements)
    return source


def _base_layer_tensors(model: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The base parameters of adapted modules that a PEFT file carries (``base_layer.<module>.<param>`` keys).

    PEFT saves an adapted embedding's or ``lm_head``'s base weight by default and loads it back into the base
    layer (it may have been resized); so does torchdora. Only keys the file has are expected.
    """
    out = {}
    for name, layer in adapter_layers(model).items():
        for pname, param in layer.base.named_parameters():
            key = f"{BASE_LAYER_PREFIX}{name}.{pname}"
            if key in tensors:
                out[key] = param
    return out


def _load_tensors(model: nn.Module, tensors: Mapping[str, Tensor], source: Path) -> None:
    expected = adapter_state_dict(model)
    expected.update(_base_layer_tensors(model, tensors))
    for key in PROJECTION_KEYS:
        if key not in tensors:
            expected.pop(key, None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mis_shaped = sorted(
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape
    )
    if missing or unexpected or mis_shaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
            if keys:
                shown = ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")
                parts.append(f"{label} keys: {shown}")
        raise ValueError(
            f"adapter {source} does not fit this model; " + "; ".join(parts)
            + ". Load it into the base model it was trained on"
        )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(_like(tensors[key], target))


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                 base_mismatch: Literal["warn", "error", "ignore"] = "warn") -> DoraConfig:
    """Load an adapter folder (torchdora or PEFT format, detected) into ``model``; returns its config.

    ``adapter_name`` (default ``"default"``): the name it gets. If ``model`` has no adapters yet they are
    injected from the saved config first; if it has others, the adapter is added under that name
    (:func:`torchdora.add_adapter`, inactive until :func:`torchdora.set_adapter`); if it has one by that name,
    its scaling (``alpha / r``) must match the file's. Every key is checked before anything is copied: on a
    mismatch the model is left as it was.

    ``base_mismatch``: what to do when the adapted base weights differ from those the adapter was trained on (by
    more than 1 %, estimated from the fingerprint saved with it): a DoRA magnitude is absolute, so the same
    adapter on other weights is another model. ``"warn"`` (default) says by how much, ``"error"`` refuses (the
    model is left as it was), ``"ignore"`` loads silently.
    """
    if base_mismatch not in ("warn", "error", "ignore"):
        raise ValueError(f"base_mismatch must be 'warn', 'error' or 'ignore', got {base_mismatch!r}")
    name = DEFAULT_ADAPTER if adapter_name is None else check_adapter_name(adapter_name)
    folder = Path(path)
    config, tensors, _ = read_adapter(folder)
    created = None
    flags = [(p, p.requires_grad) for p in model.parameters()]
    if state_of(model) is None:
        inject(model, config, adapter_name=name)
        created = "injected"
    elif name not in list_adapters(model):
        add_adapter(model, name, config)
        created = "added"
    else:
        with using_adapter(model, name):
            _check_not_merged(model)
            _check_scaling(model, config, folder)
    try:
        with using_adapter(model, name):
            _load_tensors(model, tensors, folder)
            problem = base_difference(model, recorded_fingerprint(folder))
        if problem and base_mismatch == "error":
            raise ValueError(f"adapter {folder} was trained on other base weights: {problem}. Load it onto the base "
                             "it records, or pass base_mismatch='warn' or 'ignore' to load it anyway")
    except BaseException:
        if created == "injected":  # leave the model as it was, trainable flags included
            unload(model)
            for p, flag in flags:
                p.requires_grad_(flag)
        elif created == "added":
            delete_adapter(model, name)
        raise
    if problem and base_mismatch == "warn":
        warnings.warn(f"adapter {folder} was trained on other base weights: {problem}. DoRA's magnitudes are "
                      "absolute, so on these weights it is another model. Load it onto the base it records "
                      "(base_mismatch='ignore' silences this, 'error' refuses)", stacklevel=2)
    return config


# ---- the base an adapter belongs to ------------------------------------------------------------------------
_PEFT_FINGERPRINT = "torchdora_base_fingerprint"


def recorded_fingerprint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The base fingerprint an adapter folder records (either format), or ``None`` (older files, other tools)."""
    folder = Path(path)
    try:
        if (folder / TORCHDORA_CONFIG).is_file():
            found = _read_json(folder / TORCHDORA_CONFIG).get("base_fingerprint")
        else:
            with safe_open(folder / PEFT_WEIGHTS, framework="pt") as f:
                found = json.loads((f.metadata() or {}).get(_PEFT_FINGERPRINT, "null"))
    except (OSError, ValueError, SafetensorError):
        return None
    return found if isinstance(found, dict) and found.get("kind") == FINGERPRINT_KIND else None


def _check_scaling(model: nn.Module, config: DoraConfig, source: Path) -> None:
    """Refuse a file whose ``alpha``/``r``/rsLoRA give a different scale ``s`` than the model's adapters use.

    Tensors of the same shape would load, but the adapter would compute something other than what was trained.
    """
    wrong = []
    for name, layer in adapter_layers(model).items():
        if layer.magnitude_only:  # no s·B·A term
            continue
        if config.use_vera:  # VeRA has no scale
            want = 1.0
        else:
            want = lora_scaling(config.rank_for(name), config.alpha_for(name), config.use_rslora)
        if not math.isclose(layer.scaling, want, rel_tol=1e-6):
            wrong.append(f"{name} (file {want:g}, model {layer.scaling:g})")
    if wrong:
        shown = ", ".join(wrong[:10]) + (f" (+{len(wrong) - 10} more)" if len(wrong) > 10 else "")
        raise ValueError(
            f"adapter {source} was trained with a different LoRA scaling (alpha / r) than this model's adapters: "
            f"{shown}. Load it into a model without adapters, and it injects its own"
        )
