"""The paper's model families end to end: an encoder-decoder (BART, VL-BART's backbone), a ViT, and a LLaVA-style
vision-language model (vision tower + projector + language model), each a tiny random-weight transformers model.

For each: inject, train a few steps, then the trained logits come back from every route: merged weights,
torchdora's file, PEFT's file read by torchdora and by PEFT itself (the oracle), and ``save_pretrained``.
"""

from __future__ import annotations

import json
import warnings
from typing import Callable

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import torchdora
from torchdora import DoraConfig, inject, load_adapter, save_adapter

pytestmark = pytest.mark.usefixtures("single_thread")

# fp32, same tensors; merged weights and PEFT's order of operations differ from the factored forward by ulps
LOGITS = dict(rtol=1e-5, atol=1e-5)


def _bart() -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, init_std=0.2)
    return BartForConditionalGeneration(config)


def _bart_inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (2, 6), generator=gen)
    return {"input_ids": ids, "labels": torch.randint(3, 64, (2, 5), generator=gen)}


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=3, initializer_range=0.2)
    return ViTForImageClassification(config)


def _vit_inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen), "labels": torch.tensor([0, 2])}


IMAGE_TOKEN = 60


def _llava() -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    text = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0,
                       initializer_range=0.2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config)


def _llava_inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(3, 50, (2, 5), generator=gen)
    image = torch.full((2, 4), IMAGE_TOKEN)  # (16 / 8)² = 4 patch features per image, the CLS token dropped
    ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=gen), "labels": ids}


FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict], DoraConfig]] = {
    "bart": (_bart, _bart_inputs, DoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "fc1"])),
    # the patch embedding is a Conv2d: the conv adapter in a real model
    "vit": (_vit, _vit_inputs, DoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "fc1", "projection"],
                                          modules_to_save=["classifier"])),
    "llava": (_llava, _llava_inputs, DoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "linear_1",
                                                                               "linear_2"])),
}


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inject_train_merge_save_and_load_in_both_formats(family, tmp_path):
    from peft import PeftModel

    build, make_inputs, config = FAMILIES[family]
    torch.manual_seed(0)
    build().save_pretrained(tmp_path / "base")
    cls = type(build())

    def base() -> nn.Module:
        return cls.from_pretrained(tmp_path / "base").eval()

    inputs = make_inputs()
    model = base()
    base_logits = _logits(model, inputs)
    inject(model, config)
    layers = torchdora.adapter_layers(model)
    if family == "llava":  # every part of the VLM is adapted: vision tower, projector, language model
        assert {n.split(".")[1] for n in layers} == {"vision_tower", "multi_modal_projector", "language_model"}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses  # the adapters learn on each architecture
    expected = _logits(model, inputs)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # guard: a lost adapter shows

    save_adapter(model, tmp_path / "td")
    save_adapter(model, tmp_path / "peft", format="peft", base_model_name_or_path=str(tmp_path / "base"))
    model.save_pretrained(tmp_path / "hf")
    for folder in ("td", "peft", "hf"):
        reloaded = base()
        load_adapter(reloaded, tmp_path / folder)
        assert_close(_logits(reloaded, inputs), expected, **LOGITS, msg=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for folder in ("peft", "hf"):  # the oracle reads both PEFT files
            theirs = PeftModel.from_pretrained(base(), tmp_path / folder)
            assert_close(_logits(theirs, inputs), expected, **LOGITS, msg=f"peft reads {folder}")
    assert_close(_logits(torchdora.load_model(tmp_path / "hf"), inputs), expected, **LOGITS)
    # PEFT's auto classes open the export alone: by task_type, or by auto_mapping where PEFT has no task type
    import peft

    task_type = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"]
    assert task_type == {"bart": "SEQ_2_SEQ_LM", "vit": None, "llava": None}[family]
    auto = peft.AutoPeftModelForSeq2SeqLM if task_type else peft.AutoPeftModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(_logits(auto.from_pretrained(tmp_path / "peft"), inputs), expected, **LOGITS)

    torchdora.merge_and_unload(model)
    assert not torchdora.adapter_layers(model)
    assert_close(_logits(model, inputs), expected, **LOGITS)
