"""The installed ``peft`` package as the oracle (REFERENCE §5): same adapter weights → same logits, and each
library loads the other's adapter files.

Weights are copied into PEFT's modules here by hand (not through :mod:`torchdora.peft_format`), so the logit
comparison does not depend on the file translation that the later tests check.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model  # a test dependency: its absence is a failure, not a skip
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.testing import assert_close

from torchdora import DoraConfig, EmbeddingAdapter, adapter_layers, inject, load_adapter, save_adapter

pytestmark = pytest.mark.usefixtures("single_thread")

# Same weights, different order of fp32 operations (PEFT adds a correction to the base output; torchdora
# scales the sum) through at most two transformer blocks: differences are a few ulps of logits of size ~1.
LOGITS = dict(rtol=1e-4, atol=1e-5)


def _peft_config(config: DoraConfig, **extra) -> LoraConfig:
    return LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=0.0, use_dora=config.use_dora, use_rslora=config.use_rslora,
        target_modules=list(config.target_modules), rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern), modules_to_save=list(config.modules_to_save) or None, **extra,
    )


def _get_peft_model(base: nn.Module, config: LoraConfig) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out for Conv1D, custom-model notices
        return get_peft_model(base, config).eval()


def _peft_layers(peft_model) -> dict[str, nn.Module]:
    inner = peft_model.base_model.model
    return {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


@torch.no_grad()
def _copy_into_peft(td_model: nn.Module, peft_model: nn.Module) -> None:
    """Give PEFT's adapters torchdora's tensors, checking both libraries adapted the same modules at the same scale."""
    ours = adapter_layers(td_model)
    theirs = _peft_layers(peft_model)
    assert sorted(ours) == sorted(theirs)
    for name, layer in ours.items():
        target = theirs[name]
        assert target.scaling["default"] == pytest.approx(layer.scaling), name  # rank/alpha patterns agree
        if isinstance(layer, EmbeddingAdapter):
            target.lora_embedding_A["default"].copy_(layer.lora_A)
            target.lora_embedding_B["default"].copy_(layer.lora_B)
        else:
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
        if layer.use_dora:
            magnitude = target.lora_magnitude_vector["default"].weight
            magnitude.copy_(layer.magnitude.view_as(magnitude))


@torch.no_grad()
def _perturb_peft(peft_model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=gen)
            p.mul_(1 + 0.2 * noise) if "magnitude" in name else p.add_(0.3 * noise)


CASES = {
    "llama_dora_patterns": ("make_tiny_llama", DoraConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], r=4, alpha=8,
        rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"v_proj": 3}), None),
    "llama_dora_rslora": ("make_tiny_llama", DoraConfig(target_modules=["q_proj", "o_proj", "gate_proj"], r=4,
                                                        alpha=6, use_rslora=True), None),
    "llama_lora_patterns": ("make_tiny_llama", DoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                                                          use_dora=False, rank_pattern={"v_proj": 2},
                                                          alpha_pattern={"down_proj": 5}), None),
    "gpt2_dora": ("make_tiny_gpt2", DoraConfig(target_modules=["c_attn", "c_proj", "c_fc"], r=4, alpha=8,
                                               rank_pattern={"c_fc": 2}), None),
    "gpt2_lora_rslora": ("make_tiny_gpt2", DoraConfig(target_modules=["c_attn", "c_fc"], r=4, use_dora=False,
                                                      use_rslora=True), None),
    "conv_embedding_dora": ("make_mixed_net", DoraConfig(target_modules=["emb", "conv1", "conv2", "conv3", "head"],
                                                         r=2, alpha=3), 11),
    "conv_embedding_lora": ("make_mixed_net", DoraConfig(target_modules=["emb", "conv2", "head"], r=2,
                                                         use_dora=False), 11),
}


def _setup(case, request, input_ids):
    fixture, config, vocab = CASES[case]
    make = request.getfixturevalue(fixture)
    ids = input_ids % vocab if vocab else input_ids
    return make, config, ids


@pytest.mark.parametrize("case", list(CASES))
def test_same_weights_same_logits(case, request, input_ids, perturb):
    make, config, ids = _setup(case, request, input_ids)
    ours = make(0)
    base_logits = _logits(ours, ids)
    inject(ours, config)
    perturb(ours)
    expected = _logits(ours, ids)
    assert not torch.allclose(expected, base_logits, **LOGITS)  # guard: the adapters are not the identity
    theirs = _get_peft_model(make(0), _peft_config(config))
    _copy_into_peft(ours, theirs)
    assert_close(_logits(theirs, ids), expected, **LOGITS)


FILE_CASES = ["llama_dora_patterns", "gpt2_dora", "conv_embedding_dora", "llama_lora_patterns"]


@pytest.mark.parametrize("case", FILE_CASES)
def test_peft_saved_adapter_loads_in_torchdora(case, request, input_ids, tmp_path):
    make, config, ids = _setup(case, request, input_ids)
    theirs = _get_peft_model(make(0), _peft_config(config))
    _perturb_peft(theirs)
    expected = _logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    ours = make(0)
    assert not torch.allclose(_logits(ours, ids), expected, **LOGITS)
    load_adapter(ours, tmp_path)
    assert sorted(adapter_layers(ours)) == sorted(_peft_layers(theirs))
    assert_close(_logits(ours, ids), expected, **LOGITS)


@pytest.mark.parametrize("case", FILE_CASES)
def test_torchdora_peft_file_loads_in_peft(case, request, input_ids, tmp_path, perturb):
    make, config, ids = _setup(case, request, input_ids)
    ours = make(0)
    inject(ours, config)
    perturb(ours)
    expected = _logits(ours, ids)
    save_adapter(ours, tmp_path, format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(make(0), tmp_path).eval()
    assert sorted(_peft_layers(theirs)) == sorted(adapter_layers(ours))
    assert_close(_logits(theirs, ids), expected, **LOGITS)


def test_modules_to_save_round_trip_with_peft(make_tiny_llama, input_ids, tmp_path, perturb):
    config = DoraConfig(target_modules=["q_proj", "v_proj"], r=4, modules_to_save=["lm_head"])
    # PEFT → torchdora
    theirs = _get_peft_model(make_tiny_llama(0), _peft_config(config))
    _perturb_peft(theirs)
    expected = _logits(theirs, input_ids)
    theirs.save_pretrained(tmp_path / "peft")
    ours = make_tiny_llama(0)
    load_adapter(ours, tmp_path / "peft")
    assert_close(_logits(ours, input_ids), expected, **LOGITS)
    # torchdora → PEFT
    ours = make_tiny_llama(0)
    inject(ours, config)
    perturb(ours)
    with torch.no_grad():
        ours.lm_head.weight.mul_(1.5)
    expected = _logits(ours, input_ids)
    save_adapter(ours, tmp_path / "td", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(make_tiny_llama(0), tmp_path / "td").eval()
    assert_close(_logits(theirs, input_ids), expected, **LOGITS)
