"""Resume checkpoints: safetensors + JSON round trips, the crash-safe folder swap, and kill -9 + resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from test_train import make_tiny_model, one_thread, read_metrics, tiny_config, write_tiny_data  # noqa: F401
from torchdora.app.checkpoint import (
    begin_checkpoint,
    commit_checkpoint,
    find_checkpoint,
    load_optimizer,
    load_rng_state,
    read_trainer_state,
    save_optimizer,
    save_rng_state,
)
from torchdora.app.train import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-ckpt")
    return make_tiny_model(root / "model"), write_tiny_data(root / "data")


def _net_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    optimizer = torch.optim.AdamW([{"params": list(net[0].parameters()), "lr": 1e-2},
                                   {"params": list(net[2].parameters()), "lr": 3e-3, "weight_decay": 0.1}])
    names = {p: n for n, p in net.named_parameters()}
    return net, optimizer, names


def _adam_step(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    net(x).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    net, optimizer, names = _net_and_optimizer(0)
    for _ in range(3):
        _adam_step(net, optimizer, x)
    save_optimizer(tmp_path, optimizer, names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors"]

    copy, copy_optimizer, copy_names = _net_and_optimizer(0)
    copy.load_state_dict(net.state_dict())
    load_optimizer(tmp_path, copy_optimizer, copy_names)
    _adam_step(net, optimizer, x)
    _adam_step(copy, copy_optimizer, x)
    for a, b in zip(net.parameters(), copy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same state, same ops: bitwise equal
    assert copy_optimizer.param_groups[1]["weight_decay"] == 0.1


def test_optimizer_state_of_other_parameters_is_refused(tmp_path):
    net, optimizer, names = _net_and_optimizer(0)
    _adam_step(net, optimizer, torch.ones(1, 4))
    save_optimizer(tmp_path, optimizer, names)
    other = nn.Linear(4, 2)
    other_optimizer = torch.optim.AdamW(other.parameters())
    with pytest.raises(ValueError, match="different parameters than this run"):
        load_optimizer(tmp_path, other_optimizer, {p: n for n, p in other.named_parameters()})


def test_rng_state_round_trip(tmp_path):
    import numpy as np

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    save_rng_state(tmp_path, rank=0)
    expected = (torch.rand(4), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    load_rng_state(tmp_path, rank=0)
    got = (torch.rand(4), random.random(), np.random.rand())
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[1:] == expected[1:]


def test_an_interrupted_write_keeps_the_last_complete_checkpoint(tmp_path):
    first = begin_checkpoint(tmp_path)
    (first / "payload.json").write_text("1")
    commit_checkpoint(tmp_path, first, {"step": 1, "config": {}})
    partial = begin_checkpoint(tmp_path)  # killed while writing the step-2 checkpoint
    (partial / "payload.json").write_text("2")
    assert read_trainer_state(find_checkpoint(tmp_path))["step"] == 1
    # killed between the two renames of a commit: only the previous one, under its old name
    os.replace(tmp_path / "checkpoint", tmp_path / ".checkpoint.old")
    assert find_checkpoint(tmp_path) == tmp_path / ".checkpoint.old"
    assert read_trainer_state(find_checkpoint(tmp_path))["step"] == 1
    commit_checkpoint(tmp_path, begin_checkpoint(tmp_path), {"step": 3, "config": {}})
    assert read_trainer_state(find_checkpoint(tmp_path))["step"] == 3
    assert not (tmp_path / ".checkpoint.old").exists() and not (tmp_path / ".checkpoint.tmp").exists()


def test_sigkill_then_resume_gives_the_uninterrupted_loss_sequence(tiny, tmp_path):
    """kill -9 a CLI run after a checkpoint, resume it, compare every step's loss with an uninterrupted run."""
    model_dir, data = tiny
    steps = 80  # the run must still be going when the step-6 checkpoint appears
    common = dict(steps=steps, checkpoint_every=2, eval_every=0, dropout=0.1, lr=5e-3)
    reference = train(tiny_config(model_dir, data, tmp_path / "straight", **common))

    run = tmp_path / "killed"
    args = [sys.executable, "-m", "torchdora", "train", "--model", str(model_dir), "--data", str(data),
            "--output-dir", str(run), "--steps", str(steps), "--checkpoint-every", "2", "--eval-every", "0",
            "--dropout", "0.1", "--lr", "5e-3", "--batch-size", "4", "--warmup-steps", "2", "--rank", "4",
            "--alpha", "8", "--max-eval", "16", "--targets", "q_proj,v_proj,up_proj,down_proj"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process: same float sums
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state_file = run / "checkpoint" / "trainer_state.json"
    deadline = time.monotonic() + 120
    killed_at = None
    while time.monotonic() < deadline and process.poll() is None:
        try:
            killed_at = json.loads(state_file.read_text())["step"]
        except (OSError, ValueError, KeyError):
            killed_at = None
        if killed_at is not None and killed_at >= 6:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run / "summary.json").exists()
    saved_step = read_trainer_state(find_checkpoint(run))["step"]
    assert 6 <= saved_step < steps

    resumed = train(tiny_config(model_dir, data, run, resume=str(run), **common))
    # same adapter, optimizer, scheduler, RNG (dropout) and data position: the same float ops in the same order
    assert resumed.losses == reference.losses
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, steps + 1))
    assert resumed.accuracy_after == reference.accuracy_after
    checkpoint_files = [p.name for p in (run / "checkpoint").rglob("*") if p.is_file()]
    assert checkpoint_files and all(name.endswith((".json", ".safetensors")) for name in checkpoint_files)


def test_full_fine_tuning_resumes_exactly(tiny, tmp_path):
    """Interrupted in-process (an exception at step 5, after the step-3 checkpoint), then resumed."""
    import torchdora.app.train as train_mod

    model_dir, data = tiny
    common = dict(method="full", steps=6, checkpoint_every=3, eval_every=0, lr=1e-3)
    reference = train(tiny_config(model_dir, data, tmp_path / "straight", **common))

    real, calls = train_mod.compute_loss, {"n": 0}

    def interrupt_at_fifth_step(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(model, batch)

    run = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(model_dir, data, run, **common), loss=interrupt_at_fifth_step)
    assert read_trainer_state(find_checkpoint(run))["step"] == 3
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng-rank0.json", "rng-rank0.safetensors",
        "scheduler.json", "trainer_state.json"]
    resumed = train(tiny_config(model_dir, data, run, resume=str(run), **common))
    assert resumed.losses == reference.losses
