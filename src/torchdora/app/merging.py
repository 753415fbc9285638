"""``torchdora merge``: fold an adapter into its base model and save a plain Hugging Face model folder.

The merged weight is ``W' = m · (W + s·B·A) / ||W + s·B·A||`` per output row (paper eq. 5, REFERENCE §1), so the
saved model has no adapter modules and no inference overhead, and its logits equal those of the base
model with the adapter unmerged (to float32 round-off). The folder loads with
``AutoModelForCausalLM.from_pretrained`` and holds the tokenizer too.

``torchdora merge --model M --adapter DIR --output OUT``
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MergeConfig", "merge_to_folder", "main"]


@dataclass(frozen=True)
class MergeConfig:
    """Options of ``torchdora merge``.

    Args:
        model: base model name or folder (:func:`torchdora.app.assets.resolve_model`); ``None``: the base the adapter
            records (:func:`torchdora.app.assets.model_for_adapter`), else SmolLM2-135M-Instruct.
        adapter: adapter folder (torchdora or PEFT format) trained on that base model.
        output: folder to write; it must not exist yet unless ``overwrite``.
        overwrite: replace an existing ``output`` folder.
    """

    adapter: str
    output: str
    model: str | None = None
    overwrite: bool = False


def merge_to_folder(config: MergeConfig) -> Path:
    """Load base + adapter, merge, and save the plain model and its tokenizer to ``config.output`` atomically.

    Raises:
        FileNotFoundError: the adapter folder or model path does not exist.
        ValueError: ``output`` exists (without ``overwrite``), or the adapter does not fit the model.
    """
    from torchdora.app.assets import load_model_and_tokenizer, model_for_adapter, resolve_model
    from torchdora.inject import merge_and_unload
    from torchdora.io import load_adapter, read_adapter, replace_dir

    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise ValueError(f"--output {output} already exists; choose another folder or pass --overwrite")
    read_adapter(config.adapter)  # missing or corrupt adapter: fail before the model loads
    base = model_for_adapter(config.model, config.adapter)  # no --model: the base the adapter records
    resolve_model(base)
    model, tokenizer = load_model_and_tokenizer(base)
    load_adapter(model, config.adapter)
    merge_and_unload(model)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        model.save_pretrained(tmp)  # safetensors by default
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchdora merge",
                                description="Merge an adapter into its base model; save a plain model folder.")
    p.add_argument("--model", default=None,
                   help="base model name or folder (default: the one --adapter records, else the embedded SmolLM2-135M)")
    p.add_argument("--adapter", required=True, help="adapter folder (torchdora or PEFT format)")
    p.add_argument("--output", required=True, help="folder to write (save_pretrained + tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    config = MergeConfig(**vars(_parser().parse_args(argv)))
    try:
        path = merge_to_folder(config)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"torchdora merge: error: {err}", file=sys.stderr)
        return 2
    print(f"merged model written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
