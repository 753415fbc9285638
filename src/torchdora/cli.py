"""``python -m torchdora.cli``: kept so that scripts written against it still run; the commands live in
:mod:`torchdora.app.cli`. This is an entry point, not part of the library (the library never imports it)."""

from torchdora.app.cli import COMMANDS, main

__all__ = ["main", "COMMANDS"]

if __name__ == "__main__":
    raise SystemExit(main())
