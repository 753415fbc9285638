"""One owner for a model's adapter state: regressions for the defects found where the parts met.

Each test failed before ``torchdora.state`` / ``torchdora.targets`` (see the docstrings): ``add_adapter`` built
its layers its own way, several DoRA adapters merged one after the other, and names and weights went unchecked.
References: the definitions written out in float64 here, or the unmerged model itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import torchdora
from torchdora import DoraConfig, adapter_layers
from torchdora.layers import LinearAdapter, VeraAdapter
from torchdora.state import state_of

pytestmark = pytest.mark.usefixtures("single_thread")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16)).eval()


def _randomize(model: nn.Module, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad(), torchdora.using_adapter(model, name):
        for layer in adapter_layers(model).values():
            for p in layer.adapter_parameters().values():
                p.add_(0.5 * torch.randn(p.shape, generator=gen))


def test_add_adapter_builds_vera_when_the_config_says_so():
    """Before: ``add_adapter(model, "v", DoraConfig(use_vera=True))`` built DoRA layers with ``lora_A``/``lora_B``."""
    model = _net()
    torchdora.inject(model, DoraConfig(r=4, target_modules=["0"]))
    torchdora.add_adapter(model, "v", DoraConfig(r=8, target_modules=["2"], use_vera=True, use_dora=False))
    layer = model[2]
    assert isinstance(layer, VeraAdapter)
    with torchdora.using_adapter(model, "v"):
        assert set(layer.adapter_parameters()) == {"vera_lambda_d", "vera_lambda_b"}
    with pytest.raises(ValueError, match="VeRA/DVoRA layer holds one adapter"):
        torchdora.add_adapter(model, "w", DoraConfig(r=8, target_modules=["0"], use_vera=True))
    assert torchdora.list_adapters(model) == ["default", "v"]  # the refused one left nothing behind


@pytest.mark.parametrize("first_by", ["inject", "add_adapter"])
def test_recompute_and_detach_norm_apply_however_the_layer_was_built(first_by):
    """Before: a layer first wrapped by ``add_adapter`` ignored ``recompute_modules`` (and ``detach_norm``)."""
    model = _net()
    torchdora.inject(model, DoraConfig(r=4, target_modules=["0"]))
    config = DoraConfig(r=4, target_modules=["0", "2"], recompute_modules=["2"], detach_norm=False)
    if first_by == "inject":
        model = _net()
        torchdora.inject(model, config, adapter_name="b")
    else:
        torchdora.add_adapter(model, "b", config)
    with torchdora.using_adapter(model, "b"):
        assert model[2].recompute_output and not model[0].recompute_output
        assert not model[2].detach_norm and not model[0].detach_norm
    if first_by == "add_adapter":  # the first adapter's settings are its own
        assert model[0].adapters["default"].detach_norm and not model[0].adapters["default"].recompute_output


def _dora_weight(w: torch.Tensor, adapter) -> torch.Tensor:
    v = w + adapter.scaling * adapter.lora_B.double() @ adapter.lora_A.double()
    return (adapter.magnitude.double() / torch.linalg.vector_norm(v, dim=1))[:, None] * v


def test_two_active_dora_adapters_merge_into_the_model_that_was_evaluated():
    """Before: on this 32→48 Linear with two r=4 DoRA adapters the merged output differed from the unmerged one
    by 1.94 (outputs of size 3.5): the second adapter was normalised against the first's merged weight."""
    torch.manual_seed(1)
    outer = nn.Sequential(nn.Linear(32, 48)).eval()
    torchdora.add_adapter(outer, "a", DoraConfig(r=4, target_modules=["0"]))
    torchdora.add_adapter(outer, "b", DoraConfig(r=4, target_modules=["0"]))
    model = outer[0]
    _randomize(outer, "a", 1)
    _randomize(outer, "b", 2)
    torchdora.set_adapter(outer, ["a", "b"])
    x = torch.randn(5, 32)
    w0 = model.base.weight.detach().double().clone()
    with torch.no_grad():
        unmerged = model(x)
    want = x.double() @ (w0 + sum(_dora_weight(w0, model.adapters[n]) - w0 for n in "ab")).T \
        + model.base.bias.double()
    assert_close(unmerged.double(), want, rtol=1e-5, atol=1e-5)  # the forward follows the rule (fp32 math)
    torchdora.merge(outer)
    with torch.no_grad():
        merged = model(x)
    assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)  # fp32 round-off of a size-3 output
    torchdora.unmerge(outer)
    assert_close(model.base.weight.double(), w0, rtol=0, atol=1e-6)
    plain = torchdora.merge_and_unload(outer)
    with torch.no_grad():
        assert_close(plain(x), unmerged, rtol=1e-5, atol=1e-5)


def test_a_merge_that_is_not_finite_is_refused_and_changes_nothing():
    model = _net()
    torchdora.inject(model, DoraConfig(r=4, target_modules=["0", "2"]))
    with torch.no_grad():
        model[2].lora_B.fill_(float("inf"))
    weights = [model[i].base.weight.detach().clone() for i in (0, 2)]
    with pytest.raises(ValueError, match="non-finite"):
        torchdora.merge(model)
    assert not any(layer.merged for layer in adapter_layers(model).values())  # layer 0 was rolled back
    for i, w in zip((0, 2), weights):
        assert torch.equal(model[i].base.weight, w)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf")])
def test_add_weighted_adapter_refuses_non_finite_weights(weight):
    """Before: ``add_weighted_adapter(model, ["default"], [nan], "blend")`` was accepted; outputs became NaN."""
    model = _net()
    torchdora.inject(model, DoraConfig(r=4, target_modules=["0"]))
    with pytest.raises(ValueError, match="finite"):
        torchdora.add_weighted_adapter(model, ["default"], [weight], "blend")
    assert torchdora.list_adapters(model) == ["default"]


@pytest.mark.parametrize("name", ["", "/tmp/escape", "../up", "..", ".", "a/b", "a\\b", "with.dot", "-flag",
                                  "x" * 101, 3])
def test_adapter_names_that_are_not_plain_are_refused_everywhere(name, tmp_path):
    """Before: ``add_adapter(m, "/some/abs/path", cfg)`` was accepted and ``save_adapter`` wrote to that path."""
    model = _net()
    config = DoraConfig(r=4, target_modules=["0"])
    for call in (lambda: torchdora.inject(model, config, adapter_name=name),
                 lambda: torchdora.add_adapter(model, name, config)):
        with pytest.raises(ValueError, match="adapter name"):
            call()
        assert state_of(model) is None and not adapter_layers(model)
    torchdora.inject(model, config)
    torchdora.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="adapter name"):
        torchdora.add_adapter(model, name, config)
    with pytest.raises(ValueError, match="adapter name"):
        torchdora.load_adapter(model, tmp_path / "a", adapter_name=name)
    with pytest.raises(ValueError, match="adapter name"):
        torchdora.add_weighted_adapter(model, ["default"], [1.0], name)
    assert torchdora.list_adapters(model) == ["default"]


def test_every_named_adapter_is_saved_inside_the_folder(tmp_path):
    model = _net()
    torchdora.inject(model, DoraConfig(r=4, target_modules=["0"]))
    torchdora.add_adapter(model, "second-one_2", DoraConfig(r=2, target_modules=["2"]))
    torchdora.save_adapter(model, tmp_path / "out")
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["out/second-one_2/torchdora_adapter.safetensors", "out/second-one_2/torchdora_config.json",
                       "out/torchdora_adapter.safetensors", "out/torchdora_config.json"]


def test_the_state_has_one_owner_and_inject_twice_is_refused():
    model = _net()
    torchdora.inject(model, DoraConfig(r=4, target_modules=["0"]))
    state = state_of(model)
    assert state.configs.keys() == {"default"} and state.active == ["default"] and state.current == "default"
    with pytest.raises(ValueError, match="already has torchdora adapters"):
        torchdora.inject(model, DoraConfig(r=4, target_modules=["2"]))
    torchdora.add_adapter(model, "b", DoraConfig(r=2, target_modules=["0", "2"]))
    with torchdora.using_adapter(model, "b"):
        assert state.current == "b" and torchdora.adapter_config(model).r == 2
        assert set(adapter_layers(model)) == {"0", "2"}
    assert state.current == "default" and set(adapter_layers(model)) == {"0", "2"}
    torchdora.delete_adapter(model, "default")
    assert state.current == "b" and torchdora.active_adapters(model) == ["b"]
    assert isinstance(model[0], LinearAdapter)
    torchdora.unload(model)
    assert state_of(model) is None


def test_docstrings_cite_only_files_that_ship():
    """The library and the application cite the paper and the repository's own docs, not an outside file."""
    source = Path(torchdora.__file__).parent
    repo = source.parent.parent
    offenders = [str(p.relative_to(source)) for p in source.rglob("*.py") if "REFERENCE" in p.read_text()]
    assert offenders == []
    import re

    cited = {m for p in source.rglob("*.py") for m in re.findall(r"docs/[\w./-]+\.md", p.read_text())}
    if (repo / "docs").is_dir():  # a source checkout: every cited page exists
        assert sorted(c for c in cited if not (repo / c).is_file()) == []
