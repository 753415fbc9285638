"""Hugging Face round trips: ``save_pretrained``, ``Trainer`` checkpoints and one-call loading.

After :func:`torchdora.inject` on a transformers model, ``model.save_pretrained(folder)`` saves only the adapter,
as a PEFT model does, so every Hugging Face save path (``save_pretrained``, ``Trainer.save_model``, ``Trainer``
checkpoints) writes a folder that gives back the trained model:

- ``adapter_config.json`` + ``adapter_model.safetensors``: PEFT's format, with the model's ``task_type`` and the
  base it was loaded from. ``peft.AutoPeftModelFor...`` / ``PeftModel.from_pretrained`` and transformers'
  ``AutoModelFor....from_pretrained(folder)`` (which loads the recorded base, then the adapter through PEFT) read it.
  Not written when PEFT cannot express the adapter (magnitude-only modules).
- ``torchdora_config.json`` + ``torchdora_adapter.safetensors``: torchdora's own format, read first by
  :func:`torchdora.load_adapter` and :func:`load_model`.
- ``model.safetensors``: the adapter tensors (and ``modules_to_save``) under the model's own state-dict keys, which
  is what ``Trainer(resume_from_checkpoint=...)`` loads into the live model (``load_state_dict(strict=False)``).

The folder has no ``config.json`` on purpose: ``from_pretrained`` of it then either follows
``adapter_config.json`` to the recorded base, or fails loudly; it can never load a partial model with
re-initialised layers.
"""

from __future__ import annotations

import json
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torchdora.distributed import is_main_process as main_rank
from torchdora.files import atomic_save_safetensors
from torchdora.io import (
    PEFT_CONFIG,
    TORCHDORA_CONFIG,
    adapter_state_dict,
    load_adapter,
    read_adapter,
    recorded_name,
    save_adapter,
)
from torchdora.layers import VeraAdapter
from torchdora.state import adapter_layers, on_adapters_added

__all__ = ["save_pretrained", "load_model", "adapter_base_model", "recorded_name", "local_base", "attach", "detach"]

#: the file ``Trainer`` reloads on resume (transformers' ``SAFE_WEIGHTS_NAME``)
RESUME_WEIGHTS = "model.safetensors"


def _is_transformers_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # a transformers model means transformers is imported
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def attach(model: nn.Module) -> None:
    """Give an injected transformers model torchdora's :func:`save_pretrained` and tolerate adapter-only loads.

    Runs when a model gains its first adapter (registered with :func:`torchdora.state.on_adapters_added` below);
    a no-op for other modules. The instance attribute shadows the class's
    ``save_pretrained``; :func:`detach` (called by ``unload``/``merge_and_unload``) restores it.
    """
    if not _is_transformers_model(model) or _adapter_only_load in model._load_state_dict_post_hooks.values():
        return
    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.register_load_state_dict_post_hook(_adapter_only_load)


def detach(model: nn.Module) -> None:
    """Undo :func:`attach`: the class's own ``save_pretrained`` (full model) and strict loads again."""
    # found by value rather than through a kept handle, which a deep copy of the model would share
    hooks = model._load_state_dict_post_hooks
    for key in [k for k, hook in hooks.items() if hook is _adapter_only_load]:
        del hooks[key]
    model.__dict__.pop("save_pretrained", None)


def _adapter_keys(model: nn.Module) -> dict[str, Tensor]:
    """The model's state-dict names of its adapter tensors (and ``modules_to_save``), found by tensor memory.

    By memory rather than by attribute names, so the keys stay right whatever the layers call their parameters
    (``adapter_state_dict`` returns detached views of ``modules_to_save`` tensors: same memory, other objects).
    """
    def where(t: Tensor) -> tuple:
        return t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())

    wanted = {where(t) for t in adapter_state_dict(model).values()}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if where(v) in wanted}


def _adapter_only_load(model: nn.Module, incompatible: Any) -> None:
    """``load_state_dict`` post-hook: a state dict holding every adapter tensor may leave out the frozen base.

    That is the checkpoint :func:`save_pretrained` writes for ``Trainer`` resume; the base stays as built.
    Any other incomplete state dict is reported as before (missing keys stay listed).
    """
    adapter_keys = _adapter_keys(model)
    if not adapter_keys or any(k in adapter_keys for k in incompatible.missing_keys):
        return
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k in adapter_keys]


def save_pretrained(
    self: nn.Module,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    state_dict: dict[str, Tensor] | None = None,
    push_to_hub: bool = False,
    base_model_name_or_path: str | None = None,
    **kwargs: Any,
) -> None:
    """Save only the adapter of an injected model (PEFT + torchdora formats, and the resume tensors).

    Replaces ``PreTrainedModel.save_pretrained`` on injected models (see the module docstring), so
    ``Trainer.save_model`` and ``Trainer`` checkpoints go through it. ``base_model_name_or_path`` defaults to where
    the model was loaded from (an absolute path for a local folder). ``state_dict`` (passed by ``Trainer`` when it
    gathers a sharded model) is ignored: the adapter is read from the model (gathered by :func:`save_adapter`).
    Other ``save_pretrained`` options (``safe_serialization``, ``max_shard_size``) do not apply to an adapter.
    """
    del state_dict, kwargs
    if push_to_hub:
        raise ValueError("push_to_hub=True is not supported for a model with torchdora adapters; save the folder, "
                         "then upload it with huggingface_hub.upload_folder")
    if not is_main_process and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    folder = Path(save_directory)
    base = base_model_name_or_path  # None: save_adapter records where the model was loaded from
    save_adapter(self, folder, base_model_name_or_path=base)
    # PEFT has no magnitude-only modules and no DVoRA (VeRA with DoRA's magnitude)
    if not any(layer.magnitude_only or (isinstance(layer, VeraAdapter) and layer.use_dora)
               for layer in adapter_layers(self).values()):
        save_adapter(self, folder, format="peft", base_model_name_or_path=base)
    else:  # a stale PEFT export from an earlier save would disagree with the torchdora files
        (folder / PEFT_CONFIG).unlink(missing_ok=True)
    if main_rank():
        tensors = {k: v.detach() for k, v in _adapter_keys(self).items()}
        atomic_save_safetensors(tensors, folder / RESUME_WEIGHTS, {"format": "pt", "torchdora": "adapter-only"})


on_adapters_added(attach, detach)


def adapter_base_model(path: str | os.PathLike) -> str | None:
    """The base model an adapter folder records (``base_model_name_or_path``), or ``None``."""
    folder = Path(path)
    for name in (TORCHDORA_CONFIG, PEFT_CONFIG):
        if (folder / name).is_file():
            try:
                value = json.loads((folder / name).read_text()).get("base_model_name_or_path")
            except (json.JSONDecodeError, AttributeError):
                value = None
            if value:
                return str(value)
    return None


def local_base(name: str) -> str:
    """A local copy of the base model ``name`` if an installed resolver knows one (entry points of the group
    ``torchdora.bases``: the application maps its embedded default's hub name to the weights it trained on), else
    ``name``. So adapters of a locally converted model load offline, onto the weights they were trained on."""
    from importlib.metadata import entry_points

    if Path(name).expanduser().exists():
        return name
    for point in entry_points(group="torchdora.bases"):
        try:
            found = point.load()(name)
        except Exception as err:  # a broken plugin must not stop a load that the hub can serve
            warnings.warn(f"torchdora.bases resolver {point.name!r} failed for {name!r}: {err}", stacklevel=2)
            continue
        if found:
            return str(found)
    return name


def _from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """The model class the base was saved as (``config.architectures``), loaded with ``from_pretrained``."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(name_or_path)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ValueError(
            f"cannot tell which model class {name_or_path} holds (config.architectures={architectures!r}); "
            "load the base model yourself and pass it as base="
        )
    return model_class.from_pretrained(name_or_path, **kwargs)


def load_model(
    adapter: str | os.PathLike,
    base: nn.Module | str | os.PathLike | None = None,
    *,
    is_trainable: bool = False,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """A base model with the adapter folder ``adapter`` loaded: one call, for inference by default.

    Args:
        adapter: a folder in torchdora's or PEFT's format (``save_pretrained``, ``save_adapter``, PEFT).
        base: the base model, or its hub name or local folder (loaded with the class its ``config.json`` names);
            ``None``: the base the adapter records. A name with a local copy (:func:`local_base`) loads offline.
        is_trainable: ``False`` (default, as PEFT): every parameter frozen and the model in eval mode. ``True``:
            the adapter (and ``modules_to_save``) trainable, ready to continue training.
        from_pretrained_kwargs: passed to ``from_pretrained`` when ``base`` is a name (``dtype``, ``device_map``).

    Raises:
        FileNotFoundError: no adapter in ``adapter``.
        ValueError: no base given and none recorded, or the adapter does not fit the base.
    """
    read_adapter(adapter)  # a missing or corrupt adapter fails before a base model is loaded
    if base is None:
        base = adapter_base_model(adapter)
        if base is None:
            raise ValueError(f"adapter {adapter} records no base model; pass base= (a model, a name or a folder)")
    model = base if isinstance(base, nn.Module) else _from_pretrained(local_base(str(base)), **from_pretrained_kwargs)
    load_adapter(model, adapter)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model
