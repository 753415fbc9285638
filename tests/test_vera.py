"""VeRA and DVoRA (torchdora.layers.vera): the equations against a float64 reference written from the papers,
gradients, merging, the shared projections, the adapter files, and the installed ``peft`` as the VeRA oracle.

Reference (VeRA eq. 1; DoRA paper §5.4), with ``A``, ``B`` the layer's slices of the shared pair::

    ΔW = diag(b) B diag(d) A
    VeRA:  y = x (W0 + ΔW)ᵀ + bias
    DVoRA: y = x (m ⊙ (W0 + ΔW) / ||W0 + ΔW||_row)ᵀ + bias
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel, VeraConfig, get_peft_model  # a test dependency: its absence is a failure
from peft.tuners.vera.model import _kaiming_init
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

import torchdora
from torchdora import DoraConfig, adapter_layers, inject, load_adapter, save_adapter
from torchdora import functional as DF
from torchdora.layers import VeraAdapter, VeraProjection

pytestmark = pytest.mark.usefixtures("single_thread")

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")  # three shapes, (32→32), (32→16), (32→48), (48→32)
# float64 throughout: the layer and the dense reference differ only in operation order (factored vs dense norm)
F64 = dict(rtol=1e-10, atol=1e-12)
# fp32 logits through two transformer blocks, same weights, different order of operations: a few ulps of
# logits of size ~1 (the bound for PEFT's VeRA)
LOGITS = dict(rtol=0.0, atol=1e-5)


def _vera_config(use_dora: bool, **extra) -> DoraConfig:
    return DoraConfig(r=4, target_modules=TARGETS, use_vera=True, use_dora=use_dora, **extra)


def _perturb(model: nn.Module, seed: int = 1) -> None:
    """Move d, b (and m) off their initial values: with b = 0 every output would equal the base model's."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.vera_lambda_d.add_(torch.randn(layer.vera_lambda_d.shape, generator=gen).to(layer.vera_lambda_d.dtype))
            layer.vera_lambda_b.add_(torch.randn(layer.vera_lambda_b.shape, generator=gen).to(layer.vera_lambda_b.dtype))
            if layer.magnitude is not None:
                layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=gen).to(layer.magnitude.dtype))


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def _reference_weight(w0, vera_A, vera_B, d, b, m):
    """The adapted weight from the equations, dense, with explicit diagonal matrices."""
    out, fan_in = w0.shape
    adapted = w0 + torch.diag(b) @ vera_B[:out] @ torch.diag(d) @ vera_A[:, :fan_in]
    if m is None:
        return adapted
    return m[:, None] * adapted / torch.linalg.vector_norm(adapted, dim=1, keepdim=True)


def _f64_layer(use_dora: bool, bias: bool = True, seed: int = 0, **kwargs) -> VeraAdapter:
    torch.manual_seed(seed)
    base = nn.Linear(7, 5, bias=bias, dtype=torch.float64)
    projection = VeraProjection(3, 9, 6, seed=11).to(torch.float64)  # larger than the layer: it takes a slice
    layer = VeraAdapter(base, projection=projection, r=3, use_dora=use_dora, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        layer.vera_lambda_d.copy_(torch.randn(3, dtype=torch.float64))
        layer.vera_lambda_b.copy_(torch.randn(5, dtype=torch.float64))
        if use_dora:
            layer.magnitude.mul_(1 + 0.3 * torch.rand(5, dtype=torch.float64))
    return layer


# ---- the functional core ------------------------------------------------------------------------------------
def test_projections_are_peft_s_bit_for_bit_and_kaiming_bounded():
    ours_A, ours_B = DF.vera_projections(4, 40, 24, seed=7)
    gen = torch.Generator().manual_seed(7)
    peft_A, peft_B = _kaiming_init((4, 40), generator=gen), _kaiming_init((24, 4), generator=gen)
    assert torch.equal(ours_A, peft_A) and torch.equal(ours_B, peft_B)
    assert ours_A.abs().max() <= (6 / 40) ** 0.5 and ours_B.abs().max() <= (6 / 4) ** 0.5
    assert not torch.equal(ours_A, DF.vera_projections(4, 40, 24, seed=8)[0])  # the seed matters


def test_vera_update_and_factors_match_the_dense_equation():
    gen = torch.Generator().manual_seed(0)
    x, A, B = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((2, 3, 7), (4, 7), (5, 4)))
    d, b = torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    delta = torch.diag(b) @ B @ torch.diag(d) @ A  # (5, 7)
    assert_close(DF.vera_update(x, A, B, d, b), x @ delta.T, **F64)
    a_prime, b_prime = DF.vera_factors(A, B, d, b)
    assert_close(DF.delta_weight(a_prime, b_prime, 1.0), delta, **F64)
    w = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    assert_close(DF.factored_row_norm(w, a_prime, b_prime, 1.0), torch.linalg.vector_norm(w + delta, dim=1), **F64)


# ---- the layer against the reference -----------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True], ids=["vera", "dvora"])
@pytest.mark.parametrize("fast", [True, False], ids=["fused", "reference-path"])
def test_layer_matches_float64_reference(use_dora, fast):
    layer = _f64_layer(use_dora)
    layer.use_fast_path = fast
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    projection = layer.vera_projection
    want_w = _reference_weight(layer.base.weight, projection.vera_A, projection.vera_B, layer.vera_lambda_d,
                               layer.vera_lambda_b, layer.magnitude)
    want = x @ want_w.T + layer.base.bias
    assert_close(layer(x), want, **F64)
    assert (want - layer.base(x)).abs().max() > 1e-2  # the adapter does something
    # gradients with the norm detached (DoRA paper §4.3, the default) against the same reference, norm constant
    layer.zero_grad()
    layer(x).square().sum().backward()
    d = layer.vera_lambda_d.detach().clone().requires_grad_()
    b = layer.vera_lambda_b.detach().clone().requires_grad_()
    m = None if layer.magnitude is None else layer.magnitude.detach().clone().requires_grad_()
    adapted = _reference_weight(layer.base.weight, projection.vera_A, projection.vera_B, d, b, None)
    if m is not None:
        adapted = m[:, None] * adapted / torch.linalg.vector_norm(adapted, dim=1, keepdim=True).detach()
    (x @ adapted.T + layer.base.bias).square().sum().backward()
    assert_close(layer.vera_lambda_d.grad, d.grad, **F64)
    assert_close(layer.vera_lambda_b.grad, b.grad, **F64)
    if m is not None:
        assert_close(layer.magnitude.grad, m.grad, **F64)


@pytest.mark.parametrize("use_dora", [False, True], ids=["vera", "dvora"])
def test_dropout_form_matches_reference(use_dora):
    """Training with dropout: only the update's input is dropped (VeRA/PEFT), DoRA's dropout form for DVoRA."""
    layer = _f64_layer(use_dora, dropout=0.5).train()
    layer.use_fast_path = False  # the fused path draws its own mask; its dropout form is tested in test_fast.py
    x = torch.randn(4, 7, dtype=torch.float64)
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    p = layer.vera_projection
    w0 = layer.base.weight
    delta = _reference_weight(torch.zeros_like(w0), p.vera_A, p.vera_B, layer.vera_lambda_d, layer.vera_lambda_b, None)
    if use_dora:
        factor = layer.magnitude / torch.linalg.vector_norm(w0 + delta, dim=1)
        want = x @ w0.T + (factor - 1) * (dropped @ w0.T) + factor * (dropped @ delta.T) + layer.base.bias
    else:
        want = x @ w0.T + dropped @ delta.T + layer.base.bias
    assert_close(got, want, **F64)
    assert not torch.allclose(dropped, x)  # the mask dropped something


@pytest.mark.parametrize("use_dora", [False, True], ids=["vera", "dvora"])
@pytest.mark.parametrize("fast", [True, False], ids=["fused", "reference-path"])
def test_gradcheck_exact_gradient(use_dora, fast):
    """``torch.autograd.gradcheck`` in float64 on (x, d, b, m) with the norm kept in the graph (exact gradient)."""
    layer = _f64_layer(use_dora, detach_norm=False)
    layer.use_fast_path = fast
    names = ["vera_lambda_d", "vera_lambda_b"] + (["magnitude"] if use_dora else [])
    params = [getattr(layer, n).detach().clone().requires_grad_() for n in names]
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)

    def f(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("edit", ["vera_lambda_d", "vera_lambda_b", "projection"])
def test_inference_cache_sees_every_edit(edit):
    """The cached DVoRA norm and factor are recomputed after d, b or the shared pair change in place (their
    version counters move; an edit through ``.data`` needs ``torchdora.clear_cache``, tests/test_cache.py)."""
    layer = _f64_layer(True).eval()
    x = torch.randn(3, 7, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)  # fills the caches
        target = layer.vera_projection.vera_B if edit == "projection" else getattr(layer, edit)
        target.mul_(1.5)
        got = layer(x)
    assert not torch.allclose(got, before, **F64)  # guard: the edit matters
    projection = layer.vera_projection
    want_w = _reference_weight(layer.base.weight, projection.vera_A, projection.vera_B, layer.vera_lambda_d,
                               layer.vera_lambda_b, layer.magnitude)
    assert_close(got, x @ want_w.T + layer.base.bias, **F64)


def test_initial_state_is_the_base_layer_and_as_in_vera():
    layer = VeraAdapter(nn.Linear(7, 5), projection=VeraProjection(3, 7, 5), r=3, d_initial=0.25, use_dora=True)
    assert torch.equal(layer.vera_lambda_d.detach(), torch.full((3,), 0.25))
    assert torch.equal(layer.vera_lambda_b.detach(), torch.zeros(5))
    assert_close(layer.magnitude.detach(), torch.linalg.vector_norm(layer.base.weight, dim=1))  # m = ||W0||
    x = torch.randn(4, 7)
    assert_close(layer(x), layer.base(x), rtol=1e-6, atol=1e-6)  # fp32: m/||W0|| = 1 up to round-off
    trainable = [n for n, p in layer.state_dict(keep_vars=True).items() if p.requires_grad]
    assert trainable == ["vera_lambda_d", "vera_lambda_b", "magnitude"]  # state-dict keys (named adapters: issue 18)


# ---- a model: merging, shared projections, files -------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True], ids=["vera", "dvora"])
def test_merge_round_trip(make_tiny_llama, input_ids, use_dora):
    model = make_tiny_llama()
    base_logits = _logits(model, input_ids)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(TARGETS)}
    inject(model, _vera_config(use_dora))
    _perturb(model)
    unmerged = _logits(model, input_ids)
    assert (unmerged - base_logits).abs().max() > 1e-2  # the adapters change the output
    torchdora.merge(model)
    merged = _logits(model, input_ids)
    torchdora.unmerge(model)
    again = _logits(model, input_ids)
    for name, layer in adapter_layers(model).items():  # unmerge restores W0 to fp32 round-off
        assert_close(layer.base.weight, weights[name], rtol=1e-5, atol=1e-6)
    torchdora.merge_and_unload(model)
    assert not adapter_layers(model) and not any(isinstance(m, VeraProjection) for m in model.modules())
    plain = _logits(model, input_ids)
    for other in (merged, again, plain):  # fp32, merged vs factored: round-off of logits ~1
        assert_close(other, unmerged, rtol=1e-4, atol=1e-5)


def test_trainable_parameters_are_d_b_and_m(make_tiny_llama):
    counts = {}
    for use_dora in (False, True):
        model = make_tiny_llama()
        inject(model, _vera_config(use_dora))
        counts[use_dora] = torchdora.trainable_parameter_count(model)[0]
        assert all(isinstance(layer, VeraAdapter) for layer in adapter_layers(model).values())
    outs = 2 * (32 + 16 + 48 + 32)  # two blocks: q, v, up, down output sizes
    assert counts == {False: 2 * 4 * 4 + outs, True: 2 * 4 * 4 + 2 * outs}


@pytest.mark.parametrize("use_dora", [False, True], ids=["vera", "dvora"])
def test_shared_projections_identical_across_layers_and_save_load(make_tiny_llama, input_ids, tmp_path, use_dora):
    model = make_tiny_llama()
    inject(model, _vera_config(use_dora, projection_prng_key=5))
    layers = adapter_layers(model)
    projections = {id(layer.vera_projection) for layer in layers.values()}
    assert len(projections) == 1  # one object for the whole model
    q0, q1 = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.1.self_attn.q_proj"]
    assert torch.equal(q0.vera_A_slice(), q1.vera_A_slice()) and torch.equal(q0.vera_B_slice(), q1.vera_B_slice())
    up = layers["model.layers.0.mlp.up_proj"]
    assert torch.equal(up.vera_A_slice(), q0.vera_A_slice())  # same in size: the same columns of A
    assert torch.equal(up.vera_B_slice()[:32], q0.vera_B_slice())  # B's rows are shared as far as both reach
    assert q0.vera_projection.vera_A.shape == (4, 48) and q0.vera_projection.vera_B.shape == (48, 4)  # max in/out
    assert not [k for k in model.state_dict() if "vera_A" in k or "vera_B" in k]  # never per layer
    _perturb(model)
    want = _logits(model, input_ids)

    folder = save_adapter(model, tmp_path / "adapter")
    tensors = load_file(folder / "torchdora_adapter.safetensors")
    shared_keys = sorted(k for k in tensors if "vera_A" in k or "vera_B" in k)
    assert shared_keys == ["vera_A", "vera_B"]  # saved once
    regenerated = DF.vera_projections(4, 48, 48, seed=5)
    assert torch.equal(tensors["vera_A"], regenerated[0]) and torch.equal(tensors["vera_B"], regenerated[1])
    header = json.loads((folder / "torchdora_config.json").read_text())["config"]
    assert (header["use_vera"], header["use_dora"], header["projection_prng_key"]) == (True, use_dora, 5)

    fresh = make_tiny_llama()
    load_adapter(fresh, folder)
    assert_close(_logits(fresh, input_ids), want, rtol=0, atol=0)  # same tensors, same ops: bit-identical
    assert torch.equal(next(iter(adapter_layers(fresh).values())).vera_projection.vera_A, regenerated[0])
    # a model injected with another seed takes the file's pair
    other = make_tiny_llama()
    inject(other, _vera_config(use_dora, projection_prng_key=6))
    load_adapter(other, folder)
    assert_close(_logits(other, input_ids), want, rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["vera", "dvora"])
def test_save_pretrained_round_trip(make_tiny_llama, input_ids, tmp_path, use_dora):
    """transformers' save_pretrained of an injected model writes the adapter (PEFT's file too for VeRA, not for
    DVoRA, which PEFT cannot express) and load_model gives the trained model back."""
    from torchdora.hf import load_model

    model = make_tiny_llama()
    inject(model, _vera_config(use_dora, projection_prng_key=4))
    _perturb(model)
    want = _logits(model, input_ids)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "adapter_config.json").is_file() == (not use_dora)
    loaded = load_model(tmp_path / "saved", base=make_tiny_llama())
    assert_close(_logits(loaded, input_ids), want, rtol=0, atol=0)


def test_config_and_injection_errors(make_mixed_net, make_tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="rank_pattern"):
        DoraConfig(use_vera=True, rank_pattern={"q_proj": 2})
    with pytest.raises(ValueError, match="d_initial"):
        DoraConfig(use_vera=True, d_initial=float("nan"))
    with pytest.raises(ValueError, match="projection_prng_key"):
        DoraConfig(use_vera=True, projection_prng_key=-1)
    model = make_mixed_net()
    with pytest.raises(TypeError, match="Linear.*.conv1. is a Conv1d"):
        inject(model, DoraConfig(r=2, use_vera=True, target_modules=("conv1", "head")))
    assert not adapter_layers(model)  # left as it was
    dvora = make_tiny_llama()
    inject(dvora, _vera_config(True))
    with pytest.raises(ValueError, match="PEFT has no DVoRA"):
        save_adapter(dvora, tmp_path / "peft", format="peft")


def test_train_config_builds_vera_and_dvora():
    from torchdora.app.train.options import config_from_args

    for method, use_dora in (("vera", False), ("dvora", True)):
        train = config_from_args(["--method", method, "--rank", "64", "--d-initial", "0.05", "--projection-seed", "3"])
        config = train.dora_config()
        assert (config.use_vera, config.use_dora, config.r, config.d_initial, config.projection_prng_key) == (
            True, use_dora, 64, 0.05, 3)
    assert not config_from_args(["--method", "dora"]).dora_config().use_vera
    with pytest.raises(ValueError, match="magnitude_only"):
        config_from_args(["--method", "vera", "--magnitude-only", "o_proj"])


# ---- PEFT's VeRA as the oracle ------------------------------------------------------------------------------
def _peft_vera(model: nn.Module, **config) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out for Conv1D
        return get_peft_model(model, VeraConfig(r=4, **config)).eval()


@pytest.mark.parametrize("save_projection", [True, False], ids=["projection-saved", "projection-from-seed"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_saved_vera_loads_with_equal_logits(make_tiny_llama, make_tiny_gpt2, input_ids, tmp_path, arch,
                                                 save_projection):
    make = make_tiny_llama if arch == "llama" else make_tiny_gpt2
    targets = list(TARGETS) if arch == "llama" else ["c_attn", "c_fc", "mlp.c_proj"]
    base_logits = _logits(make(), input_ids)
    peft_model = _peft_vera(make(), target_modules=targets, projection_prng_key=3, save_projection=save_projection)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "vera_lambda" in name:
                param.add_(torch.randn(param.shape, generator=gen))
    want = _logits(peft_model, input_ids)
    assert (want - base_logits).abs().max() > 1e-2  # the adapter does something
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False warns that the seed must reproduce the pair
        peft_model.save_pretrained(tmp_path / "peft")
    has_pair = "base_model.vera_A" in load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert has_pair == save_projection
    ours = make()
    config = load_adapter(ours, tmp_path / "peft")
    assert config.use_vera and not config.use_dora and config.projection_prng_key == 3
    assert_close(_logits(ours, input_ids), want, **LOGITS)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_torchdora_vera_export_loads_in_peft(make_tiny_llama, make_tiny_gpt2, input_ids, tmp_path, arch):
    make = make_tiny_llama if arch == "llama" else make_tiny_gpt2
    targets = TARGETS if arch == "llama" else ("c_attn", "c_fc", "mlp.c_proj")
    model = make()
    base_logits = _logits(model, input_ids)
    inject(model, DoraConfig(r=4, target_modules=targets, use_vera=True, use_dora=False, projection_prng_key=9))
    _perturb(model)
    want = _logits(model, input_ids)
    assert (want - base_logits).abs().max() > 1e-2
    save_adapter(model, tmp_path / "peft", format="peft")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (peft_config["peft_type"], peft_config["projection_prng_key"], peft_config["save_projection"]) == (
        "VERA", 9, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(make(), tmp_path / "peft").eval()
    assert_close(_logits(peft_model, input_ids), want, **LOGITS)
    # PEFT merges to the same weights too
    merged = peft_model.merge_and_unload()
    assert_close(_logits(merged, input_ids), want, rtol=1e-4, atol=1e-5)


# ---- analysis and the experiment's statistics ---------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True], ids=["vera", "dvora"])
def test_analysis_reads_the_trained_weight_of_a_saved_adapter(make_tiny_llama, tmp_path, use_dora):
    from torchdora.analysis.decomposition import Checkpoint, _inferred_method, checkpoint_weight

    model = make_tiny_llama()
    inject(model, _vera_config(use_dora))
    _perturb(model)
    folder = save_adapter(model, tmp_path / "snap")
    assert _inferred_method(folder, "adapter") == ("dvora" if use_dora else "vera")
    name = "model.layers.1.mlp.down_proj"
    layer = adapter_layers(model)[name]
    projection = layer.vera_projection
    f64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    want = _reference_weight(f64(layer.base.weight), f64(projection.vera_A), f64(projection.vera_B),
                             f64(layer.vera_lambda_d), f64(layer.vera_lambda_b), f64(layer.magnitude))
    checkpoint = Checkpoint(run="r", method="m", step=1, path=folder, kind="adapter")
    w0, wt = checkpoint_weight(checkpoint, name, layer.base.weight.detach(), "linear")
    assert_close(w0, f64(layer.base.weight), rtol=0, atol=0)
    assert_close(wt, want, **F64)  # the same fp32 tensors, both computed in float64
    assert (wt - w0).abs().max() > 1e-3


def test_compare_vera_statistics():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "compare_vera.py"
    spec = importlib.util.spec_from_file_location("compare_vera", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = lambda acc: {"accuracy_after": acc, "test_examples": 100}  # noqa: E731
    a = {0: run(0.80), 1: run(0.90)}
    b = {0: run(0.70), 1: run(0.60)}
    mean, se, k = module.paired_difference(a, b)
    # by hand: mean of 0.10 and 0.30; variance sum .16+.21+.09+.24 = .70 over 100, sqrt / 2 seeds
    assert k == 2 and mean == pytest.approx(0.20) and se == pytest.approx((0.70 / 100) ** 0.5 / 2)
    assert module.verdict(mean, se, "dvora", "vera") == "DVoRA higher"
    assert module.verdict(0.01, se, "dvora", "vera") == "not distinguishable"
    p, se_p, n = module.pooled(list(a.values()))
    assert (p, n) == (pytest.approx(0.85), 200) and se_p == pytest.approx((0.85 * 0.15 / 200) ** 0.5)
