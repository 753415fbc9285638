"""``torchdora merge``: fold an adapter into its base model and save a plain Hugging Face model folder.

The merged weight is ``W' = m · (W + s·B·A) / ||W + s·B·A||`` per output row (paper eq. 5), so the
saved model has no adapter modules and no inference overhead, and its logits equal those of the base
model with the adapter unmerged (to float32 round-off; to one more rounding in a bf16/fp16 base). The weights
are saved in the base's dtype (``--base-dtype``) unless ``--dtype`` asks for another. An adapter trained on a
quantized base (``--quantize nf4`` or ``int8``) is merged into the dequantized weights, and the whole model is saved
dequantized, in ``--dtype`` (bf16 gives a quarter of the fp32 size). The folder loads with
``AutoModelForCausalLM.from_pretrained`` and holds the tokenizer and a model card (``README.md``,
:mod:`torchdora.app.model_card`) too.

``torchdora merge --model M --adapter DIR --output OUT``

``--format gguf --outtype f32|f16|bf16|q8_0`` writes the merged model as one GGUF file instead (llama.cpp, Ollama;
:mod:`torchdora.app.export.gguf`, docs/serving.md).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MergeConfig", "merge_to_folder", "refuse_output_over_inputs", "main"]


@dataclass(frozen=True)
class MergeConfig:
    """Options of ``torchdora merge``.

    Args:
        model: base model name or folder (:func:`torchdora.app.assets.resolve_model`); ``None``: the base the adapter
            records (:func:`torchdora.app.assets.model_for_adapter`), else SmolLM2-135M-Instruct.
        adapter: adapter folder (torchdora or PEFT format) trained on that base model.
        output: folder to write; it must not exist yet unless ``overwrite``.
        overwrite: replace an existing ``output`` folder.
        base_dtype, quantize: how the base is loaded (as in training: an adapter trained on a 4-bit base merges
            into that same dequantized base, not into the original weights).
        dtype: dtype of the saved weights; ``None``: ``base_dtype`` (a bf16 base saves bf16, never a larger one).
            A quantized base merges in fp32 into its dequantized weights and saves them in this dtype.
        format: ``"hf"`` (a ``save_pretrained`` folder) or ``"gguf"`` (one GGUF file at ``output``).
        outtype: GGUF weight type (:data:`torchdora.app.export.gguf.OUTTYPES`); ``None``: f16. GGUF only.
    """

    adapter: str
    output: str
    model: str | None = None
    overwrite: bool = False
    base_dtype: str = "float32"
    quantize: str | None = None
    dtype: str | None = None
    format: str = "hf"
    outtype: str | None = None


def merge_to_folder(config: MergeConfig) -> Path:
    """Load base + adapter, merge, and save the plain model and its tokenizer to ``config.output`` atomically.

    Raises:
        FileNotFoundError: the adapter folder or model path does not exist.
        ValueError: ``output`` exists (without ``overwrite``), is or contains the adapter or base folder, or the
            adapter does not fit the model.
    """
    from torchdora.app.assets import (
        BASE_DTYPES,
        load_model_and_tokenizer,
        model_for_adapter,
        recorded_base_name,
        resolve_model,
    )
    from torchdora.app.model_card import write_merged_card
    from torchdora.inject import adapter_layers, merge_and_unload
    from torchdora.files import staged_dir
    from torchdora.io import load_adapter, read_adapter

    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise ValueError(f"--output {output} already exists; choose another folder or pass --overwrite")
    read_adapter(config.adapter)  # missing or corrupt adapter: fail before the model loads
    base = model_for_adapter(config.model, config.adapter)  # no --model: the base the adapter records
    source = resolve_model(base)
    refuse_output_over_inputs(output, {"--adapter": Path(config.adapter), "--model": Path(source)})
    if config.format == "gguf":
        from torchdora.app.export.gguf import check_gguf_options

        check_gguf_options(source, config.outtype, config.dtype)  # before the model loads
    elif config.outtype is not None:
        raise ValueError("--outtype sets the weight type of a GGUF file; add --format gguf, or drop it")
    dtype = BASE_DTYPES[config.dtype or config.base_dtype]
    model, tokenizer = load_model_and_tokenizer(base, dtype=config.base_dtype, quantize=config.quantize)
    load_adapter(model, config.adapter)
    if config.quantize is not None:
        for layer in adapter_layers(model).values():
            layer.merge_dtype = dtype  # the merged layers replace quantized ones: in the output dtype directly
    merge_and_unload(model)
    if getattr(model, "hf_quantizer", None) is not None:
        model.dequantize()  # the layers left 4-bit become nn.Linear; the quantization config goes away
    if config.quantize == "int8":
        from torchdora.layers.torchao import dequantize_int8_layers

        dequantize_int8_layers(model)  # the layers left int8 get their dequantized weights
    if config.format == "gguf":
        from torchdora.app.export.gguf import write_gguf

        return write_gguf(model, tokenizer, output, config.outtype or "f16")
    model.to(dtype)
    with staged_dir(output) as tmp:  # written beside --output, swapped in; a killed merge's leftovers go first
        model.save_pretrained(tmp)  # safetensors by default
        tokenizer.save_pretrained(tmp)
        # the card names the base and, for an adapter of a run folder, the run's config and results
        write_merged_card(tmp, config.adapter, recorded_base_name(base), config.dtype or config.base_dtype)
    return output


def refuse_output_over_inputs(output: Path, inputs: dict[str, Path]) -> None:
    """Refuse an ``--output`` that is one of the input folders or contains one: replacing it would delete the
    inputs (and anything else in it). Inputs that are not local folders (hub names) are ignored."""
    if not output.exists():
        return
    target = output.resolve()
    for option, path in inputs.items():
        if not path.exists():
            continue
        inside = path.resolve()
        if target == inside or target in inside.parents:
            what = "is" if target == inside else "contains"
            raise ValueError(f"--output {output} {what} the {option} folder {path}; --overwrite would delete it. "
                             "Choose an --output outside the inputs")


def _parser() -> argparse.ArgumentParser:
    from torchdora.app.assets import BASE_DTYPES, add_base_options

    p = argparse.ArgumentParser(prog="torchdora merge",
                                description="Merge an adapter into its base model; save a plain model folder.")
    p.add_argument("--model", default=None,
                   help="base model name or folder (default: the one --adapter records, else the embedded SmolLM2-135M)")
    p.add_argument("--adapter", required=True, help="adapter folder (torchdora or PEFT format)")
    p.add_argument("--output", required=True, help="folder to write (save_pretrained + tokenizer); with --format gguf, the .gguf file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    add_base_options(p)
    p.add_argument("--dtype", choices=list(BASE_DTYPES), default=None,
                   help="dtype of the saved weights (default: --base-dtype)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: a save_pretrained folder (vLLM, TGI); gguf: one GGUF file, tokenizer and chat template "
                        "inside (llama.cpp, Ollama, LM Studio; Llama architecture)")
    p.add_argument("--outtype", default=None,
                   help="GGUF weight type: f32, f16 (default), bf16 or q8_0; norms stay f32")
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
