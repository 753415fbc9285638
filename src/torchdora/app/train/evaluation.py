"""Evaluation while training: at every ``--eval-every`` step the validation examples get accuracy and perplexity
(:meth:`Run.evaluate <torchdora.app.train.run.Run.evaluate>`), the held-out loss computed exactly as the training
loss (``val_loss``: mean cross-entropy over the completion tokens, end-of-sequence token included), the custom
metrics a library user passes to :func:`torchdora.app.train.train`, and greedy generations of a few fixed
validation prompts (``--sample-prompts``), logged to ``metrics.jsonl`` and, as a table, to the trackers.

The best evaluation on ``--metric-for-best`` (``val_loss``, lower is better, or ``val_accuracy``, higher is
better; a tie is no improvement) keeps its adapter in ``best-adapter/``; ``--early-stopping-patience N`` ends the
run after N evaluations in a row without improvement (Hugging Face ``EarlyStoppingCallback``'s rule).

A custom metric is ``fn(model, tokenizer, examples) -> float``: the model being trained (adapters active, in
eval mode; do not change its weights), its tokenizer and the validation examples
(:class:`torchdora.app.data.Example`). It runs on every process with the same examples (so a metric that runs the
model also works when FSDP shards it) and the main process's value is recorded under its name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ContextManager, Mapping, Sequence

import torch
from torch import nn

from torchdora.app.train.best import METRICS_FOR_BEST

if TYPE_CHECKING:
    from torchdora.app.data import Example
    from torchdora.app.evaluate import EvalResult
    from torchdora.app.train.run import Run

__all__ = ["MetricFn", "check_custom_metrics", "check_metric_for_best",
           "validation_loss", "sample_records", "log_samples_table", "validate", "score_test"]

#: keys a validation record already has (a custom metric may not take them)
RESERVED = ("step", "split", "accuracy", "perplexity", "exact_match", "accuracy_note", "val_loss", "loss", "samples")

MetricFn = Callable[[nn.Module, Any, "list[Example]"], float]


def check_custom_metrics(metrics: Mapping[str, MetricFn] | None) -> dict[str, MetricFn]:
    """``metrics`` as a dict, refused when a name is not text, clashes with a built-in key, or is not callable."""
    checked = dict(metrics or {})
    for name, fn in checked.items():
        if not isinstance(name, str) or not name or name in RESERVED:
            raise ValueError(f"custom metric name {name!r} must be non-empty text other than {list(RESERVED)}")
        if not callable(fn):
            raise TypeError(f"custom metric {name!r} must be a callable fn(model, tokenizer, examples) -> float, "
                            f"got {type(fn).__name__}")
    return checked


def check_metric_for_best(metric: str | None, patience: int, eval_every: int,
                          validation: Sequence["Example"]) -> None:
    """Refuse, in one line, early stopping or a best checkpoint the data or settings cannot produce (``metric``:
    the ``--metric-for-best`` given, ``None`` for the default ``val_loss``, which data without a validation split
    simply does without)."""
    if patience and not eval_every:
        raise ValueError(f"--early-stopping-patience {patience} needs evaluations: set --eval-every N (> 0)")
    if not validation:
        if patience:
            raise ValueError("--early-stopping-patience needs validation examples, and the data has none; give "
                             "--val-size (> 0) or --eval-data FILE, or drop --early-stopping-patience")
        if metric is not None:
            raise ValueError(f"--metric-for-best {metric} needs validation examples, and the data has none "
                             "(--val-size 0?); give --val-size (> 0) or --eval-data FILE, or drop --metric-for-best")
        return
    if metric == "val_accuracy" and not any(len(e.options) > 1 for e in validation):
        raise ValueError("--metric-for-best val_accuracy needs validation examples with two or more options (multiple "
                         "choice or labels), and this data has none; use --metric-for-best val_loss")


@torch.no_grad()
def validation_loss(model: nn.Module, tokenizer: Any, examples: Sequence["Example"], max_length: int,
                    batch_size: int, autocast: Callable[[], ContextManager] | None = None) -> tuple[float, int]:
    """``(sum of the cross-entropy, number of tokens)`` over the completion tokens of ``examples``, tokenized and
    scored as training does (:func:`torchdora.app.train.run.compute_loss`), so ``sum / number`` is comparable with
    the training loss."""
    import contextlib

    from torchdora.app.data import Collator, tokenize_examples
    from torchdora.app.train.run import compute_loss

    items = tokenize_examples(tokenizer, examples, max_length)
    collate = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in collate(items[start : start + batch_size]).items()}
            with autocast() if autocast is not None else contextlib.nullcontext():
                loss, n = compute_loss(model, batch)
            total, count = total + float(loss) * n, count + n
    finally:
        model.train(was_training)
    return total, count


def sample_records(model: nn.Module, tokenizer: Any, examples: Sequence["Example"], max_new_tokens: int,
                   autocast: Callable[[], ContextManager] | None = None) -> list[dict[str, str]]:
    """Greedy generations for ``examples``' prompts (as scoring sees them: chat rows through the template), each
    ``{"prompt", "generated", "reference"}``."""
    import dataclasses

    from torchdora.app.data import IGNORE_INDEX, tokenize_example
    from torchdora.app.sampling import Sampling, generate_batch

    prompts = []
    for example in examples:
        item = tokenize_example(tokenizer, dataclasses.replace(example, options=()), 10**6, add_eos=False)
        prompts.append(item["input_ids"][: next(i for i, x in enumerate(item["labels"]) if x != IGNORE_INDEX)])
    answers = generate_batch(model, tokenizer, prompts, Sampling(max_new_tokens=max_new_tokens),
                             batch_size=len(prompts) or 1, autocast=autocast)
    return [{"prompt": e.prompt, "generated": a, "reference": e.completion} for e, a in zip(examples, answers)]


def log_samples_table(accelerator: Any, samples: list[dict[str, str]], step: int) -> None:
    """The samples as a table for each tracker: ``log_table`` where a tracker has one (wandb, ClearML), else a
    Markdown table as text (TensorBoard's ``add_text`` through ``GeneralTracker.log``)."""
    columns = ["prompt", "generated", "reference"]
    rows = [[s[c] for c in columns] for s in samples]
    for tracker in accelerator.trackers:
        if hasattr(tracker, "log_table"):
            tracker.log_table("validation_samples", columns=columns, data=rows, step=step)
        else:
            cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
            tracker.log({"validation_samples": "\n".join(lines)}, step=step)


def _loss_sums(run: "Run", examples: list["Example"]) -> tuple[float, int]:
    """:func:`validation_loss` over ``examples``, shared among the processes (FSDP: each scores all of them)."""
    config, acc = run.config, run.accelerator
    if run.sharded:  # FSDP: every forward is a collective, so every process scores every example
        return validation_loss(run.raw_model, run.tokenizer, examples, config.max_length, config.eval_batch_size,
                               acc.autocast)
    shard = examples[acc.process_index :: acc.num_processes]
    total, count = validation_loss(run.raw_model, run.tokenizer, shard, config.max_length, config.eval_batch_size,
                                   acc.autocast)
    if acc.num_processes > 1:
        sums = acc.reduce(torch.tensor([total, count], dtype=torch.float64, device=acc.device), reduction="sum")
        total, count = float(sums[0]), int(sums[1])
    return total, count


def validate(run: "Run", step: int, validation: list["Example"], progress: Any) -> None:
    """One periodic evaluation after optimizer step ``step``: metrics, samples, best adapter, early stopping.

    With several training sources (``run.validation_by_source``, whose union is ``validation``) each source's loss
    is recorded as ``val_loss/<name>`` too; ``val_loss`` pools their tokens, as for one validation split.
    """
    config, acc = run.config, run.accelerator
    result = run.evaluate(validation)
    per_source = {}
    if run.validation_by_source:
        sums = {name: _loss_sums(run, part) for name, part in run.validation_by_source.items()}
        total, count = sum(t for t, _ in sums.values()), sum(c for _, c in sums.values())
        per_source = {f"val_loss/{name}": t / c if c else float("nan") for name, (t, c) in sums.items()}
    else:
        total, count = _loss_sums(run, validation)
    record = {"step": step, "split": "validation", "val_loss": total / count if count else float("nan"),
              **per_source, **result.metrics()}
    run.raw_model.eval()
    for name, fn in run.custom_metrics.items():
        record[name] = float(fn(run.raw_model, run.tokenizer, list(validation)))
    run.metrics.add(record)
    extra = "".join(f", {k} {record[k]:.4f}" for k in run.custom_metrics)
    extra += "".join(f", {k} {v:.4f}" for k, v in per_source.items())
    progress.write(f"step {step}: validation val_loss {record['val_loss']:.4f}, {result.describe()}{extra}")
    if config.sample_prompts and not run.sharded:  # FSDP: generation lengths differ by process, no lockstep
        samples = sample_records(run.raw_model, run.tokenizer, validation[: config.sample_prompts],
                                 config.sample_max_new_tokens, acc.autocast)
        run.metrics.add({"step": step, "split": "samples", "samples": samples})
        if config.trackers and run.main_process:
            log_samples_table(acc, samples, step)
    run.model.train()
    best = run.best
    value = record[METRICS_FOR_BEST[best.metric][0]]
    if best.update(float("nan") if value is None else float(value), step):
        if config.method != "full":  # full fine-tuning: the best step is recorded, not a second copy of the model
            save_best_adapter(run, step)
    elif config.early_stopping_patience and best.evals_without_improvement >= config.early_stopping_patience:
        best.stopped_at = step
        progress.write(f"step {step}: early stopping, no {best.metric} improvement in "
                       f"{best.evals_without_improvement} evaluations (best {best.value:.4f} at step {best.step})")


def score_test(run: "Run", test: list["Example"], step: int) -> tuple["EvalResult", str]:
    """The test split scored after training, with the best adapter when the run kept one (``best-adapter/``, the
    weights of the best evaluation on ``--metric-for-best``), else with the last weights; and which it was.

    The last weights are put back afterwards: ``adapter/`` is the last step's, ``best-adapter/`` the best one's.
    FSDP2-sharded runs and full fine-tuning (no best copy is kept) score the last weights.
    """
    from torchdora.app.evaluate import EvalResult
    from torchdora.app.train.outputs import named_trainable
    from torchdora.io import load_adapter

    if not test:
        return EvalResult(), "none"
    best_folder = run.output_dir / "best-adapter"
    use_best = run.best.step is not None and run.config.method != "full" and not run.sharded
    if not use_best:
        after = run.evaluate(test)
        run.metrics.add({"step": step, "split": "test", "adapter": "last", **after.metrics()})
        return after, "last"
    run.accelerator.wait_for_everyone()  # best-adapter/ is complete on disk for every process
    last = {name: param.detach().clone() for name, param in named_trainable(run.raw_model).items()}
    load_adapter(run.raw_model, best_folder)
    try:
        after = run.evaluate(test)
    finally:
        with torch.no_grad():
            for name, param in named_trainable(run.raw_model).items():
                param.copy_(last[name])
    run.say(f"test split scored with best-adapter/ (step {run.best.step}, best {run.best.metric})")
    run.metrics.add({"step": step, "split": "test", "adapter": "best", "adapter_step": run.best.step,
                     **after.metrics()})
    return after, "best"


def save_best_adapter(run: "Run", step: int) -> None:
    """``best-adapter/`` (written beside and swapped in) with its model card; every process takes part."""
    from torchdora.app.assets import recorded_base_name
    from torchdora.app.model_card import write_adapter_card
    from torchdora.io import save_adapter

    folder = run.output_dir / "best-adapter"
    save_adapter(run.raw_model, folder, base_model_name_or_path=recorded_base_name(run.config.model))
    if run.main_process:
        best = run.best
        write_adapter_card(folder, run.config.to_dict(), {f"best_{best.metric}": best.value, "best_step": step},
                           note=f"The best evaluation of the run on {best.metric}, at step {step}.")
