"""Named adapters on one model (``torchdora.adapters``): switching, deleting, combining, mixed batches, files.

References: a single-adapter model trained the same way (switching), each row run alone (mixed batches), the
merged weight written out from the definition in float64 (combination, merging one adapter).
"""

from __future__ import annotations

import copy
import gc
import json
import weakref

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import torchdora
from torchdora import DoraConfig, adapter_layers, inject
from torchdora import functional as DF
from torchdora.layers import LinearAdapter

pytestmark = pytest.mark.usefixtures("single_thread")
# one fp32 computation against another that sums in a different order (a row alone vs in a batch)
FP32 = dict(rtol=1e-6, atol=1e-6)
# a mixed batch without autograd groups the rows by adapter and multiplies them in batched products (bmm) with
# s folded into B: another summation order than one row alone, a few fp32 ulps through the two blocks (2e-6)
MIXED = dict(rtol=1e-5, atol=1e-5)
CONFIG = DoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])


def _perturb_all(model: nn.Module, perturb, seed: int = 1) -> None:
    for i, name in enumerate(torchdora.list_adapters(model)):
        with torchdora.using_adapter(model, name):
            perturb(model, seed=seed + i)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _three_adapters(make_tiny_llama, perturb):
    """Tiny Llama with DoRA ``a`` (default config), DoRA ``b`` (rank 2, other targets) and LoRA ``c``."""
    model = make_tiny_llama()
    torchdora.add_adapter(model, "a", CONFIG)
    torchdora.add_adapter(model, "b", DoraConfig(r=2, alpha=2, target_modules=["k_proj", "v_proj", "down_proj"]))
    torchdora.add_adapter(model, "c", DoraConfig(r=3, alpha=6, target_modules=["q_proj", "o_proj"], use_dora=False))
    _perturb_all(model, perturb)
    return model


# ---- switching -------------------------------------------------------------------------------------------------
def _train(model, params, ids, steps=3):
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_two_adapters_trained_on_different_data_give_each_ones_logits_exactly(make_tiny_llama, input_ids):
    data = [torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    references = []
    for i in range(2):  # each adapter alone in its own model, trained on its own data
        model = make_tiny_llama()
        torch.manual_seed(10 + i)
        inject(model, CONFIG)
        _train(model, [p for p in model.parameters() if p.requires_grad], data[i])
        references.append(_logits(model, input_ids))
    model = make_tiny_llama()
    base = _logits(model, input_ids)
    for i, name in enumerate(["a", "b"]):
        torch.manual_seed(10 + i)
        torchdora.add_adapter(model, name, CONFIG)
    for i, name in enumerate(["a", "b"]):
        torchdora.set_adapter(model, name)
        params = [p for layer in adapter_layers(model).values() for p in layer.adapters[name].parameters()]
        _train(model, params, data[i])
    for name, want in [("a", references[0]), ("b", references[1]), ("a", references[0])]:
        torchdora.set_adapter(model, name)
        assert torchdora.active_adapters(model) == [name]
        assert_close(_logits(model, input_ids), want, rtol=0, atol=0)
    assert not torch.allclose(references[0], references[1], atol=1e-4)  # guard: the two really differ
    assert not torch.allclose(references[0], base, atol=1e-4)
    with torchdora.disable_adapter(model):
        assert_close(_logits(model, input_ids), base, rtol=0, atol=0)


def test_several_active_adapters_add_their_updates():
    """PEFT's rule: ``y = base(x) + Σ_i (y_i − base(x))``, checked on one layer against each adapter alone."""
    torch.manual_seed(0)
    layer = LinearAdapter(nn.Linear(12, 8), r=3, alpha=6.0, adapter_name="a")
    layer.add_adapter("b", r=2, alpha=2.0)
    layer.add_adapter("c", r=2, alpha=4.0, use_dora=False)
    with torch.no_grad():
        for ad in layer.adapters.values():
            for p in ad.parameters():
                p.add_(0.3 * torch.randn_like(p))
    layer.eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        base = layer.base(x)
        alone = {}
        for name in "abc":
            layer.set_adapter(name)
            alone[name] = layer(x)
        layer.set_adapter(["a", "b", "c"])
        got = layer(x)
    assert_close(got, base + sum(y - base for y in alone.values()), **FP32)


# ---- deleting ------------------------------------------------------------------------------------------------
def test_delete_adapter_frees_its_parameters(make_tiny_llama, perturb, input_ids):
    model = _three_adapters(make_tiny_llama, perturb)
    torchdora.set_adapter(model, "b")
    want_b = _logits(model, input_ids)
    refs = [weakref.ref(p) for layer in adapter_layers(model).values() if "a" in layer.adapters
            for p in layer.adapters["a"].parameters()]
    count = sum(p.numel() for p in model.parameters())
    torchdora.set_adapter(model, "a")
    torchdora.delete_adapter(model, "a")
    gc.collect()
    assert refs and all(r() is None for r in refs)  # nothing holds the deleted tensors any more
    assert torchdora.list_adapters(model) == ["b", "c"]
    assert torchdora.active_adapters(model) == ["b"]  # the active one was deleted: the first remaining
    assert sum(p.numel() for p in model.parameters()) < count
    assert not any(k.startswith("a.") or ".adapters.a." in k for k in model.state_dict())
    assert_close(_logits(model, input_ids), want_b, rtol=0, atol=0)
    torchdora.delete_adapter(model, "b")
    torchdora.delete_adapter(model, "c")
    assert not adapter_layers(model)  # plain modules again
    assert_close(_logits(model, input_ids), _logits(make_tiny_llama(), input_ids), rtol=0, atol=0)


def test_named_adapter_errors(make_tiny_llama, perturb):
    model = _three_adapters(make_tiny_llama, perturb)
    with pytest.raises(ValueError, match="no adapter named"):
        torchdora.set_adapter(model, "zz")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        torchdora.add_adapter(model, "a", CONFIG)
    with pytest.raises(ValueError, match="modules_to_save"):
        torchdora.add_adapter(model, "d", DoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="3 entries but the batch has 2 rows"):
        with torchdora.mixed_batch(model, ["a", "b", None]):
            model(torch.zeros(2, 3, dtype=torch.long))


# ---- mixed batches -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [["a", None, "b", "c", "a", None],  # padded groups, base rows
                                  ["a", "b", "c", None],  # the batch is the layout: the update added in place
                                  ["a", "a", "b", "b", None, None]])  # the layout, two rows per adapter
def test_mixed_batch_equals_each_row_alone(make_tiny_llama, perturb, rows):
    model = _three_adapters(make_tiny_llama, perturb)
    ids = torch.randint(3, 64, (len(rows), 7), generator=torch.Generator().manual_seed(9))
    with torchdora.mixed_batch(model, rows):
        got = _logits(model, ids)
    for i, name in enumerate(rows):
        if name is None:
            with torchdora.disable_adapter(model):
                want = _logits(model, ids[i:i + 1])
        else:
            torchdora.set_adapter(model, name)
            want = _logits(model, ids[i:i + 1])
        assert_close(got[i:i + 1], want, **MIXED, msg=f"row {i} ({name})")
    # guard: the same ids through different adapters differ, so each row really used its own
    same = ids[:1].expand(4, -1)
    with torchdora.mixed_batch(model, ["a", "b", "c", None]):
        out = _logits(model, same)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(out[i], out[j], atol=1e-4)


@pytest.mark.parametrize("rows", [["a", "b", "c"], ["a", None, "b", "c", "a", None], ["b", "b", "b", "a"],
                                  [None, None], ["c", "a", "c", "a", "c", "b", "a", "c"],
                                  ["a", "a", None]])
def test_row_layout_groups_each_row_with_its_adapter(rows):
    """The grouped layout of a mixed batch against a plain reading of ``rows``: slot ``g`` holds exactly the rows
    of adapter ``g`` in order (base rows last), padded with row 0; each row's place is its own slot position."""
    from torchdora.layers.mixed import row_layout

    names = tuple(dict.fromkeys(n for n in rows if n is not None))
    layout = row_layout(rows, names, torch.device("cpu"))
    order = list(names) + ([None] if None in rows else [])
    members = [[i for i, n in enumerate(rows) if n == name] for name in order]
    width = max(len(m) for m in members)
    assert (layout.slots, layout.width) == (len(order), width)
    want_gather = [m[j] if j < len(m) else 0 for m in members for j in range(width)]
    gather = list(range(len(rows))) if layout.gather is None else layout.gather.tolist()
    assert gather == want_gather
    scatter = list(range(len(rows))) if layout.scatter is None else layout.scatter.tolist()
    assert [gather[p] for p in scatter] == list(range(len(rows)))  # each row's place holds that row
    assert layout.slot.tolist() == [order.index(n) for n in rows]


def test_mixed_batch_refuses_an_adapter_deleted_inside_the_block(make_tiny_llama, perturb):
    model = _three_adapters(make_tiny_llama, perturb)
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torchdora.mixed_batch(model, ["a", "b"]):
        model(ids)  # the layout of this assignment is kept per layer
        torchdora.delete_adapter(model, "b")
        with pytest.raises(ValueError, match=r"no adapter named \['b'\]"):
            model(ids)


def test_mixed_batch_on_every_layer_kind(make_mixed_net):
    """Embedding, Conv1d/2d/3d and Linear layers: one adapter per row equals each row alone."""
    model = make_mixed_net()
    config = DoraConfig(r=2, alpha=4, target_modules=["emb", "conv1", "conv2", "conv3", "head"])
    torchdora.add_adapter(model, "a", config)
    torchdora.add_adapter(model, "b", DoraConfig(r=3, alpha=3, target_modules=["emb", "conv2", "head"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for ad in layer.adapters.values():
                for p in ad.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
    rows = ["b", "a", None, "b"]
    ids = torch.randint(0, 11, (len(rows), 5), generator=gen)
    with torch.no_grad(), torchdora.mixed_batch(model, rows):
        got = model(ids)
    for i, name in enumerate(rows):
        with torch.no_grad():
            if name is None:
                with torchdora.disable_adapter(model):
                    want = model(ids[i:i + 1])
            else:
                torchdora.set_adapter(model, name)
                want = model(ids[i:i + 1])
        assert_close(got[i:i + 1], want, **FP32, msg=f"row {i} ({name})")


# ---- combining and merging -----------------------------------------------------------------------------------
def _two_layer_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).eval()


def _reference_weight(layer, adapters, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined weight from its definition, float64: ``W' = m ⊙ V / ||V||`` (DoRA) or ``V`` (LoRA)."""
    w = layer.base.weight.detach().double()
    v = w.clone()
    dora = layer.adapters[adapters[0]].use_dora
    m = torch.linalg.vector_norm(w, dim=1)
    base_norm = m.clone()
    for name, wt in zip(adapters, weights):
        ad = layer.adapters[name]
        v += wt * ad.scaling * ad.lora_B.detach().double() @ ad.lora_A.detach().double()
        if dora:
            m += wt * (ad.magnitude.detach().double() - base_norm)
    if dora:
        return (m / torch.linalg.vector_norm(v, dim=1))[:, None] * v, layer.base.bias.detach().double()
    return v, layer.base.bias.detach().double()


@pytest.mark.parametrize("use_dora", [True, False])
def test_weighted_adapter_matches_its_definition(use_dora):
    model = _two_layer_net()
    torchdora.add_adapter(model, "a", DoraConfig(r=3, alpha=6, target_modules=["0", "2"], use_dora=use_dora))
    torchdora.add_adapter(model, "b", DoraConfig(r=2, alpha=8, target_modules=["0", "2"], use_dora=use_dora,
                                                 use_rslora=True))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for ad in layer.adapters.values():
                for p in ad.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
    adapters, weights = ["a", "b"], [0.7, -0.4]
    reference = copy.deepcopy(model).double()
    for name, layer in adapter_layers(model).items():
        w, b = _reference_weight(layer, adapters, weights)
        plain = nn.Linear(w.shape[1], w.shape[0]).double()
        plain.weight.data.copy_(w), plain.bias.data.copy_(b)
        reference[int(name)] = plain
    torchdora.add_weighted_adapter(model, adapters, weights, "ab")
    torchdora.set_adapter(model, "ab")
    x = torch.randn(5, 12, generator=gen)
    with torch.no_grad():
        got = model(x)
        assert_close(got.double(), reference(x.double()), rtol=1e-5, atol=1e-6)  # fp32 against fp64
        torchdora.set_adapter(model, "a")
        assert not torch.allclose(got, model(x), atol=1e-4)  # guard: the combination is neither adapter
    # one adapter with weight 1 is that adapter
    torchdora.add_weighted_adapter(model, ["b"], [1.0], "b1")
    with torch.no_grad():
        torchdora.set_adapter(model, "b")
        want = model(x)
        torchdora.set_adapter(model, "b1")
        assert_close(model(x), want, **FP32)


def _dora_update(w: torch.Tensor, ad) -> torch.Tensor:
    """One DoRA adapter's update of the pre-trained ``w`` in float64, from the definition (paper eq. 5)."""
    v = w + ad.scaling * ad.lora_B.double() @ ad.lora_A.double()
    return (ad.magnitude.double() / torch.linalg.vector_norm(v, dim=1))[:, None] * v - w


def test_merging_one_adapter_then_another_gives_the_weight_of_both_active():
    """merge(['a']) then merge(['b']): the weight of a and b active together, each normalised against the
    pre-trained weight; an active adapter cannot stay unmerged beside a merged one."""
    model = _two_layer_net()
    torchdora.add_adapter(model, "a", DoraConfig(r=3, alpha=6, target_modules=["0", "2"]))
    torchdora.add_adapter(model, "b", DoraConfig(r=2, alpha=4, target_modules=["0", "2"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for ad in layer.adapters.values():
                for p in ad.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
    x = torch.randn(4, 12, generator=gen)
    weights = {n: layer.base.weight.detach().clone() for n, layer in adapter_layers(model).items()}
    with torch.no_grad():
        torchdora.set_adapter(model, "a")
        want_a = model(x)
        torchdora.merge(model, adapter_names=["a"])
        assert_close(model(x), want_a, **FP32)  # a, merged: its own output
        with pytest.raises(RuntimeError, match="unmerge"):
            torchdora.set_adapter(model, "b")  # b would compute on a changed base weight
        torchdora.merge(model, adapter_names=["b"])  # b joins: both are applied, both active
        assert torchdora.active_adapters(model) == ["a", "b"]
        got = model(x)
    h = x.double()
    for i, n in ((0, "0"), (1, "2")):
        layer = model[2 * i]
        w = weights[n].double()
        w_ab = w + _dora_update(w, layer.adapters["a"]) + _dora_update(w, layer.adapters["b"])
        h = h @ w_ab.T + layer.base.bias.double()
        if i == 0:
            h = torch.tanh(h)
    assert_close(got.double(), h, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="merged"):
        torchdora.delete_adapter(model, "a")
    torchdora.unmerge(model)
    for n, layer in adapter_layers(model).items():
        assert_close(layer.base.weight, weights[n], rtol=1e-5, atol=1e-6)


# ---- files ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["torchdora", "peft"])
def test_save_and_load_named_adapters(fmt, make_tiny_llama, perturb, input_ids, tmp_path):
    model = make_tiny_llama()
    inject(model, CONFIG)
    torchdora.add_adapter(model, "b", DoraConfig(r=2, alpha=2, target_modules=["k_proj", "v_proj"]))
    _perturb_all(model, perturb)
    want = {}
    for name in ("default", "b"):
        torchdora.set_adapter(model, name)
        want[name] = _logits(model, input_ids)
    torchdora.save_adapter(model, tmp_path / "all", format=fmt)
    config_file = "torchdora_config.json" if fmt == "torchdora" else "adapter_config.json"
    assert (tmp_path / "all" / config_file).is_file() and (tmp_path / "all" / "b" / config_file).is_file()
    torchdora.save_adapter(model, tmp_path / "only_b", format=fmt, adapter_name="b")
    assert not (tmp_path / "only_b" / config_file).exists() and (tmp_path / "only_b" / "b" / config_file).is_file()

    fresh = make_tiny_llama()
    torchdora.load_adapter(fresh, tmp_path / "all")
    torchdora.load_adapter(fresh, tmp_path / "only_b" / "b", adapter_name="b")
    assert torchdora.list_adapters(fresh) == ["default", "b"]
    for name in ("default", "b"):
        torchdora.set_adapter(fresh, name)
        assert_close(_logits(fresh, input_ids), want[name], rtol=0, atol=0)
    assert not torch.allclose(want["default"], want["b"], atol=1e-4)
    if fmt == "peft":  # PEFT reads the multi-adapter folder: root = default, <name>/ = name
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "all")
        peft_model.load_adapter(tmp_path / "all" / "b", adapter_name="b")
        for name in ("default", "b"):
            peft_model.set_adapter(name)
            assert_close(_logits(peft_model, input_ids), want[name], rtol=1e-5, atol=1e-5)
        assert json.loads((tmp_path / "all" / "b" / config_file).read_text())["r"] == 2


def test_mixed_batch_generate_equals_each_prompt_alone(make_tiny_llama, perturb):
    """Serving: left-padded prompts of different lengths, each with its adapter or the base, generated as one
    batch (what examples/serve_adapters.py does) give each prompt's greedy tokens generated alone."""
    model = _three_adapters(make_tiny_llama, perturb)
    gen = torch.Generator().manual_seed(11)
    names = ["a", None, "c", "b", "a"]
    prompts = [torch.randint(3, 64, (n,), generator=gen) for n in (5, 3, 7, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), torchdora.mixed_batch(model, names):
        batched = model.generate(input_ids=ids, attention_mask=mask, **settings)[:, width:]
    for i, (name, p) in enumerate(zip(names, prompts)):
        with torch.no_grad():
            if name is None:
                with torchdora.disable_adapter(model):
                    want = model.generate(input_ids=p[None], **settings)[0, len(p):]
            else:
                torchdora.set_adapter(model, name)
                want = model.generate(input_ids=p[None], **settings)[0, len(p):]
        assert torch.equal(batched[i], want), f"prompt {i} ({name})"
