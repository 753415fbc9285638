"""Prompts to token ids and batched generation, shared by ``generate``, ``chat`` and the samples a run logs.

A prompt is plain text (continued as it is, with the tokenizer's special tokens such as BOS) or a conversation
of ``(role, content)`` turns, rendered with the tokenizer's chat template plus its generation prompt
(:func:`torchdora.app.data.render_chat`), optionally after a system turn. Batches are left-padded (generation
appends on the right) and ``generate`` derives the position ids from the attention mask, so a prompt's
continuation does not depend on its batch neighbours (greedy decoding gives the same text alone or batched,
up to float round-off in the padded rows' attention).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Sampling", "chat_turns", "prompt_ids", "generate_batch"]

Turns = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: ``temperature`` 0 is greedy (deterministic); above 0 samples, from the smallest set
    of tokens whose probabilities add up to ``top_p`` (nucleus sampling; 1: every token)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: no nucleus cut), got {self.top_p!r}")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": float(self.temperature), "top_p": float(self.top_p), "top_k": 0}


def chat_turns(prompt: str | Turns, system: str | None = None) -> list[tuple[str, str]]:
    """A prompt as turns: text becomes one user turn; ``system`` goes first unless the turns start with one."""
    turns = [("user", prompt)] if isinstance(prompt, str) else [tuple(t) for t in prompt]
    if system and not (turns and turns[0][0] == "system"):
        turns.insert(0, ("system", system))
    return turns


def prompt_ids(tokenizer: "PreTrainedTokenizerBase", prompt: str | Turns, chat: bool,
               system: str | None = None) -> list[int]:
    """Ids of a prompt: with ``chat`` (or when ``prompt`` is turns) the chat template's rendering of the turns and
    the generation prompt (the template holds its own special tokens), else the text with the tokenizer's."""
    if chat or not isinstance(prompt, str):
        from torchdora.app.data import render_chat

        text = render_chat(tokenizer, chat_turns(prompt, system), add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if system:
        raise ValueError("a system prompt needs the chat template: add --chat (or give messages)")
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer: "PreTrainedTokenizerBase", prompts: Sequence[Sequence[int]],
                   sampling: Sampling = Sampling(), batch_size: int = 8,
                   autocast: Callable[[], ContextManager] | None = None, streamer: Any = None) -> list[str]:
    """The decoded continuation of each prompt (ids), cut at the end-of-sequence token, ``batch_size`` at a time.

    ``streamer`` (e.g. transformers' ``TextIteratorStreamer``) receives the tokens as they come; it takes a
    single prompt. Sampling draws from the global torch generator: seed it for repeatable samples.
    """
    if streamer is not None and len(prompts) != 1:
        raise ValueError("a streamer takes one prompt at a time")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    eos = tokenizer.eos_token_id
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[start : start + batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, prompt in enumerate(chunk):
                ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
                mask[row, width - len(prompt) :] = 1
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=sampling.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                     streamer=streamer, **sampling.generate_kwargs())
            for row in out[:, width:].tolist():
                row = row[: row.index(eos)] if eos is not None and eos in row else row
                answers.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers
