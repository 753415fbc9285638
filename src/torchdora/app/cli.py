"""The ``torchdora`` command: ``torchdora <command> [options]``.

Each command lives in its own module with a ``main(argv) -> int`` that parses its options into a dataclass
and calls an importable, typed function; only the chosen command's module is imported.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import re
import sys

__all__ = ["main", "COMMANDS", "os_error_of", "environment_error"]

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("torchdora.app.train", "fine-tune a model with DoRA, LoRA or full fine-tuning"),
    "eval": ("torchdora.app.evaluate", "multiple-choice accuracy and perplexity of a model (+ adapter)"),
    "merge": ("torchdora.app.merging", "merge an adapter into its base model: a plain model folder, or a GGUF file"),
    "export-lora": ("torchdora.app.export.lora", "the rank-R LoRA adapter closest to a DoRA adapter (PEFT format, "
                                                 "for LoRA-only servers)"),
    "generate": ("torchdora.app.generate", "generate text from a model (+ adapter), one prompt or a file of them"),
    "chat": ("torchdora.app.chat", "chat with a model (+ adapter), tokens streamed as they come"),
    "compare": ("torchdora.app.compare", "compare run folders: a table of final metrics and one figure of curves"),
    "analyze": ("torchdora.analysis.cli", "magnitude/direction weight-decomposition analysis (paper section 3)"),
}


#: command -> the option that names where it writes (the fix for a full disk or an unwritable folder)
OUTPUT_OPTIONS: dict[str, str] = {"train": "--output-dir", "merge": "--output", "analyze": "--output-dir",
                                  "generate": "--output", "compare": "--output"}


def os_error_of(err: BaseException) -> OSError | None:
    """The operating-system error behind ``err``: ``err`` itself, or the one safetensors' Rust writer reports only
    as text (``SafetensorError: Error while serializing: I/O error: No space left on device (os error 28)``)."""
    if isinstance(err, OSError):
        return err
    found = re.search(r"\(os error (\d+)\)", str(err))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def environment_error(err: OSError, command: str) -> str:
    """A one-line message for an operating-system error of ``torchdora <command>``: what failed, where, and the fix."""
    where = f" ({err.filename})" if err.filename else ""
    reason = err.strerror or str(err)
    option = OUTPUT_OPTIONS.get(command)
    elsewhere = f"choose another {option}" if option else "write somewhere else"
    kept = "; the last complete checkpoint was kept" if command == "train" else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free some space or {elsewhere}{kept}"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"{elsewhere}: one you can write to" if option else "check the permissions of the files named"
    elif command == "train":
        fix = "check the folder and the disk, then resume with --resume if a checkpoint was written"
    else:
        fix = "check the folder and the disk, then run the command again"
    return f"{reason}{where}: {fix}"


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: torchdora <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `torchdora <command> --help` for a command's options."]
    return "\n".join(lines)


def quiet_import_warnings() -> None:
    """transformers imports torchao when it is installed (``torchdora[int8]``); on a CPU build torchao logs warnings
    about its CUDA-only extensions, and torch about torchao's pytree registrations: nothing about the user's run."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from torchdora import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"torchdora: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from torchdora.app.extras import missing_for_command

    missing = missing_for_command(command)  # before the import, which would fail with a bare "No module named"
    if missing is not None and not any(flag in rest for flag in ("-h", "--help")):
        print(f"torchdora {command}: error: {missing}", file=sys.stderr)
        return 2
    quiet_import_warnings()
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except Exception as err:  # the environment (a full disk, a read-only folder) for every command: one line
        cause = os_error_of(err)
        if cause is None:
            raise
        print(f"torchdora {command}: error: {environment_error(cause, command)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
