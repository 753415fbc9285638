"""benchmarks/memory.py's formula: its parameter and byte counts against published counts and a real NF4 layer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def memory():
    spec = importlib.util.spec_from_file_location("torchdora_benchmark_memory", REPO / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape, params", [
    ("SmolLM2-135M", 134_515_008),  # the embedded model's parameter count (torchdora train prints it)
    ("Llama-3.2-1B", 1_235_814_400),  # the model cards' counts
    ("Llama-3.1-8B", 8_030_261_248),
    ("Llama-3.1-70B", 70_553_706_496),
])
def test_formula_counts_the_published_parameters(memory, shape, params):
    assert memory.estimate(shape, "fp32", "lora", 1, False)["weights"] == 4 * params


def test_formula_counts_the_adapter_torchdora_trains(memory):
    # torchdora train's default targets at r = 16 on SmolLM2-135M: 3,409,920 (DoRA) and 3,317,760 (LoRA) parameters,
    # each with a gradient and two AdamW moments in fp32
    assert memory.estimate("SmolLM2-135M", "fp32", "dora", 1, False)["adapter"] == 16 * 3_409_920
    assert memory.estimate("SmolLM2-135M", "fp32", "lora", 1, False)["adapter"] == 16 * 3_317_760


def test_nf4_bytes_per_weight_match_a_real_layer(memory):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the qdora extra) is not installed")
    layer = bnb.nn.Linear4bit(1024, 512, bias=False, compress_statistics=True, quant_type="nf4").to("cpu")
    state = layer.weight.quant_state
    stored = (layer.weight.numel() * layer.weight.element_size() + state.absmax.numel() * state.absmax.element_size()
              + state.state2.absmax.numel() * state.state2.absmax.element_size())
    assert stored == pytest.approx(memory.WEIGHT_BYTES["nf4"] * 1024 * 512, rel=1e-3)
