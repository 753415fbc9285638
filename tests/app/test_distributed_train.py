"""`torchdora train` under torchrun: 2 CPU processes (gloo) against 1, DDP and FSDP2 (``--sharding fsdp``),
resume across process counts and sharding, a failed rank.

Tolerance: the 2-process run averages two half-batch gradients where one process averages the whole batch
(DDP's all-reduce or FSDP2's reduce-scatter), so losses and adapters agree to fp32 round-off of a few ulps per
step (rtol 1e-5, atol 1e-6). One 1-process reference run serves every comparison.
"""

from __future__ import annotations

import json
import os
import shutil
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


def _workers(process: subprocess.Popen) -> list[int]:
    return [int(pid) for pid in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                               text=True).stdout.split()]


def _kill_all(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (each worker runs in a session of its own: killpg misses them)."""
    workers = _workers(process)
    os.killpg(process.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)
    for pid in workers:  # gone before anything reads or resumes the run folder
        while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
            time.sleep(0.01)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "torchdora_adapter.safetensors")


def _wait_for_checkpoint(process: subprocess.Popen, run: Path, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if read_trainer_state(find_checkpoint(run))["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    if process.poll() is None:
        _kill_all(process)  # no stray workers left behind by a failed test
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
    _kill_all(process)
    saved = read_trainer_state(find_checkpoint(run))
    assert saved["num_processes"] == 2 and 4 <= saved["step"] < STEPS

    resumed = _single(_args(tiny_assets, run, "--resume", str(run)))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "2-process checkpoint on 1 process" in resumed.stdout
    assert f"at step {saved['step']}" in resumed.stdout  # continued from the kill, not from a finished run
    torch.testing.assert_close(torch.tensor(_losses(run)), torch.tensor(_losses(reference)), **TOL)
    for key, value in _adapter(run).items():
        torch.testing.assert_close(value, _adapter(reference)[key], **TOL)


def _assert_matches_reference(run: Path, reference: Path) -> None:
    torch.testing.assert_close(torch.tensor(_losses(run)), torch.tensor(_losses(reference)), **TOL)
    ours, theirs = _adapter(run), _adapter(reference)
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")


def test_fsdp_equals_one_process_and_saves_the_same_files(tiny_assets, reference, tmp_path):
    run = tmp_path / "run"
    process = _torchrun(2, _args(tiny_assets, run, "--sharding", "fsdp"))
    output, _ = process.communicate(timeout=300)  # checkpoints every 2 steps: a rank-0-only gather would hang
    assert process.returncode == 0, output
    assert "on 2 process(es), FSDP2-sharded" in output
    _assert_matches_reference(run, reference)
    assert any(v.abs().max() > 0 for k, v in _adapter(run).items() if k.endswith("lora_B"))  # it trained
    # the sharded checkpoint holds whole tensors, the same as the 1-process run's (so it resumes anywhere)
    ours = load_file(run / "checkpoint" / "optimizer.safetensors")
    theirs = load_file(reference / "checkpoint" / "optimizer.safetensors")
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")
    assert (run / "adapter-peft" / "adapter_model.safetensors").is_file()


def test_killed_fsdp_run_resumes_on_two_and_on_one_process(tiny_assets, reference, tmp_path):
    run = tmp_path / "run"
    process = _torchrun(2, _args(tiny_assets, run, "--sharding", "fsdp"))
    _wait_for_checkpoint(process, run, 4)
    _kill_all(process)  # torchrun and both workers, possibly mid-save
    checkpoint = find_checkpoint(run)
    saved = read_trainer_state(checkpoint)
    assert saved["num_processes"] == 2 and 4 <= saved["step"] < STEPS
    on_one = tmp_path / "copy"
    shutil.copytree(run, on_one)

    # --sharding fsdp comes from the checkpoint; gradient checkpointing (recompute in backward) changes no number
    resumed = _torchrun(2, _args(tiny_assets, run, "--resume", str(run), "--gradient-checkpointing", "reentrant"))
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "FSDP2-sharded" in output, output[-3000:]
    assert f"resumed from {checkpoint} at step {saved['step']}" in output, output[-3000:]
    _assert_matches_reference(run, reference)

    single = _single(_args(tiny_assets, on_one, "--resume", str(on_one)))
    assert single.returncode == 0, single.stdout + single.stderr
    assert "2-process checkpoint on 1 process" in single.stdout
    assert f"at step {saved['step']}" in single.stdout
    _assert_matches_reference(on_one, reference)


def test_a_killed_rank_stops_the_run_and_keeps_the_checkpoint(tiny_assets, tmp_path):
    run = tmp_path / "run"
    process = _torchrun(2, _args(tiny_assets, run, "--steps", "400", "--checkpoint-every", "2", "--sharding", "fsdp"))
    _wait_for_checkpoint(process, run, 2)
    workers = _workers(process)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    try:
        output, _ = process.communicate(timeout=120)  # the other rank must not hang in a collective
    finally:
        if process.poll() is None:
            _kill_all(process)
    assert process.returncode != 0
    assert "Signal 9 (SIGKILL)" in output or "SIGKILL" in output, output[-3000:]
    assert not (run / "summary.json").exists()
    checkpoint = find_checkpoint(run)
    state = read_trainer_state(checkpoint)
    assert state["step"] >= 2
    assert load_file(checkpoint / "adapter" / "torchdora_adapter.safetensors")  # whole and readable
    assert json.loads((checkpoint / "adapter" / "torchdora_config.json").read_text())["format"] == "torchdora-adapter"
