"""``torchdora generate``: text from a model, with an adapter merged in for zero overhead.

``torchdora generate --model M [--adapter DIR] --prompt TEXT [--system TEXT] [--chat] [--max-new-tokens N]``
``torchdora generate [--adapter DIR] --prompt-file prompts.txt|prompts.jsonl --output answers.jsonl``

A prompt file holds one prompt per line: plain text lines (``.txt`` and any other suffix), or a ``.jsonl`` file
whose lines are ``{"prompt": TEXT}`` or ``{"messages": [{"role", "content"}, ...]}`` (a conversation whose answer is
wanted next; it goes through the chat template). Prompts are generated ``--batch-size`` at a time and the
answers written, in order, to ``--output`` as JSON lines ``{"prompt" or "messages", "answer"}`` (atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchdora.app.sampling import Sampling

__all__ = ["GenerateConfig", "load_generation_model", "read_prompt_file", "generate_text", "generate_file", "main"]


@dataclass(frozen=True)
class GenerateConfig:
    """Options of ``torchdora generate``.

    Args:
        prompt: the text to continue (or, with ``chat``/``system``, the user's message).
        prompt_file: instead of ``prompt``: a file of prompts (see the module docstring); needs ``output``.
        output: the JSON-lines file of answers for ``prompt_file``.
        model: model name or folder; ``None``: the base ``adapter`` records, else the embedded SmolLM2-135M-Instruct.
        adapter: optional adapter folder (torchdora or PEFT format), merged before generating.
        max_new_tokens: tokens to generate at most.
        temperature: 0 is greedy decoding (deterministic); above 0 samples. top_p: nucleus sampling's mass.
        seed: sampling seed.
        base_dtype, quantize: how the base loads (:func:`torchdora.app.assets.load_model_and_tokenizer`); an
            adapter on a 4-bit base merges into plain layers of the base's dtype.
        chat: wrap the prompt in the tokenizer's chat template as a user turn (instruction-tuned models).
        system: a system prompt, first turn of the chat template (implies ``chat``): query a model trained with a
            system prompt the way it was trained.
        batch_size: prompts of ``prompt_file`` generated together.
        compile: run the model through ``torch.compile`` (a slower first token, faster ones after it).
    """

    prompt: str | None = None
    model: str | None = None
    adapter: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    base_dtype: str = "float32"
    quantize: str | None = None
    chat: bool = False
    system: str | None = None
    prompt_file: str | None = None
    output: str | None = None
    top_p: float = 1.0
    batch_size: int = 8
    compile: bool = False

    def __post_init__(self) -> None:
        if self.prompt_file is None and (not isinstance(self.prompt, str) or not self.prompt):
            raise ValueError("prompt is empty: pass --prompt TEXT or --prompt-file FILE")
        if self.prompt_file is not None and self.prompt is not None:
            raise ValueError("give --prompt or --prompt-file, not both")
        if self.prompt_file is not None and not self.output:
            raise ValueError(f"--prompt-file {self.prompt_file} needs --output answers.jsonl (where the answers go)")
        if self.output is not None and self.prompt_file is None:
            raise ValueError("--output writes the answers of a --prompt-file; give one, or drop --output")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        Sampling(self.max_new_tokens, self.temperature, self.top_p)  # checks the three, naming the bad one

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_p)


def load_generation_model(model: str | None, adapter: str | None, base_dtype: str = "float32",
                          quantize: str | None = None) -> tuple[Any, Any, str | None]:
    """Base (+ adapter merged), tokenizer, and the base's name; a bad adapter fails before the model loads."""
    from torchdora.app.assets import load_model_and_tokenizer, model_for_adapter, resolve_model
    from torchdora.inject import merge_and_unload
    from torchdora.io import load_adapter, read_adapter

    if adapter is not None:
        read_adapter(adapter)
    base = model_for_adapter(model, adapter)  # no --model: the base the adapter records
    resolve_model(base)
    loaded, tokenizer = load_model_and_tokenizer(base, dtype=base_dtype, quantize=quantize)
    if adapter is not None:
        load_adapter(loaded, adapter)
        merge_and_unload(loaded)
    return loaded.eval(), tokenizer, base


def read_prompt_file(path: str | Path) -> list[str | list[tuple[str, str]]]:
    """The prompts of a prompt file: text, or ``(role, content)`` turns for ``messages`` lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file {path} does not exist (one prompt per line, or a .jsonl file of "
                                "{\"prompt\"} / {\"messages\"} lines)")
    prompts: list[str | list[tuple[str, str]]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix.lower() != ".jsonl":
            prompts.append(line)
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg}); write one object per line") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"]:
            prompts.append(row["prompt"])
        elif isinstance(row, dict) and "messages" in row:
            prompts.append(_turns(row["messages"], where))
        else:
            raise ValueError(f"{where}: expected {{\"prompt\": TEXT}} or {{\"messages\": [...]}}, got {line[:80]!r}")
    if not prompts:
        raise ValueError(f"--prompt-file {path} holds no prompt")
    return prompts


def _turns(messages: Any, where: str) -> list[tuple[str, str]]:
    from torchdora.app.data.chat import ROLES

    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": TEXT}}")
        turns.append((m["role"], m["content"]))
    return turns


def generate_text(config: GenerateConfig) -> str:
    """The generated continuation of ``config.prompt`` (without the prompt)."""
    from torchdora.app.sampling import generate_batch, prompt_ids

    model, tokenizer, _ = load_generation_model(config.model, config.adapter, config.base_dtype, config.quantize)
    if config.compile:
        model.compile()
    ids = prompt_ids(tokenizer, config.prompt, chat=config.chat or bool(config.system), system=config.system)
    torch.manual_seed(config.seed)
    return generate_batch(model, tokenizer, [ids], config.sampling)[0]


def generate_file(config: GenerateConfig) -> Path:
    """Answers to every prompt of ``config.prompt_file``, written to ``config.output`` as JSON lines."""
    from torchdora.app.sampling import generate_batch, prompt_ids
    from torchdora.files import atomic_write_bytes

    prompts = read_prompt_file(config.prompt_file)  # before the model loads
    model, tokenizer, _ = load_generation_model(config.model, config.adapter, config.base_dtype, config.quantize)
    if config.compile:
        model.compile()
    chat = config.chat or bool(config.system)
    ids = [prompt_ids(tokenizer, p, chat=chat, system=config.system) for p in prompts]
    torch.manual_seed(config.seed)
    answers = generate_batch(model, tokenizer, ids, config.sampling, batch_size=config.batch_size)
    lines = [json.dumps({**({"prompt": p} if isinstance(p, str) else
                            {"messages": [{"role": r, "content": c} for r, c in p]}), "answer": a}, ensure_ascii=False)
             for p, a in zip(prompts, answers)]
    output = Path(config.output)
    atomic_write_bytes(output, ("\n".join(lines) + "\n").encode("utf-8"))
    return output


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """``--max-new-tokens``, ``--temperature``, ``--top-p``, ``--seed`` (generate and chat)."""
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64, help="tokens per answer (64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0, help="nucleus sampling mass, (0, 1] (default 1)")
    p.add_argument("--seed", type=int, default=0)


def _parser() -> argparse.ArgumentParser:
    from torchdora.app.assets import add_base_options

    p = argparse.ArgumentParser(prog="torchdora generate", description="Generate text from a model (+ adapter).")
    p.add_argument("--model", default=None,
                   help="model name or folder (default: the one --adapter records, else the embedded SmolLM2-135M)")
    p.add_argument("--adapter", default=None, help="adapter folder (torchdora or PEFT format)")
    p.add_argument("--prompt", default=None, help="text to continue (or the user message, with --chat/--system)")
    p.add_argument("--prompt-file", dest="prompt_file", default=None,
                   help="one prompt per line, or .jsonl of {\"prompt\"} / {\"messages\"} lines; needs --output")
    p.add_argument("--output", default=None, help="answers of --prompt-file as JSON lines (written atomically)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="prompts generated together (8)")
    add_sampling_options(p)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompt")
    p.add_argument("--system", default=None, help="system prompt (implies --chat)")
    p.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    add_base_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        config = GenerateConfig(**vars(_parser().parse_args(argv)))
        if config.prompt_file is not None:
            path = generate_file(config)
            print(f"answers written to {path}")
            return 0
        text = generate_text(config)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"torchdora generate: error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
