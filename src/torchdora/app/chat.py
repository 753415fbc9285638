"""``torchdora chat``: an interactive conversation with a model (+ adapter), tokens printed as they come.

``torchdora chat [--adapter DIR] [--model M] [--system TEXT] [--temperature T] [--top-p P] [--max-new-tokens N]``

Each line read is a user turn; the whole history (system prompt, earlier turns and answers) goes through the
tokenizer's chat template for every answer, which transformers' ``TextStreamer`` prints token by token. Commands:
``/reset`` forgets the history, ``/exit`` (or end of input, Ctrl-D) ends the session. It reads standard input
line by line, so it also answers piped input (``printf 'hi\\n/exit\\n' | torchdora chat``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from torchdora.app.sampling import Sampling

__all__ = ["ChatConfig", "chat_session", "text_streamer", "main"]

PROMPT = "you> "
COMMANDS = {"/exit": "end the session", "/quit": "end the session", "/reset": "forget the conversation so far",
            "/help": "list the commands"}


@dataclass(frozen=True)
class ChatConfig:
    """Options of ``torchdora chat`` (as :class:`torchdora.app.generate.GenerateConfig`, plus ``system``)."""

    model: str | None = None
    adapter: str | None = None
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    base_dtype: str = "float32"
    quantize: str | None = None

    def __post_init__(self) -> None:
        Sampling(self.max_new_tokens, self.temperature, self.top_p)  # checks the three, naming the bad one

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_p)


def chat_session(config: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> list[tuple[str, str]]:
    """Run the session until ``/exit`` or the end of ``stdin``; returns the conversation (without the system turn)."""
    from torchdora.app.generate import load_generation_model
    from torchdora.app.sampling import generate_batch, prompt_ids

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tokenizer, base = load_generation_model(config.model, config.adapter, config.base_dtype, config.quantize)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {base or 'the default model'!r} has no chat template, so it cannot "
                         "chat; use an instruction-tuned model, or `torchdora generate --prompt` to continue text")
    torch.manual_seed(config.seed)
    history: list[tuple[str, str]] = []
    interactive = stdin.isatty()
    print(f"chatting with {base or 'the default model'}{' + ' + config.adapter if config.adapter else ''}; "
          "/reset forgets, /exit ends", file=stdout, flush=True)
    while True:
        if interactive:
            print(PROMPT, end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        command = text.strip().split()[0].lower()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = []
            print("(conversation forgotten)", file=stdout, flush=True)
            continue
        if command == "/help" or (command.startswith("/") and command not in COMMANDS):
            print("commands: " + ", ".join(f"{k} ({v})" for k, v in COMMANDS.items()), file=stdout, flush=True)
            continue
        history.append(("user", text))
        ids = prompt_ids(tokenizer, history, chat=True, system=config.system)
        streamer = text_streamer(tokenizer, stdout)
        answer = generate_batch(model, tokenizer, [ids], config.sampling, streamer=streamer)[0]
        history.append(("assistant", answer))
    return history


def text_streamer(tokenizer: Any, stdout: TextIO) -> Any:
    """A ``TextStreamer`` printing the answer's tokens to ``stdout`` as they come, then a newline."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            print(text, end="" if not stream_end else "\n", file=stdout, flush=True)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _parser() -> argparse.ArgumentParser:
    from torchdora.app.assets import add_base_options
    from torchdora.app.generate import add_sampling_options

    p = argparse.ArgumentParser(prog="torchdora chat", description="Chat with a model (+ adapter), tokens streamed.")
    p.add_argument("--model", default=None,
                   help="model name or folder (default: the one --adapter records, else the embedded SmolLM2-135M)")
    p.add_argument("--adapter", default=None, help="adapter folder (torchdora or PEFT format)")
    p.add_argument("--system", default=None, help="system prompt, the first turn of every answer's history")
    add_sampling_options(p)
    p.set_defaults(max_new_tokens=256)
    add_base_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        chat_session(ChatConfig(**vars(_parser().parse_args(argv))))
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"torchdora chat: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
