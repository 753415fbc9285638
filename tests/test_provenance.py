"""The base an adapter belongs to: the fingerprint saved with it, and the check when it is loaded elsewhere.

References: the sketch's estimate against the exact relative Frobenius difference of random perturbations (a
Johnson-Lindenstrauss sketch of 16 numbers: within a factor of 2 here, for these fixed seeds), and loads onto
the same, a bf16-rounded and a perturbed base.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torchdora
from torchdora import DoraConfig
from torchdora import functional as DF

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("size", [0.001, 0.03, 0.3])
def test_the_sketch_estimates_the_relative_difference(size):
    gen = torch.Generator().manual_seed(0)
    for shape in ((64, 48), (200, 30), (7, 300)):
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        other = w + size * torch.randn(shape, generator=gen, dtype=torch.float64) * w.norm() / w.numel() ** 0.5
        exact = float((other - w).norm() / w.norm())
        estimate = DF.sketch_difference(DF.weight_sketch(w), DF.weight_sketch(other))
        assert exact / 2 < estimate < exact * 2, (shape, exact, estimate)
        assert DF.sketch_difference(DF.weight_sketch(w), DF.weight_sketch(w.clone())) == 0.0


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16))


@pytest.mark.parametrize("fmt", ["torchdora", "peft"])
def test_loading_onto_other_base_weights_warns_with_the_size_or_refuses(fmt, tmp_path):
    model = _net()
    torchdora.inject(model, DoraConfig(r=4, target_modules=["0", "2"]))
    torchdora.save_adapter(model, tmp_path / "a", format=fmt)
    assert torchdora.io.recorded_fingerprint(tmp_path / "a")["modules"].keys() == {"0", "2"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchdora.load_adapter(_net(), tmp_path / "a")  # the same weights: silent
        rounded = _net()
        rounded.to(torch.bfloat16).float()
        with torch.no_grad():
            for p in rounded.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        torchdora.load_adapter(rounded, tmp_path / "a")  # bf16 rounding of the same weights: about 0.2 %
    other = _net()
    with torch.no_grad():
        other[2].weight.mul_(1.1)  # 10 % off in one module
    with pytest.warns(UserWarning, match=r"1 of 2 adapted modules differ by more than 1%, most 2 by about 1\d\.\d%"):
        torchdora.load_adapter(other, tmp_path / "a")
    other = _net()
    with torch.no_grad():
        other[2].weight.mul_(1.1)
    with pytest.raises(ValueError, match="other base weights"):
        torchdora.load_adapter(other, tmp_path / "a", base_mismatch="error")
    assert not torchdora.adapter_layers(other)  # left as it was
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchdora.load_adapter(other, tmp_path / "a", base_mismatch="ignore")


def test_an_adapter_without_a_fingerprint_loads_silently(tmp_path):
    import json

    model = _net()
    torchdora.inject(model, DoraConfig(r=4, target_modules=["0"]))
    torchdora.save_adapter(model, tmp_path / "a")
    header = json.loads((tmp_path / "a" / "torchdora_config.json").read_text())
    del header["base_fingerprint"]  # as written before fingerprints existed
    (tmp_path / "a" / "torchdora_config.json").write_text(json.dumps(header))
    other = _net(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchdora.load_adapter(other, tmp_path / "a")


def test_load_model_maps_the_embedded_defaults_hub_name_to_its_local_copy(tmp_path, monkeypatch):
    """Before: ``torchdora.load_model(run/adapter)`` offline retried the hub for about 30 s, then raised OSError."""
    pytest.importorskip("transformers")
    from torchdora.app.assets import DEFAULT_MODEL_HUB_NAME, load_model_and_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = load_model_and_tokenizer(None)
    torchdora.inject(model, DoraConfig(r=1, target_modules=["model.layers.0.self_attn.q_proj"]))
    torchdora.save_adapter(model, tmp_path / "a", base_model_name_or_path=DEFAULT_MODEL_HUB_NAME)
    assert torchdora.hf.local_base(DEFAULT_MODEL_HUB_NAME) != DEFAULT_MODEL_HUB_NAME
    assert torchdora.hf.local_base("someone/else") == "someone/else"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same weights it was trained on: no base mismatch
        loaded = torchdora.load_model(tmp_path / "a")
    assert type(loaded).__name__ == "LlamaForCausalLM" and torchdora.list_adapters(loaded) == ["default"]
