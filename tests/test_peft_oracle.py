"""The installed ``peft`` package as the oracle: same adapter weights → same logits, and each
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
from safetensors.torch import load_file
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


# ---- what the ecosystem opens: AutoPeftModel, PEFT's default embedding files, PEFT options -----------------
def test_torchdora_peft_export_opens_with_auto_peft_model_alone(make_tiny_llama, input_ids, tmp_path, perturb):
    from peft import AutoPeftModelForCausalLM

    make_tiny_llama(0).save_pretrained(tmp_path / "base")
    ours = make_tiny_llama(0)
    inject(ours, DoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    perturb(ours)
    expected = _logits(ours, input_ids)
    save_adapter(ours, tmp_path / "peft", format="peft", base_model_name_or_path=str(tmp_path / "base"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()  # task_type CAUSAL_LM
    assert_close(_logits(theirs, input_ids), expected, **LOGITS)


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_peft_default_embedding_and_lm_head_dora_files_load(target, make_tiny_llama, input_ids, tmp_path):
    """PEFT saves the adapted layer's base weight too (``<m>.base_layer.weight``); it loads into the base layer."""
    config = DoraConfig(target_modules=[target, "q_proj"], r=4)
    theirs = _get_peft_model(make_tiny_llama(0), _peft_config(config))
    _perturb_peft(theirs)
    with torch.no_grad():  # a base weight that differs from ours shows that it is read from the file
        theirs.get_submodule(f"base_model.model.{'model.' if target == 'embed_tokens' else ''}{target}") \
            .base_layer.weight.mul_(1.1)
    expected = _logits(theirs, input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "setting save_embedding_layers to True"
        theirs.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith(f"{target}.base_layer.weight") for k in keys)  # PEFT's default did write it
    ours = make_tiny_llama(0)
    load_adapter(ours, tmp_path)
    assert_close(_logits(ours, input_ids), expected, **LOGITS)


def _option_value(name: str):
    """A non-default value of every PEFT LoraConfig option (what a user of that option would save)."""
    return {
        "bias": "all", "lora_bias": True, "use_qalora": True, "target_parameters": ["mlp.experts.down_proj"],
        "megatron_config": {"tensor_model_parallel_size": 2}, "trainable_token_indices": [0, 1],
        "loftq_config": {"loftq_bits": 4}, "corda_config": {"cache_file": "c"}, "lora_ga_config": {"direction": "ArB2r"},
        "velora_config": {"rank": 1}, "alora_invocation_tokens": [1, 2], "monteclora_config": {"n": 1},
        "layer_replication": [[0, 1], [0, 1]], "use_bdlora": {"target_modules": ["q_proj"]},
        "arrow_config": {"top_k": 1}, "kasa_config": {"beta": 1}, "ensure_weight_tying": True,
    }[name]


def test_every_peft_lora_option_is_classified():
    """A new peft option fails here until it is sorted into honoured (tested equal below) or refused."""
    import dataclasses

    from torchdora.peft_format import PEFT_OPTIONS_HONOURED, PEFT_OPTIONS_REFUSED

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert fields == PEFT_OPTIONS_HONOURED | set(PEFT_OPTIONS_REFUSED), fields ^ (PEFT_OPTIONS_HONOURED
                                                                                  | set(PEFT_OPTIONS_REFUSED))
    assert not PEFT_OPTIONS_HONOURED & set(PEFT_OPTIONS_REFUSED)


def _peft_file(make, tmp_path, **options):
    theirs = _get_peft_model(make(0), LoraConfig(r=4, lora_alpha=8, use_dora=True, **options))
    _perturb_peft(theirs)
    theirs.save_pretrained(tmp_path)
    return theirs


@pytest.mark.parametrize("option", sorted(__import__("torchdora.peft_format", fromlist=["x"]).PEFT_OPTIONS_REFUSED))
def test_each_unsupported_peft_option_is_refused_by_name(option, make_tiny_llama, tmp_path):
    import json

    _peft_file(make_tiny_llama, tmp_path, target_modules=["q_proj"])
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[option] = _option_value(option)  # written as that option's user would have it saved
    config_path.write_text(json.dumps(config))
    model = make_tiny_llama(0)
    with pytest.raises(ValueError, match=option):
        load_adapter(model, tmp_path)
    assert not adapter_layers(model)  # refused before anything was injected


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_base_changing_inits_are_refused(init, make_tiny_llama, tmp_path):
    import json

    _peft_file(make_tiny_llama, tmp_path, target_modules=["q_proj"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["init_lora_weights"] = init
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="init_lora_weights"):
        load_adapter(make_tiny_llama(0), tmp_path)


HONOURED_CASES = {  # honoured options at a non-default value, through real PEFT models: equal logits
    "layers_to_transform": ("make_tiny_llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "layers_pattern": ("make_tiny_llama", dict(target_modules=["q_proj"], layers_to_transform=[0],
                                               layers_pattern="layers")),
    "exclude_modules": ("make_tiny_llama", dict(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])),
    "fan_in_fan_out": ("make_tiny_gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True)),
    "init_lora_weights": ("make_tiny_llama", dict(target_modules=["q_proj"], init_lora_weights="orthogonal")),
    "rank_alpha_patterns_rslora": ("make_tiny_llama", dict(target_modules=["q_proj", "v_proj"], use_rslora=True,
                                                           rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 5})),
    "lora_dropout_modules_to_save": ("make_tiny_llama", dict(target_modules=["q_proj"], lora_dropout=0.1,
                                                             modules_to_save=["lm_head"])),
}


@pytest.mark.parametrize("case", sorted(HONOURED_CASES))
def test_honoured_peft_options_load_with_equal_logits(case, request, input_ids, tmp_path):
    fixture, options = HONOURED_CASES[case]
    make = request.getfixturevalue(fixture)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _peft_file(make, tmp_path, **options)
    expected = _logits(theirs, input_ids)
    ours = make(0)
    assert not torch.allclose(_logits(ours, input_ids), expected, **LOGITS)
    load_adapter(ours, tmp_path)
    assert sorted(adapter_layers(ours)) == sorted(_peft_layers(theirs))
    assert_close(_logits(ours.eval(), input_ids), expected, **LOGITS)
