"""Hugging Face round trips (:mod:`torchdora.hf`): ``save_pretrained`` of an injected model saves only the adapter,
and every loader a Hugging Face user reaches for gives back the trained model, or refuses loudly.

Every reload is compared with the trained model's logits (same fp32 tensors; PEFT and transformers compute DoRA in
another order: a few ulps), and every test first checks that the adapter moved the logits, so a silently
re-initialised adapter fails.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import torchdora
from torchdora import DoraConfig, adapter_layers, inject
from torchdora.hf import adapter_base_model

pytestmark = pytest.mark.usefixtures("single_thread")

# fp32, same tensors, at most a different order of operations through two blocks (see test_peft_oracle.py)
LOGITS = dict(rtol=1e-5, atol=1e-5)
CONFIG = DoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def base_dir(tmp_path, make_tiny_llama) -> Path:
    folder = tmp_path / "base"
    make_tiny_llama(0).save_pretrained(folder)
    return folder


def _trained(base_dir: Path, perturb, config: DoraConfig = CONFIG):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    inject(model, config)
    perturb(model)
    return model


def _quiet():
    warnings.simplefilter("ignore")  # transformers' deprecation notices, PEFT's custom-model notices


def test_save_pretrained_writes_the_adapter_and_every_loader_gives_back_the_model(base_dir, tmp_path, perturb,
                                                                                 input_ids):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    model = _trained(base_dir, perturb)
    expected = _logits(model, input_ids)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(base_dir), input_ids)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # guard: a lost adapter shows
    model.save_pretrained(tmp_path / "out")

    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "model.safetensors",
                     "torchdora_adapter.safetensors", "torchdora_config.json"]  # no config.json: never a partial model
    peft_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert peft_config["task_type"] == "CAUSAL_LM"
    assert peft_config["base_model_name_or_path"] == str(base_dir.resolve())
    resume = load_file(tmp_path / "out" / "model.safetensors")
    trainable = sorted(k for k, v in model.state_dict(keep_vars=True).items() if v.requires_grad)
    assert sorted(resume) == trainable  # adapter only, under the model's state-dict keys

    with warnings.catch_warnings():
        _quiet()
        loaders = {
            "transformers": lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "out"),
            "AutoPeftModelForCausalLM": lambda: AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out"),
            "PeftModel": lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                                           tmp_path / "out"),
            "torchdora.load_model": lambda: torchdora.load_model(tmp_path / "out"),
        }
        for name, load in loaders.items():
            assert_close(_logits(load().eval(), input_ids), expected, **LOGITS, msg=name)


def test_a_folder_peft_cannot_express_never_loads_as_a_partial_model(base_dir, tmp_path, perturb, input_ids):
    """Magnitude-only modules (paper §5.6) have no PEFT form: from_pretrained must fail, not re-initialise."""
    from transformers import AutoModelForCausalLM

    config = DoraConfig(r=4, target_modules=["q_proj", "o_proj"], magnitude_only_modules=["o_proj"])
    model = _trained(base_dir, perturb, config)
    expected = _logits(model, input_ids)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "adapter_config.json").write_text("{}")  # a stale export from an earlier save goes
    model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    with pytest.raises((OSError, ValueError), match="config.json"):  # no config.json in the folder
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_close(_logits(torchdora.load_model(tmp_path / "out"), input_ids), expected, **LOGITS)


def test_an_adapter_with_no_recorded_base_refuses_to_load_alone(tmp_path, tiny_llama, perturb, monkeypatch):
    import huggingface_hub
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, no network retries
    inject(tiny_llama, CONFIG)  # built from a config: no name or folder to record
    perturb(tiny_llama)
    tiny_llama.save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="records no base model; pass base="):
        torchdora.load_model(tmp_path / "out")
    with pytest.raises((OSError, ValueError, TypeError)):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_load_model_is_frozen_for_inference_unless_asked(base_dir, tmp_path, perturb, input_ids, make_tiny_llama):
    model = _trained(base_dir, perturb)
    expected = _logits(model, input_ids)
    torchdora.save_adapter(model, tmp_path / "td")
    assert adapter_base_model(tmp_path / "td") == str(base_dir.resolve())  # recorded without being asked
    frozen = torchdora.load_model(tmp_path / "td", base_dir)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    assert_close(_logits(frozen, input_ids), expected, **LOGITS)
    trainable = torchdora.load_model(tmp_path / "td", make_tiny_llama(0), is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names == {n for n, p in model.named_parameters() if p.requires_grad} and names
    assert_close(_logits(trainable.eval(), input_ids), expected, **LOGITS)
    with pytest.raises(FileNotFoundError):
        torchdora.load_model(tmp_path / "missing", base_dir)


def test_adapter_only_state_dict_loads_strictly_and_a_partial_one_still_reports(base_dir, tmp_path, perturb,
                                                                                 input_ids):
    config = DoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = _trained(base_dir, perturb, config)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # a trained modules_to_save layer must come back too
    expected = _logits(model, input_ids)
    model.save_pretrained(tmp_path / "out")
    adapter = load_file(tmp_path / "out" / "model.safetensors")  # what Trainer's resume loads
    assert "lm_head.weight" in adapter and len(adapter) == 1 + 3 * 2 * 2  # lm_head; A, B, m of 2 layers x 2
    fresh = _trained(base_dir, lambda m: None, config)  # same base, adapter at its initial values
    assert not torch.allclose(_logits(fresh, input_ids), expected, atol=1e-3)
    assert fresh.load_state_dict(adapter, strict=True).missing_keys == []  # the frozen base may be left out
    assert_close(_logits(fresh, input_ids), expected, rtol=0, atol=0)
    partial = dict(list(adapter.items())[1:])
    with pytest.raises(RuntimeError, match="Missing key"):  # an incomplete adapter is still an error
        fresh.load_state_dict(partial, strict=True)


def test_merge_and_unload_gives_back_the_full_save_pretrained(base_dir, tmp_path, perturb, input_ids):
    from transformers import AutoModelForCausalLM

    model = _trained(base_dir, perturb)
    expected = _logits(model, input_ids)
    torchdora.merge_and_unload(model)
    assert "save_pretrained" not in vars(model)
    model.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()
    # merged weights (m/n)·(W + s·B·A) in fp32: a few ulps from the unmerged forward
    assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), input_ids), expected, **LOGITS)


def test_plain_modules_are_left_alone(make_mixed_net):
    net = make_mixed_net(0)
    inject(net, DoraConfig(r=2, target_modules=["conv1", "head"]))
    assert "save_pretrained" not in vars(net) and adapter_layers(net)


def test_a_deep_copy_keeps_its_own_hooks(base_dir, tmp_path, perturb):
    import copy

    model = _trained(base_dir, perturb)
    twin = copy.deepcopy(model)
    torchdora.unload(twin)
    assert "save_pretrained" not in vars(twin) and "save_pretrained" in vars(model)
    model.save_pretrained(tmp_path / "out")  # the original still saves the adapter and loads it strictly
    assert not (tmp_path / "out" / "config.json").exists()
    adapter = load_file(tmp_path / "out" / "model.safetensors")
    assert model.load_state_dict(adapter, strict=True).missing_keys == []
