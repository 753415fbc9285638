"""Bring-your-own-loop: torchdora adapters trained by a plain ``transformers.Trainer``."""

from __future__ import annotations

import pytest
import torch

import torchdora
from test_train import make_tiny_model, one_thread, write_tiny_data  # noqa: F401 (one_thread: autouse fixture)
from torchdora.app.data import Collator, load_dataset, tokenize_examples


def test_trainer_trains_injected_adapters_and_lowers_the_loss(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    model_dir = make_tiny_model(tmp_path / "model")
    data = write_tiny_data(tmp_path / "data")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    torchdora.inject(model, torchdora.DoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    splits = load_dataset(data, seed=0)
    train_set = tokenize_examples(tokenizer, splits.train, max_length=64)

    def mean_loss() -> float:
        batch = Collator(tokenizer.pad_token_id)(train_set[:32])
        with torch.no_grad():
            return float(model(**batch).loss)

    before = mean_loss()
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=15, per_device_train_batch_size=8,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=5, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_set,
                      data_collator=Collator(tokenizer.pad_token_id))
    trainer.train()
    after = mean_loss()

    assert after < before - 0.2, (before, after)
    for name, param in model.named_parameters():  # only adapter parameters moved
        if name in frozen:
            torch.testing.assert_close(param, frozen[name], rtol=0, atol=0)
    layer = torchdora.adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_B.abs().sum() > 0  # B left its zero initialisation: the adapter did the learning
    torchdora.save_adapter(model, tmp_path / "adapter")
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    torchdora.load_adapter(reloaded, tmp_path / "adapter")
    ids = torch.tensor([train_set[0]["input_ids"]])
    model.eval()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)  # same fp32 tensors
