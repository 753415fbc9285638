"""Nothing lost: every fault a user or the machine can cause, met through ``torchdora train``'s command line.

Each test injects one fault (a second run's folder as ``--output-dir``, NaN gradients, SIGINT/SIGTERM, kills at
each point of the checkpoint swap, a full disk, a model that fails to load) and checks what the user is left
with: the exit code and one line naming the problem and the fix, an intact checkpoint, and a resume whose loss
sequence equals an uninterrupted run's (bitwise: the same float operations in the same order, one thread).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import make_tiny_model, one_thread, read_metrics, tiny_config, write_tiny_data  # noqa: F401
import torchdora.app.checkpoint as checkpoint_mod
import torchdora.app.train as train_mod
from torchdora.app.checkpoint import find_checkpoint, read_trainer_state
from torchdora.app.train import lr_factor, main, train

# The same run through the CLI and through TrainConfig (dropout on: the RNG state must resume too).
OPTIONS = dict(steps=8, batch_size=4, lr=1e-2, warmup_steps=2, rank=4, alpha=8, eval_every=0, checkpoint_every=2,
               max_eval=8, dropout=0.1, targets="q_proj,v_proj,up_proj,down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-reliability")
    return make_tiny_model(root / "model"), write_tiny_data(root / "data")


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> list[float]:
    """The loss of every step of the uninterrupted run."""
    model_dir, data = tiny
    torch.set_num_threads(1)
    return train(tiny_config(model_dir, data, tmp_path_factory.mktemp("ref") / "run", **OPTIONS)).losses


def argv(model_dir: Path, data: Path, out: Path, **overrides) -> list[str]:
    values = {**OPTIONS, **overrides}
    args = ["--model", str(model_dir), "--data", str(data), "--output-dir", str(out)]
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def losses_of(run: Path) -> list[float]:
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def faulty_loss(at_call: int, action):
    """The training loss, with ``action(loss)`` run on the ``at_call``-th micro-batch loss (1-based); it may return
    a replacement. Passed to ``main(argv, loss=...)``."""
    real, calls = train_mod.compute_loss, {"n": 0}

    def faulty(model, batch):
        calls["n"] += 1
        loss, n = real(model, batch)
        if calls["n"] == at_call:
            loss = action(loss) or loss
        return loss, n

    return faulty


# ---- 1. --resume A --output-dir B, B another run ---------------------------------------------------------------
def test_resume_into_another_runs_folder_is_refused_and_leaves_it_byte_identical(tiny, tmp_path, capsys):
    model_dir, data = tiny
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(argv(model_dir, data, a, steps=2)) == 0
    assert main(argv(model_dir, data, b, steps=4)) == 0
    before = folder_bytes(b)
    capsys.readouterr()
    assert main(["--resume", str(a), "--output-dir", str(b)]) == 2
    err = capsys.readouterr().err
    assert f"--output-dir {b} already holds a run (checkpoint, summary.json)" in err and "Traceback" not in err
    assert folder_bytes(b) == before
    # into a new folder it continues A there, leaving A as it was
    a_before = folder_bytes(a)
    assert main(["--resume", str(a), "--output-dir", str(tmp_path / "c"), "--steps", "2"]) == 0
    assert folder_bytes(a) == a_before and (tmp_path / "c" / "summary.json").is_file()


# ---- 2. divergence ---------------------------------------------------------------------------------------------
def _nan_gradient(loss):
    loss.register_hook(lambda grad: grad * float("nan"))  # the loss stays finite: only the update is poisoned


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_nan_stop_keeps_a_finite_checkpoint_that_resumes_with_a_lower_lr(tiny, tmp_path, monkeypatch, capsys,
                                                                         max_grad_norm):
    """NaN gradients at step 4 with a finite loss: with clipping the norm check stops before the update; without,
    the finiteness check refuses the step-4 checkpoint (the old code wrote it, full of NaN)."""
    model_dir, data = tiny
    out = tmp_path / "run"
    assert main(argv(model_dir, data, out, max_grad_norm=max_grad_norm), loss=faulty_loss(4, _nan_gradient)) == 1
    err = capsys.readouterr().err
    what = "the weights became NaN or infinite by step 4" if max_grad_norm == 0 else "gradient norm became nan"
    assert what in err and "Traceback" not in err
    assert f"resume from it with a lower learning rate: torchdora train --resume {out} --lr 0.0025" in err
    assert ("--max-grad-norm 1" in err) == (max_grad_norm == 0)  # only advice not already followed
    assert "--dtype float32" not in err
    kept = find_checkpoint(out)
    assert read_trainer_state(kept)["step"] == 2
    for name in ("adapter/torchdora_adapter.safetensors", "optimizer.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(kept / name).values())

    monkeypatch.undo()
    assert main(["--resume", str(out), "--lr", "2.5e-3"]) == 0
    state = read_trainer_state(find_checkpoint(out))
    assert state["history"] == [{"step": 2, "changed": {"lr": [0.01, 0.0025]}}]
    assert state["config"]["lr"] == 2.5e-3
    lrs = {r["step"]: r["lr"] for r in read_metrics(out) if "lr" in r}
    for step in (1, 2):  # before the resume: the first lr
        assert lrs[step] == pytest.approx(1e-2 * lr_factor(step - 1, "linear", 2, 8), rel=1e-12)
    for step in range(3, 9):  # after: the new peak on the same schedule
        assert lrs[step] == pytest.approx(2.5e-3 * lr_factor(step - 1, "linear", 2, 8), rel=1e-12)
    assert all(r["loss"] == r["loss"] for r in read_metrics(out) if "loss" in r)


def test_resume_still_refuses_run_defining_changes(tiny, tmp_path, capsys):
    model_dir, data = tiny
    out = tmp_path / "run"
    assert main(argv(model_dir, data, out, steps=2)) == 0
    capsys.readouterr()
    assert main(["--resume", str(out), "--max-eval", "4"]) == 2  # before/after accuracy on other examples
    assert "max_eval: checkpoint 8, now 4" in capsys.readouterr().err


# ---- 3. signals ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_at_a_random_step_saves_that_step_and_resumes_exactly(tiny, tmp_path, monkeypatch, capsys,
                                                                       reference, signum):
    model_dir, data = tiny
    step = random.Random(f"{signum}-{os.getpid()}").randint(1, 7)  # any step before the last
    out = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    # no periodic checkpoint: only the signal's
    code = main(argv(model_dir, data, out, checkpoint_every=0),
                loss=faulty_loss(step, lambda loss: os.kill(os.getpid(), signum)))
    err = capsys.readouterr().err
    assert code == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved" in err, err
    assert "Traceback" not in err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    assert read_trainer_state(find_checkpoint(out))["step"] == step
    monkeypatch.undo()
    assert main(["--resume", str(out)]) == 0
    assert losses_of(out) == reference


def wait_until(condition, what: str, limit_s: float = 120.0) -> None:
    """Let the main thread's signal handlers run (between sleeps) until ``condition()``; a bound, not a timing."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {limit_s} s")
        time.sleep(0.001)


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test, set rather than assumed: a job that a shell starts in the
    background without job control inherits SIGINT ignored, and Python then leaves it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_second_signal_stops_at_once_without_a_checkpoint(tiny, tmp_path, monkeypatch, capsys, python_sigint):
    """The second SIGINT is sent only once the handler has recorded the first (POSIX does not queue a second
    pending signal of the same kind, so two back-to-back kills sometimes arrive as one and the run saved step 3),
    and the step then waits for the handler's KeyboardInterrupt, so no step can end in between. The handler
    calls Python's own SIGINT handler directly rather than re-sending the signal, so that KeyboardInterrupt is
    raised inside the handler, not on some later delivery (a re-sent signal once left this test waiting 120 s)."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # what the second SIGINT hands over to
    model_dir, data = tiny
    out = tmp_path / "run"
    handlers = []
    enter = train_mod.run.StopSignals.__enter__

    def recording_enter(self):
        handlers.append(self)
        return enter(self)

    monkeypatch.setattr(train_mod.run.StopSignals, "__enter__", recording_enter)

    def twice(loss):
        os.kill(os.getpid(), signal.SIGINT)
        wait_until(lambda: handlers[-1].signum == signal.SIGINT, "the first SIGINT's handling")
        os.kill(os.getpid(), signal.SIGINT)  # the handler re-raises it with Python's own: KeyboardInterrupt
        wait_until(lambda: False, "the KeyboardInterrupt of the second SIGINT")

    assert main(argv(model_dir, data, out), loss=faulty_loss(3, twice)) == 130
    err = capsys.readouterr().err
    assert "SIGINT received: stopping after the current step" in err
    assert "second SIGINT: stopping now" in err and "Traceback" not in err
    assert read_trainer_state(find_checkpoint(out))["step"] == 2  # the periodic one; no step-3 checkpoint


def test_sigint_to_the_cli_process_exits_130_with_a_checkpoint_of_that_step(tiny, tmp_path):
    """A real signal to a real ``torchdora train`` process at a random moment of training."""
    model_dir, data = tiny
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "torchdora", "train",
                                    *argv(model_dir, data, out, steps=400, checkpoint_every=0)],
                                   stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:  # until the first step is logged
            if (out / "metrics.jsonl").is_file() and '"loss"' in (out / "metrics.jsonl").read_text():
                break
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.3))
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    err = log.read_text()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    step = read_trainer_state(find_checkpoint(out))["step"]
    assert 0 < step < 400 and f"stopped by SIGINT at step {step}; checkpoint saved" in err
    assert len(losses_of(out)) == step


# ---- 4. kills during the checkpoint swap ----------------------------------------------------------------------
class Killed(BaseException):
    """Stands for kill -9: nothing in torchdora catches it."""


def kill_at(monkeypatch, points: set[int]) -> dict[str, int]:
    """Make the checkpoint module's n-th rename/delete (0-based, counted over the whole run) raise :class:`Killed`."""
    calls = {"n": 0}

    def counted(fn):
        def wrapper(*args, **kwargs):
            n = calls["n"]
            calls["n"] += 1
            if n in points:
                raise Killed(f"killed before {fn.__name__}{args}")
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(checkpoint_mod, "os", types.SimpleNamespace(**{**vars(os), "replace": counted(os.replace)}))
    monkeypatch.setattr(checkpoint_mod, "shutil", types.SimpleNamespace(rmtree=counted(shutil.rmtree)))
    return calls


def _fake_save(output_dir: Path, step: int) -> None:
    tmp = checkpoint_mod.begin_checkpoint(output_dir)
    (tmp / "payload.json").write_text(json.dumps(step))
    checkpoint_mod.commit_checkpoint(output_dir, tmp, {"step": step, "config": {}})


def _check_resumable(output_dir: Path, at_least: int) -> int:
    found = find_checkpoint(output_dir)
    step = read_trainer_state(found)["step"]
    assert step >= at_least and json.loads((found / "payload.json").read_text()) == step
    return step


def test_every_pair_of_kill_points_in_the_swap_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    """Kill at any rename/delete of one save, resume from what is found, kill again at any point of the next."""
    _fake_save(tmp_path / "probe", 1)
    calls = kill_at(monkeypatch, set())
    _fake_save(tmp_path / "probe", 2)
    points = calls["n"] + 1  # the ops of a save over an existing checkpoint, and one past them (no kill)
    monkeypatch.undo()
    for first in range(points):
        for second in range(points + 2):  # the save after a kill may first finish the killed one's swap
            out = tmp_path / f"{first}-{second}"
            _fake_save(out, 1)
            step = 1
            for save, point in ((2, first), (None, second)):
                kill_at(monkeypatch, {point})
                try:
                    _fake_save(out, save or step + 1)
                except Killed:
                    pass
                monkeypatch.undo()
                step = _check_resumable(out, at_least=step)
            _fake_save(out, step + 1)
            assert _check_resumable(out, step + 1) == step + 1
            assert not (out / ".checkpoint.old").exists() and not (out / ".checkpoint.tmp").exists()


@pytest.mark.parametrize("first, second", [(1, 1), (2, 0), (3, 2)])
def test_two_kills_in_a_row_during_swaps_resume_to_the_reference_losses(tiny, tmp_path, monkeypatch, reference,
                                                                        first, second):
    """Rename/delete number 1, 2, 3 are the three steps of the second save's swap (the first save has one rename):
    kill there, resume (from .checkpoint.tmp, .checkpoint.old or checkpoint), kill again in the resumed run."""
    model_dir, data = tiny
    out = tmp_path / "run"
    for point in (first, second):
        kill_at(monkeypatch, {point})
        with pytest.raises(Killed):
            train(tiny_config(model_dir, data, out, **OPTIONS, **({"resume": str(out)} if out.exists() else {})))
        monkeypatch.undo()
        find_checkpoint(out)
    assert train(tiny_config(model_dir, data, out, resume=str(out), **OPTIONS)).losses == reference


def test_half_deleted_edited_or_rng_less_checkpoints_are_never_resumed_silently(tiny, tmp_path, capsys):
    model_dir, data = tiny
    out = tmp_path / "run"
    train(tiny_config(model_dir, data, out, **{**OPTIONS, "steps": 4}))
    good = out / "checkpoint"
    shutil.copytree(good, out / ".checkpoint.old")
    (out / ".checkpoint.old" / "optimizer.safetensors").unlink()  # a deletion cut short
    state = read_trainer_state(good)
    (out / ".checkpoint.old" / "trainer_state.json").write_text(json.dumps({**state, "step": 99}))
    assert find_checkpoint(out, warn=True) == good  # not the newer-looking, incomplete one
    assert "skipping" in capsys.readouterr().err
    adapter = good / "adapter" / "torchdora_adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-1] + b"\x01")  # one flipped byte
    assert main(["--resume", str(out)]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="rng-rank0.safetensors is missing"):
        checkpoint_mod.load_rng_state(tmp_path, rank=0, num_saved=1)
    assert checkpoint_mod.load_rng_state(tmp_path, rank=1, num_saved=1) is False  # a rank it never had


# ---- 5. a run that failed before its first checkpoint ------------------------------------------------------
def test_a_run_that_failed_before_its_first_checkpoint_leaves_a_reusable_folder(tiny, tmp_path, monkeypatch, capsys):
    model_dir, data = tiny
    out = tmp_path / "run"

    def unreachable(*args, **kwargs):
        raise ValueError("Could not load model 'org/name': connection refused")

    monkeypatch.setattr("torchdora.app.assets.load_model_and_tokenizer", unreachable)
    assert main(argv(model_dir, data, out)) == 2
    assert (out / "config.json").is_file()
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv(model_dir, data, out, steps=2)) == 0
    assert "reusing" in capsys.readouterr().out and (out / "summary.json").is_file()


# ---- 6. the environment: a full disk, a folder that cannot be written --------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs where the test may mount one (root on Linux), else ``None``."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if sys.platform != "linux" or shutil.which("mount") is None:
        yield None
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_gives_a_clear_error_and_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch, capsys,
                                                                       small_disk, reference):
    """Full disk after the step-4 checkpoint: the next write fails (a metrics line, or the step-6 checkpoint where
    only safetensors writes are patched); on a tmpfs for real, else a patched write."""
    model_dir, data = tiny
    out = (small_disk or tmp_path) / "run"
    filler = (small_disk or tmp_path) / "filler"

    def fill_disk(loss):
        if small_disk is None:  # no tmpfs: every safetensors write fails as on a full disk
            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]))
            monkeypatch.setattr("torchdora.io.save_file", full)
            return
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
            except OSError:
                pass

    assert main(argv(model_dir, data, out), loss=faulty_loss(5, fill_disk)) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "free some space" in err and "Traceback" not in err
    assert read_trainer_state(find_checkpoint(out))["step"] == 4
    assert not (out / ".checkpoint.tmp").exists()  # the unfinished write was removed, freeing its space
    monkeypatch.undo()
    filler.unlink(missing_ok=True)
    assert main(["--resume", str(out)]) == 0
    assert losses_of(out) == reference


def test_an_unwritable_output_folder_is_one_line(tiny, tmp_path, capsys):
    model_dir, data = tiny
    (tmp_path / "file").write_text("")
    assert main(argv(model_dir, data, tmp_path / "file" / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchdora train: error: Not a directory") and "Traceback" not in err


def test_eval_and_generate_option_errors_are_one_line(capsys):
    from torchdora.app import evaluate, generate

    for args in (["--batch-size", "0"], ["--max-length", "1"]):
        assert evaluate.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("torchdora eval: error:") and args[0][2:].replace("-", "_") in err
    for value in ("nan", "inf", "-1"):
        assert generate.main(["--prompt", "hi", "--temperature", value]) == 2
        assert "temperature must be a finite number >= 0" in capsys.readouterr().err


def test_a_pickle_only_model_folder_is_refused_by_name(tiny, tmp_path, capsys):
    model_dir, data = tiny
    pickled = tmp_path / "pickled"
    shutil.copytree(model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    assert main(argv(pickled, data, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "only as pickle files (pytorch_model.bin)" in err and "save_pretrained" in err


def test_an_unreachable_hub_name_fails_at_once(tiny, tmp_path, monkeypatch, capsys):
    import socket

    _, data = tiny
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)

    def no_network(address, timeout=None):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    start = time.perf_counter()
    assert main(argv("someorg/not-cached-anywhere", data, tmp_path / "run")) == 2
    assert time.perf_counter() - start < 10  # huggingface_hub's own retries take about a minute
    err = capsys.readouterr().err
    assert "not in the Hugging Face cache, and https://huggingface.co cannot be reached" in err


# ---- 7. adapters edited or corrupted on disk -----------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory) -> Path:
    model_dir, data = tiny
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(model_dir, data, out, **{**OPTIONS, "steps": 2}))
    return out


def test_a_flipped_byte_in_a_peft_adapter_is_refused(tiny, finished_run, tmp_path, capsys):
    from torchdora.app import evaluate

    model_dir, data = tiny
    adapter = tmp_path / "adapter-peft"
    shutil.copytree(finished_run / "adapter-peft", adapter)
    args = ["--model", str(model_dir), "--data", str(data), "--max-eval", "4", "--adapter", str(adapter)]
    assert evaluate.main(args) == 0  # intact: loads
    weights = adapter / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-4] ^= 0x01  # the lowest mantissa byte of the last float32: still finite, only slightly different
    weights.write_bytes(bytes(raw))
    capsys.readouterr()
    assert evaluate.main(args) == 2
    assert "does not match the checksum torchdora recorded" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["torchdora", "peft"])
def test_an_edited_alpha_is_refused_in_either_format(tiny, finished_run, tmp_path, capsys, layout):
    from torchdora.app import evaluate

    model_dir, data = tiny
    adapter = tmp_path / "adapter"
    shutil.copytree(finished_run / ("adapter" if layout == "torchdora" else "adapter-peft"), adapter)
    config_file = adapter / ("torchdora_config.json" if layout == "torchdora" else "adapter_config.json")
    config = json.loads(config_file.read_text())
    if layout == "torchdora":
        config["config"]["alpha"] = 64.0
    else:
        config["lora_alpha"] = 64.0
        config["base_model_name_or_path"] = "/somewhere/else"  # a harmless edit users make: still accepted
    config_file.write_text(json.dumps(config))
    assert evaluate.main(["--model", str(model_dir), "--data", str(data), "--adapter", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert "was edited after saving" in err and ("alpha=64" in err or "lora_alpha=64.0" in err)


# ---- 8. permissions -------------------------------------------------------------------------------------------
def test_files_and_folders_follow_the_umask(tiny, finished_run, tmp_path):
    from torchdora.app import merging

    model_dir, _ = tiny
    previous = os.umask(0o022)
    try:
        merged = tmp_path / "merged"
        assert merging.main(["--model", str(model_dir), "--adapter", str(finished_run / "adapter"),
                             "--output", str(merged)]) == 0
        os.umask(0o027)
        checkpoint = finished_run.parent / "again"
        train(tiny_config(model_dir, tiny[1], checkpoint, **{**OPTIONS, "steps": 1}))
    finally:
        os.umask(previous)
    assert (merged.stat().st_mode & 0o777) == 0o755
    assert {p.stat().st_mode & 0o777 for p in merged.iterdir()} == {0o644}
    modes = {p.relative_to(checkpoint).as_posix(): p.stat().st_mode & 0o777 for p in checkpoint.rglob("*")}
    assert all(mode == (0o750 if (checkpoint / name).is_dir() else 0o640) for name, mode in modes.items()), modes


def test_a_signal_during_setup_stops_before_the_first_step(tiny, tmp_path, monkeypatch, capsys):
    import torchdora.app.train.run as run_module

    model_dir, data = tiny
    real = run_module.Run.evaluate

    def evaluate_then_signal(self, examples):
        result = real(self, examples)
        os.kill(os.getpid(), signal.SIGTERM)  # during the evaluation before training
        return result

    monkeypatch.setattr(run_module.Run, "evaluate", evaluate_then_signal)
    assert main(argv(model_dir, data, tmp_path / "run")) == 143
    assert "stopped by SIGTERM before step 1; nothing new to save" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint").exists()
