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


# ---- save paths and resume: the adapter survives every Trainer save ----------------------------------------
def _token_data(n: int = 24, length: int = 8, vocab: int = 64) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(3, vocab, (n, length), generator=gen)
    return [{"input_ids": r, "labels": r} for r in rows]


def _trainer(model, out, max_steps: int = 6):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=2e-2, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1,
                             save_steps=2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                             dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=_token_data())


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_trainer_checkpoints_and_save_model_reload_and_resume_continues_the_run(tmp_path, make_tiny_llama):
    """save_steps checkpoints, save_model and save_pretrained reload to the trained logits; resuming from the
    step-2 checkpoint gives the same losses at steps 3..6 as the uninterrupted run."""
    from transformers import AutoModelForCausalLM

    make_tiny_llama(0).save_pretrained(tmp_path / "base")
    config = torchdora.DoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    torchdora.inject(model, config)
    trainer = _trainer(model, tmp_path / "run")
    trainer.train()
    trainer.save_model(tmp_path / "final")
    full = _losses(trainer)
    assert sorted(full) == [1, 2, 3, 4, 5, 6] and abs(full[6] - full[1]) > 1e-2  # the adapter learns

    ids = torch.tensor([_token_data()[0]["input_ids"].tolist()])
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "base")(ids).logits, expected,
                                  atol=1e-3)  # guard: a re-initialised adapter would show
        for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-6"):
            reloaded = AutoModelForCausalLM.from_pretrained(folder)  # recorded base + adapter, through PEFT
            torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torchdora.load_model(folder)(ids).logits, expected, rtol=1e-5, atol=1e-5)

    resumed_model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    torchdora.inject(resumed_model, config)  # fresh adapter: only the checkpoint can bring the trained one back
    resumed = _trainer(resumed_model, tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    continued = _losses(resumed)  # steps 1-2 come from the checkpoint's trainer_state.json, 3-6 are new
    assert sorted(continued) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4, 5, 6):  # same data order, optimizer and schedule state: the same run, to fp32 round-off
        assert continued[step] == pytest.approx(full[step], rel=1e-4), (step, continued, full)
    resumed_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(resumed_model(ids).logits, expected, rtol=1e-4, atol=1e-5)
