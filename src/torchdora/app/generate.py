"""``torchdora generate``: text from a model, with an adapter merged in for zero overhead.

``torchdora generate --model M [--adapter DIR] --prompt TEXT [--max-new-tokens N] [--chat]``
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

__all__ = ["GenerateConfig", "generate_text", "main"]


@dataclass(frozen=True)
class GenerateConfig:
    """Options of ``torchdora generate``.

    Args:
        prompt: the text to continue.
        model: model name or folder; ``None``: the base ``adapter`` records, else the embedded SmolLM2-135M-Instruct.
        adapter: optional adapter folder (torchdora or PEFT format), merged before generating.
        max_new_tokens: tokens to generate at most.
        temperature: 0 is greedy decoding (deterministic); above 0 samples.
        seed: sampling seed.
        base_dtype, quantize: how the base loads (:func:`torchdora.app.assets.load_model_and_tokenizer`); an
            adapter on a 4-bit base merges into plain layers of the base's dtype.
        chat: wrap the prompt in the tokenizer's chat template as a user turn (instruction-tuned models).
        compile: run the model through ``torch.compile`` (a slower first token, faster ones after it).
    """

    prompt: str
    model: str | None = None
    adapter: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    base_dtype: str = "float32"
    quantize: str | None = None
    chat: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError("prompt is empty: pass --prompt TEXT")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")


def generate_text(config: GenerateConfig) -> str:
    """The generated continuation of ``config.prompt`` (without the prompt)."""
    from torchdora.app.assets import load_model_and_tokenizer, model_for_adapter, resolve_model
    from torchdora.inject import merge_and_unload
    from torchdora.io import load_adapter, read_adapter

    if config.adapter is not None:
        read_adapter(config.adapter)
    base = model_for_adapter(config.model, config.adapter)  # no --model: the base the adapter records
    resolve_model(base)
    model, tokenizer = load_model_and_tokenizer(base, dtype=config.base_dtype, quantize=config.quantize)
    if config.adapter is not None:
        load_adapter(model, config.adapter)
        merge_and_unload(model)
    if config.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {base!r} has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": config.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(config.prompt, return_tensors="pt")
    if config.compile:
        model.compile()
    torch.manual_seed(config.seed)
    sampling = config.temperature > 0
    extra = {"temperature": config.temperature, "top_p": 1.0, "top_k": 0} if sampling else {}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=config.max_new_tokens, do_sample=sampling,
                                pad_token_id=tokenizer.pad_token_id, **extra)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _parser() -> argparse.ArgumentParser:
    from torchdora.app.assets import add_base_options

    p = argparse.ArgumentParser(prog="torchdora generate", description="Generate text from a model (+ adapter).")
    p.add_argument("--model", default=None,
                   help="model name or folder (default: the one --adapter records, else the embedded SmolLM2-135M)")
    p.add_argument("--adapter", default=None, help="adapter folder (torchdora or PEFT format)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompt")
    p.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    add_base_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        config = GenerateConfig(**vars(_parser().parse_args(argv)))
        text = generate_text(config)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"torchdora generate: error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
