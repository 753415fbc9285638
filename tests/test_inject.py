"""Injection by name/suffix/regex/"all-linear", patterns, trainability, disabling, merging and the user errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import torchdora
from torchdora import (
    AdapterLayer,
    ConvAdapter,
    DoraConfig,
    EmbeddingAdapter,
    LinearAdapter,
    adapter_config,
    adapter_layers,
    disable_adapters,
    find_targets,
    inject,
    merge,
    merge_and_unload,
    trainable_parameter_count,
    unload,
    unmerge,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# logits of a 2-layer model in fp32, adapter vs merged/base: a handful of fp32 matmuls of width <= 64
LOGITS = dict(rtol=1e-4, atol=1e-5)
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _names(model) -> list[str]:
    return list(adapter_layers(model))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---- selecting modules ---------------------------------------------------------------------------------------
def test_exact_name(tiny_llama):
    inject(tiny_llama, DoraConfig(target_modules=["model.layers.1.self_attn.q_proj"]))
    assert _names(tiny_llama) == ["model.layers.1.self_attn.q_proj"]


def test_suffixes(tiny_llama):
    inject(tiny_llama, DoraConfig(target_modules=["q_proj", "mlp.down_proj"]))
    assert _names(tiny_llama) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
    ]


def test_suffix_matches_only_at_a_dot_boundary(tiny_llama):
    # "proj" is a substring of every projection but a dotted suffix of none
    with pytest.raises(ValueError, match="matches no module"):
        inject(tiny_llama, DoraConfig(target_modules=["proj"]))


def test_regex_string_matches_whole_name(tiny_llama):
    inject(tiny_llama, DoraConfig(target_modules=r"model\.layers\.0\..*_proj"))
    assert _names(tiny_llama) == [f"model.layers.0.{'self_attn' if i < 4 else 'mlp'}.{n}"
                                  for i, n in enumerate(LLAMA_LINEAR)]


def test_all_linear_excludes_output_head(tiny_llama):
    inject(tiny_llama, DoraConfig(target_modules="all-linear"))
    names = _names(tiny_llama)
    assert len(names) == 14 and "lm_head" not in names
    assert {n.rsplit(".", 1)[1] for n in names} == set(LLAMA_LINEAR)
    assert all(isinstance(m, LinearAdapter) for m in adapter_layers(tiny_llama).values())


def test_all_linear_on_gpt2_finds_conv1d(tiny_gpt2):
    inject(tiny_gpt2, DoraConfig(target_modules="all-linear"))
    names = _names(tiny_gpt2)
    assert len(names) == 8 and "lm_head" not in names
    assert all(layer.fan_in_fan_out for layer in adapter_layers(tiny_gpt2).values())


def test_exclude_modules(tiny_llama):
    config = DoraConfig(target_modules="all-linear", exclude_modules=["o_proj", "model.layers.1.mlp.up_proj"])
    inject(tiny_llama, config)
    names = _names(tiny_llama)
    assert len(names) == 11
    assert not any(n.endswith("o_proj") for n in names) and "model.layers.1.mlp.up_proj" not in names


def test_exclude_modules_regex(tiny_llama):
    inject(tiny_llama, DoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*"))
    assert _names(tiny_llama) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_rank_and_alpha_patterns(tiny_llama):
    config = DoraConfig(
        target_modules=["q_proj", "v_proj"], r=8, alpha=16,
        rank_pattern={"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 2}, alpha_pattern={"v_proj": 6},
    )
    inject(tiny_llama, config)
    layers = adapter_layers(tiny_llama)
    got = {n: (layer.r, layer.scaling, tuple(layer.lora_A.shape)) for n, layer in layers.items()}
    assert got == {
        "model.layers.0.self_attn.q_proj": (4, 16 / 4, (4, 32)),
        "model.layers.0.self_attn.v_proj": (8, 6 / 8, (8, 32)),
        "model.layers.1.self_attn.q_proj": (4, 16 / 4, (4, 32)),
        "model.layers.1.self_attn.v_proj": (2, 6 / 2, (2, 32)),
    }


def test_rslora_scaling(tiny_llama):
    inject(tiny_llama, DoraConfig(target_modules=["q_proj"], r=16, alpha=8, use_rslora=True))
    assert all(layer.scaling == pytest.approx(2.0) for layer in adapter_layers(tiny_llama).values())


def test_config_reaches_every_layer(tiny_llama, input_ids, perturb):
    config = DoraConfig(target_modules=["q_proj", "up_proj"], r=2, alpha=3, dropout=0.25, detach_norm=False,
                        init="gaussian", dtype="float64")
    inject(tiny_llama, config)
    for layer in adapter_layers(tiny_llama).values():
        assert (layer.r, layer.lora_alpha, layer.dropout_p, layer.detach_norm) == (2, 3.0, 0.25, False)
        assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.25
        assert layer.lora_A.dtype == layer.lora_B.dtype == layer.magnitude.dtype == torch.float64
        assert (layer.lora_B == 0).all()
        assert not layer.training  # the model was in eval mode: no dropout until model.train()
    perturb(tiny_llama)
    eval_logits = _logits(tiny_llama, input_ids)
    assert_close(_logits(tiny_llama, input_ids), eval_logits, rtol=0, atol=0)
    tiny_llama.train()
    assert not torch.allclose(_logits(tiny_llama, input_ids), eval_logits)  # dropout acts in training only
    tiny_llama.eval()
    assert_close(_logits(tiny_llama, input_ids), eval_logits, rtol=0, atol=0)


def test_magnitude_only_modules(tiny_llama, input_ids, perturb):
    base = _logits(tiny_llama, input_ids)
    config = DoraConfig(target_modules=["q_proj", "v_proj", "o_proj"], magnitude_only_modules=["o_proj"])
    inject(tiny_llama, config)
    for name, layer in adapter_layers(tiny_llama).items():
        assert layer.magnitude_only == name.endswith("o_proj")
        assert (layer.lora_A is None) == name.endswith("o_proj")
        assert layer.magnitude is not None
    assert_close(_logits(tiny_llama, input_ids), base, **LOGITS)
    perturb(tiny_llama)
    assert not torch.allclose(_logits(tiny_llama, input_ids), base, **LOGITS)


def test_recompute_modules_train_like_the_default(make_tiny_llama, input_ids, perturb):
    """The selected layers recompute x Wᵀ in backward; logits and every adapter gradient equal the default's."""
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    models = {}
    for recompute in ((), ("q_proj", "down_proj")):
        model = make_tiny_llama()
        inject(model, DoraConfig(target_modules=targets, recompute_modules=recompute))
        perturb(model, seed=1)
        for name, layer in adapter_layers(model).items():
            assert layer.recompute_output == (bool(recompute) and name.endswith(("q_proj", "down_proj")))
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        models[recompute] = model
    default, lean = models.values()
    grads = {n: p.grad for n, p in default.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for name, p in lean.named_parameters():  # only fp32 round-off differs: z recomputed vs (y − b) / f, summed
        if p.requires_grad:                      # over tokens and back through the layers: rtol 1e-4
            assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_modules=["q_proj"], recompute_modules=["v_proj"]),
     r"recompute_modules entries \['v_proj'\] match none of the targeted modules"),
    (dict(target_modules=["q_proj", "embed_tokens"], recompute_modules=["embed_tokens"]),
     "not Linear/Conv1D layers"),
])
def test_recompute_modules_errors(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        inject(tiny_llama, DoraConfig(**kwargs))
    assert not adapter_layers(tiny_llama)


def test_embedding_and_head_can_be_targeted(tiny_llama, input_ids, perturb):
    inject(tiny_llama, DoraConfig(target_modules=["embed_tokens", "lm_head"]))
    layers = adapter_layers(tiny_llama)
    assert isinstance(layers["model.embed_tokens"], EmbeddingAdapter)
    assert isinstance(layers["lm_head"], LinearAdapter)
    base = _logits(tiny_llama, input_ids)
    perturb(tiny_llama)
    assert not torch.allclose(_logits(tiny_llama, input_ids), base, **LOGITS)


def test_find_targets_does_not_modify(tiny_llama):
    names = find_targets(tiny_llama, DoraConfig(target_modules=["k_proj"]))
    assert names == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    assert not adapter_layers(tiny_llama)


# ---- trainability ----------------------------------------------------------------------------------------------
def test_only_adapter_parameters_trainable(tiny_llama):
    inject(tiny_llama, DoraConfig(target_modules="all-linear", r=4))
    layers = adapter_layers(tiny_llama).values()
    adapter_params = {id(p) for layer in layers for p in layer.adapter_parameters().values()}
    trainable = {id(p) for p in tiny_llama.parameters() if p.requires_grad}
    assert trainable == adapter_params
    # r·(in + out) + out per adapted layer, counted from the shapes in the model's config
    shapes = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
              "gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}
    expected = 2 * sum(4 * (i + o) + o for i, o in shapes.values())
    n_trainable, total = trainable_parameter_count(tiny_llama)
    assert n_trainable == expected
    assert total == sum(p.numel() for p in tiny_llama.parameters())


def test_lora_has_no_magnitude(tiny_llama):
    inject(tiny_llama, DoraConfig(target_modules=["q_proj"], use_dora=False))
    for layer in adapter_layers(tiny_llama).values():
        assert layer.magnitude is None and set(layer.adapter_parameters()) == {"lora_A", "lora_B"}


def test_modules_to_save_are_trainable(tiny_llama):
    inject(tiny_llama, DoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head", "model.norm"]))
    assert tiny_llama.lm_head.weight.requires_grad and tiny_llama.model.norm.weight.requires_grad
    assert not tiny_llama.model.embed_tokens.weight.requires_grad
    assert not tiny_llama.model.layers[0].self_attn.q_proj.base.weight.requires_grad


def test_training_step_moves_only_adapters(tiny_llama, input_ids):
    inject(tiny_llama, DoraConfig(target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in tiny_llama.named_parameters() if not p.requires_grad}
    tiny_llama.train()
    opt = torch.optim.SGD([p for p in tiny_llama.parameters() if p.requires_grad], lr=0.1)
    loss = tiny_llama(input_ids, labels=input_ids).loss
    loss.backward()
    opt.step()
    for name, p in tiny_llama.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    layer = adapter_layers(tiny_llama)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_B.abs().sum() > 0  # B left zero after a step would mean no gradient reached it


# ---- switching adapters off, merging ------------------------------------------------------------------------------
def test_disable_adapters_gives_base_output(tiny_llama, input_ids, perturb):
    base = _logits(tiny_llama, input_ids)
    inject(tiny_llama, DoraConfig(target_modules="all-linear"))
    perturb(tiny_llama)
    adapted = _logits(tiny_llama, input_ids)
    assert not torch.allclose(adapted, base, **LOGITS)
    with disable_adapters(tiny_llama):
        assert_close(_logits(tiny_llama, input_ids), base, rtol=0, atol=0)  # the very same base modules run
    assert_close(_logits(tiny_llama, input_ids), adapted, rtol=0, atol=0)
    merge(tiny_llama)
    with pytest.raises(RuntimeError, match="unmerge"):
        with disable_adapters(tiny_llama):
            pass


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("use_dora", [True, False])
def test_merge_unmerge_and_unload_model(model_name, use_dora, input_ids, perturb, request):
    model = request.getfixturevalue(model_name)
    base = _logits(model, input_ids)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject(model, DoraConfig(target_modules="all-linear", use_dora=use_dora, r=4))
    perturb(model)
    adapted = _logits(model, input_ids)
    assert not torch.allclose(adapted, base, **LOGITS)
    merge(model)
    assert_close(_logits(model, input_ids), adapted, **LOGITS)
    unmerge(model)
    assert_close(_logits(model, input_ids), adapted, **LOGITS)
    merge(model)
    unmerge(model)
    assert_close(_logits(model, input_ids), adapted, **LOGITS)
    merge_and_unload(model)
    assert not adapter_layers(model) and not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert_close(_logits(model, input_ids), adapted, **LOGITS)
    assert set(dict(model.named_parameters())) == set(weights)  # the original module tree and names again
    with pytest.raises(ValueError, match="no torchdora adapters"):
        adapter_config(model)


def test_unload_restores_base(tiny_gpt2, input_ids, perturb):
    base = _logits(tiny_gpt2, input_ids)
    inject(tiny_gpt2, DoraConfig(target_modules=["c_attn", "c_fc"]))
    perturb(tiny_gpt2)
    merge(tiny_gpt2)  # unload must undo a merge too
    unload(tiny_gpt2)
    assert not adapter_layers(tiny_gpt2)
    assert_close(_logits(tiny_gpt2, input_ids), base, **LOGITS)
    inject(tiny_gpt2, DoraConfig(target_modules=["c_attn"]))  # a fresh start is allowed after unloading


# ---- errors -------------------------------------------------------------------------------------------------------
def test_inject_twice_is_an_error(tiny_llama):
    inject(tiny_llama, DoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has torchdora adapters"):
        inject(tiny_llama, DoraConfig(target_modules=["v_proj"]))


def test_unsupported_module_type(tiny_llama):
    with pytest.raises(TypeError, match="LlamaRMSNorm"):
        inject(tiny_llama, DoraConfig(target_modules=["input_layernorm"]))
    assert not adapter_layers(tiny_llama)


def test_target_matching_nothing_lists_close_names(tiny_llama):
    with pytest.raises(ValueError, match=r"q_prj.*matches no module.*'q_proj'"):
        inject(tiny_llama, DoraConfig(target_modules=["q_prj"]))


def test_regex_matching_nothing(tiny_llama):
    with pytest.raises(ValueError, match="matches no module"):
        inject(tiny_llama, DoraConfig(target_modules=r".*\.query"))


def test_magnitude_only_must_be_targeted(tiny_llama):
    with pytest.raises(ValueError, match="must also be listed in target_modules"):
        inject(tiny_llama, DoraConfig(target_modules=["q_proj"], magnitude_only_modules=["o_proj"]))


def test_modules_to_save_matching_nothing(tiny_llama):
    with pytest.raises(ValueError, match=r"modules_to_save entries \['lm_hed'\] match no module.*'lm_head'"):
        inject(tiny_llama, DoraConfig(target_modules=["q_proj"], modules_to_save=["lm_hed"]))


class _ConvNet(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.conv = nn.Conv2d(4, 4, 3, groups=groups)

    def forward(self, x):
        return self.conv(self.proj(x.transpose(1, 3)).transpose(1, 3))


def test_grouped_conv_is_refused_and_model_left_unchanged():
    model = _ConvNet(groups=2)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="groups=2"):
        inject(model, DoraConfig(target_modules=["proj", "conv"]))
    assert isinstance(model.proj, nn.Linear) and isinstance(model.conv, nn.Conv2d)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "torchdora_config")
    inject(model, DoraConfig(target_modules=["proj"]))  # still a clean model


def test_ungrouped_conv_is_injected():
    model = _ConvNet(groups=1)
    inject(model, DoraConfig(target_modules=["conv"]))
    assert isinstance(model.conv, ConvAdapter)


def test_public_api_is_explicit():
    for name in torchdora.__all__:
        assert hasattr(torchdora, name), name


def test_each_target_entry_must_match_something(tiny_llama):
    # One good entry must not hide a typo in another: "v_prj" would otherwise be silently ignored.
    with pytest.raises(ValueError, match=r"target_modules entries \['v_prj'\] match no module.*'v_proj'"):
        inject(tiny_llama, DoraConfig(target_modules=["q_proj", "v_prj"]))
    assert not adapter_layers(tiny_llama)
    with pytest.raises(ValueError, match=r"magnitude_only_modules entries \['o_projx'\] match none"):
        inject(tiny_llama, DoraConfig(target_modules=["q_proj", "o_proj"], magnitude_only_modules=["o_proj", "o_projx"]))
