"""The training loop: :func:`train` sets a run up, steps the optimizer, evaluates, checkpoints, writes outputs."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import torch

from torchdora.app.evaluate import EvalResult
from torchdora.app.train import run as run_module
from torchdora.app.train.config import TrainConfig
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
from torchdora.app.train.run import (
    EpochSampler,
    Position,
    Run,
    StopSignals,
    TrainingInterrupted,
    check_model_before_loading,
    check_output_dir,
    check_resume,
    default_output_dir,
    lr_factor,
    run_folder_of,
    shared_state_reset,
    train_only_weights,
)
from torchdora.app.train.sharding import refuse_accelerate_sharding, shard_and_fill, skeleton_model, use_fsdp
from torchdora.distributed import world_size
from torchdora.io import atomic_write_json

__all__ = ["train"]


def train(config: TrainConfig) -> TrainResult:
    """Run one fine-tuning job as ``config`` says and write its run folder; see the module docstring.

    Cheap checks come first (config, resume compatibility, output folder, data, model name, targets on a
    weightless model), so bad input fails before the model loads.

    Raises:
        ValueError / FileNotFoundError / TypeError: bad input, with the value and the fix.
        TrainingDiverged: the loss, gradient or weights became NaN or infinite (the last finite checkpoint is kept).
        TrainingInterrupted: SIGINT/SIGTERM arrived; a checkpoint was saved at the step boundary.
    """
    with StopSignals() as signals:
        return _train(config, signals)


def _train(config: TrainConfig, signals: StopSignals) -> TrainResult:
    start_wall = time.perf_counter()
    from accelerate import Accelerator

    from torchdora.app.assets import (
        enable_gradient_checkpointing,
        load_model_and_tokenizer,
        load_tokenizer,
        resolve_model,
    )
    from torchdora.app.data import Collator, load_dataset, tokenize_examples
    from torchdora.inject import inject, trainable_parameter_count

    processes = world_size()  # from torchrun's / accelerate's environment; the group starts below
    config = config.resolved(processes)  # a per-device batch size becomes the global one
    checkpoint_dir, saved_state = check_resume(config)
    resume_run = run_folder_of(checkpoint_dir) if checkpoint_dir else None
    output_dir = Path(config.output_dir or resume_run or default_output_dir(config.method))
    check_output_dir(output_dir, resume_run)
    config = dataclasses.replace(config, output_dir=str(output_dir))
    splits = load_dataset(config.data, seed=config.seed, max_train=config.max_train, max_eval=config.max_eval)
    source = resolve_model(config.model)
    check_model_before_loading(source, config)
    prepare_trackers(config.trackers)

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
    trainable, total = trainable_parameter_count(model)
    if fsdp:
        model = shard_and_fill(model, config, accelerator.device)

    train_items = tokenize_examples(tokenizer, splits.train, config.max_length)
    recomputed = []
    # one 16-token forward finds what is kept anyway (checkpointed blocks keep nothing: nothing to choose there)
    if config.method == "dora" and config.recompute == "auto" and config.gradient_checkpointing == "off":
        from torchdora.recompute import choose_recompute

        ids = torch.tensor([list(train_items[0]["input_ids"])[:16]], device=next(model.parameters()).device)
        model.train()
        recomputed = choose_recompute(model, lambda: model(input_ids=ids, labels=ids).loss)
    if config.packing:
        from torchdora.app.data import pack_examples, packing_isolates_examples

        examples = len(train_items)
        train_items = pack_examples(train_items, config.max_length)
        # the check runs the model: under FSDP2 every process takes part (its all-gathers are collectives)
        leaks = (fsdp or accelerator.is_main_process) and not packing_isolates_examples(
            model, model.get_input_embeddings().num_embeddings)
        if accelerator.is_main_process:
            print(f"packing: {examples} examples in {len(train_items)} rows of up to {config.max_length} tokens",
                  flush=True)
            if leaks:
                print("packing: warning: this model's attention crosses example boundaries in a packed row (it "
                      "ignores position-id resets); examples see their row neighbours. Drop --packing to keep "
                      "them independent.", flush=True)
    sampler = EpochSampler(len(train_items), config.seed)
    # Its own generator: starting a loader iteration (also when resuming mid-epoch) then leaves the global
    # RNG, which drives dropout, untouched, so a resumed run draws the same dropout masks.
    if config.batch_size % accelerator.num_processes:
        raise ValueError(
            f"--batch-size {config.batch_size} does not split over {accelerator.num_processes} processes; "
            f"use a multiple of {accelerator.num_processes} (it counts the examples of all processes together), "
            "or give --per-device-batch-size instead"
        )
    # accelerate hands process p the batches p, p + N, ... of this loader: with batch_size / N examples each,
    # the N processes together see the same consecutive examples a single process would.
    loader = torch.utils.data.DataLoader(train_items, batch_size=config.batch_size // accelerator.num_processes,
                                         sampler=sampler,
                                         collate_fn=Collator(tokenizer.pad_token_id),
                                         generator=torch.Generator().manual_seed(config.seed))
    if config.compile:
        model.compile()  # in place: the state-dict keys stay as they are
    names = {p: n for n, p in named_trainable(model).items()}
    optimizer = torch.optim.AdamW(list(names), lr=config.lr, weight_decay=config.weight_decay)
    if fsdp:  # already sharded: accelerate must not wrap it in DDP
        optimizer, loader = accelerator.prepare(optimizer, loader)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    # Stepped once per optimizer step by the loop (not prepared: accelerate would step it once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        getattr(optimizer, "optimizer", optimizer),
        lambda step: lr_factor(step, config.schedule, config.warmup_steps, total_steps),
    )
    run = Run(config, accelerator, model, accelerator.unwrap_model(model), tokenizer, optimizer, scheduler, names,
               output_dir, total_steps, len(loader),
               Metrics(output_dir / "metrics.jsonl", write=accelerator.is_main_process,
                       on_record=(lambda r: accelerator.log(tracker_values(r), step=r["step"])) if config.trackers
                       else None))
    run.say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f} %)\n"
            f"steps: {total_steps}, global batch {config.batch_size} x {config.grad_accum} "
            f"({config.batch_size // accelerator.num_processes} per process per micro-batch on "
            f"{accelerator.num_processes} process(es){', FSDP2-sharded' if fsdp else ''}), "
            f"{len(train_items)} training examples "
            f"({steps_per_epoch} steps per epoch)"
            + (f"\nrecompute x·Wᵀ in backward (--recompute auto): {len(recomputed)} DoRA layers, "
               f"{','.join(sorted({n.rsplit('.', 1)[-1] for n in recomputed}))}" if recomputed else ""))

    position, before = Position(), None
    if checkpoint_dir is not None and saved_state is not None:
        position, before = run.restore(checkpoint_dir, saved_state)
    if before is None:
        before = run.evaluate(splits.test)
        run.metrics.add({"step": 0, "split": "test", **before.metrics()})
        run.say(f"test split before training: {before.describe()}")

    if _any_process(accelerator, signals.signum is not None):  # during setup: no step to save yet
        signum = signals.signum or signal.SIGTERM
        raise TrainingInterrupted(signum, f"stopped by {signal.Signals(signum).name} before step {position.step + 1}; "
                                          "nothing new to save")
    train_start = time.perf_counter()
    train_loop(run, sampler, loader, position, before, splits.validation[: config.val_examples], signals)
    train_time = time.perf_counter() - train_start
    if _any_process(accelerator, signals.signum is not None):  # arrived after the last step's checkpoint
        raise interrupted(run, signals.signum or signal.SIGTERM, position.step)

    after = run.evaluate(splits.test)
    run.metrics.add({"step": position.step, "split": "test", **after.metrics()})
    losses = [r["loss"] for r in run.metrics.records if "loss" in r]
    peaks = accelerator.gather(torch.tensor([peak_rss_mb()], dtype=torch.float64, device=accelerator.device))
    result = TrainResult(
        output_dir=output_dir, steps=position.step, accuracy_before=before.accuracy, accuracy_after=after.accuracy,
        perplexity_before=before.perplexity, perplexity_after=after.perplexity,
        exact_match_before=before.exact_match, exact_match_after=after.exact_match,
        final_loss=losses[-1] if losses else float("nan"), wall_time_s=time.perf_counter() - start_wall,
        train_time_s=train_time, peak_rss_mb=peak_rss_mb(), trainable_params=trainable, total_params=total,
        losses=losses, peak_rss_mb_per_process=[round(x, 1) for x in peaks.tolist()],
    )
    write_outputs(run.raw_model, tokenizer, config, result, run.metrics, after)  # collective; the main one writes
    if run.main_process:
        print_summary(config, result, after)
    if config.trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return result


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
                validation: list, signals: StopSignals | None = None) -> None:
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
    while position.step < run.total_steps:
        sampler.start_epoch(position.epoch)
        skip = position.micro_in_epoch
        for batch in (loader if skip == 0 else acc.skip_first_batches(loader, skip)):
            with acc.accumulate(model):
                loss, _ = run_module.compute_loss(model, batch)
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
            if position.step >= run.total_steps:
                break
        else:
            position.epoch, position.micro_in_epoch = position.epoch + 1, 0
    progress.close()


def after_step(run: Run, position: Position, before: EvalResult, validation: list, progress: Any) -> bool:
    """Periodic validation, snapshot and checkpoint after optimizer step ``position.step``; whether it checkpointed."""
    config, step = run.config, position.step
    if config.eval_every and step % config.eval_every == 0:
        result = run.evaluate(validation)
        run.metrics.add({"step": step, "split": "validation", **result.metrics()})
        progress.write(f"step {step}: validation {result.describe()}")
        run.model.train()
    if config.save_every and step % config.save_every == 0:  # every process: gathering is a collective
        save_snapshot(run.raw_model, config, run.output_dir, step)
    if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == run.total_steps:
        run.save_checkpoint(position, before)
        return True
    return False
