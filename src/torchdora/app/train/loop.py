"""The training loop: :func:`train` sets a run up, steps the optimizer, evaluates, checkpoints, writes outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torchdora.app.evaluate import EvalResult
from torchdora.app.train.config import TrainConfig
from torchdora.app.train.evaluation import (
    MetricFn, check_custom_metrics, check_metric_for_best, score_test, validate,
)
from torchdora.app.train.optim import param_groups
from torchdora.app.train.outputs import (
    Metrics,
    Progress,
    TrainResult,
    named_trainable,
    peak_rss_mb,
    prepare_trackers,
    print_summary,
    quiet_library_bars,
    save_snapshot,
    tracker_values,
    write_outputs,
)
from torchdora.app.train.preflight import RunFolderLock, check_data_unchanged, data_fingerprint, warn_about_length
from torchdora.app.train.run import (
    EpochSampler,
    Position,
    Run,
    StopSignals,
    TrainingInterrupted,
    check_model_before_loading,
    check_output_dir,
    check_resume,
    compute_loss,
    default_output_dir,
    lr_factor,
    run_folder_of,
    shared_state_reset,
    train_only_weights,
)
from torchdora.app.train.sharding import refuse_accelerate_sharding, shard_and_fill, skeleton_model, use_fsdp
from torchdora.distributed import world_size
from torchdora.files import atomic_write_json

__all__ = ["train", "LossFn"]


LossFn = Callable[[nn.Module, Mapping[str, Tensor]], tuple[Tensor, int]]
"""``loss(model, batch) -> (mean loss over the batch's completion tokens, their number)``."""


def train(config: TrainConfig, loss: LossFn = compute_loss,
          metrics: Mapping[str, MetricFn] | None = None) -> TrainResult:
    """Run one fine-tuning job as ``config`` says and write its run folder; see the module docstring.

    Cheap checks come first (config, resume compatibility, output folder, data, model name, targets on a
    weightless model), so bad input fails before the model loads. ``loss`` is the training loss of one
    micro-batch (:func:`torchdora.app.train.run.compute_loss` by default). ``metrics``: custom validation metrics,
    ``{name: fn(model, tokenizer, examples) -> float}``, recorded at every evaluation
    (:mod:`torchdora.app.train.evaluation`).

    Raises:
        ValueError / FileNotFoundError / TypeError: bad input, with the value and the fix.
        TrainingDiverged: the loss, gradient or weights became NaN or infinite (the last finite checkpoint is kept).
        TrainingInterrupted: SIGINT/SIGTERM arrived; a checkpoint was saved at the step boundary.
    """
    with StopSignals() as signals, contextlib.ExitStack() as held:  # held: the run folder's lock
        return _train(config, signals, held, loss, check_custom_metrics(metrics))


@dataclass
class _Data:
    """The training data as the loop consumes it."""

    items: list[dict[str, list[int]]]
    sampler: EpochSampler
    loader: Any
    lines: list[str]  # what to tell the user about the data


def _train(config: TrainConfig, signals: StopSignals, held: contextlib.ExitStack, loss: LossFn,
           custom_metrics: dict[str, MetricFn]) -> TrainResult:
    start_wall = time.perf_counter()
    config, output_dir, (checkpoint_dir, saved_state), data_in, source, fingerprint = _check_inputs(config, held)
    splits = data_in.splits
    accelerator, fsdp = _setup_accelerator(config, output_dir)
    model, tokenizer, (trainable, total) = _setup_model(config, source, accelerator, fsdp)
    items, lines = _tokenize_train(config, splits, tokenizer)
    lines[1:1] = data_in.lines
    recomputed = _choose_recompute(config, model, items)
    data = _setup_data(config, items, lines, model, tokenizer, accelerator, fsdp)
    if config.compile:
        model.compile()  # in place, after the recompute probe: the state-dict keys stay as they are
    run, steps_per_epoch = _setup_optimizer(config, accelerator, model, tokenizer, data, output_dir, fsdp,
                                            fingerprint)
    run.custom_metrics = custom_metrics
    warn_about_length(config, run.total_steps, accelerator.is_main_process)
    run.say("\n".join(data.lines) + "\n"
            f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f} %)\n"
            f"steps: {run.total_steps}, global batch {config.batch_size} x {config.grad_accum} "
            f"({config.batch_size // accelerator.num_processes} per process per micro-batch on "
            f"{accelerator.num_processes} process(es){', FSDP2-sharded' if fsdp else ''}), "
            f"{len(data.items)} training examples "
            f"({steps_per_epoch} steps per epoch)"
            + (f"\nrecompute x·Wᵀ in backward (--recompute auto): {len(recomputed)} DoRA layers, "
               f"{','.join(sorted({n.rsplit('.', 1)[-1] for n in recomputed}))}" if recomputed else ""))
    position, before = _setup_run_state(run, checkpoint_dir, saved_state, splits.test)

    if _any_process(accelerator, signals.signum is not None):  # during setup: no step to save yet
        signum = signals.signum or signal.SIGTERM
        raise TrainingInterrupted(signum, f"stopped by {signal.Signals(signum).name} before step {position.step + 1}; "
                                          "nothing new to save")
    train_start = time.perf_counter()
    run.validation_by_source = {name: part[: config.val_examples]
                                for name, part in data_in.validation_by_source.items()}
    validation = ([e for part in run.validation_by_source.values() for e in part] if run.validation_by_source
                  else splits.validation[: config.val_examples])
    train_loop(run, data.sampler, data.loader, position, before, validation, signals, loss)
    train_time = time.perf_counter() - train_start
    if _any_process(accelerator, signals.signum is not None):  # arrived after the last step's checkpoint
        raise interrupted(run, signals.signum or signal.SIGTERM, position.step)

    after, scored_with = score_test(run, splits.test, position.step)
    losses = [r["loss"] for r in run.metrics.records if "loss" in r]
    peaks = accelerator.gather(torch.tensor([peak_rss_mb()], dtype=torch.float64, device=accelerator.device))
    result = TrainResult(
        output_dir=output_dir, steps=position.step, accuracy_before=before.accuracy, accuracy_after=after.accuracy,
        perplexity_before=before.perplexity, perplexity_after=after.perplexity,
        exact_match_before=before.exact_match, exact_match_after=after.exact_match,
        final_loss=losses[-1] if losses else float("nan"), wall_time_s=time.perf_counter() - start_wall,
        train_time_s=train_time, peak_rss_mb=peak_rss_mb(), trainable_params=trainable, total_params=total,
        losses=losses, peak_rss_mb_per_process=[round(x, 1) for x in peaks.tolist()], best=run.best.to_dict(),
        test_adapter=scored_with,
    )
    write_outputs(run.raw_model, tokenizer, config, result, run.metrics, after)  # collective; the main one writes
    if run.main_process:
        print_summary(config, result, after)
    if config.trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return result


# ---- set-up steps, in the order _train takes them ----------------------------------------------------------------
def _check_inputs(config: TrainConfig, held: contextlib.ExitStack
                  ) -> tuple[TrainConfig, Path, tuple[Path | None, Any], Any, Any, dict[str, str]]:
    """The cheap checks, before anything loads: the config resolved for this many processes, the run folder
    (locked for the run's life in ``held``), the checkpoint to resume (and its saved state), the data's splits
    (and their fingerprint, checked against the resumed run's) and the model's source."""
    from torchdora.app.assets import resolve_model
    from torchdora.app.data.mixture import load_training_data

    processes = world_size()  # from torchrun's / accelerate's environment; the group starts below
    config = config.resolved(processes)  # a per-device batch size becomes the global one
    checkpoint_dir, saved_state = check_resume(config)
    resume_run = run_folder_of(checkpoint_dir) if checkpoint_dir else None
    output_dir = Path(config.output_dir or resume_run or default_output_dir(config.method))
    held.enter_context(RunFolderLock(output_dir, resume_run))
    check_output_dir(output_dir, resume_run)
    config = dataclasses.replace(config, output_dir=str(output_dir))
    data = load_training_data(config.data, seed=config.seed, max_train=config.max_train, max_eval=config.max_eval,
                              val_size=config.val_size, test_size=config.test_size, eval_data=config.eval_data,
                              test_data=config.test_data, data_weights=config.data_weights)
    fingerprint = data_fingerprint(data.splits.items())
    check_metric_for_best(config.metric_for_best, config.early_stopping_patience, config.eval_every,
                          data.splits.validation)
    check_data_unchanged(config, saved_state, fingerprint)
    source = resolve_model(config.model)
    check_model_before_loading(source, config)
    prepare_trackers(config.trackers)
    return config, output_dir, (checkpoint_dir, saved_state), data, source, fingerprint


def _setup_accelerator(config: TrainConfig, output_dir: Path) -> tuple[Any, bool]:
    """The accelerate ``Accelerator`` (processes, mixed precision, trackers), whether to shard with FSDP2, and
    the run folder with its ``config.json``."""
    from accelerate import Accelerator

    shared_state_reset()
    # accelerate treats a multi-process launch without CUDA as distributed only when told it runs on the CPU
    # (then it uses gloo); without this each torchrun process would train alone on the full batch.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=cpu_processes,
                              mixed_precision="bf16" if config.dtype == "bfloat16" else "no",
                              log_with=config.trackers or None, project_dir=output_dir / "trackers")
    refuse_accelerate_sharding(accelerator.distributed_type)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    fsdp = use_fsdp(config, accelerator.num_processes, backend)
    accelerator.wait_for_everyone()  # every process checked the output folder before the main one fills it
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / "config.json", config.to_dict())
        # One line, not the whole config: a log stays short; --print-config and config.json have every value.
        print(f"torchdora train: {config.method} on {config.model} / {config.data}, config in "
              f"{output_dir / 'config.json'}", flush=True)
    if config.trackers:
        accelerator.init_trackers("torchdora", config=config.to_dict())
    return accelerator, fsdp


def _setup_model(config: TrainConfig, source: Any, accelerator: Any, fsdp: bool) -> tuple[Any, Any, tuple[int, int]]:
    """The model with its adapters (or the weights to train), its tokenizer, and (trainable, total) parameters."""
    from torchdora.app.assets import enable_gradient_checkpointing, load_model_and_tokenizer, load_tokenizer
    from torchdora.inject import inject, trainable_parameter_count

    random.seed(config.seed)
    torch.manual_seed(config.seed)  # the adapter's A initialisation
    quiet_library_bars()
    if fsdp and not accelerator.is_main_process:  # weights come from process 0 in shard_and_fill
        model, tokenizer = skeleton_model(source, config.base_dtype), load_tokenizer(source)
    else:
        model, tokenizer = load_model_and_tokenizer(source, dtype=config.base_dtype, quantize=config.quantize)
    enable_gradient_checkpointing(model, config.gradient_checkpointing)
    if config.method == "full":
        model.requires_grad_(not config.train_only)
        if config.train_only:
            train_only_weights(model, config.train_only_list)
    else:
        inject(model, config.dora_config())
    counts = trainable_parameter_count(model)
    if fsdp:
        model = shard_and_fill(model, config, accelerator.device)
    return model, tokenizer, counts


def _tokenize_train(config: TrainConfig, splits: Any, tokenizer: Any) -> tuple[list[dict[str, list[int]]], list[str]]:
    """The training split tokenized, and the lines that describe the data (split sizes, examples cut)."""
    from torchdora.app.data import describe_splits, tokenize_with_cuts

    items, cut = tokenize_with_cuts(tokenizer, splits.train, config.max_length)
    lines = [describe_splits(splits)]
    if cut:
        lines.append(f"data: {cut} of {len(items)} training examples are longer than --max-length "
                     f"{config.max_length} and were cut (prompts and a chat's earliest turns lose their start); "
                     "raise --max-length to keep them whole")
    return items, lines


def _choose_recompute(config: TrainConfig, model: Any, items: list[dict[str, list[int]]]) -> list[str]:
    """With ``--recompute auto``, the DoRA layers whose input is better recomputed in backward than kept."""
    # one 16-token forward finds what is kept anyway (checkpointed blocks keep nothing: nothing to choose there)
    if not (config.method == "dora" and config.recompute == "auto" and config.gradient_checkpointing == "off"):
        return []
    from torchdora.recompute import choose_recompute

    ids = torch.tensor([list(items[0]["input_ids"])[:16]], device=next(model.parameters()).device)
    model.train()
    return choose_recompute(model, lambda: model(input_ids=ids, labels=ids).loss)


def _setup_data(config: TrainConfig, items: list[dict[str, list[int]]], lines: list[str], model: Any,
                tokenizer: Any, accelerator: Any, fsdp: bool) -> _Data:
    """The tokenized training split packed (with ``--packing``), its epoch sampler and its loader."""
    from torchdora.app.data import Collator

    if config.packing:
        from torchdora.app.data import pack_examples, packing_isolates_examples

        examples = len(items)
        items = pack_examples(items, config.max_length)
        # the check runs the model: under FSDP2 every process takes part (its all-gathers are collectives)
        leaks = (fsdp or accelerator.is_main_process) and not packing_isolates_examples(
            model, model.get_input_embeddings().num_embeddings)
        if accelerator.is_main_process:
            print(f"packing: {examples} examples in {len(items)} rows of up to {config.max_length} tokens",
                  flush=True)
            if leaks:
                print("packing: warning: this model's attention crosses example boundaries in a packed row (it "
                      "ignores position-id resets); examples see their row neighbours. Drop --packing to keep "
                      "them independent.", flush=True)
    if config.batch_size % accelerator.num_processes:
        raise ValueError(
            f"--batch-size {config.batch_size} does not split over {accelerator.num_processes} processes; "
            f"use a multiple of {accelerator.num_processes} (it counts the examples of all processes together), "
            "or give --per-device-batch-size instead"
        )
    sampler = EpochSampler(len(items), config.seed)
    # Its own generator: starting a loader iteration (also when resuming mid-epoch) then leaves the global
    # RNG, which drives dropout, untouched, so a resumed run draws the same dropout masks.
    # accelerate hands process p the batches p, p + N, ... of this loader: with batch_size / N examples each,
    # the N processes together see the same consecutive examples a single process would.
    loader = torch.utils.data.DataLoader(items, batch_size=config.batch_size // accelerator.num_processes,
                                         sampler=sampler, collate_fn=Collator(tokenizer.pad_token_id),
                                         generator=torch.Generator().manual_seed(config.seed))
    return _Data(items, sampler, loader, lines)


def _setup_optimizer(config: TrainConfig, accelerator: Any, model: Any, tokenizer: Any, data: _Data,
                     output_dir: Path, fsdp: bool, fingerprint: dict[str, str]) -> tuple[Run, int]:
    """AdamW over the trainable weights and its schedule, everything prepared by accelerate, gathered in a
    :class:`Run`; and the optimizer steps of one epoch."""
    names = {p: n for n, p in named_trainable(model).items()}
    optimizer = torch.optim.AdamW(param_groups(model, config.lr, config.magnitude_lr_ratio, config.weight_decay,
                                               config.magnitude_weight_decay))
    if fsdp:  # already sharded: accelerate must not wrap it in DDP
        optimizer, data.loader = accelerator.prepare(optimizer, data.loader)
    else:
        model, optimizer, data.loader = accelerator.prepare(model, optimizer, data.loader)
    steps_per_epoch = math.ceil(len(data.loader) / config.grad_accum)
    total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    # Stepped once per optimizer step by the loop (not prepared: accelerate would step it once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        getattr(optimizer, "optimizer", optimizer),
        lambda step: lr_factor(step, config.schedule, config.warmup_steps, total_steps),
    )
    metrics = Metrics(output_dir / "metrics.jsonl", write=accelerator.is_main_process,
                      on_record=(lambda r: accelerator.log(tracker_values(r), step=r["step"])) if config.trackers
                      else None)
    run = Run(config, accelerator, model, accelerator.unwrap_model(model), tokenizer, optimizer, scheduler, names,
              output_dir, total_steps, len(data.loader), metrics, data_fingerprint=fingerprint)
    return run, steps_per_epoch


def _setup_run_state(run: Run, checkpoint_dir: Path | None, saved_state: Any,
                     test: list) -> tuple[Position, EvalResult]:
    """Where training starts: a checkpoint's position and its before-training evaluation, or step 0 and the test
    split evaluated now."""
    position, before = Position(), None
    if checkpoint_dir is not None and saved_state is not None:
        position, before = run.restore(checkpoint_dir, saved_state)
    if before is None and not test:
        before = EvalResult()
        run.say("no test split (--test-size 0): nothing is scored before or after training")
    if before is None:
        before = run.evaluate(test)
        run.metrics.add({"step": 0, "split": "test", **before.metrics()})
        run.say(f"test split before training: {before.describe()}")
    return position, before


def _any_process(accelerator: Any, flag: bool) -> bool:
    """Whether ``flag`` is set on any process (all processes must call this)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def interrupted(run: Run, signum: int, step: int) -> TrainingInterrupted:
    folder = run.output_dir
    return TrainingInterrupted(signum, f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved "
                                       f"in {folder / 'checkpoint'}. Continue with: torchdora train --resume {folder}")


def train_loop(run: Run, sampler: EpochSampler, loader: Any, position: Position, before: EvalResult,
               validation: list, signals: StopSignals | None = None, loss_fn: LossFn = compute_loss) -> None:
    """Optimizer steps from ``position`` to ``run.total_steps``; logs, validates, snapshots and checkpoints.

    Stops at the first step boundary after SIGINT/SIGTERM on any process, with a checkpoint of that step.
    """
    acc, config, model = run.accelerator, run.config, run.model
    trainable = list(run.names)
    progress = Progress(run.total_steps, position.step, enabled=run.main_process, every=config.log_every)
    micro_losses: list[float] = []
    tokens = 0
    step_start = time.perf_counter()
    model.train()
    while position.step < run.total_steps and run.best.stopped_at is None:
        sampler.start_epoch(position.epoch)
        skip = position.micro_in_epoch
        for batch in (loader if skip == 0 else acc.skip_first_batches(loader, skip)):
            with acc.accumulate(model):
                loss, _ = loss_fn(model, batch)
                if not bool(acc.gather(torch.isfinite(loss.detach()).float().reshape(1)).all()):  # all stop together
                    progress.close()
                    raise run.diverged(f"the loss became {loss.item()}", position.step + 1)
                acc.backward(loss)  # divided by grad_accum by accelerate
                if acc.sync_gradients and config.max_grad_norm > 0:
                    norm = acc.clip_grad_norm_(trainable, config.max_grad_norm)  # the same on every process
                    if not math.isfinite(float(norm)):  # stop before the step writes NaN into the weights
                        progress.close()
                        raise run.diverged(f"the gradient norm became {float(norm)}", position.step + 1)
                run.optimizer.step()  # a no-op until the last micro-batch of the step
                run.optimizer.zero_grad(set_to_none=True)
            position.micro_in_epoch += 1
            micro_losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
            if not acc.sync_gradients:
                continue
            lr = run.scheduler.get_last_lr()[0]
            run.scheduler.step()
            position.step += 1
            stop_here = signals is not None and signals.signum is not None
            numbers = acc.gather(torch.tensor([[sum(micro_losses) / len(micro_losses), tokens, float(stop_here)]],
                                              dtype=torch.float64, device=acc.device))
            step_loss, step_tokens = float(numbers[:, 0].mean()), int(numbers[:, 1].sum())
            stop = bool(numbers[:, 2].max() > 0)  # every process stops at the same step
            speed = step_tokens / max(time.perf_counter() - step_start, 1e-9)
            run.metrics.add({"step": position.step, "epoch": position.epoch, "loss": step_loss, "lr": lr,
                             "tokens": step_tokens, "tokens_per_s": speed})
            progress.update(step_loss, lr, speed)
            micro_losses, tokens = [], 0
            saved = after_step(run, position, before, validation, progress)
            if stop:
                if not saved:
                    run.save_checkpoint(position, before)
                progress.close()
                raise interrupted(run, (signals.signum if signals else None) or signal.SIGTERM, position.step)
            step_start = time.perf_counter()
            if position.step >= run.total_steps or run.best.stopped_at is not None:
                break
        else:
            position.epoch, position.micro_in_epoch = position.epoch + 1, 0
    progress.close()


def after_step(run: Run, position: Position, before: EvalResult, validation: list, progress: Any) -> bool:
    """Periodic validation, snapshot and checkpoint after optimizer step ``position.step``; whether it checkpointed."""
    config, step = run.config, position.step
    if config.eval_every and validation and step % config.eval_every == 0:
        validate(run, step, validation, progress)
    if config.save_every and step % config.save_every == 0:  # every process: gathering is a collective
        save_snapshot(run.raw_model, config, run.output_dir, step)
    if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == run.total_steps \
            or run.best.stopped_at is not None:
        run.save_checkpoint(position, before)
        return True
    return False
