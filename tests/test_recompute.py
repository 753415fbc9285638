"""torchdora.recompute: which DoRA outputs later ops keep, and the per-layer choice that brings DoRA to LoRA's memory."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from torchdora import DoraConfig, adapter_layers, inject
from torchdora.recompute import choose_recompute, kept_outputs

pytestmark = pytest.mark.usefixtures("single_thread")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(make_tiny_llama, perturb, use_dora=True, dropout=0.0):
    model = make_tiny_llama(0)
    inject(model, DoraConfig(target_modules=ALL, r=4, use_dora=use_dora, dropout=dropout))
    perturb(model)
    return model.train()


def _saved_bytes_and_grads(model, ids):
    """Bytes of the distinct storages autograd keeps for backward during one forward, and the gradients."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return sum(storages.values()), grads


def test_kept_outputs_follow_the_llama_block(make_tiny_llama, perturb, input_ids):
    model = _model(make_tiny_llama, perturb)
    kept = kept_outputs(model, lambda: model(input_ids=input_ids, labels=input_ids).loss)
    by_kind = {name.rsplit(".", 1)[-1]: v for name, v in kept.items() if ".layers.0." in name}
    # gate's output is kept by SiLU and up's by the gated product; q and k go through RoPE (which keeps cos/sin),
    # v is copied by repeat_kv (GQA), o and down end in residual adds
    assert by_kind == {"q_proj": False, "k_proj": False, "v_proj": False, "o_proj": False, "gate_proj": True,
                       "up_proj": True, "down_proj": False}
    assert not any(layer.recompute_output for layer in adapter_layers(model).values())  # restored


def test_the_probe_leaves_the_random_state_alone(make_tiny_llama, perturb, input_ids):
    model = _model(make_tiny_llama, perturb, dropout=0.5)  # the probe's forward draws dropout masks
    state = torch.get_rng_state()
    kept_outputs(model, lambda: model(input_ids=input_ids, labels=input_ids).loss)
    assert torch.equal(torch.get_rng_state(), state)


def test_choose_recompute_saves_memory_and_keeps_gradients(make_tiny_llama, perturb, input_ids):
    dora, lora = _model(make_tiny_llama, perturb), _model(make_tiny_llama, perturb, use_dora=False)
    longer = torch.cat([input_ids, input_ids.flip(1)], dim=1)  # (2, 14)
    before, grads = _saved_bytes_and_grads(dora, input_ids)
    chosen = choose_recompute(dora, lambda: dora(input_ids=input_ids, labels=input_ids).loss)
    # the narrowest inputs (hidden 32) among the outputs nothing keeps; down_proj's input is 48 wide
    assert sorted({n.rsplit(".", 1)[-1] for n in chosen}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    after, grads_after = _saved_bytes_and_grads(dora, input_ids)
    assert after < before
    # per token, DoRA now keeps beyond LoRA only down_proj's output (2 layers × hidden 32 × fp32); the rest of its
    # extra is per output feature (factors, norms), independent of the token count
    extra = {}
    for ids in (input_ids, longer):
        extra[ids.shape[1]] = _saved_bytes_and_grads(dora, ids)[0] - _saved_bytes_and_grads(lora, ids)[0]
    assert extra[14] - extra[7] == 2 * 7 * 2 * 32 * 4  # 7 more tokens in each of 2 sequences
    for name, grad in grads.items():  # the recomputed x Wᵀ is the same product: equal to fp32 round-off
        assert_close(grads_after[name], grad, rtol=1e-5, atol=1e-7, msg=name)
