"""``torch.compile(model, fullgraph=True)`` of an injected model: no graph break, the eager results (outputs and
gradients) within 1e-5, and a compiled eval forward that reads the cached norm instead of recomputing it.

Compiling is slow on a small machine, so the models are tiny and the cases few; the backend is ``aot_eager``
(Dynamo's graph capture and AOTAutograd, what every backend sees) except for one case through Inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

import torchdora
from torchdora import DoraConfig, inject
from torchdora import functional as DF

pytestmark = pytest.mark.usefixtures("single_thread")

# the same fp32 computation traced and run eagerly: the compiler may reorder sums (the tolerance)
TOL = dict(rtol=1e-5, atol=1e-5)
TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(make_tiny_llama, perturb, adapters: str) -> torch.nn.Module:
    """A one-block tiny Llama (tracing time grows with the blocks) with a DoRA adapter ``default`` and a LoRA
    adapter ``lora``, ``adapters`` active."""
    model = make_tiny_llama()
    del model.model.layers[1:]
    model.config.num_hidden_layers = 1
    inject(model, DoraConfig(target_modules=TARGETS, r=4))
    torchdora.add_adapter(model, "lora", DoraConfig(target_modules=TARGETS, r=2, use_dora=False))
    perturb(model, seed=5)
    torchdora.set_adapter(model, {"dora": "default", "lora": "lora", "both": ["default", "lora"]}[adapters])
    return model


def _loss_and_grads(model, input_ids, run=None):
    """Logits and the gradients of the model's parameters, the forward run by ``run`` (default: ``model``)."""
    model.zero_grad(set_to_none=True)
    logits = (model if run is None else run)(input_ids, use_cache=False).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_no_graph_break(make_tiny_llama, perturb, input_ids):
    model = _model(make_tiny_llama, perturb, "both")
    for training in (False, True):
        model.train(training)
        with torch.set_grad_enabled(training):
            explained = torch._dynamo.explain(model)(input_ids, use_cache=False)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()


def test_training_step_matches_eager(make_tiny_llama, perturb, input_ids):
    """A DoRA and a LoRA adapter active: outputs and every adapter gradient, with the norm computed in the graph
    (detached, paper §4.3)."""
    model = _model(make_tiny_llama, perturb, "both").train()
    want, want_grads = _loss_and_grads(model, input_ids)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got, got_grads = _loss_and_grads(model, input_ids, compiled)
    assert_close(got, want, **TOL)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], **TOL, msg=name)


def test_exact_norm_gradient_matches_eager(make_tiny_llama, perturb, input_ids):
    """One DoRA adapter with ``detach_norm=False``: the norm's own gradient path is traced too."""
    model = _model(make_tiny_llama, perturb, "dora").train()
    for layer in torchdora.adapter_layers(model).values():
        layer.detach_norm = False
    want, want_grads = _loss_and_grads(model, input_ids)
    got, got_grads = _loss_and_grads(model, input_ids, torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert want_grads.keys() == got_grads.keys() and want_grads
    assert_close(got, want, **TOL)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], **TOL, msg=name)


def _count_norms(monkeypatch) -> list[int]:
    calls = [0]
    original = DF.factored_row_norm

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(DF, "factored_row_norm", counted)
    return calls


def test_eval_reads_the_cached_norm(make_tiny_llama, perturb, input_ids, monkeypatch):
    """Compiled eval: the eager logits, no norm recomputed while nothing changed, and an edit of ``B`` (seen by
    its version counter) recomputes that layer's norm only."""
    model = _model(make_tiny_llama, perturb, "both")
    norms = _count_norms(monkeypatch)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = model(input_ids, use_cache=False).logits  # fills the caches
        filled = norms[0]
        for _ in range(2):
            assert_close(compiled(input_ids, use_cache=False).logits, want, **TOL)
        assert filled > 0 and norms[0] == filled  # read, not recomputed
        layer = model.model.layers[0].self_attn.q_proj
        with layer.using("default"):
            layer.lora_B.add_(0.5)
        got = compiled(input_ids, use_cache=False).logits
        assert norms[0] == filled + 1
        want = copy.deepcopy(model)(input_ids, use_cache=False).logits  # a copy starts with empty caches
    assert_close(got, want, **TOL)


def test_cached_value_operator_names_one_live_owner():
    """The operator a compiled graph calls reads ``owner.<method>(*args)`` by a handle: the same handle for the
    same owner and call, another for another owner, a copy of the cached tensor (the graph may write into its
    output), and a clear error once the owner is gone."""
    from torchdora import cache

    layers = [torchdora.LinearAdapter(torch.nn.Linear(6, 5), r=2) for _ in range(2)]
    first = cache._handle(layers[0], "_cached_row_norm", ("default",), ("factored",))
    assert cache._handle(layers[0], "_cached_row_norm", ("default",), ("factored",)) == first
    assert cache._handle(layers[0], "_cached_row_norm", ("default",), ("dense",)) != first  # other settings
    assert cache._handle(layers[1], "_cached_row_norm", ("default",), ("factored",)) != first
    with torch.no_grad():
        read = torch.ops.torchdora.cached_value(first, [layers[0].lora_A], [2.0], 5, torch.float32)
        with layers[0].using("default"):
            want = layers[0].row_norm()
    assert_close(read, want, rtol=0, atol=0)
    assert read.data_ptr() != want.data_ptr()  # a copy: the cache's tensor stays as it is
    del layers[0], want
    with pytest.raises(RuntimeError, match="compile the model again"):
        torch.ops.torchdora.cached_value(first, [read], [2.0], 5, torch.float32)


def test_compiled_eval_follows_clear_cache_and_settings(make_tiny_llama, perturb, input_ids):
    """The operator's copy of a cached norm follows the cache's rule: an edit through ``.data`` (invisible to
    the host-side facts) is seen after ``clear_cache``, and a new scaling (a graph constant) after recompiling."""
    model = _model(make_tiny_llama, perturb, "dora")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        stale = compiled(input_ids, use_cache=False).logits  # fills the graph's copies
        layer.lora_B.data.add_(0.5)
        torchdora.clear_cache(model)
        got = compiled(input_ids, use_cache=False).logits
        assert_close(got, copy.deepcopy(model)(input_ids, use_cache=False).logits, **TOL)
        assert (got - stale).abs().max() > 1e-3  # guard: the edit moved the logits
        before = got
        layer.adapter.scaling *= 3.0
        got = compiled(input_ids, use_cache=False).logits
        assert_close(got, copy.deepcopy(model)(input_ids, use_cache=False).logits, **TOL)
        assert (got - before).abs().max() > 1e-3  # guard: the new scaling moved the logits


def test_inductor_matches_eager(perturb, monkeypatch):
    """Through Inductor (generated code), on a two-layer MLP to keep the compile short: eval with two active
    adapters reads the cached norms; a training step's outputs and gradients match eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 8))
    inject(model, DoraConfig(target_modules=["0", "2"], r=4))
    torchdora.add_adapter(model, "lora", DoraConfig(target_modules=["0", "2"], r=2, use_dora=False))
    perturb(model, seed=6)
    torchdora.set_adapter(model, ["default", "lora"])
    x = torch.randn(5, 16)
    norms = _count_norms(monkeypatch)
    compiled = torch.compile(model, fullgraph=True)
    model.eval()
    with torch.no_grad():
        want = model(x)
        filled = norms[0]
        assert_close(compiled(x), want, **TOL)
        assert norms[0] == filled
    model.train()
    want = model(x)
    want.square().sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = compiled(x)
    got.square().sum().backward()
    assert_close(got, want, **TOL)
    assert want_grads
    for name, grad in want_grads.items():
        assert_close(dict(model.named_parameters())[name].grad, grad, **TOL, msg=name)


def test_cli_compile_flags():
    """``torchdora train --compile`` and ``torchdora generate --compile`` reach their configs (off by default)."""
    from torchdora.app import generate
    from torchdora.app.train.options import config_from_args

    assert config_from_args(["--compile"]).compile is True
    assert config_from_args([]).compile is False
    assert generate.GenerateConfig(**vars(generate._parser().parse_args(["--prompt", "hi", "--compile"]))).compile
    assert not generate.GenerateConfig(**vars(generate._parser().parse_args(["--prompt", "hi"]))).compile
