"""torchdora.app.train.optim: the magnitude's own AdamW group (``--magnitude-lr-ratio``, ``--magnitude-weight-decay``)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from test_train import one_thread, read_metrics, tiny, tiny_config  # noqa: F401
import torchdora
from torchdora.app.checkpoint import find_checkpoint, read_trainer_state
from torchdora.app.train import TrainConfig, main, train
from torchdora.app.train.optim import apply_group_settings, magnitude_parameters, param_groups


def dora_mlp(use_dora: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    model.requires_grad_(False)
    torchdora.inject(model, torchdora.DoraConfig(r=2, alpha=4, target_modules=("0", "2"), use_dora=use_dora))
    return model


def test_the_magnitudes_get_lr_times_ratio_and_every_other_parameter_lr():
    model = dora_mlp()
    groups = param_groups(model, lr=1e-3, magnitude_lr_ratio=10.0, weight_decay=0.1, magnitude_weight_decay=0.0)
    # the magnitudes by name, written out here rather than found the way optim.py finds them
    named = dict(model.named_parameters())
    magnitudes = {id(p) for n, p in named.items() if n.endswith("magnitude")}
    assert len(magnitudes) == 2
    by_id = {id(p): g for g in groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(by_id) == sorted(id(p) for p in trainable)  # every trainable parameter, exactly once
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    for p in trainable:
        group = by_id[id(p)]
        expected = (1e-2, 0.0) if id(p) in magnitudes else (1e-3, 0.1)
        assert (group["lr"], group["weight_decay"]) == pytest.approx(expected, rel=1e-15)


def test_defaults_give_one_group_in_parameter_order_as_before():
    """Ratio 1 and no separate decay: one group, as ``AdamW(params)``, so old checkpoints' optimizer states load."""
    for model in (dora_mlp(), dora_mlp(use_dora=False)):
        (group,) = param_groups(model, lr=3e-4, weight_decay=0.01)
        assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters() if p.requires_grad]
        assert (group["lr"], group["weight_decay"]) == (3e-4, 0.01)
    assert magnitude_parameters(dora_mlp(use_dora=False)) == []
    with pytest.raises(ValueError, match="magnitude_lr_ratio must be positive"):
        param_groups(dora_mlp(), lr=1e-3, magnitude_lr_ratio=0.0)


def test_first_adam_step_moves_each_parameter_by_its_groups_lr():
    """Adam's first update is ``lr · g / (|g| + eps)`` ≈ ``lr · sign(g)`` per entry: an independent check that the
    group's lr is what AdamW applies (tolerance: eps = 1e-8 against gradients ≫ 1e-6)."""
    model = dora_mlp()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))  # B ≠ 0: every parameter gets a gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, magnitude_lr_ratio=0.25))
    model(torch.randn(16, 6)).pow(2).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = 2.5e-4 if name.endswith("magnitude") else 1e-3
        moved = grads[name].abs() > 1e-6
        assert moved.any(), name
        step = (before[name] - p.detach())[moved]
        torch.testing.assert_close(step, lr * grads[name][moved].sign(), rtol=1e-3, atol=0)


def test_apply_group_settings_keeps_each_groups_ratio():
    groups = param_groups(dora_mlp(), lr=1e-3, magnitude_lr_ratio=4.0, weight_decay=0.0, magnitude_weight_decay=0.5)
    peaks = apply_group_settings(groups, lr=2e-3, weight_decay=0.1, magnitude_weight_decay=0.2)
    assert peaks == pytest.approx([2e-3, 8e-3])
    assert [g["weight_decay"] for g in groups] == [0.1, 0.2]
    old = [{"params": [], "lr": 1.0, "weight_decay": 0.0}]  # a checkpoint's group from before this option
    assert apply_group_settings(old, lr=5e-4, weight_decay=0.0) == [5e-4]


def test_config_validates_the_options():
    with pytest.raises(ValueError, match="magnitude_lr_ratio must be positive"):
        TrainConfig(magnitude_lr_ratio=-1.0)
    with pytest.raises(ValueError, match="need --method dora or dvora"):
        TrainConfig(method="lora", magnitude_lr_ratio=2.0)
    with pytest.raises(ValueError, match="magnitude_weight_decay must be >= 0"):
        TrainConfig(magnitude_weight_decay=-0.1)
    assert TrainConfig(magnitude_lr_ratio="10").magnitude_lr_ratio == 10.0  # key=value overrides arrive as text


def test_a_run_records_the_ratio_and_a_resume_with_another_lr_keeps_it(tiny, tmp_path, monkeypatch):
    """Stopped after the step-2 checkpoint, resumed with a doubled lr: the magnitude keeps lr × ratio."""
    import torchdora.app.train.loop as loop

    model_dir, data = tiny
    out = tmp_path / "run"
    original = loop.after_step

    def stop_after_step_2(run, position, *args):
        saved = original(run, position, *args)
        if position.step == 2:
            raise RuntimeError("stopped for the test")
        return saved

    monkeypatch.setattr(loop, "after_step", stop_after_step_2)
    config = tiny_config(model_dir, data, out, steps=4, checkpoint_every=2, eval_every=0, max_eval=4,
                         schedule="constant", warmup_steps=0, magnitude_lr_ratio=0.5, magnitude_weight_decay=0.0)
    with pytest.raises(RuntimeError, match="stopped for the test"):
        train(config)
    assert json.loads((out / "config.json").read_text())["magnitude_lr_ratio"] == 0.5

    def group_lrs() -> dict[bool, float]:
        index = json.loads((find_checkpoint(out) / "optimizer.json").read_text())
        out_ = {}
        for g in index["param_groups"]:
            magnitude = all(n.endswith("magnitude") for n in g["params"])  # names written by the checkpoint
            assert magnitude == g.get("magnitude", False)
            out_[magnitude] = g["lr"]
        return out_

    assert group_lrs() == pytest.approx({False: 1e-2, True: 0.5e-2})
    monkeypatch.undo()
    assert main(["--resume", str(out), "--lr", "2e-2"]) == 0
    state = read_trainer_state(find_checkpoint(out))
    assert state["step"] == 4 and state["config"]["magnitude_lr_ratio"] == 0.5
    assert state["history"] == [{"step": 2, "changed": {"lr": [0.01, 0.02]}}]
    assert group_lrs() == pytest.approx({False: 2e-2, True: 1e-2})
    assert [r["lr"] for r in read_metrics(out) if "lr" in r] == pytest.approx([1e-2, 1e-2, 2e-2, 2e-2])
