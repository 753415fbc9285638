"""QDoRA over bitsandbytes NF4 (``layers/bnb.py``): every number against fp32 DoRA on the dequantized weight.

The reference is :class:`LinearAdapter` around an ``nn.Linear`` holding ``Ŵ = dequantize_4bit(W)`` with the same
``A``, ``B`` and ``m``: the 4-bit layer must compute exactly that function (docs/memory.md). Both sides are fp32 and
differ only in the order of operations (block-wise norms, a dequantize per product), so outputs and gradients agree
to a few fp32 ulps of values of order 1: ``rtol=1e-5, atol=1e-6``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the qdora extra) is not installed")

from conftest import assert_same_function, dense_reference, layer_grads  # noqa: E402
from torchdora import DoraConfig, adapter_layers, inject, load_adapter, merge_and_unload, save_adapter  # noqa: E402
from torchdora import functional as DF  # noqa: E402
from torchdora.layers import Linear4bitAdapter, LinearAdapter, adapter_class_for  # noqa: E402
from torchdora.layers import bnb as qlayers  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
TIGHT = dict(rtol=1e-5, atol=1e-6)


def _linear4bit(in_features=64, out_features=96, bias=True, seed=0, compute_dtype=torch.float32):
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4")  # double quantization on
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # quantizes


def _pair(seed=0, bias=True, **adapter):
    """(4-bit adapter, fp32 reference adapter on the dequantized weight) with identical A, B, m, off the identity."""
    q = Linear4bitAdapter(_linear4bit(bias=bias, seed=seed), **adapter)
    return q, dense_reference(q, q.weight_2d(), seed, **adapter)


def test_row_blocks_dequantize_exactly_like_the_whole_weight():
    layer = _linear4bit(in_features=64, out_features=96)
    whole = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    blocks = list(DF.dequantized_row_blocks(lambda a, b: qlayers.dequantize_linear4bit(layer, a, b), 96, 10))
    assert [b.shape[0] for b in blocks] == [10] * 9 + [6]
    assert torch.equal(torch.cat(blocks), whole)  # same bytes, same scales: bit-identical


def test_blockwise_norm_terms_match_float64(monkeypatch):
    monkeypatch.setattr(qlayers, "_BLOCK_ELEMENTS", 64 * 4)  # force several row blocks
    q, _ = _pair()
    w = q.weight_2d().double()
    a, b = q.lora_A.detach().double(), q.lora_B.detach().double()
    expected = torch.linalg.vector_norm(w + q.scaling * b @ a, dim=1)
    assert_close(q.base_sq_norm().double(), (w * w).sum(1), rtol=1e-6, atol=0)  # fp32 sums of 64 terms
    assert_close(q.row_norm().double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fast", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_qdora_gradients_equal_fp32_dora_on_dequantized_weight(fast, bias):
    q, ref = _pair(bias=bias)
    q.use_fast_path = ref.use_fast_path = fast
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(7))
    y = assert_same_function(q, ref, x, **TIGHT)
    assert not torch.allclose(y, ref.base(x), **TIGHT)  # guard: the adapter changes the output


def test_qdora_dropout_and_exact_norm_gradients_match():
    q, ref = _pair(dropout=0.25, detach_norm=False)
    q.train(), ref.train()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    assert_same_function(q, ref, x, **TIGHT)  # the same dropout masks on both sides


def test_gradients_stay_right_after_an_eval_mode_forward():
    """With AVX512-BF16, an eval no-grad forward repacks Linear4bit for inference; gradients after
    that were silently wrong. Force the repacking on (as a fresh load on such a CPU does), then train."""
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    model = nn.Sequential(_linear4bit(64, 64, seed=0), nn.GELU(), _linear4bit(64, 64, seed=1)).eval()
    for m in model:
        if qlayers.is_linear4bit(m):
            m.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        model(torch.randn(2, 64))
    assert getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)  # the hazard is armed
    model[0].support_avx512bf16_for_cpu = True
    assert qlayers.disable_cpu_weight_repacking(model) == 2
    assert not getattr(model[2].weight.quant_state, "packing_format_for_cpu", False)
    # the adapter guards its own base: repack the first layer again, then wrap it
    model[0].support_avx512bf16_for_cpu = True
    with torch.no_grad():
        model[0](torch.randn(2, 64))
    q = Linear4bitAdapter(model[0])
    assert not q.base.support_avx512bf16_for_cpu
    dense = nn.Linear(64, 64)
    with torch.no_grad():
        dense.weight.copy_(q.weight_2d()), dense.bias.copy_(q.base.bias)
    ref = LinearAdapter(dense)
    with torch.no_grad():
        for p, p_ref in zip(q.adapter_parameters().values(), ref.adapter_parameters().values()):
            p.add_(0.1), p_ref.copy_(p)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    y, gx, grads = layer_grads(q.eval(), x)  # eval mode with grads: still the unpacked weight
    y_ref, gx_ref, grads_ref = layer_grads(ref, x)
    assert_close(gx, gx_ref, **TIGHT)
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], **TIGHT, msg=name)


def test_merge_swaps_in_a_plain_linear_and_unmerge_restores_the_packed_base():
    q, _ = _pair()
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = q(x)
        packed = q.base
        merged = q.merged_linear(torch.bfloat16)
        assert merged.weight.dtype == torch.bfloat16
        q.merge()
        assert isinstance(q.base, nn.Linear) and not qlayers.is_linear4bit(q.base)
        assert_close(q(x), expected, **TIGHT)
        q.unmerge()
        assert q.base is packed
        assert_close(q(x), expected, rtol=0, atol=0)


def test_inject_merge_and_unload_on_a_4bit_model():
    model = nn.Sequential(_linear4bit(64, 64, seed=0), nn.GELU(), _linear4bit(64, 32, seed=1))
    assert adapter_class_for(model[0]) is Linear4bitAdapter
    inject(model, DoraConfig(target_modules=["0", "2"], r=4))
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.add_(0.1)
        x = torch.randn(2, 64)
        expected = model(x)
        merge_and_unload(model)
        assert all(type(m) is nn.Linear for m in (model[0], model[2]))
        assert_close(model(x), expected, **TIGHT)



def test_recompute_modules_by_name_on_4bit_layers_gives_the_same_gradients():
    """``recompute_modules`` names 4-bit layers too (they have the fused backward): same gradients as keeping the
    output, and backward saves no ``(tokens, out)`` output of the recomputing layer."""
    def model(recompute):
        m = nn.Sequential(_linear4bit(64, 64, seed=0), nn.GELU(), _linear4bit(64, 32, seed=1))
        inject(m, DoraConfig(target_modules=["0", "2"], r=4, recompute_modules=["0", "2"] if recompute else ()))
        with torch.no_grad():
            for layer in adapter_layers(m).values():
                layer.lora_B.add_(0.1)
        return m

    kept, recomputed = model(False), model(True)
    assert [layer.recompute_output for layer in adapter_layers(recomputed).values()] == [True, True]
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(9))
    grads = []
    for m in (kept, recomputed):
        m(x).square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], **TIGHT, msg=name)

# ---- PEFT's QDoRA files, both ways (transformers' own 4-bit load path) -------------------------------------------
def _quantized_tiny_llama(folder):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu",
                                                     dtype=torch.float32)
    qlayers.disable_cpu_weight_repacking(model)
    return model.eval()


@pytest.fixture
def llama4bit_folder(tmp_path_factory, make_tiny_llama):
    folder = tmp_path_factory.mktemp("llama")
    make_tiny_llama(0).save_pretrained(folder)
    return folder


TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_peft_qdora_adapter_loads_with_equal_logits(llama4bit_folder, input_ids, tmp_path):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(_quantized_tiny_llama(llama4bit_folder),
                                LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)).eval()
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__.endswith("bnb")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen)
                p.mul_(1 + 0.2 * noise) if "magnitude" in name else p.add_(0.3 * noise)
    expected = _logits(theirs, input_ids)
    theirs.save_pretrained(tmp_path)
    ours = _quantized_tiny_llama(llama4bit_folder)
    assert not torch.allclose(_logits(ours, input_ids), expected, rtol=1e-4, atol=1e-5)
    load_adapter(ours, tmp_path)
    assert all(isinstance(m, Linear4bitAdapter) for m in adapter_layers(ours).values())
    # PEFT adds a correction to the 4-bit base output, torchdora scales the sum: fp32 reorderings over 2 blocks
    assert_close(_logits(ours, input_ids), expected, rtol=1e-4, atol=1e-5)


def test_torchdora_qdora_adapter_loads_in_peft(llama4bit_folder, input_ids, tmp_path, perturb):
    from peft import PeftModel

    ours = _quantized_tiny_llama(llama4bit_folder)
    inject(ours, DoraConfig(target_modules=TARGETS, r=4, alpha=8))
    perturb(ours)
    expected = _logits(ours, input_ids)
    save_adapter(ours, tmp_path, format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(_quantized_tiny_llama(llama4bit_folder), tmp_path).eval()
    assert_close(_logits(theirs, input_ids), expected, rtol=1e-4, atol=1e-5)


def test_requantized_base_through_data_needs_clear_cache():
    """On a 4-bit base: packed bytes re-written through ``.data`` (a re-quantization in place) are an edit the
    cache cannot see from the host (:mod:`torchdora.cache`'s rule); ``torchdora.clear_cache`` makes it seen."""
    import copy

    import torchdora

    q, _ = _pair()
    q.eval()
    x = torch.randn(3, q.in_features)
    with torch.no_grad():
        before = q(x)
        other = _linear4bit(seed=5)
        q.base.weight.data.copy_(other.weight.data)  # new packed bytes, same quant_state object
        q.base.weight.quant_state = other.weight.quant_state
        stale = q(x)  # the new base product with the old factor
        torchdora.clear_cache(q)
        got = q(x)
        want = copy.deepcopy(q)(x)  # a copy starts with empty caches
    assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(stale, want, **TIGHT)  # not seen before clear_cache: the limitation is real
    assert not torch.allclose(got, before, **TIGHT)


# ---- an eval-mode forward before inject, for every 4-bit configuration ------------------------------------------
CONFIGS = [(quant, double, dtype) for quant in ("nf4", "fp4") for double in (True, False)
           for dtype in (torch.float32, torch.bfloat16)]


def _repacked_model(quant: str, double: bool, compute_dtype: torch.dtype) -> nn.Module:
    """Two 4-bit layers, eval mode (as ``from_pretrained`` returns them)."""
    torch.manual_seed(0)
    layers = []
    for seed in (0, 1):
        dense = nn.Linear(64, 64)
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=compute_dtype, compress_statistics=double, quant_type=quant)
        layer.load_state_dict(dense.state_dict())
        layers.append(layer.to("cpu"))
    return nn.Sequential(layers[0], nn.GELU(), layers[1]).eval()


@pytest.mark.parametrize("quant,double,compute_dtype", CONFIGS, ids=lambda v: str(v).replace("torch.", ""))
def test_inject_after_an_eval_forward_keeps_the_function_and_the_gradients(quant, double, compute_dtype):
    """Before: inject un-repacked only the layers it wrapped (the one after the adapter stayed repacked, its kernel
    has no backward, so the adapter's gradients were exactly zero), and without double quantization the
    un-repacking scrambled the weights (a tiny Llama's logits moved by 0.26; the embedded model's perplexity went
    from 4.7 to 126)."""
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    model = _repacked_model(quant, double, compute_dtype)
    original = [qlayers.dequantize_linear4bit(model[i]).float() for i in (0, 2)]  # before any repacking
    for i in (0, 2):
        model[i].support_avx512bf16_for_cpu = True
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(x.to(compute_dtype))
    assert all(getattr(model[i].weight.quant_state, "packing_format_for_cpu", False) for i in (0, 2))
    inject(model, DoraConfig(r=4, target_modules=["0"]))  # B = 0: the model must compute the same
    assert not getattr(model[2].weight.quant_state, "packing_format_for_cpu", False)  # not wrapped, protected
    # The repacking stored each block's scale in bf16 (a relative rounding of at most 2**-9): the weights come back
    # to that, never scrambled. (The repacked kernel itself computes in bf16, so its output is no fp32 reference.)
    now = [qlayers.dequantize_linear4bit(layer).float() for layer in (model[0].base, model[2])]
    for w, w0 in zip(now, original):
        assert_close(w, w0, rtol=2**-8, atol=0)
    dense = [nn.Linear(64, 64) for _ in range(2)]
    with torch.no_grad():
        for d, w, q in zip(dense, now, (model[0].base, model[2])):
            d.weight.copy_(w)
            d.bias.copy_(q.bias.float())
    reference = nn.Sequential(dense[0], nn.GELU(), dense[1]).eval()
    with torch.no_grad():
        after = model(x.to(compute_dtype)).float()
        want = reference(x)
    # fp32 compute: the same weights through another kernel, fp32 round-off; bf16 compute: bf16 products
    tol = dict(rtol=1e-4, atol=1e-4) if compute_dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    assert_close(after, want, **tol)
    # gradients against fp32 DoRA on the dequantized weights (the reference: plain nn.Linear layers)
    inject(reference, DoraConfig(r=4, target_modules=["0"]))
    with torch.no_grad():
        for p, p_ref in zip(model[0].adapter_parameters().values(), reference[0].adapter_parameters().values()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
            p_ref.copy_(p)
    model.train(), reference.train()
    for net in (model, reference):
        net(x.to(next(iter(net[0].adapter_parameters().values())).dtype)).float().square().sum().backward()
    for name, p_ref in reference[0].adapter_parameters().items():
        got = model[0].adapter_parameters()[name].grad
        assert got is not None and bool(got.abs().sum() > 0), name  # before: exactly zero
        if compute_dtype == torch.float32:
            assert_close(got, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)
        else:  # bf16 products: the gradient points the same way, to bf16's precision
            cos = torch.nn.functional.cosine_similarity(got.flatten(), p_ref.grad.flatten(), dim=0)
            assert float(cos) > 0.999, (name, float(cos))
