"""Writes that nothing can tear: an adapter save killed at every step leaves the old or the new adapter loadable,
and the next save removes what the killed one left behind.

A kill is a forked child that ends with ``os._exit`` (no cleanup, no ``finally``) at the k-th filesystem step of
a save, for every k: deterministic, unlike a signal sent from outside at some moment.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import torchdora
import torchdora.files as files
from torchdora import DoraConfig

pytestmark = pytest.mark.usefixtures("single_thread")

#: the filesystem steps of a save that a kill can fall between
STEPS = {"os.replace": (files.os, "replace"), "exchange": (files, "_exchange"), "rmtree": (files.shutil, "rmtree"),
         "fsync": (files.os, "fsync"), "save_file": (files, "save_file"), "link": (files.os, "link"),
         "mkdtemp": (files.tempfile, "mkdtemp"), "mkstemp": (files.tempfile, "mkstemp")}


def _model(seed: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
    torchdora.inject(model, DoraConfig(r=2, target_modules=["0", "2"]))
    with torch.no_grad():
        for p in torchdora.io.adapter_state_dict(model).values():
            p.fill_(float(seed))
    return model


def _save_killed_at(folder: Path, fmt: str, kill_at: int) -> None:
    """In a forked child: save the seed-2 adapter, ending the process at filesystem step ``kill_at`` (0: never)."""
    count = [0]

    def wrap(original):
        def step(*args, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                os._exit(9)
            return original(*args, **kwargs)
        return step

    for owner, name in STEPS.values():
        setattr(owner, name, wrap(getattr(owner, name)))
    torchdora.save_adapter(_model(2), folder, format=fmt)
    os._exit(100 + min(count[0], 99))  # finished: report how many steps the save took


def _run(folder: Path, fmt: str, kill_at: int) -> int:
    process = multiprocessing.get_context("fork").Process(target=_save_killed_at, args=(folder, fmt, kill_at))
    process.start()
    process.join()
    return process.exitcode


def _loaded_value(folder: Path) -> float:
    _, tensors, _ = torchdora.read_adapter(folder)
    values = {float(t.flatten()[0]) for t in tensors.values()}
    assert len(values) == 1  # every tensor from one save, never a mixture
    return values.pop()


@pytest.mark.parametrize("fmt", ["torchdora", "peft"])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_adapter(fmt, tmp_path):
    folder = tmp_path / "adapter"
    torchdora.save_adapter(_model(1), folder, format=fmt)
    (folder / "notes.txt").write_text("mine")  # a file of the user's in the folder survives every save
    steps = _run(folder, fmt, 0) - 100  # a full save, counting its steps
    assert steps >= 5 and _loaded_value(folder) == 2.0
    torchdora.save_adapter(_model(1), folder, format=fmt)
    seen = set()
    for kill_at in range(1, steps + 1):
        assert _run(folder, fmt, kill_at) == 9
        value = _loaded_value(folder)
        assert value in (1.0, 2.0)
        seen.add(value)
        assert (folder / "notes.txt").read_text() == "mine"
        torchdora.save_adapter(_model(1), folder, format=fmt)  # the next save cleans up after the killed one
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
        assert _loaded_value(folder) == 1.0
    assert seen == {1.0, 2.0}  # kills up to the swap keep the old adapter; after it, the new one


def test_staged_dir_refuses_or_keeps_as_asked(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="choose a new output folder"):
        with files.staged_dir(target, replace=False):
            pass
    with files.staged_dir(target, keep=True) as tmp:
        assert (tmp / "keep.txt").read_text() == "x"
        (tmp / "new.txt").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt", "new.txt"]
    with pytest.raises(RuntimeError, match="boom"):
        with files.staged_dir(target) as tmp:
            (tmp / "half.txt").write_text("z")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt", "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_dir_puts_back_a_folder_left_between_two_renames(tmp_path, monkeypatch):
    """Where the atomic exchange is missing, a swap is two renames; a kill between them leaves ``.name.old``."""
    target, old = tmp_path / "out", tmp_path / ".out.old"
    old.mkdir()
    (old / "f").write_text("previous")
    new = tmp_path / "new"
    new.mkdir()
    (new / "f").write_text("next")
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    files.replace_dir(new, target)
    assert (target / "f").read_text() == "next" and not old.exists()
