"""How the commands load the base: ``--base-dtype``, ``--quantize nf4``, ``--gradient-checkpointing``; merge's dtype."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch.testing import assert_close

from conftest import build_tiny_llama, perturb_adapters
from test_train import one_thread, tiny, tiny_config  # noqa: F401 (fixtures: one thread, the tiny model and data)
from torchdora import DoraConfig, adapter_layers, inject, save_adapter
from torchdora.app.assets import enable_gradient_checkpointing, load_model_and_tokenizer
from torchdora.app.train import train
from torchdora.app.train.config import TrainConfig
from torchdora.app.train.options import config_from_args


def _safetensors_dtypes(folder) -> set[str]:
    """The dtypes named in the header of every ``*.safetensors`` file of ``folder`` (no tensor is read)."""
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes


# ---- gradient checkpointing: same gradients, both modes ---------------------------------------------------------
def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # the same dropout masks in both runs (checkpointing replays them)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("method", ["dora", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(method, mode, input_ids):
    model = build_tiny_llama(0)
    inject(model, DoraConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], r=4, dropout=0.1,
                             use_dora=method == "dora"))
    perturb_adapters(model)
    model.train()
    loss, grads = _loss_and_grads(model, input_ids)
    enable_gradient_checkpointing(model, mode)
    assert model.model.gradient_checkpointing
    loss_ckpt, grads_ckpt = _loss_and_grads(model, input_ids)
    assert len(grads) == len(grads_ckpt) > 0 and all(g.abs().sum() > 0 for g in grads.values())
    # the same ops replayed on the same inputs: identical up to fp32 reassociation in a re-run matmul
    assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_mode_is_validated():
    with pytest.raises(ValueError, match="gradient checkpointing must be one of"):
        enable_gradient_checkpointing(build_tiny_llama(0), "yes")


# ---- base dtype and quantization when loading ----------------------------------------------------------------
def test_bfloat16_base_keeps_fp32_adapters(tiny):
    model, _ = load_model_and_tokenizer(tiny[0], dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    inject(model, DoraConfig(target_modules=["q_proj"], r=4))
    layer = next(iter(adapter_layers(model).values()))
    assert layer.base.weight.dtype == torch.bfloat16
    assert {p.dtype for p in layer.adapter_parameters().values()} == {torch.float32}


def test_unknown_base_dtype_is_a_value_error(tiny):
    with pytest.raises(ValueError, match="base dtype must be one of"):
        load_model_and_tokenizer(tiny[0], dtype="float8")


def test_train_options_parse_and_validate():
    config = config_from_args(["--quantize", "nf4", "--base-dtype", "bfloat16", "--gradient-checkpointing"])
    assert (config.quantize, config.base_dtype, config.gradient_checkpointing) == ("nf4", "bfloat16", "non-reentrant")
    assert config_from_args(["--gradient-checkpointing", "reentrant"]).gradient_checkpointing == "reentrant"
    assert TrainConfig().quantize is None and TrainConfig().base_dtype == "float32"
    with pytest.raises(ValueError, match="method full"):
        TrainConfig(method="full", quantize="nf4")
    with pytest.raises(ValueError, match="base_dtype must be one of"):
        TrainConfig(base_dtype="half")



@pytest.mark.parametrize(("base_dtype", "adapter_dtype", "stored"), [
    ("float32", "bfloat16", "BF16"), ("bfloat16", "base", "BF16"), ("bfloat16", "float32", "F32"),
])
def test_adapter_dtype_sets_weights_gradients_and_optimizer_state(tiny, tmp_path, base_dtype, adapter_dtype, stored):
    from torchdora import load_adapter

    model_dir, data = tiny
    result = train(tiny_config(model_dir, data, tmp_path / "run", steps=12, eval_every=0, checkpoint_every=0,
                               base_dtype=base_dtype, adapter_dtype=adapter_dtype))
    assert sum(result.losses[-3:]) < sum(result.losses[:3])  # it learns
    assert _safetensors_dtypes(tmp_path / "run" / "adapter") == {"F32"}  # files hold fp32 (exact for bf16)
    from safetensors import safe_open

    with safe_open(tmp_path / "run" / "checkpoint" / "optimizer.safetensors", "pt") as f:
        moments = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(("/exp_avg", "/exp_avg_sq"))}
    assert moments == {stored}  # AdamW's moments follow the adapter weights
    model, _ = load_model_and_tokenizer(model_dir, dtype=base_dtype)
    load_adapter(model, tmp_path / "run" / "adapter")
    wanted = {"BF16": torch.bfloat16, "F32": torch.float32}[stored]
    assert {p.dtype for layer in adapter_layers(model).values() for p in layer.adapter_parameters().values()} \
        == {wanted}


def test_adapter_dtype_is_validated():
    assert config_from_args(["--adapter-dtype", "bfloat16"]).adapter_dtype == "bfloat16"
    assert TrainConfig(adapter_dtype="base", base_dtype="float16").dora_config().dtype == "float16"
    with pytest.raises(ValueError, match="adapter_dtype must be one of"):
        TrainConfig(adapter_dtype="fp8")
    with pytest.raises(ValueError, match="--method full has no adapter"):
        TrainConfig(method="full", adapter_dtype="bfloat16")

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the qdora extra) is not installed")


def test_train_on_an_nf4_base_with_checkpointing(tiny, tmp_path):
    from torchdora.layers import Linear4bitAdapter

    model_dir, data = tiny
    result = train(tiny_config(model_dir, data, tmp_path / "run", quantize="nf4", steps=16,
                               gradient_checkpointing="non-reentrant", eval_every=0))
    losses = result.losses  # the loss records of metrics.jsonl
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4])  # it learns on a 4-bit base
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["quantize"] == "nf4" and config["gradient_checkpointing"] == "non-reentrant"
    model, _ = load_model_and_tokenizer(model_dir, quantize="nf4")
    from torchdora import load_adapter

    load_adapter(model, tmp_path / "run" / "adapter")
    assert all(isinstance(m, Linear4bitAdapter) for m in adapter_layers(model).values())


# ---- merge writes the base's dtype -------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_of_a_bfloat16_base_writes_bfloat16(tiny, tmp_path, quantize):
    from torchdora.app.merging import MergeConfig, merge_to_folder

    model_dir, _ = tiny
    model, _ = load_model_and_tokenizer(model_dir, dtype="bfloat16", quantize=quantize)
    inject(model, DoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    perturb_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    ids = torch.tensor([[2, 5, 7, 9, 4]])
    with torch.no_grad():
        expected = model(ids).logits.float()
    out = merge_to_folder(MergeConfig(adapter=str(tmp_path / "adapter"), output=str(tmp_path / "merged"),
                                      model=str(model_dir), base_dtype="bfloat16", quantize=quantize))
    assert _safetensors_dtypes(out) == {"BF16"}
    merged, _ = load_model_and_tokenizer(out, dtype="bfloat16")
    assert "quantization_config" not in merged.config.to_dict()
    with torch.no_grad():
        logits = merged(ids).logits.float()
    # the merged bf16 weight rounds W' once more (2^-8 relative) than the unmerged bf16 forward
    assert_close(logits, expected, rtol=0.05, atol=0.05)


def test_eval_and_generate_take_the_base_options(tiny, capsys):
    from torchdora.app import evaluate, generate

    model_dir, data = tiny
    assert evaluate.main(["--model", str(model_dir), "--data", str(data), "--max-eval", "4",
                          "--base-dtype", "bfloat16", "--quantize", "nf4"]) == 0
    assert "accuracy=" in capsys.readouterr().out
    assert generate.main(["--model", str(model_dir), "--prompt", "good", "--max-new-tokens", "2",
                          "--base-dtype", "float16"]) == 0
