"""Translation between torchdora's adapter keys and PEFT's adapter file format (REFERENCE §5).

PEFT keys carry the prefix ``base_model.model.`` and no adapter name:
``<m>.lora_A.weight`` / ``<m>.lora_B.weight`` (Linear, Conv1D, Conv), ``<m>.lora_embedding_A`` /
``<m>.lora_embedding_B`` (Embedding), ``<m>.lora_magnitude_vector`` (``(out,)``; Conv ``(1, out, 1, ...)``),
and ``<m>.<param>`` for ``modules_to_save``.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from torchdora.config import DoraConfig
from torchdora.inject import adapter_layers
from torchdora.layers import ConvAdapter, EmbeddingAdapter

__all__ = ["to_peft", "from_peft"]

from torchdora.io import PEFT_PREFIX as PREFIX  # noqa: E402
from torchdora.io import SAVE_PREFIX  # noqa: E402  (io imports this module lazily)
# torchdora key suffix -> PEFT key suffix, per layer kind
_LINEAR_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_EMBEDDING_KEYS = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B", "magnitude": "lora_magnitude_vector"}
# PEFT config fields this module cannot honour, with the value that means "unused"
_UNSUPPORTED = {"layers_to_transform": None, "layers_pattern": None, "bias": "none", "lora_bias": False,
                "use_qalora": False, "target_parameters": None}


def to_peft(
    model: nn.Module, config: DoraConfig, tensors: Mapping[str, Tensor], base_model_name_or_path: str | None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PEFT's ``adapter_config.json`` dict and ``adapter_model.safetensors`` tensors for ``model``'s adapters."""
    layers = adapter_layers(model)
    magnitude_only = [n for n, layer in layers.items() if layer.magnitude_only]
    if magnitude_only:
        raise ValueError(
            f"PEFT's format has no magnitude-only modules ({magnitude_only[:4]}); save with format='torchdora'"
        )
    out: dict[str, Tensor] = {}
    for name, layer in layers.items():
        keys = _EMBEDDING_KEYS if isinstance(layer, EmbeddingAdapter) else _LINEAR_KEYS
        for ours, theirs in keys.items():
            if f"{name}.{ours}" not in tensors:
                continue
            tensor = tensors[f"{name}.{ours}"]
            if ours == "magnitude" and isinstance(layer, ConvAdapter):
                tensor = tensor.view(1, -1, *([1] * (layer.base.weight.dim() - 2)))
            out[f"{PREFIX}{name}.{theirs}"] = tensor
    for key, tensor in tensors.items():
        if key.startswith(SAVE_PREFIX):
            out[PREFIX + key[len(SAVE_PREFIX):]] = tensor
    fan_in_fan_out = any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values())
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_dora": config.use_dora,
        "use_rslora": config.use_rslora,
        # the exact adapted names, so PEFT selects the same modules whatever its matching rules
        "target_modules": sorted(layers),
        "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "modules_to_save": list(config.modules_to_save) or None,
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return peft_config, out


def from_peft(peft_config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> tuple[DoraConfig, dict[str, Tensor]]:
    """A :class:`DoraConfig` and torchdora-keyed tensors from a PEFT LoRA/DoRA adapter."""
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(f"only PEFT LoRA/DoRA adapters can be loaded, got peft_type={peft_config.get('peft_type')!r}")
    for field, unused in _UNSUPPORTED.items():
        value = peft_config.get(field, unused)
        if value not in (unused, None, False, "none"):
            raise ValueError(f"PEFT adapter option {field}={value!r} is not supported by torchdora")
    targets = peft_config.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(targets)
    init = peft_config.get("init_lora_weights", True)
    config = DoraConfig(
        r=int(peft_config["r"]),
        alpha=float(peft_config.get("lora_alpha", 8)),
        dropout=float(peft_config.get("lora_dropout", 0.0)),
        target_modules=targets,
        exclude_modules=tuple(peft_config.get("exclude_modules") or ())
        if not isinstance(peft_config.get("exclude_modules"), str) else peft_config["exclude_modules"],
        rank_pattern=dict(peft_config.get("rank_pattern") or {}),
        alpha_pattern=dict(peft_config.get("alpha_pattern") or {}),
        use_dora=bool(peft_config.get("use_dora", False)),
        use_rslora=bool(peft_config.get("use_rslora", False)),
        init="gaussian" if init == "gaussian" else "kaiming",
        modules_to_save=tuple(peft_config.get("modules_to_save") or ()),
    )
    reverse = {theirs: mine for keys in (_LINEAR_KEYS, _EMBEDDING_KEYS) for mine, theirs in keys.items()}
    ours: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"unexpected key {key!r} in PEFT adapter: every key should start with {PREFIX!r}")
        key = key[len(PREFIX):]
        for theirs, mine in reverse.items():
            if key.endswith("." + theirs):
                module = key[: -len(theirs) - 1]
                ours[f"{module}.{mine}"] = tensor.flatten() if mine == "magnitude" else tensor
                break
        else:
            ours[SAVE_PREFIX + key] = tensor
    return config, ours
