"""The ``torchdora`` command: ``torchdora <command> [options]``.

Each command lives in its own module with a ``main(argv) -> int`` that parses its options into a dataclass
and calls an importable, typed function; only the chosen command's module is imported.
"""

from __future__ import annotations

import importlib
import logging
import sys

__all__ = ["main", "COMMANDS"]

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("torchdora.app.train", "fine-tune a model with DoRA, LoRA or full fine-tuning"),
    "eval": ("torchdora.app.evaluate", "multiple-choice accuracy and perplexity of a model (+ adapter)"),
    "merge": ("torchdora.app.merging", "merge an adapter into its base model: a plain model folder, or a GGUF file"),
    "export-lora": ("torchdora.app.export.lora", "the rank-R LoRA adapter closest to a DoRA adapter (PEFT format, "
                                                 "for LoRA-only servers)"),
    "generate": ("torchdora.app.generate", "generate text from a model (+ adapter)"),
    "analyze": ("torchdora.analysis.cli", "magnitude/direction weight-decomposition analysis (paper section 3)"),
}


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
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
