"""DoRA over a torchao int8 base (``layers/torchao.py``): every number against fp32 DoRA on the dequantized weight.

The reference is :class:`LinearAdapter` around an ``nn.Linear`` holding ``Ŵ = (q − z)·s`` (computed in float64 from
torchao's stored int8 values and row scales, then rounded to fp32) with the same ``A``, ``B`` and ``m``. Both sides
are fp32 and differ only in the order of operations (torchao multiplies by the int8 values and rescales after the
product; the norms go block by block), so outputs and gradients agree to a few fp32 ulps: ``rtol=1e-5, atol=1e-6``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

pytest.importorskip("torchao", reason="torchao (the int8 extra) is not installed")
from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: E402

from conftest import assert_same_function, dense_reference  # noqa: E402
from torchdora import DoraConfig, adapter_layers, inject, load_adapter, merge_and_unload, save_adapter  # noqa: E402
from torchdora.layers import Int8LinearAdapter, adapter_class_for  # noqa: E402
from torchdora.layers import quantized as qbase  # noqa: E402
from torchdora.layers.torchao import dequantize_int8_layers, is_int8_linear  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
TIGHT = dict(rtol=1e-5, atol=1e-6)


def _int8_linear(in_features=64, out_features=96, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    quantize_(layer, Int8WeightOnlyConfig(), filter_fn=lambda m, name: isinstance(m, nn.Linear))
    return layer


def _reference_weight(layer) -> torch.Tensor:
    w = layer.weight
    q = w.qdata.double() - (0 if w.zero_point is None else w.zero_point.double().reshape(-1, 1))
    return (q * w.scale.double().reshape(-1, 1)).float()


def _pair(seed=0, bias=True, **adapter):
    """(int8 adapter, fp32 reference adapter on the dequantized weight) with identical A, B, m, off the identity."""
    q = Int8LinearAdapter(_int8_linear(bias=bias, seed=seed), **adapter)
    return q, dense_reference(q, _reference_weight(q.base), seed, **adapter)


def test_the_layer_is_recognised_and_dequantizes_exactly():
    layer = _int8_linear()
    assert is_int8_linear(layer) and adapter_class_for(layer) is Int8LinearAdapter
    assert not is_int8_linear(nn.Linear(4, 4))
    q = Int8LinearAdapter(layer, r=4)
    assert_close(q.weight_2d(), _reference_weight(layer), rtol=0, atol=0)
    blocks = list(q._row_blocks(block_elements=64 * 10))  # 10 rows per block, a ragged last one
    assert [b.shape[0] for b in blocks] == [10] * 9 + [6]
    assert torch.equal(torch.cat(blocks), q.weight_2d())


@pytest.mark.parametrize("fast", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_int8_dora_gradients_equal_fp32_dora_on_the_dequantized_weight(fast, bias):
    q, ref = _pair(bias=bias)
    q.use_fast_path = ref.use_fast_path = fast
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(7))
    y = assert_same_function(q, ref, x, **TIGHT)
    assert not torch.allclose(y, ref.base(x), **TIGHT)  # guard: the adapter changes the output


def test_exact_norm_gradient_and_dropout_match(monkeypatch):
    monkeypatch.setattr(qbase, "BLOCK_ELEMENTS", 64 * 8)  # several row blocks in the norms and their gradient
    q, ref = _pair(dropout=0.25, detach_norm=False)
    assert len(list(q._row_blocks())) == 12
    q.train(), ref.train()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    assert_same_function(q, ref, x, **TIGHT)  # the same dropout masks on both sides


def test_inject_save_load_merge_and_dequantize_a_model(tmp_path):
    def model():
        m = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8))
        torch.manual_seed(0)
        for layer in m[::2]:
            layer.reset_parameters()
        quantize_(m, Int8WeightOnlyConfig(), filter_fn=lambda mod, name: isinstance(mod, nn.Linear))
        return m

    trained = model()
    inject(trained, DoraConfig(target_modules=["0", "2"], r=4))
    assert all(isinstance(m, Int8LinearAdapter) for m in adapter_layers(trained).values())
    with torch.no_grad():
        for layer in adapter_layers(trained).values():
            layer.lora_B.add_(0.1)
    x = torch.randn(2, 64)
    expected = trained(x).detach()
    save_adapter(trained, tmp_path / "adapter")
    reloaded = model()
    load_adapter(reloaded, tmp_path / "adapter")
    assert_close(reloaded(x), expected, **TIGHT)
    merge_and_unload(reloaded)
    assert all(type(m) is nn.Linear and not is_int8_linear(m) for m in (reloaded[0], reloaded[2]))
    assert is_int8_linear(reloaded[4])  # not adapted: still int8 ...
    assert dequantize_int8_layers(reloaded) == 1  # ... until dequantized for saving
    assert not is_int8_linear(reloaded[4])
    assert_close(reloaded(x), expected, **TIGHT)


# ---- the commands: --quantize int8 ------------------------------------------------------------------------------
def test_train_eval_and_merge_on_an_int8_base(tmp_path):
    """``torchdora train --quantize int8`` learns on an int8 base; the adapter reloads on one with equal logits; the
    merged model (all layers dequantized) gives the same logits as the unmerged int8 model."""
    from torchdora.app.assets import load_model_and_tokenizer
    from torchdora.app.merging import MergeConfig, merge_to_folder
    from torchdora.app.train import train
    from test_train import make_tiny_model, tiny_config, write_tiny_data

    model_dir, data = make_tiny_model(tmp_path / "model"), write_tiny_data(tmp_path / "data")
    result = train(tiny_config(model_dir, data, tmp_path / "run", quantize="int8", steps=16, eval_every=0))
    assert len(result.losses) == 16 and sum(result.losses[-4:]) < sum(result.losses[:4])  # it learns on int8
    model, _ = load_model_and_tokenizer(model_dir, quantize="int8")
    assert sum(is_int8_linear(m) for m in model.modules()) > 0 and not is_int8_linear(model.lm_head)
    load_adapter(model, tmp_path / "run" / "adapter")
    assert all(isinstance(m, Int8LinearAdapter) for m in adapter_layers(model).values())
    ids = torch.tensor([[2, 5, 7, 9, 4]])
    with torch.no_grad():
        expected = model(ids).logits
    out = merge_to_folder(MergeConfig(adapter=str(tmp_path / "run" / "adapter"), output=str(tmp_path / "merged"),
                                      model=str(model_dir), quantize="int8"))
    merged, _ = load_model_and_tokenizer(out)
    assert not any(is_int8_linear(m) for m in merged.modules())
    with torch.no_grad():
        assert_close(merged(ids).logits, expected, **TIGHT)
