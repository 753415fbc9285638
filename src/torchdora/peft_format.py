"""Translation between torchdora's adapter keys and PEFT's adapter file format (``docs/formats.md``).

PEFT keys carry the prefix ``base_model.model.`` and no adapter name:
``<m>.lora_A.weight`` / ``<m>.lora_B.weight`` (Linear, Conv1D, Conv), ``<m>.lora_embedding_A`` /
``<m>.lora_embedding_B`` (Embedding), ``<m>.lora_magnitude_vector`` (``(out,)``; Conv ``(1, out, 1, ...)``),
and ``<m>.<param>`` for ``modules_to_save``. PEFT also saves the base weight of an adapted embedding or
``lm_head`` (``<m>.base_layer.weight``, its ``save_embedding_layers="auto"`` default): read back as
``base_layer.<m>.weight`` and loaded into the base module, as PEFT loads it.

On the way in, every PEFT ``LoraConfig`` option that changes the computation and that torchdora does not
implement is refused by name (:func:`check_peft_options`); on the way out, ``task_type`` is inferred from the
model's class (:func:`infer_task_type`) so that ``AutoPeftModelFor...`` and transformers' ``from_pretrained`` of the
folder find the right model class.

VeRA (``peft_type: "VERA"``, Kopiczko et al., ICLR 2024): ``base_model.model.<m>.vera_lambda_d`` ``(r,)`` and
``.vera_lambda_b`` ``(out,)`` per module, and the shared pair once as ``base_model.vera_A`` ``(r, max in)`` and
``base_model.vera_B`` ``(max out, r)`` (absent when saved with ``save_projection=False``: then it is drawn again
from ``projection_prng_key``). DVoRA has no PEFT format (PEFT has no DVoRA); it is saved in torchdora's.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from torchdora.config import DoraConfig
from torchdora.layers import ConvAdapter, EmbeddingAdapter
from torchdora.state import adapter_layers

__all__ = ["to_peft", "from_peft", "infer_task_type", "check_peft_options", "BASE_LAYER_PREFIX", "PEFT_PREFIX",
           "SAVE_PREFIX"]

#: prefix of every key in a PEFT adapter file
PEFT_PREFIX = PREFIX = "base_model.model."
#: torchdora key prefix of a ``modules_to_save`` tensor (PEFT: the module's own key under :data:`PEFT_PREFIX`)
SAVE_PREFIX = "modules_to_save."
# torchdora key suffix -> PEFT key suffix, per layer kind
_LINEAR_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_EMBEDDING_KEYS = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B", "magnitude": "lora_magnitude_vector"}
# The magnitude is written twice: PEFT's own key, and this one, which transformers 5's adapter loading
# (``AutoModelFor....from_pretrained(adapter_folder)``) needs: it maps PEFT's key to a name that does not exist and
# silently re-initialises the magnitude. PEFT reads either (same tensor), older PEFT ignores the extra key.
_MAGNITUDE_ALIAS = "lora_magnitude_vector.weight"
#: torchdora key prefix of a PEFT-saved base weight of an adapted module (``<m>.base_layer.<param>`` in PEFT)
BASE_LAYER_PREFIX = "base_layer."

# ---- PEFT LoraConfig options ---------------------------------------------------------------------------------
# Every field of peft 0.21's LoraConfig is in exactly one of these tables (tests/test_peft_oracle.py checks this
# against the installed peft). A field in neither (a newer peft) is accepted only at a value that means "off".
#: bookkeeping, or options whose effect torchdora reproduces (targets, rank/alpha, rsLoRA, DoRA, dropout, ...)
PEFT_OPTIONS_HONOURED = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "use_rslora",
    "modules_to_save", "rank_pattern", "alpha_pattern", "use_dora", "layers_to_transform", "layers_pattern",
    # PEFT switches it per module to match the layer type (on for Conv1D); torchdora reads the type itself
    "fan_in_fan_out",
    # only sets how A and B start (the file holds the trained values); base-changing inits are refused below
    "init_lora_weights", "eva_config",
    # meaningful only with use_qalora (refused), or at run time only (not saved by PEFT)
    "qalora_group_size", "runtime_config", "megatron_core",
})
#: option -> its "off" value: any other value changes the computation in a way torchdora does not implement
PEFT_OPTIONS_REFUSED: dict[str, Any] = {
    "bias": "none", "lora_bias": False, "use_qalora": False, "target_parameters": None,
    "megatron_config": None, "trainable_token_indices": None, "loftq_config": {}, "corda_config": None,
    "lora_ga_config": None, "velora_config": None, "alora_invocation_tokens": None, "monteclora_config": None,
    "layer_replication": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "ensure_weight_tying": False,
}
#: ``init_lora_weights`` values that also rewrite the base weight (the adapter is relative to that new base)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _is_off(value: Any, off: Any) -> bool:
    return value == off or value in (None, False, "none", {}, [])


def check_peft_options(peft_config: Mapping[str, Any]) -> None:
    """Refuse a PEFT LoRA config that uses an option torchdora does not implement, naming the option.

    Loading such an adapter as plain LoRA/DoRA would give wrong outputs without an error.
    """
    for field, off in PEFT_OPTIONS_REFUSED.items():
        value = peft_config.get(field, off)
        if not _is_off(value, off):
            raise ValueError(f"PEFT adapter option {field}={value!r} is not supported by torchdora; load this "
                             f"adapter with peft, or train it without {field}")
    init = peft_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"PEFT adapter option init_lora_weights={init!r} is not supported by torchdora: this adapter is relative "
            "to a rewritten base weight. Convert it to plain LoRA with peft (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) first"
        )
    known = PEFT_OPTIONS_HONOURED | set(PEFT_OPTIONS_REFUSED)
    unknown = {k: v for k, v in peft_config.items() if k not in known and not _is_off(v, None)}
    if unknown:
        raise ValueError(f"PEFT adapter options {unknown} are unknown to torchdora (a newer peft?); they may change "
                         "the computation, so the adapter is refused. Load it with peft")


# PEFT task types (peft.TaskType), in the order a model class is looked up in transformers' auto mappings
_TASK_MAPPINGS = (
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES"),
)


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``model``'s class (``"CAUSAL_LM"`` for ``LlamaForCausalLM``), or ``None``.

    ``None`` for a class PEFT has no task type for (ViT image classification, LLaVA); PEFT then finds the class
    through ``auto_mapping`` (see :func:`to_peft`).
    """
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # transformers is optional: a plain nn.Module has no task type anyway
        return None
    names = {cls.__name__ for cls in type(model).__mro__}
    for task, mapping in _TASK_MAPPINGS:
        for value in getattr(modeling_auto, mapping, {}).values():
            if names & ({value} if isinstance(value, str) else set(value)):
                return task
    return None


def _auto_mapping(model: nn.Module) -> dict[str, str] | None:
    """PEFT's ``auto_mapping`` (what ``AutoPeftModel`` imports when there is no task type), for transformers classes."""
    module = type(model).__module__
    if not module.startswith("transformers."):
        return None
    return {"base_model_class": type(model).__name__, "parent_library": module}


def to_peft(
    model: nn.Module, config: DoraConfig, tensors: Mapping[str, Tensor], base_model_name_or_path: str | None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PEFT's ``adapter_config.json`` dict and ``adapter_model.safetensors`` tensors for ``model``'s adapters.

    ``task_type`` is :func:`infer_task_type` of ``model``; without one, ``auto_mapping`` names the model class.
    """
    if config.use_vera:
        return _to_peft_vera(model, config, tensors, base_model_name_or_path)
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
            if ours == "magnitude":
                out[f"{PREFIX}{name}.{_MAGNITUDE_ALIAS}"] = tensor.clone()  # safetensors refuses shared memory
    for key, tensor in tensors.items():
        if key.startswith(SAVE_PREFIX):
            out[PREFIX + key[len(SAVE_PREFIX):]] = tensor
    fan_in_fan_out = any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values())
    task_type = infer_task_type(model)
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "auto_mapping": None if task_type else _auto_mapping(model),
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
    """A :class:`DoraConfig` and torchdora-keyed tensors from a PEFT LoRA/DoRA or VeRA adapter."""
    if peft_config.get("peft_type") == "VERA":
        return _from_peft_vera(peft_config, tensors)
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(f"only PEFT LoRA/DoRA and VeRA adapters can be loaded, got peft_type={peft_config.get('peft_type')!r}")
    check_peft_options(peft_config)
    targets = peft_config.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(targets)
    if peft_config.get("layers_to_transform") is not None or peft_config.get("layers_pattern"):
        # PEFT narrowed its targets to some layers: the adapted modules are exactly those the file has weights for
        targets = _adapted_modules(tensors)
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
    reverse = {_MAGNITUDE_ALIAS: "magnitude", **reverse}  # the longer suffix first
    ours: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"unexpected key {key!r} in PEFT adapter: every key should start with {PREFIX!r}")
        key = key[len(PREFIX):]
        module, dot, param = key.rpartition(".")
        if module.endswith(".base_layer"):  # an adapted embedding/lm_head's base weight, saved by PEFT's default
            ours[f"{BASE_LAYER_PREFIX}{module[: -len('.base_layer')]}.{param}"] = tensor
            continue
        for theirs, mine in reverse.items():
            if key.endswith("." + theirs):
                module = key[: -len(theirs) - 1]
                ours[f"{module}.{mine}"] = tensor.flatten() if mine == "magnitude" else tensor
                break
        else:
            ours[SAVE_PREFIX + key] = tensor
    return config, ours


def _adapted_modules(tensors: Mapping[str, Tensor]) -> tuple[str, ...]:
    """Dotted names of the modules a PEFT file holds LoRA weights for, as exact-match targets."""
    suffixes = (".lora_A.weight", ".lora_embedding_A", ".lora_magnitude_vector")
    names = {key[len(PREFIX):].rsplit(suffix, 1)[0] for key in tensors for suffix in suffixes if key.endswith(suffix)}
    return tuple(sorted(names))


# ---- VeRA ------------------------------------------------------------------------------------------------
_VERA_KEYS = ("vera_lambda_d", "vera_lambda_b")  # the same names in both formats
_VERA_SHARED = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}
# PEFT VeraConfig fields torchdora cannot honour, with the value that means "unused"
_VERA_UNSUPPORTED = {"layers_to_transform": None, "layers_pattern": None, "bias": "none", "init_weights": True}
# VeraConfig fields (peft 0.21) that torchdora reads or that do not change the computation
_VERA_HONOURED = {"peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
                  "peft_version", "r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout",
                  "d_initial", "fan_in_fan_out", "modules_to_save"}


def _to_peft_vera(
    model: nn.Module, config: DoraConfig, tensors: Mapping[str, Tensor], base_model_name_or_path: str | None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PEFT ``VeraConfig`` dict and tensors (``save_projection=True``: the shared pair goes with the file)."""
    if config.use_dora:
        raise ValueError(
            "PEFT has no DVoRA (VeRA with DoRA's magnitude), so there is no PEFT file for it; save with "
            "format='torchdora', or train with use_dora=False for a PEFT VeRA adapter"
        )
    layers = adapter_layers(model)
    out = {theirs: tensors[ours] for ours, theirs in _VERA_SHARED.items()}
    for name in layers:
        for key in _VERA_KEYS:
            out[f"{PREFIX}{name}.{key}"] = tensors[f"{name}.{key}"]
    for key, tensor in tensors.items():
        if key.startswith(SAVE_PREFIX):
            out[PREFIX + key[len(SAVE_PREFIX):]] = tensor
    peft_config = {
        "peft_type": "VERA",
        "task_type": infer_task_type(model),
        "auto_mapping": None if infer_task_type(model) else _auto_mapping(model),
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": config.r,
        "target_modules": sorted(layers),  # the exact adapted names, whatever PEFT's matching rules
        "projection_prng_key": config.projection_prng_key,
        "save_projection": True,
        "vera_dropout": config.dropout,
        "d_initial": config.d_initial,
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values()),
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return peft_config, out


def _from_peft_vera(peft_config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> tuple[DoraConfig, dict[str, Tensor]]:
    """A VeRA :class:`DoraConfig` (``use_vera=True, use_dora=False``) and torchdora-keyed tensors."""
    for field, unused in _VERA_UNSUPPORTED.items():
        value = peft_config.get(field, unused)
        if value != unused and value is not None:
            raise ValueError(f"PEFT VeRA adapter option {field}={value!r} is not supported by torchdora; load this "
                             "adapter with peft")
    unknown = {k: v for k, v in peft_config.items()
               if k not in _VERA_HONOURED | set(_VERA_UNSUPPORTED) and not _is_off(v, None)}
    if unknown:
        raise ValueError(f"PEFT VeRA adapter options {unknown} are unknown to torchdora (a newer peft?); they may "
                         "change the computation, so the adapter is refused. Load it with peft")
    targets = peft_config.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(targets)
    if targets is None:
        raise ValueError("the PEFT VeRA adapter names no target_modules; torchdora needs the adapted module names")
    config = DoraConfig(
        r=int(peft_config.get("r", 256)),
        dropout=float(peft_config.get("vera_dropout", 0.0)),
        target_modules=targets,
        use_dora=False,
        use_vera=True,
        d_initial=float(peft_config.get("d_initial", 0.1)),
        projection_prng_key=int(peft_config.get("projection_prng_key", 0)),
        modules_to_save=tuple(peft_config.get("modules_to_save") or ()),
    )
    shared = {theirs: ours for ours, theirs in _VERA_SHARED.items()}
    ours: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        if key in shared:
            ours[shared[key]] = tensor
            continue
        if not key.startswith(PREFIX):
            raise ValueError(f"unexpected key {key!r} in PEFT VeRA adapter: keys start with {PREFIX!r} or are "
                             f"{sorted(shared)}")
        key = key[len(PREFIX):]
        if key.rsplit(".", 1)[-1] in _VERA_KEYS:
            ours[key] = tensor
        else:
            ours[SAVE_PREFIX + key] = tensor
    return config, ours
