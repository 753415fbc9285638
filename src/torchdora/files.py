"""Writing files so that nothing is ever half-written, and the checksums that tell a complete file from another.

Every writer here goes through a temporary name in the destination's folder and an atomic rename, so a crash,
a signal or a full disk leaves either the previous file or the new one, never a mixture. A folder (an adapter,
a merged model, a checkpoint) is written beside its destination and swapped in (:func:`replace_dir`): on Linux
with one atomic exchange of the two names, so at every instant the destination holds the old or the new folder.

The library (adapter files) and the application (checkpoints, run outputs) both use these; nothing else in the
package writes files.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "default_mode",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_safetensors",
    "replace_dir",
    "staged_dir",
    "remove_stale_temporaries",
    "file_sha256",
    "tensors_sha256",
]

#: suffix of every temporary file and folder written here (``.<name>.<random>.tmp``)
TMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask`` is set-and-return)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give a new file (0o666) or folder (0o777) under the current umask.

    ``tempfile.mkstemp``/``mkdtemp`` create 0600/0700 on purpose (private until renamed); a file or folder
    swapped in from them gets this mode first, so other users and serving accounts read it as usual.
    """
    return (0o777 if directory else 0o666) & ~_umask()


def _temp_file(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    tmp = _temp_file(path)
    try:
        os.chmod(tmp, default_mode())
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = _temp_file(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=dict(metadata or {}))
        os.chmod(tmp, default_mode())  # after: safetensors writes the file anew (0600)
        with open(tmp, "rb") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- folders --------------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2  # linux/fs.h


def _libc_renameat2() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.renameat2
    except (OSError, AttributeError):
        return None


_renameat2 = _libc_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` if unsupported."""
    if _renameat2 is None:
        return False
    at_fdcwd = -100
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_stale_temporaries(target: str | os.PathLike) -> None:
    """Delete what killed writers of ``target`` left beside it (``.<name>.*.tmp`` files and folders).

    Only the caller's own destination is cleaned, so two writers of different destinations in one folder never
    delete each other's work in progress; a writer of the same destination is refused earlier (a run's lock).
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    for stale in target.parent.glob(f".{target.name}.*{TMP_SUFFIX}"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _set_modes(folder: Path) -> None:
    # a tempfile.mkdtemp folder is 0700, and some writers (safetensors under transformers) leave files 0600
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, default_mode(directory=path.is_dir()))


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Swap the finished folder ``tmp`` in as ``target``; the previous ``target`` (if any) is deleted.

    On Linux the two names are exchanged in one atomic step, so ``target`` always names a complete folder.
    Elsewhere the previous ``target`` moves to ``.<name>.old`` first and is deleted last (a directory cannot
    be renamed over a non-empty one); a ``.<name>.old`` found with no ``target`` is put back first.
    """
    tmp, target = Path(tmp), Path(target)
    _set_modes(tmp)
    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        os.replace(old, target)  # an earlier swap was cut between its two renames
    if target.exists() and _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder
        return target
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)  # the file is never written in place, only replaced: sharing it is safe
    except OSError:
        shutil.copy2(source, destination)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, keep: bool = False, replace: bool = True) -> Iterator[Path]:
    """Write a folder beside ``target`` and swap it in when the block ends without an error.

    ``keep=True`` starts the new folder with the entries ``target`` already has (hard links, no copies), so a
    writer that adds or replaces some files (one adapter format beside another) keeps the rest. ``replace=False``
    refuses an existing ``target``. On an error the staged folder is deleted and ``target`` is untouched;
    temporaries that killed writers of ``target`` left behind are deleted first.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose another output path")
    if target.exists() and not replace:
        raise FileExistsError(f"{target} exists; choose a new output folder or remove it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX))
    try:
        if keep and target.is_dir():
            shutil.copytree(target, tmp, symlinks=True, dirs_exist_ok=True, copy_function=_link_or_copy)
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- checksums ------------------------------------------------------------------------------------------
_HASHES: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) -> SHA-256, per process


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, remembered while the file is unchanged (a resume checks the same files twice).

    Files modified in the last 2 s are always read: file times can be as coarse as a clock tick, so a
    same-size rewrite right after a hash could otherwise look unchanged.
    """
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _HASHES:
        return _HASHES[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if time.time() - st.st_mtime > 2.0:
        _HASHES[key] = digest.hexdigest()
    return digest.hexdigest()


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes (sorted by name): a checksum that can be stored
    inside the safetensors file it describes, which PEFT's ``adapter_config.json`` has no field for."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
