"""Checks made as a run starts: the run folder belongs to this run alone (:class:`RunFolderLock`), a resumed run
trains on the data it started with (:func:`data_fingerprint`), and the settings fit the run's length
(:func:`length_warnings`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from torchdora.app.train.config import TrainConfig

__all__ = ["LOCK_FILE", "RunFolderBusy", "RunFolderLock", "lock_holder", "data_fingerprint", "data_changes",
           "check_data_unchanged", "length_warnings", "warn_about_length"]

#: the lock file inside a run folder; it exists only while a run holds the folder
LOCK_FILE = ".torchdora.lock"


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock: it is training into that folder right now."""


def lock_holder(folder: Path) -> int | None:
    """The process id recorded in ``folder``'s lock file (``None``: no file, or not written yet)."""
    try:
        return int((Path(folder) / LOCK_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class RunFolderLock:
    """An exclusive ``flock`` on ``<folder>/.torchdora.lock`` for the life of a run, holding the process id.

    ``resume_run``: the run being resumed (when it is ``folder``, the message for a busy folder says so).

    The operating system releases a ``flock`` when its process ends, however it ends, so a run killed with
    ``kill -9`` leaves nothing stale: the next run takes the lock (and rewrites the id). A second run into the same
    folder, or a ``--resume`` of a run still going, fails at once with :class:`RunFolderBusy` naming the holder, and
    writes nothing. Released, the lock file is deleted (and the folders this lock created, if nothing else was
    written in them: a run refused by a later check leaves no empty folder). Locks work between processes of one
    machine (and on network file systems that support ``flock``). Without ``fcntl`` (Windows) there is no lock.
    """

    def __init__(self, folder: Path, resume_run: Path | None = None) -> None:
        self.folder = Path(folder)
        self.resuming = resume_run is not None and Path(resume_run).resolve() == self.folder.resolve()
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None
        self.created: list[Path] = []  # the folders this lock made, innermost first

    def __enter__(self) -> "RunFolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        from torchdora.distributed import is_main_process

        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        if not is_main_process() or (self.folder.exists() and not self.folder.is_dir()):
            return  # the main process holds the lock for all; a file is refused by check_output_dir
        self.created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies, as for every file of a run
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunFolderBusy(self._busy_message(lock_holder(self.folder))) from None
            # The holder we waited on may have deleted the file between our open and our lock: then we hold a
            # lock on a file no one else will open. Only a lock on the file that is at the path counts.
            try:
                current = os.stat(self.path)
                same = (current.st_ino, current.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: no one can take a lock on it meanwhile
            for folder in self.created:
                if any(folder.iterdir()):
                    break
                folder.rmdir()
        except OSError:
            pass  # a folder that became unwritable: the lock goes with the process all the same
        finally:
            os.close(self.fd)
            self.fd = None

    def _busy_message(self, pid: int | None) -> str:
        who = f"process {pid}" if pid is not None else "another process"
        stop = f"kill -TERM {pid}" if pid is not None else "SIGTERM to it"
        if self.resuming:
            return (f"{self.folder} is still being trained by {who}; stop it first ({stop} saves a checkpoint), "
                    f"then --resume {self.folder}")
        return (f"--output-dir {self.folder} is in use by another torchdora train run ({who}); wait for it to end, "
                f"stop it ({stop} saves a checkpoint), or choose another --output-dir")


# ---- the data of a resumed run ----------------------------------------------------------------------------------
def data_fingerprint(splits: Iterable[tuple[str, list[Any]]]) -> dict[str, str]:
    """SHA-256 of each split's examples (every field of every example, in order), by split name.

    Cheap (the examples are hashed once, no tokenizer involved) and independent of where the data came from
    (a file, a folder of split files, a named dataset); ``max_train``/``max_eval`` apply before it.
    """
    out = {}
    for name, examples in splits:
        digest = hashlib.sha256()
        for example in examples:
            fields = dataclasses.asdict(example) if dataclasses.is_dataclass(example) else vars(example)
            digest.update(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode())
            digest.update(b"\n")
        out[name] = digest.hexdigest()
    return out


def data_changes(recorded: Mapping[str, str] | None, fingerprint: Mapping[str, str]) -> dict[str, list[str | None]]:
    """``{split: [recorded, now]}`` for every split whose fingerprint differs (none for a checkpoint without one)."""
    if not recorded:
        return {}
    return {name: [recorded.get(name), value] for name, value in fingerprint.items() if recorded.get(name) != value}


def check_data_unchanged(config: TrainConfig, saved_state: Mapping[str, Any] | None,
                         fingerprint: Mapping[str, str]) -> dict[str, list[str | None]]:
    """Refuse to resume on data other than the checkpoint's, unless ``config.allow_data_change``; the changes.

    "Resume is exact" holds only on the same examples: an edited data file would otherwise continue silently.
    """
    if saved_state is None:
        return {}
    changed = data_changes(saved_state.get("data_fingerprint"), fingerprint)
    if changed and not config.allow_data_change:
        raise ValueError(
            f"the data of --resume {config.resume} changed since its checkpoint ({config.data}: the "
            f"{', '.join(changed)} split(s) differ), so the run would not continue as it started. Restore the data, "
            "start a new run with another --output-dir, or pass --allow-data-change to continue on the new data "
            "(recorded in the checkpoint's history)"
        )
    return changed


# ---- settings that do not fit the run's length -----------------------------------------------------------------
def length_warnings(config: TrainConfig, total_steps: int) -> list[str]:
    """One line per setting that makes no sense for a run of ``total_steps`` optimizer steps, with the fix."""
    lines = []
    tenth, quarter = max(1, total_steps // 10), max(1, total_steps // 4)
    if config.warmup_steps >= total_steps:
        reached = total_steps / (config.warmup_steps + 1)  # lr_factor of the last step, still warming up
        lines.append(f"--warmup-steps {config.warmup_steps} is not below the run's {total_steps} steps: the learning "
                     f"rate never reaches --lr {config.lr:g} (it ends at {reached:.0%} of it); use --warmup-steps "
                     f"{tenth if tenth < total_steps else 0} (about a tenth of the steps) or 0")
    if config.eval_every > total_steps:
        lines.append(f"--eval-every {config.eval_every} is beyond the run's {total_steps} steps: no validation runs "
                     f"during training; use --eval-every {quarter}, or 0 for none")
    if config.save_every > total_steps:
        lines.append(f"--save-every {config.save_every} is beyond the run's {total_steps} steps: no snapshot is "
                     f"written for torchdora analyze; use --save-every {quarter}, or 0 for none")
    if config.checkpoint_every > total_steps:
        lines.append(f"--checkpoint-every {config.checkpoint_every} is beyond the run's {total_steps} steps: the only "
                     f"checkpoint is the last step's, so a crash restarts from step 0; use --checkpoint-every "
                     f"{quarter}")
    return lines


def warn_about_length(config: TrainConfig, total_steps: int, main_process: bool = True) -> None:
    """Print :func:`length_warnings` to stderr (from the main process)."""
    if main_process:
        for line in length_warnings(config, total_steps):
            print(f"torchdora train: warning: {line}", file=sys.stderr, flush=True)
