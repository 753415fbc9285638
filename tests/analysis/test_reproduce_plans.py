"""experiments/reproduce_decomposition.py: plans, and which run folders it reuses, resumes or trains again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import reproduce_decomposition as rd  # noqa: E402


def _config(s: rd.Settings, method: str, seed: int, **changes) -> dict:
    """What ``torchdora train`` would save for this run (the fields the script compares, plus one it ignores)."""
    return {**rd._expected_config(s, method, seed), "eval_every": 0, **changes}


def _fake_run(s: rd.Settings, method: str, seed: int, finished: bool, checkpoint: bool = False, **changes) -> Path:
    folder = rd.run_dir(s, method, seed)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(_config(s, method, seed, **changes)))
    if finished:
        (folder / "summary.json").write_text("{}")
    if checkpoint:
        (folder / "checkpoint").mkdir()
    return folder


def test_a_plan_fills_what_the_options_leave_out(tmp_path):
    s = rd.parse_args(["--plan", "plateau", "--seeds", "0", "--output-dir", str(tmp_path)])
    assert (s.seeds, s.full_steps, s.full_save_every, s.schedule, s.batch_size, s.max_train) == ((0,), 250, 25, "linear", 8, 2000)
    pilot = rd.parse_args([])
    assert (pilot.plan, pilot.adapter_steps, pilot.schedule, pilot.max_train, pilot.checkpoint_every) == ("pilot", 200, "constant", None, 0)
    with pytest.raises(SystemExit):
        rd.parse_args(["--plan", "plateau", "--full-save-every", "100"])  # 2 snapshots: too few


def test_finished_runs_are_reused_unfinished_ones_resumed_others_trained_again(tmp_path, monkeypatch):
    s = rd.parse_args(["--plan", "plateau", "--output-dir", str(tmp_path)])
    _fake_run(s, "full", 0, finished=True)
    old = _fake_run(s, "lora", 0, finished=True)
    config = json.loads((old / "config.json").read_text())
    for key in ("dropout", "weight_decay", "magnitude_lr_ratio", "magnitude_weight_decay"):  # a run from before them
        config.pop(key, None)
    (old / "config.json").write_text(json.dumps(config))
    _fake_run(s, "dora", 0, finished=False, checkpoint=True)
    _fake_run(s, "dora", 1, finished=True, lr=3e-3)  # other settings
    _fake_run(s, "full", 1, finished=False)  # no checkpoint
    assert rd.reusable(s, "full", 0) and rd.reusable(s, "lora", 0)
    assert not rd.reusable(s, "dora", 0) and rd.resumable(s, "dora", 0)
    assert not rd.reusable(s, "dora", 1) and not rd.resumable(s, "dora", 1)

    commands = []
    monkeypatch.setattr(rd.subprocess, "run", lambda cmd, **kw: commands.append(cmd))
    for method, seed in (("full", 0), ("lora", 0), ("dora", 0), ("dora", 1), ("full", 1)):
        rd.train(s, method, seed)
    assert len(commands) == 3
    assert commands[0][-2:] == ["--resume", str(rd.run_dir(s, "dora", 0))]
    for cmd, (method, seed) in zip(commands[1:], (("dora", 1), ("full", 1))):
        assert cmd[cmd.index("--method") + 1] == method and cmd[cmd.index("--seed") + 1] == str(seed)
        assert cmd[-1] == str(rd.run_dir(s, method, seed)) and not rd.run_dir(s, method, seed).exists()


def test_an_ablation_has_its_own_folders_result_set_and_options(tmp_path):
    s = rd.parse_args(["--plan", "plateau", "--output-dir", str(tmp_path), "--magnitude-lr-ratio", "0.1",
                       "--dropout", "0.05"])
    assert rd.run_dir(s, "dora", 2).name == "dora-seed2-drop0.05-mlr0.1"
    assert rd.run_dir(s, "lora", 2).name == "lora-seed2-drop0.05"
    assert rd.run_dir(s, "full", 2).name == "full-seed2"  # full fine-tuning has no adapter to change
    assert rd.set_name(s) == "plateau-drop0.05-mlr0.1"
    opts = rd.train_options(s, "dora", 0)
    assert opts[opts.index("--magnitude-lr-ratio") + 1] == "0.1" and opts[opts.index("--dropout") + 1] == "0.05"
    assert "--magnitude-lr-ratio" not in rd.train_options(s, "lora", 0)
    _fake_run(s, "dora", 0, finished=True, magnitude_lr_ratio=1.0)  # the folder holds a run without the change
    assert not rd.reusable(s, "dora", 0)
