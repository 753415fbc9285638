"""Chat data: ``messages`` rows rendered with the tokenizer's chat template, loss on assistant turns only.

A row ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}`` is
rendered by ``tokenizer.apply_chat_template`` (the template the model was instruction-tuned with). The label
mask is found from the template itself: for assistant turn ``i``, the characters between the rendering of
``messages[:i]`` with the generation prompt (``"<|im_start|>assistant\\n"`` in ChatML) and the rendering of
``messages[:i + 1]`` are the assistant's (its content and end-of-turn token, so the model learns to stop); every
token that starts inside such a span is trained, every other token (system, user, template markup) is ``-100``.
This works for any template whose rendering of a conversation starts with the rendering of its prefixes, and
refuses (naming the template) one that does not, e.g. templates that rewrite earlier turns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torchdora.app.data.cutting import head_tokens, tail_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Message", "parse_messages", "render_chat", "assistant_spans", "tokenize_chat", "tokenize_chat_cut",
           "chat_prompt_ids"]

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")

Message = tuple[str, str]
"""``(role, content)``: hashable, so an :class:`~torchdora.app.data.Example` holding turns stays frozen."""


def parse_messages(value: Any, where: str) -> tuple[Message, ...]:
    """Check a ``messages`` field: a list of ``{"role", "content"}`` objects ending with an assistant turn."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    turns = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: messages[{index}] must be an object with text 'role' and 'content', "
                             f"got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: messages[{index}] has role {message['role']!r}; use one of {list(ROLES)}")
        turns.append((message["role"], message["content"]))
    if turns[-1][0] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's (the answer to learn), "
                         f"got role {turns[-1][0]!r}")
    return tuple(turns)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
                add_generation_prompt: bool = False) -> str:
    """The tokenizer's chat template applied to ``messages`` (text, not ids)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of this model ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template, so "
            "'messages' rows cannot be rendered; use an instruction-tuned model, set tokenizer.chat_template, "
            "or write prompt/completion rows"
        )
    from jinja2 import TemplateError  # SecurityError (the sandbox refused) is one

    try:
        return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except (TemplateError, OverflowError, RecursionError, MemoryError) as err:
        raise ValueError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', '?') or 'this tokenizer'} failed "
            f"({type(err).__name__}: {_first_line(err)}); fix 'chat_template' in its tokenizer_config.json "
            "(or chat_template.jinja), or write prompt/completion rows"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else "no message"


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character span of each assistant turn in it."""
    text = render_chat(tokenizer, messages)
    spans = []
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        before = _render_prefix(tokenizer, messages[:i])
        through = render_chat(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ValueError(
                "the chat template does not render a conversation as an extension of its first turns (it "
                "rewrites earlier turns), so the assistant tokens cannot be located; write prompt/completion rows"
            )
        spans.append((len(before), len(through)))
    return text, spans


def _render_prefix(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> str:
    """``messages`` plus the generation prompt; for no messages at all, what the template renders then, if
    anything (many templates index ``messages[0]`` and fail: nothing comes before the first turn)."""
    if messages:
        return render_chat(tokenizer, messages, add_generation_prompt=True)
    try:
        return render_chat(tokenizer, [], add_generation_prompt=True)
    except Exception:  # jinja errors of templates that need a first message
        return ""


def tokenize_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
                  max_length: int) -> dict[str, list[int]]:
    """``input_ids`` of the rendered conversation and ``labels`` that are ``-100`` outside assistant turns.

    The template holds its own special tokens (BOS included where the model uses one), so the text is tokenized
    without adding any. A token is trained when its first character lies inside an assistant span. Too-long
    conversations keep their last ``max_length`` tokens (the latest turns, like prompts cut from the left).
    """
    return tokenize_chat_cut(tokenizer, messages, max_length)[0]


def tokenize_chat_cut(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
                      max_length: int) -> tuple[dict[str, list[int]], bool]:
    """:func:`tokenize_chat` and whether the conversation was longer than ``max_length`` (cut from the left).

    Only the end of a long conversation is tokenized (:func:`torchdora.app.data.cutting.tail_tokens`)."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded, base = tail_tokens(tokenizer, text, max_length, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    starts = [base + start for start, _ in encoded["offset_mapping"]]
    labels = [token if any(a <= start < b for a, b in spans) else IGNORE_INDEX for token, start in zip(ids, starts)]
    cut = len(ids) > max_length
    if cut:
        ids, labels = ids[-max_length:], labels[-max_length:]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise ValueError(f"a conversation has no assistant token left to train on within max_length={max_length}")
    return {"input_ids": ids, "labels": labels}, cut


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
                    keep: int | None = None) -> list[int]:
    """Ids of every turn before the last (assistant) one plus the generation prompt: what evaluation conditions
    on to score or generate the final answer. With ``keep``, only the ids whose last ``keep`` are exact (the end
    of a long conversation is tokenized, not all of it)."""
    text = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    if keep is None:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    encoded, start = tail_tokens(tokenizer, text, keep, add_special_tokens=False)
    # The first id stays first, as when everything is tokenized: a BOS the template writes is kept by the cut.
    head = head_tokens(tokenizer, text, 1, add_special_tokens=False)[:1] if start else []
    return head + list(encoded["input_ids"])
