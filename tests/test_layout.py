"""The layering: the library (``torchdora`` outside ``app/`` and ``analysis/``) never imports the application
or the analysis, imports flow one way (no cycle, lazy imports included), no module takes another's underscore
names, no source file outgrows one sitting, and every entry point lists the same commands."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

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


# ---- the import graph ----------------------------------------------------------------------------------------
SOURCE = Path(torchdora.__file__).parent
#: most lines a source file may have (a file that grows past it wants splitting by concern)
MAX_LINES = 460


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """``(imported module, imported name or "", line)`` for every torchdora import in the file, lazy ones included."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "torchdora"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "torchdora":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in modules else (base, alias.name, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m, _, _ in _imports(path, modules) if m in modules and m != name}
            for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or ``None`` (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_lazy_imports_included() -> None:
    graph = _graph()
    assert "torchdora.state" in graph["torchdora.inject"]  # the graph sees the imports
    assert _cycle(graph) is None


def test_no_module_imports_another_modules_underscore_names() -> None:
    modules = _modules()
    offenders = [f"{_module_name(path)}:{line} imports {name} from {source}"
                 for path in modules.values() for source, name, line in _imports(path, modules)
                 if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))]
    assert offenders == []


def test_no_source_file_is_too_long() -> None:
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
