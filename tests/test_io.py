"""Adapter files: round trips in both formats, mismatches named key by key, corrupt files, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from torchdora import DoraConfig, adapter_layers, inject, load_adapter, merge, read_adapter, save_adapter
from torchdora.io import (
    FORMAT_VERSION,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    TORCHDORA_CONFIG,
    TORCHDORA_WEIGHTS,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
)

pytestmark = pytest.mark.usefixtures("single_thread")

FORMATS = ["torchdora", "peft"]
WEIGHT_FILE = {"torchdora": TORCHDORA_WEIGHTS, "peft": PEFT_WEIGHTS}
CONFIG_FILE = {"torchdora": TORCHDORA_CONFIG, "peft": PEFT_CONFIG}


def _out(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _saved_adapter(make, tmp_path, fmt, config, perturb, seed=0):
    model = make(seed)
    inject(model, config)
    perturb(model)
    return model, save_adapter(model, tmp_path / "adapter", format=fmt)


# ---- round trips ----------------------------------------------------------------------------------------
ROUND_TRIPS = {
    # Linear (+ Embedding) on Llama, with patterns and a trainable head
    "llama": ("make_tiny_llama", DoraConfig(
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], r=4, alpha=8,
        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, modules_to_save=["lm_head"])),
    "llama_lora_rslora": ("make_tiny_llama", DoraConfig(target_modules="all-linear", use_dora=False,
                                                       use_rslora=True, r=4)),
    "gpt2": ("make_tiny_gpt2", DoraConfig(target_modules=["c_attn", "c_fc"], r=4)),  # transformers Conv1D
    "mixed": ("make_mixed_net", DoraConfig(target_modules=["emb", "conv1", "conv2", "conv3", "head"], r=2)),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_save_load_round_trip(case, fmt, tmp_path, input_ids, perturb, request):
    fixture, config = ROUND_TRIPS[case]
    make = request.getfixturevalue(fixture)
    ids = input_ids % 11 if case == "mixed" else input_ids
    model, folder = _saved_adapter(make, tmp_path, fmt, config, perturb)
    if config.modules_to_save:
        with torch.no_grad():
            model.lm_head.weight.add_(0.5)  # a trained head must travel with the adapter
    folder = save_adapter(model, tmp_path / "adapter", format=fmt)  # overwriting an adapter is allowed
    expected = _out(model, ids)
    fresh = make(0)
    assert not torch.allclose(_out(fresh, ids), expected, rtol=1e-4, atol=1e-5)  # guard: the adapter matters
    loaded_config = load_adapter(fresh, folder)
    assert list(adapter_layers(fresh)) == list(adapter_layers(model))
    # identical tensors (fp32 round trip) and the same modules: outputs agree bit for bit
    assert_close(_out(fresh, ids), expected, rtol=0, atol=0)
    assert loaded_config.use_dora == config.use_dora and loaded_config.use_rslora == config.use_rslora
    for name, layer in adapter_layers(fresh).items():
        assert layer.scaling == adapter_layers(model)[name].scaling
    if fmt == "torchdora":
        assert loaded_config == config


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_into_already_injected_model(fmt, tmp_path, make_tiny_llama, input_ids, perturb):
    config = DoraConfig(target_modules=["q_proj", "v_proj"], r=4)
    model, folder = _saved_adapter(make_tiny_llama, tmp_path, fmt, config, perturb)
    other = make_tiny_llama(0)
    inject(other, config)
    load_adapter(other, folder)
    assert_close(_out(other, input_ids), _out(model, input_ids), rtol=0, atol=0)


def test_files_hold_fp32_tensors_under_stable_keys(tmp_path, make_tiny_llama, perturb):
    model = make_tiny_llama(0)
    inject(model, DoraConfig(target_modules=["model.layers.0.mlp.down_proj"], r=4, dtype="bfloat16"))
    save_adapter(model, tmp_path / "td")
    save_adapter(model, tmp_path / "peft", format="peft")
    td = load_file(tmp_path / "td" / TORCHDORA_WEIGHTS)
    assert sorted(td) == [f"model.layers.0.mlp.down_proj.{k}" for k in ("lora_A", "lora_B", "magnitude")]
    peft = load_file(tmp_path / "peft" / PEFT_WEIGHTS)
    prefix = "base_model.model.model.layers.0.mlp.down_proj."
    assert {k: tuple(v.shape) for k, v in peft.items()} == {
        prefix + "lora_A.weight": (4, 48), prefix + "lora_B.weight": (32, 4), prefix + "lora_magnitude_vector": (32,),
        # the same magnitude again under the name transformers 5's adapter loading needs (peft_format.py says why)
        prefix + "lora_magnitude_vector.weight": (32,)}
    assert torch.equal(peft[prefix + "lora_magnitude_vector"], peft[prefix + "lora_magnitude_vector.weight"])
    assert all(t.dtype == torch.float32 for t in [*td.values(), *peft.values()])
    peft_config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["use_dora"] is True and peft_config["r"] == 4


def test_read_adapter_needs_no_model(tmp_path, make_tiny_gpt2, perturb):
    config = DoraConfig(target_modules=["c_attn"], r=2)
    model, folder = _saved_adapter(make_tiny_gpt2, tmp_path, "torchdora", config, perturb)
    got_config, tensors, fmt = read_adapter(folder)
    assert fmt == "torchdora" and got_config == config
    assert_close(tensors["transformer.h.1.attn.c_attn.lora_B"],
                 adapter_layers(model)["transformer.h.1.attn.c_attn"].lora_B.detach(), rtol=0, atol=0)


# ---- errors a user can hit ------------------------------------------------------------------------------
def test_peft_format_refuses_magnitude_only(tmp_path, tiny_llama):
    inject(tiny_llama, DoraConfig(target_modules=["q_proj", "o_proj"], magnitude_only_modules=["o_proj"]))
    with pytest.raises(ValueError, match="magnitude-only.*format='torchdora'"):
        save_adapter(tiny_llama, tmp_path / "a", format="peft")
    save_adapter(tiny_llama, tmp_path / "b")  # fine in torchdora's format


def test_save_unknown_format_and_merged_model(tmp_path, tiny_llama):
    inject(tiny_llama, DoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="format='onnx'"):
        save_adapter(tiny_llama, tmp_path / "a", format="onnx")  # type: ignore[arg-type]
    merge(tiny_llama)
    with pytest.raises(RuntimeError, match="unmerge"):
        save_adapter(tiny_llama, tmp_path / "b")


def test_save_without_adapters(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="no torchdora adapters"):
        save_adapter(tiny_llama, tmp_path / "a")


@pytest.mark.parametrize("fmt", FORMATS)
def test_mismatched_base_model_lists_keys_and_leaves_model_unchanged(fmt, tmp_path, make_tiny_llama, perturb):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = DoraConfig(target_modules=["q_proj", "down_proj"], r=4)
    _, folder = _saved_adapter(make_tiny_llama, tmp_path, fmt, config, perturb)
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    before, flags = _state(wider), _flags(wider)
    with pytest.raises(ValueError, match=r"mis-shaped keys: model\.layers\.0\.mlp\.down_proj\.lora_A: "
                                         r"file \(4, 48\) vs model \(4, 40\)"):
        load_adapter(wider, folder)
    assert not adapter_layers(wider) and not hasattr(wider, "torchdora_config")
    assert _flags(wider) == flags
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())


@pytest.mark.parametrize("fmt", FORMATS)
def test_different_targets_list_missing_and_unexpected(fmt, tmp_path, make_tiny_llama, perturb):
    _, folder = _saved_adapter(make_tiny_llama, tmp_path, fmt, DoraConfig(target_modules=["q_proj"], r=4), perturb)
    other = make_tiny_llama(0)
    inject(other, DoraConfig(target_modules=["q_proj", "k_proj"], r=4))
    perturb(other, seed=5)
    before = _state(other)
    with pytest.raises(ValueError, match=r"missing keys: model\.layers\.0\.self_attn\.k_proj\.lora_A.*"):
        load_adapter(other, folder)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing half-copied
    lora = make_tiny_llama(0)
    inject(lora, DoraConfig(target_modules=["q_proj"], r=4, use_dora=False))
    with pytest.raises(ValueError, match=r"unexpected keys: model\.layers\.0\.self_attn\.q_proj\.magnitude"):
        load_adapter(lora, folder)


@pytest.mark.parametrize("fmt", FORMATS)
def test_different_scaling_is_refused(fmt, tmp_path, make_tiny_llama, perturb):
    _, folder = _saved_adapter(make_tiny_llama, tmp_path, fmt, DoraConfig(target_modules=["q_proj"], r=4, alpha=8),
                               perturb)
    other = make_tiny_llama(0)
    inject(other, DoraConfig(target_modules=["q_proj"], r=4, alpha=16))
    with pytest.raises(ValueError, match=r"scaling.*model\.layers\.0\.self_attn\.q_proj"):
        load_adapter(other, folder)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_safetensors(fmt, tmp_path, make_tiny_llama, perturb):
    _, folder = _saved_adapter(make_tiny_llama, tmp_path, fmt, DoraConfig(target_modules=["q_proj"]), perturb)
    path = folder / WEIGHT_FILE[fmt]
    path.write_bytes(path.read_bytes()[:-100])
    model = make_tiny_llama(0)
    flags = _flags(model)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(model, folder)
    assert not adapter_layers(model) and _flags(model) == flags


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_json(fmt, tmp_path, make_tiny_llama, perturb):
    _, folder = _saved_adapter(make_tiny_llama, tmp_path, fmt, DoraConfig(target_modules=["q_proj"]), perturb)
    path = folder / CONFIG_FILE[fmt]
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_adapter(make_tiny_llama(0), folder)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        read_adapter(folder)


def test_weights_from_another_save_are_detected(tmp_path, make_tiny_llama, perturb):
    # A save interrupted between its two files leaves new weights beside the old config: the checksum in the
    # config (written last) must catch it rather than load weights the config does not describe.
    _, folder = _saved_adapter(make_tiny_llama, tmp_path / "a", "torchdora", DoraConfig(target_modules=["q_proj"]), perturb)
    _, other = _saved_adapter(make_tiny_llama, tmp_path / "b", "torchdora", DoraConfig(target_modules=["q_proj"]), perturb,
                              seed=1)
    assert (other / TORCHDORA_WEIGHTS).read_bytes() != (folder / TORCHDORA_WEIGHTS).read_bytes()
    (folder / TORCHDORA_WEIGHTS).write_bytes((other / TORCHDORA_WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match="checksum differs.*save the adapter again"):
        read_adapter(folder)


def test_newer_format_version(tmp_path, make_tiny_llama, perturb):
    _, folder = _saved_adapter(make_tiny_llama, tmp_path, "torchdora", DoraConfig(target_modules=["q_proj"]), perturb)
    path = folder / TORCHDORA_CONFIG
    header = json.loads(path.read_text())
    header["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(header))
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}.*upgrade torchdora"):
        load_adapter(make_tiny_llama(0), folder)


def test_missing_files(tmp_path, make_tiny_llama, perturb):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_adapter(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        read_adapter(tmp_path / "empty")
    _, folder = _saved_adapter(make_tiny_llama, tmp_path, "torchdora", DoraConfig(target_modules=["q_proj"]), perturb)
    (folder / TORCHDORA_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="adapter folder is incomplete"):
        read_adapter(folder)


def test_unsupported_peft_options(tmp_path, make_tiny_llama, perturb):
    _, folder = _saved_adapter(make_tiny_llama, tmp_path, "peft", DoraConfig(target_modules=["q_proj"]), perturb)
    path = folder / PEFT_CONFIG
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        read_adapter(folder)
    path.write_text(json.dumps({**config, "bias": "all"}))
    with pytest.raises(ValueError, match="bias='all' is not supported"):
        read_adapter(folder)


# ---- atomic writes ---------------------------------------------------------------------------------------
def _fail_replace(monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"old": 1})
    atomic_write_bytes(tmp_path / "y.bin", b"old")
    atomic_save_safetensors({"t": torch.zeros(2)}, tmp_path / "z.safetensors")
    _fail_replace(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"new": 2})
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(tmp_path / "y.bin", b"new")
    with pytest.raises(OSError, match="disk full"):
        atomic_save_safetensors({"t": torch.ones(2)}, tmp_path / "z.safetensors")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": 1}
    assert (tmp_path / "y.bin").read_bytes() == b"old"
    assert torch.equal(load_file(tmp_path / "z.safetensors")["t"], torch.zeros(2))
    assert _leftovers(tmp_path) == []


def test_atomic_write_cleans_up_when_the_writer_fails(tmp_path, monkeypatch):
    import torchdora.files as tio

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tio, "save_file", broken_save_file)
    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_save_safetensors({"t": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_save_leaves_previous_adapter_loadable(fmt, tmp_path, make_tiny_llama, input_ids, perturb):
    config = DoraConfig(target_modules=["q_proj"], r=4)
    model, folder = _saved_adapter(make_tiny_llama, tmp_path, fmt, config, perturb)
    expected = _out(model, input_ids)
    perturb(model, seed=9)
    _fail_replace(monkeypatch := pytest.MonkeyPatch())
    try:
        with pytest.raises(OSError, match="disk full"):
            save_adapter(model, folder, format=fmt)
    finally:
        monkeypatch.undo()
    assert _leftovers(folder) == []
    fresh = make_tiny_llama(0)
    load_adapter(fresh, folder)
    assert_close(_out(fresh, input_ids), expected, rtol=0, atol=0)


# ---- values checked on load (issue 11) ------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0])
def test_alpha_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        DoraConfig(alpha=bad)
    with pytest.raises(ValueError, match=r"alpha_pattern\['v_proj'\] must be a positive number"):
        DoraConfig(alpha_pattern={"v_proj": bad})


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_finite_weights_are_refused_on_load(fmt, tmp_path, make_tiny_llama, perturb):
    from safetensors import safe_open

    _, folder = _saved_adapter(make_tiny_llama, tmp_path, fmt, DoraConfig(r=2), perturb)
    path = folder / WEIGHT_FILE[fmt]
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key][0] = float("nan")
    atomic_save_safetensors(tensors, path, metadata)
    with pytest.raises(ValueError, match=rf"NaN or infinite values in {key}"):
        read_adapter(folder)


def test_a_peft_folder_written_elsewhere_loads_without_a_checksum(tmp_path, make_tiny_llama, perturb):
    """PEFT's own files carry no torchdora metadata: they load (the checksum is checked only where recorded)."""
    from safetensors import safe_open

    model, folder = _saved_adapter(make_tiny_llama, tmp_path, "peft", DoraConfig(r=2), perturb)
    path = folder / PEFT_WEIGHTS
    with safe_open(path, framework="pt") as f:
        assert {"torchdora_tensors_sha256", "torchdora_config"} <= set(f.metadata())
    atomic_save_safetensors(load_file(path), path, {"format": "pt"})
    config, tensors, _ = read_adapter(folder)
    assert config.r == 2 and tensors


def test_an_adapter_file_that_is_not_a_regular_file_is_named_so(tmp_path):
    """A FIFO (or a link to a device) in place of the weights is never opened: "not a regular file", not "not
    found" (issue 25, item 14)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    inject(model, DoraConfig(r=1, target_modules=["0"]))
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "torchdora_adapter.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(ValueError, match="not a regular file"):
        read_adapter(tmp_path / "a")
