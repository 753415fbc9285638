"""The layering: the library (``torchdora`` outside ``app/`` and ``analysis/``) never imports the application
or the analysis, and every entry point lists the same commands."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import torchdora

#: entry points, not library: they exist to start the application
ENTRY_POINTS = {"torchdora.cli", "torchdora.__main__"}
UPPER_LAYERS = ("torchdora.app", "torchdora.analysis")


def library_modules() -> list[str]:
    names = ["torchdora"]
    for info in pkgutil.walk_packages(torchdora.__path__, "torchdora."):
        if info.name in ENTRY_POINTS or info.name.startswith(UPPER_LAYERS):
            continue
        names.append(info.name)
    return names


def test_library_modules_are_found() -> None:
    names = library_modules()
    for expected in ("torchdora.functional", "torchdora.layers.linear", "torchdora.layers.conv",
                     "torchdora.layers.embedding", "torchdora.inject", "torchdora.io", "torchdora.peft_format"):
        assert expected in names
    assert not any(n.startswith(UPPER_LAYERS) for n in names)


def test_library_never_imports_the_application() -> None:
    # A fresh interpreter per check: this test process has imported the application already.
    code = (
        "import importlib, json, sys\n"
        f"names = {library_modules()!r}\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "    # lazy imports inside functions are not run here; the static check below covers them\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({UPPER_LAYERS!r}))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_library_source_names_no_upper_layer() -> None:
    """Lazy imports (inside functions) count too: no library file mentions ``torchdora.app``/``analysis`` in an import."""
    import importlib
    import re

    pattern = re.compile(r"^\s*(from|import)\s+torchdora\.(app|analysis)\b", re.M)
    offenders = []
    for name in library_modules():
        module = importlib.import_module(name)
        source = open(module.__file__, encoding="utf-8").read()
        if pattern.search(source):
            offenders.append(name)
    assert offenders == []


def test_python_dash_m_lists_every_command() -> None:
    done = subprocess.run([sys.executable, "-m", "torchdora", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "eval", "merge", "generate", "analyze"):
        assert f"\n  {command} " in done.stdout
    old = subprocess.run([sys.executable, "-m", "torchdora.cli", "--help"], capture_output=True, text=True, check=True)
    assert old.stdout == done.stdout
