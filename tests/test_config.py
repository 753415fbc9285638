"""DoraConfig validation, serialisation, and the name-matching rules it applies."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from torchdora.config import ALL_LINEAR, DoraConfig, module_matches, pattern_value

pytestmark = pytest.mark.usefixtures("single_thread")


def test_defaults_follow_the_paper():
    config = DoraConfig()
    assert config.use_dora and config.detach_norm  # paper §4.3: the norm is detached by default
    assert config.init == "kaiming" and config.dtype == "float32" and config.torch_dtype is torch.float32


def test_lists_become_tuples_and_alpha_a_float():
    config = DoraConfig(target_modules=["q_proj", "v_proj"], magnitude_only_modules=["v_proj"],
                        modules_to_save=["lm_head"], alpha=32)
    assert config.target_modules == ("q_proj", "v_proj")
    assert config.magnitude_only_modules == ("v_proj",) and config.modules_to_save == ("lm_head",)
    assert isinstance(config.alpha, float) and config.alpha == 32.0


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DoraConfig().r = 4  # type: ignore[misc]


@pytest.mark.parametrize("config", [
    DoraConfig(),
    DoraConfig(r=4, alpha=8, dropout=0.1, target_modules=r".*\.(q|v)_proj", exclude_modules=["layers.0.q_proj"],
               rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3.5}, magnitude_only_modules=["v_proj"],
               use_rslora=True, detach_norm=False, init="gaussian", modules_to_save=["lm_head"], dtype=None),
    DoraConfig(target_modules=ALL_LINEAR, use_dora=False, dtype="bfloat16"),
])
def test_json_round_trip(config):
    text = json.dumps(config.to_dict())
    assert DoraConfig.from_dict(json.loads(text)) == config


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive integer, got r=0"),
    (dict(r=2.5), "r=2.5"),
    (dict(r=True), "r=True"),
    (dict(alpha=0), "alpha must be a positive number, got alpha=0"),
    (dict(alpha="16"), "alpha='16'"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got dropout=1.0"),
    (dict(dropout=-0.1), "dropout=-0.1"),
    (dict(target_modules="(q_proj"), r"target_modules='\(q_proj' is not a valid regular expression"),
    (dict(exclude_modules="[a"), r"exclude_modules='\[a' is not a valid regular expression"),
    (dict(target_modules=[]), "target_modules is empty"),
    (dict(magnitude_only_modules=["o_proj"], use_dora=False), "needs use_dora=True"),
    (dict(recompute_modules=["q_proj"], use_dora=False), r"recompute_modules=\['q_proj'\] needs use_dora=True"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive number, got 0"),
    (dict(rank_pattern={"q_proj": 2.5}), r"rank_pattern\['q_proj'\]"),
    (dict(alpha_pattern={"v_proj": -1}), r"alpha_pattern\['v_proj'\] must be a positive number, got -1"),
    (dict(rank_pattern={"(q": 4}), r"rank_pattern key '\(q' is not a valid regular expression"),
    (dict(init="xavier"), "init must be 'kaiming' or 'gaussian', got init='xavier'"),
    (dict(dtype="fp32"), "dtype must be one of .* got dtype='fp32'"),
])
def test_invalid_values_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DoraConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_modules=["q_proj", 3]), "target_modules must hold non-empty strings, got 3"),
    (dict(target_modules=["q_proj", ""]), "non-empty strings"),
    (dict(exclude_modules=5), "exclude_modules must be a string or a list of strings, got 5"),
    (dict(modules_to_save=[None]), "modules_to_save must hold non-empty strings"),
])
def test_invalid_types_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        DoraConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown DoraConfig fields \['lora_r'\]"):
        DoraConfig.from_dict({"lora_r": 8})


@pytest.mark.parametrize("name, patterns, expected", [
    ("model.layers.0.self_attn.q_proj", ("q_proj",), True),
    ("model.layers.0.self_attn.q_proj", ("self_attn.q_proj",), True),
    ("model.layers.0.self_attn.q_proj", ("model.layers.0.self_attn.q_proj",), True),
    ("model.layers.0.self_attn.q_proj", ("proj",), False),  # suffix only at a dot boundary
    ("model.layers.0.self_attn.q_proj", ("attn.q_proj",), False),
    ("model.layers.0.self_attn.q_proj", r".*q_proj", True),  # a string is a full-match regex
    ("model.layers.0.self_attn.q_proj", r"q_proj", False),
    ("model.layers.0.self_attn.q_proj", r".*layers\.1\..*", False),
])
def test_module_matches(name, patterns, expected):
    assert module_matches(name, patterns) is expected


@pytest.mark.parametrize("name, expected", [
    ("model.layers.0.self_attn.q_proj", 4),
    ("model.layers.1.self_attn.q_proj", 2),  # the first matching key wins, in insertion order
    ("model.layers.1.self_attn.k_proj", 8),
    ("model.layers.0.self_attn.xq_proj", 8),  # a key matches whole dotted parts, not a substring
])
def test_rank_pattern_resolution(name, expected):
    config = DoraConfig(r=8, rank_pattern={r"layers\.0\.self_attn\.q_proj": 4, "q_proj": 2})
    assert config.rank_for(name) == expected
    assert pattern_value(name, config.rank_pattern, 8) == expected


def test_alpha_for_and_magnitude_only():
    config = DoraConfig(target_modules=["q_proj", "o_proj"], alpha=16, alpha_pattern={"o_proj": 4},
                        magnitude_only_modules=["o_proj"])
    assert config.alpha_for("model.layers.0.self_attn.o_proj") == 4.0
    assert config.alpha_for("model.layers.0.self_attn.q_proj") == 16.0
    assert config.is_magnitude_only("model.layers.0.self_attn.o_proj")
    assert not config.is_magnitude_only("model.layers.0.self_attn.q_proj")
