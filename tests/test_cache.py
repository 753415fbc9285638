"""The cached norms and factor are never stale: after every kind of change the layer gives what a fresh layer
(same tensors, empty caches) gives, in training and in eval; and the caches are really used when nothing changed."""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import torchdora
from torchdora import DoraConfig, inject, load_adapter, save_adapter
from torchdora import functional as DF
from torchdora.layers import AdapterLayer, ConvAdapter, EmbeddingAdapter, LinearAdapter

# the same fp32 computation, once with caches and once without: only summation order can differ
FP32 = dict(rtol=1e-5, atol=1e-5)


def make(kind: str) -> tuple[AdapterLayer, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = LinearAdapter(nn.Linear(12, 8), r=3, alpha=6.0), torch.randn(5, 12)
    elif kind == "conv2d":
        layer, x = ConvAdapter(nn.Conv2d(3, 4, 3, padding=1), r=2, alpha=4.0), torch.randn(2, 3, 5, 5)
    else:
        layer, x = EmbeddingAdapter(nn.Embedding(10, 6), r=2, alpha=4.0), torch.randint(0, 10, (2, 4))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return layer, x


def fresh_output(layer: AdapterLayer, x: torch.Tensor) -> torch.Tensor:
    """What a layer with the same tensors and no cache computes."""
    copy_ = copy.deepcopy(layer)
    copy_.clear_cache()
    with torch.no_grad():
        return copy_(x)


def _edit_weight(layer, x):
    with torch.no_grad():
        layer.base.weight.mul_(1.3)


def _edit_a(layer, x):
    with torch.no_grad():
        layer.lora_A.add_(0.2)


def _edit_b(layer, x):
    with torch.no_grad():
        layer.lora_B.mul_(-2.0)


def _edit_m(layer, x):
    with torch.no_grad():
        layer.magnitude.mul_(0.5)


def _optimizer_step(layer, x):
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(x).float().square().sum().backward()
    opt.step()


def _foreach_sgd_step(layer, x):
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5, foreach=True)
    layer(x).float().square().sum().backward()
    opt.step()


def _to_float64_and_back(layer, x):
    layer.double()
    with torch.no_grad():
        layer.base.weight.add_(0.25)  # a change made in the other dtype
    layer.float()


def _replace_parameter(layer, x):
    layer.lora_B = nn.Parameter(torch.randn_like(layer.lora_B))


def _load_state_dict(layer, x):
    state = {k: v + 0.1 for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)


def _merge_unmerge_then_edit(layer, x):
    with torch.no_grad():
        layer.merge()
        layer.unmerge()


def _swap_data(layer, x):
    layer.lora_A.data = layer.lora_A.data * 3.0  # .data assignment: a new storage


def _scaling(layer, x):
    layer.scaling = layer.scaling * 2.0


CHANGES: dict[str, Callable] = {
    "edit_weight": _edit_weight, "edit_A": _edit_a, "edit_B": _edit_b, "edit_m": _edit_m,
    "adamw_step": _optimizer_step, "foreach_sgd_step": _foreach_sgd_step, "to_dtype": _to_float64_and_back,
    "replace_parameter": _replace_parameter, "load_state_dict": _load_state_dict,
    "merge_unmerge": _merge_unmerge_then_edit, "data_assignment": _swap_data, "scaling": _scaling,
}


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_change_invalidates_cache(kind, mode, change):
    layer, x = make(kind)
    layer.train(mode == "train")
    before = layer(x).detach()
    with torch.no_grad():
        layer(x)  # fill the no-grad (eval) caches too
    CHANGES[change](layer, x)
    want = fresh_output(layer, x)
    got_grad = layer(x).detach()
    with torch.no_grad():
        got_nograd = layer(x)
    assert_close(got_grad, want, **FP32)
    assert_close(got_nograd, want, **FP32)
    if change != "merge_unmerge":  # guard: the change did change the output (merge/unmerge restores it)
        assert not torch.allclose(want, before, **FP32)


def test_merged_layer_and_unmerged_again_use_the_current_weight():
    layer, x = make("linear")
    layer.eval()
    unmerged = layer(x)
    layer.merge()
    assert_close(layer(x), unmerged, **FP32)
    with torch.no_grad():
        layer.lora_B.add_(0.5)  # edited while merged; unmerge subtracts the new B·A, so W moves with it
    layer.unmerge()
    assert_close(layer(x), fresh_output(layer, x), **FP32)


def test_load_adapter_invalidates_cache(tmp_path, make_tiny_llama, input_ids, perturb):
    source = make_tiny_llama()
    inject(source, DoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    perturb(source, seed=3)
    save_adapter(source, tmp_path / "adapter")
    model = make_tiny_llama()
    inject(model, DoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    perturb(model, seed=4)
    with torch.no_grad():
        stale = model(input_ids).logits  # caches filled with the old adapter
        load_adapter(model, tmp_path / "adapter")
        got = model(input_ids).logits
        want = source(input_ids).logits
    assert_close(got, want, **FP32)
    assert not torch.allclose(stale, want, **FP32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_move_invalidates_cache():
    layer, x = make("linear")
    layer.eval()
    with torch.no_grad():
        cpu_out = layer(x)
        layer.cuda()
        with torch.no_grad():
            layer.base.weight.mul_(1.5)
        layer.cpu()
        assert_close(layer(x), fresh_output(layer, x), **FP32)
        assert not torch.allclose(layer(x), cpu_out, **FP32)


# ---- the caches are used --------------------------------------------------------------------------------------
def _count_calls(monkeypatch, name: str) -> list[int]:
    calls = [0]
    original = getattr(DF, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(DF, name, counted)
    return calls


def test_eval_computes_norm_and_factor_once(monkeypatch):
    layer, x = make("linear")
    layer.eval()
    norms = _count_calls(monkeypatch, "factored_row_norm")
    scales = _count_calls(monkeypatch, "dora_scale")
    with torch.no_grad():
        first = layer(x)
        for _ in range(3):
            assert_close(layer(x), first, rtol=0, atol=0)
    assert norms[0] == 1 and scales[0] == 1
    with torch.no_grad():
        layer.magnitude.mul_(2.0)  # m changes: the factor is recomputed, the norm is not
        layer(x)
    assert norms[0] == 1 and scales[0] == 2


def test_training_recomputes_norm_once_per_step_and_base_norm_never(monkeypatch):
    layer, x = make("linear")
    layer.train()
    norms = _count_calls(monkeypatch, "factored_row_norm")
    base = _count_calls(monkeypatch, "base_row_sq_norm")
    layer.clear_cache()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        for _ in range(2):  # two gradient-accumulation micro-batches share one norm
            layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert norms[0] == 3
    assert base[0] == 1  # ||W||² of the frozen base: once


# ---- edits that version counters do not see ----------------------------------------------------------------
def _param_owner(layer: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds the parameter ``layer.<name>`` and its attribute name there."""
    target = getattr(layer, name)
    for module in layer.modules():
        for pname, p in module.named_parameters(recurse=False):
            if p is target:
                return module, pname
    raise LookupError(name)


class _Scale(nn.Module):
    """A parametrization ``X ↦ s·X`` whose ``s`` can be changed behind the parametrized tensor's back."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.0), requires_grad=False)

    def forward(self, x):
        return x * self.s


def test_which_edits_move_the_version_counter():
    """The facts torchdora.cache's rule rests on (torch 2.13): if one of these changes, its docstring must."""
    p = nn.Parameter(torch.randn(4, 3))
    p.data.add_(1.0)
    p.data.copy_(torch.zeros(4, 3))
    assert p._version == 0  # .data is a new tensor with its own counter
    with torch.no_grad():
        p.add_(1.0)
    assert p._version == 1
    p.detach().mul_(2.0)  # a detached alias shares the counter
    assert p._version == 2
    steps = {}
    kinds = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    for name, kwargs in kinds.items():
        q = nn.Parameter(torch.randn(4, 3))
        q.grad = torch.ones(4, 3)
        torch.optim.AdamW([q], lr=0.1, **kwargs).step()
        steps[name] = q._version
    assert steps == {"for-loop": 2, "foreach": 2, "fused": 0}  # a fused step writes behind the counter


def _parametrize_b(layer):
    from torch.nn.utils import parametrize

    owner, name = _param_owner(layer, "lora_B")
    scale = _Scale()
    parametrize.register_parametrization(owner, name, scale)
    with torch.no_grad():
        layer(layer._x)  # cache filled through the parametrization
    scale.s.data.fill_(-2.0)  # the parametrized tensor is rebuilt on every access, maybe at the same address


def _parametrize_base(layer):
    from torch.nn.utils import parametrize

    scale = _Scale()
    parametrize.register_parametrization(layer.base, "weight", scale)
    with torch.no_grad():
        layer(layer._x)
    scale.s.data.fill_(1.5)


def _swap_b(layer):
    new = nn.Parameter(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(7)))
    torch.utils.swap_tensors(layer.lora_B, new)


def _swap_base(layer):
    w = layer.base.weight
    torch.utils.swap_tensors(w, nn.Parameter(2.0 * w.detach().clone(), requires_grad=False))


def _fused_adamw(layer):
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, fused=True)
    layer.train()
    layer(layer._x).float().square().sum().backward()
    opt.step()
    layer.eval()


def _half_and_back(layer):
    layer.half()  # the fp32 storages are freed; the new ones may reuse their addresses
    layer.float()


SEEN: dict[str, Callable] = {
    "parametrize_B": _parametrize_b, "parametrize_base": _parametrize_base, "swap_tensors_B": _swap_b,
    "swap_tensors_base": _swap_base, "fused_adamw": _fused_adamw, "half_and_back": _half_and_back,
}


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
@pytest.mark.parametrize("change", list(SEEN))
def test_change_behind_the_version_counter_is_seen(kind, change):
    """New storages (parametrizations, swaps, dtype round trips) and fused optimizer steps need no clear_cache."""
    layer, x = make(kind)
    layer.eval()
    layer._x = x
    with torch.no_grad():
        before = layer(x)  # caches filled
    SEEN[change](layer)
    want = fresh_output(layer, x)
    with torch.no_grad():
        got = layer(x)
    assert_close(got, want, **FP32)
    if change != "half_and_back":  # guard: the change did change the output (a round trip changes it a little)
        assert not torch.allclose(want, before, **FP32)
    layer.train()  # the training path's cached norm (gradient-accumulation micro-batches) too
    assert_close(layer(x).detach(), fresh_output(layer.eval(), x), **FP32)


def _data_add_b(layer):
    layer.lora_B.data.add_(0.5)


def _data_add_a(layer):
    layer.lora_A.data.mul_(-1.5)


def _data_mul_m(layer):
    layer.magnitude.data.mul_(0.7)


def _data_mul_base(layer):
    layer.base.weight.data.mul_(1.5)


def _data_copy_b(layer):
    layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(5)))


def _numpy_write_base(layer):
    layer.base.weight.detach().numpy()[0] += 1.0  # shared memory, no dispatch at all


UNSEEN: dict[str, Callable] = {
    "B.data.add_": _data_add_b, "A.data.mul_": _data_add_a, "m.data.mul_": _data_mul_m,
    "base.weight.data.mul_": _data_mul_base, "B.data.copy_": _data_copy_b, "base.weight.numpy": _numpy_write_base,
}


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
@pytest.mark.parametrize("change", list(UNSEEN))
def test_edit_through_data_needs_clear_cache(kind, change):
    """The documented rule: an edit through ``.data`` or shared memory is not seen until torchdora.clear_cache."""
    layer, x = make(kind)
    layer.eval()
    with torch.no_grad():
        layer(x)  # caches filled
    UNSEEN[change](layer)
    want = fresh_output(layer, x)
    with torch.no_grad():
        stale = layer(x)
        assert not torch.allclose(stale, want, **FP32)  # the limitation is real, hence the rule
        torchdora.clear_cache(layer)
        assert_close(layer(x), want, **FP32)


def test_whole_model_data_edits_need_clear_cache(make_tiny_llama, input_ids, perturb):
    """An EMA-style update through ``.data`` on every adapter tensor, then clear_cache and eval: the logits of a
    fresh copy."""
    from torchdora import adapter_layers

    model = make_tiny_llama()
    inject(model, DoraConfig(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4))
    perturb(model, seed=3)
    with torch.no_grad():
        before = model(input_ids).logits
        for layer in adapter_layers(model).values():
            for p in layer.adapter_parameters().values():
                p.data.mul_(0.9).add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(8)))
        torchdora.clear_cache(model)
        got = model(input_ids).logits
        reference = copy.deepcopy(model)
        torchdora.clear_cache(reference)
        want = reference(input_ids).logits
    assert_close(got, want, **FP32)
    assert not torch.allclose(got, before, **FP32)


def test_state_dict_load_into_merged_layer():
    """A merged layer computes with the loaded weight, and unmerge refuses a weight it did not write."""
    layer, x = make("linear")
    other, _ = make("linear")
    with torch.no_grad():
        other.lora_B.mul_(-1.0)
    layer.eval(), other.eval()
    want = fresh_output(other, x)
    layer.merge()
    other.merge()
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert_close(layer(x), want, **FP32)
        assert not torch.allclose(layer(x), fresh_output(make("linear")[0].eval(), x), **FP32)
    with pytest.raises(RuntimeError, match="changed since merge"):
        layer.unmerge()


def test_unmerge_restores_weight_after_adapter_edits_while_merged():
    """Edits of A/B/m while merged (through .data or not) do not change what unmerge gives back."""
    layer, x = make("linear")
    weight = layer.base.weight.detach().clone()
    layer.merge()
    layer.lora_B.data.add_(0.5)
    with torch.no_grad():
        layer.lora_A.mul_(2.0)
        layer.magnitude.mul_(3.0)
    layer.double()  # a dtype round trip while merged is allowed
    layer.float()
    layer.unmerge()
    assert_close(layer.base.weight, weight, rtol=1e-5, atol=1e-6)  # fp32 round-off of W·f/f


# ---- no device synchronisation ----------------------------------------------------------------------------------
class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that read a device tensor on the host (a synchronisation on CUDA) or copy host data into
    a new tensor (a host-to-device copy that waits, on CUDA), while ``active`` is set (inside adapter layers)."""

    WATCHED = {
        torch.ops.aten.is_nonzero.default, torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
        torch.ops.aten.item.default, torch.ops.aten.lift_fresh.default, torch.ops.aten.nonzero.default,
        torch.ops.aten.masked_select.default, torch.ops.aten.allclose.default,
    }

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and func in self.WATCHED:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _host_reads_in_adapter_layers(model: nn.Module, run: Callable[[], object]) -> list[str]:
    from torchdora import adapter_layers

    mode = _HostReads()

    def enter(module, args):
        mode.active += 1

    def leave(module, args, out):
        mode.active -= 1

    handles = [h for layer in adapter_layers(model).values()
               for h in (layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave))]
    try:
        with mode, torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return mode.seen


@pytest.mark.parametrize("setting", ["one", "two_active", "mixed_batch"])
def test_eval_forward_reads_nothing_on_the_host_after_the_first_call(make_tiny_llama, input_ids, perturb, setting):
    """Unmerged eval (decoding): after the first call, no adapter layer syncs with the device, whatever it holds."""
    from torchdora import mixed_batch, set_adapter

    model = make_tiny_llama()
    config = DoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj",
                                        "embed_tokens"], r=4)
    inject(model, config)
    torchdora.add_adapter(model, "lora", DoraConfig(target_modules=config.target_modules, r=2, use_dora=False))
    perturb(model, seed=2)
    batch = input_ids[:2]
    if setting == "two_active":
        set_adapter(model, ["default", "lora"])

    def run():
        if setting == "mixed_batch":
            with mixed_batch(model, ["default", "lora"]):
                return model(batch)
        return model(batch)
    first = _host_reads_in_adapter_layers(model, run)
    if setting == "mixed_batch":  # the only host data an eval forward reads: the rows' slots, copied once
        assert first, "guard: the watch records what the first call reads (the mixed batch's row indices)"
    else:
        assert first == []  # not even the first call: without autograd nothing asks whether m has a zero
    assert _host_reads_in_adapter_layers(model, run) == []
    assert _host_reads_in_adapter_layers(model, run) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("setting", ["one", "two_active", "mixed_batch"])
def test_cuda_eval_forward_does_not_synchronise(make_tiny_llama, input_ids, perturb, setting):
    """On a GPU, under ``torch.cuda.set_sync_debug_mode("error")`` inside every adapter layer: after the first
    call, an unmerged eval forward raises on no synchronisation (one adapter, two active, a mixed batch)."""
    from torchdora import adapter_layers, mixed_batch, set_adapter

    model = make_tiny_llama()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "embed_tokens"]
    inject(model, DoraConfig(target_modules=targets, r=4))
    torchdora.add_adapter(model, "lora", DoraConfig(target_modules=targets, r=2, use_dora=False))
    perturb(model, seed=2)
    model.cuda()
    batch = input_ids[:2].cuda()
    if setting == "two_active":
        set_adapter(model, ["default", "lora"])

    def run():
        with torch.no_grad():
            if setting == "mixed_batch":
                with mixed_batch(model, ["default", "lora"]):
                    return model(batch).logits
            return model(batch).logits

    first = run()  # fills the caches (reads m == 0 once, copies the row indices)
    hooks = [h for layer in adapter_layers(model).values() for h in (
        layer.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error")),
        layer.register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode("default")))]
    try:
        again = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for h in hooks:
            h.remove()
    assert_close(again, first, rtol=0, atol=0)


def test_mixed_batch_stacks_follow_edits(make_tiny_llama, input_ids, perturb):
    """Without autograd a mixed batch reads stacked adapters kept between calls: it equals the per-adapter path
    (autograd on) before and after an in-place edit of one adapter's ``B``, and the edit changes its rows."""
    from torchdora import mixed_batch

    model = make_tiny_llama()
    targets = ["q_proj", "v_proj", "up_proj"]
    inject(model, DoraConfig(target_modules=targets, r=4))
    torchdora.add_adapter(model, "small", DoraConfig(target_modules=targets, r=2))
    torchdora.add_adapter(model, "lora", DoraConfig(target_modules=targets, r=3, use_dora=False))
    perturb(model, seed=4)
    rows = ["default", "small", None, "lora"]
    ids = input_ids[:1].expand(len(rows), -1)

    def both():
        with mixed_batch(model, rows):
            with torch.no_grad():
                stacked = model(ids).logits
            return stacked, model(ids).logits.detach()

    first, want = both()
    assert_close(first, want, **FP32)
    with torch.no_grad():
        layer = model.model.layers[0].self_attn.q_proj
        with layer.using("small"):
            layer.lora_B.add_(0.5)
    got, want = both()
    assert_close(got, want, **FP32)
    assert not torch.allclose(got[1], first[1], **FP32)  # guard: the edited adapter's row moved
    assert_close(got[0], first[0], rtol=0, atol=0)  # and no other
