"""Shared test fixtures: tiny random-weight models built from configs (no download), fixed seeds, eval mode.

Models are rebuilt for every test (injection edits a model in place); building one takes milliseconds.
Use the ``make_*`` factory fixtures when a test needs two identical copies (e.g. torchdora vs PEFT);
``perturb`` moves injected adapters off the identity; ``single_thread`` (opt in with
``pytestmark = pytest.mark.usefixtures("single_thread")``) keeps many tiny ops fast on a loaded machine.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

TINY_VOCAB = 64
TINY_SEQ = 7


def build_tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer ``LlamaForCausalLM`` (hidden 32, GQA 4/2 heads), random weights from ``seed``, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def build_tiny_gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer ``GPT2LMHeadModel`` (transformers ``Conv1D`` layers, weight ``(in, out)``), eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=TINY_VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


class MixedNet(nn.Module):
    """Embedding → Conv1d → Conv2d → Conv3d → Linear over token ids ``(B, T)``: every non-Linear layer type."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 6)
        self.conv1 = nn.Conv1d(6, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 4, (1, 3), padding=(0, 1))
        self.conv3 = nn.Conv3d(4, 3, (1, 1, 3), padding=(0, 0, 1), bias=False)
        self.head = nn.Linear(3, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).transpose(1, 2)  # (B, 6, T)
        h = self.conv1(h)  # (B, 5, T)
        h = self.conv2(h.unsqueeze(2))  # (B, 4, 1, T)
        h = self.conv3(h.unsqueeze(2))  # (B, 3, 1, 1, T)
        return self.head(h.flatten(2).transpose(1, 2))  # (B, T, vocab)


def build_mixed_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MixedNet().eval()


def perturb_adapters(model: nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Move every adapter away from the identity: random ``lora_B`` (and ``lora_A``) and a rescaled magnitude.

    Without this a test could pass only because the adapter does nothing (``B = 0`` at initialisation).
    """
    from torchdora import adapter_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name, param in layer.adapter_parameters().items():
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.dtype)
                if name == "magnitude":
                    param.mul_(1.0 + 0.2 * noise)
                else:
                    param.add_(scale * noise)


def dense_reference(quantized: nn.Module, weight: torch.Tensor, seed: int = 0, **adapter) -> nn.Module:
    """For a quantized adapter layer: the fp32 ``LinearAdapter`` around an ``nn.Linear`` holding ``weight`` (its
    dequantized weight) and its bias, with the same adapter tensors, both moved off the identity together."""
    from torchdora.layers import LinearAdapter

    bias = quantized.packed_base.bias
    dense = nn.Linear(quantized.in_features, quantized.out_features, bias=bias is not None)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    ref = LinearAdapter(dense, **adapter)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for (name, p), p_ref in zip(quantized.adapter_parameters().items(), ref.adapter_parameters().values()):
            noise = torch.randn(p.shape, generator=gen)
            p.mul_(1 + 0.2 * noise) if name == "magnitude" else p.add_(0.3 * noise)
            p_ref.copy_(p)
    return ref


def layer_grads(layer: nn.Module, x: torch.Tensor):
    """``(output, ∂/∂x, {adapter parameter: gradient})`` of a fixed linear functional of ``layer(x)``."""
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, {k: p.grad.clone() for k, p in layer.adapter_parameters().items()}


def assert_same_function(layer: nn.Module, reference: nn.Module, x: torch.Tensor, rtol: float, atol: float,
                         dropout_seed: int = 5) -> torch.Tensor:
    """``layer`` and ``reference`` give the same output, input gradient and adapter gradients on ``x`` (the same
    dropout masks: the generator is seeded alike before each); returns the output."""
    from torch.testing import assert_close

    torch.manual_seed(dropout_seed)
    y, gx, grads = layer_grads(layer, x)
    torch.manual_seed(dropout_seed)
    y_ref, gx_ref, grads_ref = layer_grads(reference, x)
    assert_close(y, y_ref, rtol=rtol, atol=atol)
    assert_close(gx, gx_ref, rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], rtol=rtol, atol=atol, msg=name)
    return y


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread: tiny tensors gain nothing from more, and on a loaded machine
    OpenMP's thread hand-offs make many small ops (gradcheck, tiny models) up to 100× slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_llama() -> nn.Module:
    return build_tiny_llama()


@pytest.fixture
def tiny_gpt2() -> nn.Module:
    return build_tiny_gpt2()


@pytest.fixture
def make_tiny_llama() -> Callable[..., nn.Module]:
    return build_tiny_llama


@pytest.fixture
def make_tiny_gpt2() -> Callable[..., nn.Module]:
    return build_tiny_gpt2


@pytest.fixture
def make_mixed_net() -> Callable[..., nn.Module]:
    """Factory of :class:`MixedNet` (Embedding, Conv1d/2d/3d, Linear); its input is ids in ``[0, 11)``."""
    return build_mixed_net


@pytest.fixture
def input_ids() -> torch.Tensor:
    """A ``(2, TINY_SEQ)`` batch of token ids valid for the tiny models."""
    return torch.randint(3, TINY_VOCAB, (2, TINY_SEQ), generator=torch.Generator().manual_seed(123))


@pytest.fixture
def perturb() -> Callable[..., None]:
    """:func:`perturb_adapters` as a fixture, so tests need not import from conftest."""
    return perturb_adapters
