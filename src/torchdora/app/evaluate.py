"""Evaluation of a causal LM (+ adapter): multiple-choice accuracy and completion perplexity.

Which metric fits the data: examples with two or more options (multiple choice, text/label rows) get accuracy
(one option is always "right": such examples count for perplexity only, and a note says so); every example gets
perplexity; examples without options whose answer is short (at most :data:`SHORT_ANSWER_TOKENS`
tokens) get exact match of greedy generations. A metric with no example is NaN here and ``null`` in JSON.

Accuracy follows the usual log-likelihood protocol for classification with a language model: for each
example, every candidate completion (``Example.options``) is scored by ``sum log p(option tokens | prompt)``
and the highest-scoring option is the prediction. Perplexity is ``exp`` of the mean negative log-likelihood
per token of the gold completions (without the end-of-sequence token, exactly the tokens that are scored).

Prompt and option are tokenized separately, the way :func:`torchdora.app.data.tokenize_example` builds the
training sequences, so a model is scored on exactly the token sequences it was trained on.

``torchdora eval --model M [--adapter DIR] [--data D] [--split test|validation] [--max-eval N]``
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence

import torch
from torch import Tensor, nn

from torchdora.app.data import IGNORE_INDEX, Example, tokenize_example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: examples without options whose gold answer has at most this many tokens also get greedy exact match
SHORT_ANSWER_TOKENS = 16

__all__ = [
    "SHORT_ANSWER_TOKENS",
    "EvalResult",
    "EvalConfig",
    "selected_logits",
    "score_options",
    "evaluate_examples",
    "greedy_answers",
    "run_eval",
    "main",
]


@dataclass(frozen=True)
class EvalResult:
    """Sums that add up across data shards (processes), and the metrics derived from them.

    ``n_scored`` counts examples with two or more options (the accuracy's denominator); ``nll_sum``/``n_tokens``
    cover the gold completion of every example; ``n_examples`` counts every example evaluated and ``n_one_option``
    those with a single option (no accuracy: that option always wins).
    """

    n_correct: int = 0
    n_scored: int = 0
    nll_sum: float = 0.0
    n_tokens: int = 0
    n_exact: int = 0
    n_generated: int = 0
    n_examples: int = 0
    n_one_option: int = 0

    @property
    def accuracy(self) -> float:
        """Fraction of option-scored examples whose gold option has the highest log-likelihood (NaN if none)."""
        return self.n_correct / self.n_scored if self.n_scored else float("nan")

    @property
    def perplexity(self) -> float:
        """``exp(mean NLL per gold completion token)`` (NaN if no token was scored)."""
        return math.exp(self.nll_sum / self.n_tokens) if self.n_tokens else float("nan")

    @property
    def exact_match(self) -> float:
        """Fraction of short-answer examples whose greedy generation is the gold answer (NaN if none)."""
        return self.n_exact / self.n_generated if self.n_generated else float("nan")

    def __add__(self, other: "EvalResult") -> "EvalResult":
        return EvalResult.from_sums([a + b for a, b in zip(self.sums(), other.sums())])

    def sums(self) -> list[float]:
        """The fields as numbers, in order (to add them up across processes in one tensor)."""
        return [float(v) for v in dataclasses.astuple(self)]

    @classmethod
    def from_sums(cls, values: Sequence[float]) -> "EvalResult":
        kinds = [f.type for f in dataclasses.fields(cls)]
        return cls(*(float(v) if kind in (float, "float") else int(round(v)) for v, kind in zip(values, kinds)))

    @property
    def accuracy_note(self) -> str | None:
        """Why the accuracy is missing or covers fewer examples than were evaluated (``None``: it covers them all)."""
        if self.n_one_option:
            left_out = (f"{self.n_one_option} of the {self.n_examples} examples have a single option, which always "
                        "scores as right")
            if self.n_scored:
                return f"{left_out}; the accuracy covers the {self.n_scored} examples with two or more options"
            return f"{left_out}: no accuracy; give every example two or more options"
        if not self.n_scored:
            return ("no example has options or labels (generative data), so there is no multiple-choice accuracy; "
                    "see perplexity (and exact_match, greedy generations of short answers)")
        return None

    def metrics(self) -> dict[str, float | str]:
        """What a metrics record shows: accuracy and perplexity, exact match where answers were generated, and the
        accuracy's note when examples with a single option were left out of it."""
        out: dict[str, float | str] = {"accuracy": self.accuracy, "perplexity": self.perplexity}
        if self.n_generated:
            out["exact_match"] = self.exact_match
        if self.n_one_option:
            out["accuracy_note"] = self.accuracy_note or ""
        return out

    def to_dict(self) -> dict[str, float | int]:
        return {**self.metrics(), **dataclasses.asdict(self)}

    def describe(self) -> str:
        """One line: the metrics that have examples, with their counts."""
        parts = [f"accuracy {self.accuracy:.4f} ({self.n_scored} examples)"] if self.n_scored else []
        if self.n_one_option:
            parts.append(f"{self.n_one_option} single-option examples without accuracy")
        parts.append(f"perplexity {self.perplexity:.3f}")
        if self.n_generated:
            parts.append(f"exact match {self.exact_match:.4f} ({self.n_generated} generated)")
        return ", ".join(parts)


# ---- logits at chosen positions only -------------------------------------------------------------------
def _accepts_logits_to_keep(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP / accelerate wrappers
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def selected_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, keep: Tensor,
                    position_ids: Tensor | None = None) -> Tensor:
    """Logits at the positions where ``keep`` is true, ``(keep.sum(), vocab)``.

    The vocabulary projection dominates a small model's cost (SmolLM2: 49152 × 576 per position), and the
    loss or a score needs it only where a target token follows; transformers models accept a boolean
    ``logits_to_keep`` mask ``(B, T)`` for exactly this. Models without it get full logits, then masked.

    ``position_ids`` marks packed rows (:mod:`torchdora.app.data.packing`): then no attention mask is passed,
    so transformers derives the per-example (block-diagonal) causal mask from the position-id resets.
    """
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
    if _accepts_logits_to_keep(model):
        try:
            logits = model(**inputs, logits_to_keep=keep).logits
        except (IndexError, TypeError):  # an older model that takes only an int (a RuntimeError, e.g. OOM, is real)
            logits = None
        if logits is not None and logits.dim() == 2 and logits.shape[0] == int(keep.sum()):
            return logits
    return model(**inputs).logits[keep]


# ---- scoring ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Request:
    """One sequence to run and the (position → token) targets of each option it scores."""

    example: int
    input_ids: list[int]
    # option index -> (positions predicting the tokens, the tokens)
    targets: dict[int, tuple[list[int], list[int]]]


def tokenized_requests(tokenizer: "PreTrainedTokenizerBase", examples: Sequence[Example], max_length: int) -> list[_Request]:
    """Sequences to score; options of one token that share the prompt are scored from a single sequence."""
    requests: list[_Request] = []
    for index, example in enumerate(examples):
        options = example.options or (example.completion,)
        sequences, prompts, targets = [], [], []
        for option in options:
            item = tokenize_example(tokenizer, dataclasses.replace(example, completion=option, options=()), max_length,
                                add_eos=False)
            labels = item["labels"]
            positions = [p - 1 for p, label in enumerate(labels) if label != IGNORE_INDEX]  # predict p + 1
            sequences.append(item["input_ids"])
            prompts.append(tuple(item["input_ids"][: positions[0] + 1]))
            targets.append((positions, [labels[p + 1] for p in positions]))
        if len(options) > 1 and len(set(prompts)) == 1 and all(len(pos) == 1 for pos, _ in targets):
            # Every option is one token after the same prompt: one forward pass of the prompt scores them all.
            requests.append(_Request(index, list(prompts[0]), dict(enumerate(targets))))
        else:
            requests += [_Request(index, ids, {i: target}) for i, (ids, target) in enumerate(zip(sequences, targets))]
    return requests


@torch.no_grad()
def score_options(
    model: nn.Module,
    tokenizer: "PreTrainedTokenizerBase",
    examples: Sequence[Example],
    max_length: int = 256,
    batch_size: int = 16,
    autocast: Callable[[], ContextManager] | None = None,
) -> list[list[float]]:
    """``log p(option | prompt)`` summed over the option's tokens, per example and option.

    Examples without options get one score, for their completion. Sequences are sorted by length and run
    in batches of ``batch_size`` (right padding, which does not change a causal model's positions).
    ``autocast`` makes a fresh context manager per batch (e.g. ``accelerator.autocast``) for mixed precision.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got batch_size={batch_size!r}")
    requests = sorted(tokenized_requests(tokenizer, examples, max_length), key=lambda r: len(r.input_ids))
    scores: list[list[float]] = [[0.0] * len(e.options or (e.completion,)) for e in examples]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            width = max(len(r.input_ids) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            keep = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, request in enumerate(chunk):
                ids[row, : len(request.input_ids)] = torch.as_tensor(request.input_ids)
                mask[row, : len(request.input_ids)] = 1
                for positions, _ in request.targets.values():
                    keep[row, positions] = True
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits = selected_logits(model, ids.to(device), mask.to(device), keep.to(device))
            log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()  # (kept, V), row-major order of `keep`
            flat = keep.flatten().nonzero().squeeze(1).tolist()
            row_of = {pos: i for i, pos in enumerate(flat)}
            for row, request in enumerate(chunk):
                for option, (positions, tokens) in request.targets.items():
                    total = sum(float(log_probs[row_of[row * width + p], t]) for p, t in zip(positions, tokens))
                    scores[request.example][option] = total
    finally:
        model.train(was_training)
    return scores


def _gold_token_count(tokenizer: "PreTrainedTokenizerBase", example: Example, max_length: int) -> int:
    item = tokenize_example(tokenizer, dataclasses.replace(example, options=()), max_length, add_eos=False)
    return sum(label != IGNORE_INDEX for label in item["labels"])


def _normalize(text: str) -> str:
    return " ".join(text.split())


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer: "PreTrainedTokenizerBase",
    examples: Sequence[Example],
    max_length: int = 256,
    batch_size: int = 16,
    autocast: Callable[[], ContextManager] | None = None,
) -> list[str]:
    """Greedy continuation of each example's prompt (the ids scoring sees), up to one token more than the gold
    answer, cut at the end-of-sequence token and decoded. Batches are left-padded (generation appends on the
    right); ``generate`` derives the position ids from the attention mask."""
    items = []
    for example in examples:
        item = tokenize_example(tokenizer, dataclasses.replace(example, options=()), max_length, add_eos=False)
        n_prompt = next(i for i, label in enumerate(item["labels"]) if label != IGNORE_INDEX)
        items.append((item["input_ids"][:n_prompt], len(item["input_ids"]) - n_prompt))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (prompt, _) in enumerate(chunk):
                ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
                mask[row, width - len(prompt) :] = 1
            new = max(n for _, n in chunk) + 1  # room for the answer and the token that should end it
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                                     min_new_tokens=0, do_sample=False, pad_token_id=pad, eos_token_id=eos)
            for row, (_, n_gold) in zip(out[:, width:].tolist(), chunk):
                row = row[: n_gold + 1]  # each example's own budget, whatever the batch's longest answer
                row = row[: row.index(eos)] if eos is not None and eos in row else row
                answers.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers


def evaluate_examples(
    model: nn.Module,
    tokenizer: "PreTrainedTokenizerBase",
    examples: Sequence[Example],
    max_length: int = 256,
    batch_size: int = 16,
    autocast: Callable[[], ContextManager] | None = None,
    exact_match: bool = True,
) -> EvalResult:
    """Multiple-choice accuracy, gold-completion NLL and (``exact_match``) greedy exact match of short answers
    of ``model`` on ``examples`` (sums, see :class:`EvalResult`). Exact match compares whitespace-normalized
    text: the generation up to the end-of-sequence token against the gold completion.

    Raises:
        ValueError: an example's answer is not one of its options (naming the example).
    """
    for index, example in enumerate(examples):
        if example.options and example.completion not in example.options:
            raise ValueError(f"example {index} (prompt {example.prompt[:60]!r}): its answer {example.completion!r} "
                             f"is not one of its options {list(example.options)!r}; fix its label or its options")
    scores = score_options(model, tokenizer, examples, max_length, batch_size, autocast)
    n_correct = n_scored = n_tokens = n_one_option = 0
    nll = 0.0
    short = []
    for example, option_scores in zip(examples, scores):
        gold = example.options.index(example.completion) if example.options else 0
        if len(example.options) == 1:
            n_one_option += 1  # its only option always has the highest score: no information about the model
        elif example.options:
            n_scored += 1
            # ties count as wrong: an untrained model scoring every option equally has not chosen the answer
            best = max(option_scores)
            n_correct += int(option_scores[gold] == best and option_scores.count(best) == 1)
        nll -= option_scores[gold]
        count = _gold_token_count(tokenizer, example, max_length)
        n_tokens += count
        if exact_match and not example.options and count <= SHORT_ANSWER_TOKENS:
            short.append(example)
    answers = greedy_answers(model, tokenizer, short, max_length, batch_size, autocast) if short else []
    n_exact = sum(_normalize(a) == _normalize(e.completion) for a, e in zip(answers, short))
    return EvalResult(n_correct, n_scored, nll, n_tokens, n_exact, len(short), len(examples), n_one_option)


# ---- torchdora eval ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalConfig:
    """Options of ``torchdora eval``.

    Args:
        model: model name or local folder (see :func:`torchdora.app.assets.resolve_model`); ``None``: the base ``adapter``
            records, else the embedded SmolLM2-135M-Instruct.
        adapter: optional adapter folder (torchdora or PEFT format) loaded on top of the model.
        data: dataset name or path (:func:`torchdora.app.data.load_dataset`); ``None``: the data of the run ``adapter``
            was trained in, with its seed (:func:`torchdora.app.run_folder.eval_defaults`), else Rotten Tomatoes.
        split: ``"test"`` or ``"validation"``.
        max_eval: evaluate at most this many examples of the split (a prefix, so results are comparable).
        max_length, batch_size: token budget per sequence (prompts are cut from the left), sequences per forward.
        seed: the data split seed (training's ``--seed`` gives its held-out split); ``None``: the run's, else 0.
        tasks, include_path: lm-evaluation-harness tasks instead (:mod:`torchdora.app.lmeval`), local task YAMLs.
        dtype: ``"float32"`` or ``"bfloat16"`` (autocast).
        base_dtype, quantize: how the base loads (:func:`torchdora.app.assets.load_model_and_tokenizer`);
            use the training run's values for an adapter trained on a bf16 or 4-bit base.
    """

    model: str | None = None
    adapter: str | None = None
    data: str | None = None
    split: str = "test"
    max_eval: int | None = None
    max_length: int = 256
    batch_size: int = 16
    seed: int | None = None
    dtype: str = "float32"
    base_dtype: str = "float32"
    quantize: str | None = None
    tasks: str | None = None
    include_path: str | None = None

    def __post_init__(self) -> None:
        if self.split not in ("test", "validation"):
            raise ValueError(f"split must be 'test' or 'validation', got split={self.split!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got dtype={self.dtype!r}")
        for name in ("max_length", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got max_length={self.max_length}")


def run_eval(config: EvalConfig) -> EvalResult:
    """Load data, model and adapter (cheap checks first), then evaluate one split."""
    from torchdora.app.assets import load_model_and_tokenizer, model_for_adapter, resolve_model
    from torchdora.app.run_folder import eval_defaults, eval_examples
    from torchdora.io import load_adapter, read_adapter

    config, note = eval_defaults(config)  # no --data: the adapter's run's data and seed
    if note is not None:
        print(note, file=sys.stderr)
    examples = eval_examples(config, from_run=note is not None)
    if config.adapter is not None:
        read_adapter(config.adapter)  # a missing or corrupt adapter fails before the model loads
    base = model_for_adapter(config.model, config.adapter)  # no --model: the base the adapter records
    resolve_model(base)
    model, tokenizer = load_model_and_tokenizer(base, dtype=config.base_dtype, quantize=config.quantize)
    if config.adapter is not None:
        load_adapter(model, config.adapter)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if config.dtype == "bfloat16" else None
    return evaluate_examples(model, tokenizer, examples, config.max_length, config.batch_size, autocast)


def _parser() -> argparse.ArgumentParser:
    from torchdora.app.assets import add_base_options

    p = argparse.ArgumentParser(prog="torchdora eval", description="Multiple-choice accuracy and perplexity.")
    p.add_argument("--model", default=None,
                   help="model name or local folder (default: the one --adapter records, else the embedded SmolLM2-135M)")
    p.add_argument("--adapter", default=None, help="adapter folder (torchdora or PEFT format)")
    p.add_argument("--data", default=None, help="dataset name or path (default: the --adapter run's, else rotten_tomatoes)")
    p.add_argument("--split", default="test", choices=["test", "validation"])
    p.add_argument("--max-eval", type=int, default=None, help="evaluate at most N examples")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=None, help="data split seed (default: the --adapter run's, else 0)")
    p.add_argument("--tasks", default=None, help="comma-separated lm-evaluation-harness tasks instead (lmeval extra)")
    p.add_argument("--include-path", dest="include_path", default=None, help="folder of local task YAML files")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16: autocast")
    add_base_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = EvalConfig(**{k: v for k, v in vars(args).items()})
        if config.tasks:
            from torchdora.app.lmeval import eval_tasks

            return eval_tasks(config)
        result = run_eval(config)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"torchdora eval: error: {err}", file=sys.stderr)
        return 2
    accuracy = f"accuracy={result.accuracy:.4f} " if result.n_scored else "accuracy=- "
    exact = f" exact_match={result.exact_match:.4f} ({result.n_generated} generated)" if result.n_generated else ""
    print(f"split={config.split} examples={result.n_examples} {accuracy}perplexity={result.perplexity:.4f}{exact}")
    if result.accuracy_note is not None:
        print(f"note: {result.accuracy_note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
