"""What ``torchdora train`` checks as a run starts (:mod:`torchdora.app.train.preflight`), through its command line:
the run folder is locked for the life of a run, a resume on changed data is refused unless allowed, and settings
that make no sense for the run's length are warned about with the fix."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_reliability import OPTIONS, Killed, argv, faulty_loss, folder_bytes
from test_train import one_thread, tiny, tiny_config  # noqa: F401 (fixtures)
from torchdora.app.checkpoint import find_checkpoint, read_trainer_state
from torchdora.app.train import config_from_args, main, train
from torchdora.app.train.preflight import LOCK_FILE, length_warnings

# Takes the lock as another torchdora train would (an exclusive flock, its pid in the file), says so, then waits.
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
sys.stdin.read()
"""


def hold_lock(folder: Path) -> int:
    """This test process takes the run folder's lock through a file descriptor of its own; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


# ---- item 2: one run per folder ------------------------------------------------------------------------------
def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder_and_writes_nothing(tiny, tmp_path, capsys):
    model_dir, data = tiny
    out = tmp_path / "run"
    fd = hold_lock(out)  # a run in progress in this folder (new: nothing in it yet but the lock)
    try:
        before = folder_bytes(out)
        assert main(argv(model_dir, data, out, steps=2)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"--output-dir {out} is in use by another torchdora train run (process {os.getpid()})" in err
        assert folder_bytes(out) == before  # nothing written, not even the lock file's pid
    finally:
        os.close(fd)  # the holder ends: the lock goes with it
    assert main(argv(model_dir, data, out, steps=2)) == 0
    assert (out / "summary.json").is_file() and not (out / LOCK_FILE).exists()  # released and removed at the end


def test_resume_of_a_running_run_is_refused_and_a_killed_holder_leaves_the_folder_usable(tiny, tmp_path, capsys):
    model_dir, data = tiny
    out = tmp_path / "run"
    assert main(argv(model_dir, data, out, steps=2)) == 0
    capsys.readouterr()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / LOCK_FILE)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"  # it holds the lock now: no timing involved
        before = folder_bytes(out)
        assert main(["--resume", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{out} is still being trained by process {holder.pid}; stop it first (kill -TERM {holder.pid}" in err
        assert folder_bytes(out) == before
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    assert (out / LOCK_FILE).read_text() == f"{holder.pid}\n"  # stale file, but no lock: the OS released it
    assert main(["--resume", str(out)]) == 0
    assert not (out / LOCK_FILE).exists()


def test_a_refused_run_removes_the_folder_it_created(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    out = tmp_path / "new" / "run"
    assert main(argv(model_dir, tmp_path / "missing.jsonl", out, steps=2)) == 2  # the data is not there
    assert "missing.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # no empty folders left behind by the lock


# ---- item 5: resume on changed data --------------------------------------------------------------------------
def killed(loss):
    raise Killed("kill -9 in step 3")


def test_resume_on_changed_data_is_refused_unless_allowed_and_the_change_is_recorded(tiny, tmp_path,
                                                                                     capsys):
    model_dir, tiny_data = tiny
    data = tmp_path / "data.jsonl"
    data.write_text(tiny_data.read_text())
    out = tmp_path / "run"
    with pytest.raises(Killed):  # in step 3, after the step-2 checkpoint
        train(tiny_config(model_dir, data, out, **OPTIONS), faulty_loss(3, killed))
    recorded = read_trainer_state(find_checkpoint(out))["data_fingerprint"]
    assert set(recorded) == {"train", "validation", "test"}

    rows = data.read_text().splitlines()
    row = json.loads(rows[5])
    rows[5] = json.dumps({**row, "prompt": row["prompt"].replace("Review:", "Review: very")})  # one edited row
    data.write_text("\n".join(rows) + "\n")
    before = folder_bytes(out)
    capsys.readouterr()
    assert main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"the data of --resume {out} changed since its checkpoint" in err and "--allow-data-change" in err
    assert "Traceback" not in err and folder_bytes(out) == before

    assert main(["--resume", str(out), "--allow-data-change"]) == 0
    assert "resuming on changed data" in capsys.readouterr().out
    state = read_trainer_state(find_checkpoint(out))
    [entry] = [h for h in state["history"] if "data_changed" in h]
    assert entry["step"] == 2 and all(old == recorded[split] and new != old
                                      for split, (old, new) in entry["data_changed"].items())
    assert state["data_fingerprint"] != recorded  # the new data is what the next resume compares against
    assert config_from_args(["--resume", str(out)]).allow_data_change is False  # never carried over


def test_resume_on_the_same_data_passes_the_check(tiny, tmp_path):
    model_dir, data = tiny
    out = tmp_path / "run"
    train(tiny_config(model_dir, data, out, **{**OPTIONS, "steps": 2}))
    assert main(["--resume", str(out)]) == 0  # the same file: the same fingerprint


# ---- item 17: settings that do not fit the run's length ------------------------------------------------------
def test_settings_beyond_the_runs_length_are_warned_with_the_fix(tiny, tmp_path, capsys):
    model_dir, data = tiny
    assert main(argv(model_dir, data, tmp_path / "run", steps=2, warmup_steps=20, eval_every=60, save_every=5,
                     checkpoint_every=50)) == 0
    err = capsys.readouterr().err
    assert ("--warmup-steps 20 is not below the run's 2 steps: the learning rate never reaches --lr 0.01 (it ends "
            "at 10% of it); use --warmup-steps 1 (about a tenth of the steps) or 0") in err
    assert "--eval-every 60 is beyond the run's 2 steps: no validation runs during training; use --eval-every 1" in err
    assert "--save-every 5 is beyond the run's 2 steps: no snapshot is written" in err
    assert "--checkpoint-every 50 is beyond the run's 2 steps" in err


def test_settings_that_fit_give_no_warning():
    config = tiny_config(Path("m"), Path("d"), Path("o"), **OPTIONS)  # 8 steps, warm-up 2, checkpoints every 2
    assert length_warnings(config, 8) == []
    assert len(length_warnings(config, 2)) == 1  # the warm-up (2 >= 2) alone
