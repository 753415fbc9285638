"""`torchdora train` under torchrun: 2 CPU processes (gloo) against 1, resume across process counts, a failed rank.

Tolerance: the 2-process run averages two half-batch gradients where one process averages the whole batch,
so losses and adapters agree to fp32 round-off of a few ulps per step (rtol 1e-5, atol 1e-6).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import make_tiny_model, read_metrics, write_tiny_data
from torchdora.app.checkpoint import find_checkpoint, read_trainer_state

TOL = {"rtol": 1e-5, "atol": 1e-6}
STEPS = 8


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    return make_tiny_model(root / "model"), write_tiny_data(root / "data")


def _args(assets: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    model, data = assets
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--steps", str(STEPS),
            "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "2", "--rank", "4", "--alpha", "8",
            "--eval-every", "0", "--checkpoint-every", "2", "--max-eval", "16",
            "--targets", "q_proj,v_proj,up_proj,down_proj", *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _single(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchdora", *args], env=_env(), capture_output=True,
                          text=True, timeout=300)


def _torchrun(nproc: int, args: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "torchdora", *args]
    return subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "torchdora_adapter.safetensors")


def _wait_for_checkpoint(process: subprocess.Popen, run: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if read_trainer_state(find_checkpoint(run))["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of step {step} appeared (exit code {process.poll()})")


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    result = _single(_args(tiny_assets, run))
    assert result.returncode == 0, result.stdout + result.stderr
    return run


def test_two_processes_equal_one(tiny_assets, reference, tmp_path):
    run = tmp_path / "run"
    process = _torchrun(2, _args(tiny_assets, run))
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "on 2 process(es)" in output  # really sharded, not two independent single-process runs
    torch.testing.assert_close(torch.tensor(_losses(run)), torch.tensor(_losses(reference)), **TOL)
    ours, theirs = _adapter(run), _adapter(reference)
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], **TOL)
    assert any(v.abs().max() > 0 for k, v in ours.items() if k.endswith("lora_B"))  # it trained
    # rank 0 alone wrote: one metrics line per step, one summary
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, STEPS + 1))


def test_two_process_checkpoint_resumes_in_one(tiny_assets, reference, tmp_path):
    run = tmp_path / "run"
    process = _torchrun(2, _args(tiny_assets, run))
    _wait_for_checkpoint(process, run, 4)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers
    process.wait(timeout=60)
    saved = read_trainer_state(find_checkpoint(run))
    assert saved["num_processes"] == 2 and 4 <= saved["step"] < STEPS

    resumed = _single(_args(tiny_assets, run, "--resume", str(run)))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "2-process checkpoint on 1 process" in resumed.stdout
    torch.testing.assert_close(torch.tensor(_losses(run)), torch.tensor(_losses(reference)), **TOL)
    for key, value in _adapter(run).items():
        torch.testing.assert_close(value, _adapter(reference)[key], **TOL)


def test_a_killed_rank_stops_the_run_and_keeps_the_checkpoint(tiny_assets, tmp_path):
    run = tmp_path / "run"
    process = _torchrun(2, _args(tiny_assets, run, "--steps", "400", "--checkpoint-every", "2"))
    _wait_for_checkpoint(process, run, 2)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    try:
        output, _ = process.communicate(timeout=120)  # the other rank must not hang in a collective
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    assert "Signal 9 (SIGKILL)" in output or "SIGKILL" in output, output[-3000:]
    assert not (run / "summary.json").exists()
    checkpoint = find_checkpoint(run)
    state = read_trainer_state(checkpoint)
    assert state["step"] >= 2
    assert load_file(checkpoint / "adapter" / "torchdora_adapter.safetensors")  # whole and readable
    assert json.loads((checkpoint / "adapter" / "torchdora_config.json").read_text())["format"] == "torchdora-adapter"
