"""Greedy decoding with unmerged adapters: does DoRA cost what LoRA costs per generated token (issue 28)?

    OMP_NUM_THREADS=1 python benchmarks/decode.py                       # eager rows, the embedded SmolLM2-135M
    OMP_NUM_THREADS=1 python benchmarks/decode.py --compile --compile-layers 4   # + torch.compile rows
    python benchmarks/decode.py --device cuda --dtype bfloat16           # on a GPU (benchmarks/gpu_check.sh)

Rows (adapters r 16 on q, k, v, up, down with trained-looking ``B``, greedy, a KV cache, ``--tokens`` new tokens
after an 8-token prompt, time per generated token including that short prefill), each a median over repeats with
the variants interleaved (``benchmarks/run.py``'s :func:`interleaved_clocks`, by wall and by CPU time); each ratio is
taken repeat by repeat (the two rows ran side by side) and given as its median with a 95 % interval:

1. batch 1: DoRA unmerged, LoRA unmerged, DoRA merged (the base model's speed);
2. batch 8: a mixed batch of 8 DoRA adapters (row ``i`` through adapter ``i``, :func:`torchdora.mixed_batch`),
   the same with 8 LoRA adapters (what reading 8 adapters per token costs, whatever the method), and the same 8
   rows through one LoRA adapter; and the bandwidth floor under the mixed / one-adapter ratio, the bytes of
   weights each step reads (:func:`weight_bytes`);
3. with ``--compile``: the training step (loss, backward) and batch-1 decoding of DoRA and LoRA, eager and
   ``torch.compile``d, on the model cut to ``--compile-layers`` blocks (compiling all 30 takes too long on a CPU),
   and LoRA compiled again on a second copy of the model: the null baseline of the compiled ratio.

Each row's greedy tokens are compared with its reference (DoRA merged for DoRA unmerged and compiled, eager for
compiled): a benchmark of wrong outputs would be worthless. The targets (issue 28: DoRA / LoRA per token ≤ 1.10,
mixed 8 / one LoRA ≤ 1.15) are judged at the end. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import interleaved_clocks, ratio_summary  # noqa: E402

import torchdora  # noqa: E402
from torchdora import DoraConfig, inject  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
PROMPT = 8


def with_adapters(base: nn.Module, r: int, mixed: int) -> nn.Module:
    """A copy of ``base`` holding adapters ``dora``, ``lora``, ``mix0`` … ``mix{mixed-1}`` (DoRA) and ``lmix0`` …
    ``lmix{mixed-1}`` (LoRA), with
    trained-looking ``B`` (an adapter at initialisation has ``B = 0`` and would make the comparison trivial)."""
    model = copy.deepcopy(base)
    inject(model, DoraConfig(target_modules=TARGETS, r=r, alpha=2.0 * r, dtype=None), adapter_name="dora")
    torchdora.add_adapter(model, "lora", DoraConfig(target_modules=TARGETS, r=r, alpha=2.0 * r, dtype=None,
                                                    use_dora=False))
    for i in range(mixed):
        torchdora.add_adapter(model, f"mix{i}", DoraConfig(target_modules=TARGETS, r=r, alpha=2.0 * r, dtype=None))
        torchdora.add_adapter(model, f"lmix{i}", DoraConfig(target_modules=TARGETS, r=r, alpha=2.0 * r, dtype=None,
                                                            use_dora=False))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))
            elif name.endswith("magnitude"):
                p.mul_(1.0 + 0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model.eval()


def weight_bytes(model: nn.Module, adapters: list[str]) -> int:
    """Bytes of weights one decoding step reads: every base parameter once (a tied embedding once: the output
    head reads it whole) and the tensors of each adapter in ``adapters`` (a mixed batch reads all of its rows').

    At batch 8 a CPU (and a GPU) decoding step is bound by memory bandwidth, so the ratio of two rows' bytes is a
    floor under their time ratio that no implementation can go below without reading fewer bytes."""
    layers = torchdora.adapter_layers(model).values()
    adapter_ids = {id(p) for layer in layers for adapter in layer.adapters.values() for p in adapter.parameters()}
    base = sum(p.nbytes for p in model.parameters() if id(p) not in adapter_ids)
    return base + sum(p.nbytes for layer in layers for name in set(adapters) if name in layer.adapters
                      for p in layer.adapters[name].parameters())


def merged_copy(model: nn.Module, adapter: str) -> nn.Module:
    merged = copy.deepcopy(model)
    torchdora.set_adapter(merged, adapter)
    return torchdora.merge_and_unload(merged).eval()


def greedy(model: nn.Module, prompt: torch.Tensor, tokens: int, forward: Callable | None = None) -> torch.Tensor:
    """``tokens`` greedy tokens after ``prompt`` ``(B, P)`` with a KV cache; returns them ``(B, tokens)``."""
    from transformers import DynamicCache

    forward = model if forward is None else forward
    cache = DynamicCache()
    ids, out = prompt, []
    with torch.no_grad():
        for _ in range(tokens):
            logits = forward(input_ids=ids, past_key_values=cache, use_cache=True).logits
            ids = logits[:, -1].argmax(-1, keepdim=True)
            out.append(ids)
    return torch.cat(out, 1)


def decode_rows(base: nn.Module, args, device) -> tuple[dict[str, float], list[str]]:
    model = with_adapters(base, args.r, 8)
    merged = merged_copy(model, "dora")
    # the 8-LoRA mixed row on its own copy: a layer keeps the stacks of one row assignment, and two mixed rows
    # alternating on one model would rebuild them at each run's first token (about 125 ms for the model here)
    lora_mixed_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    one = torch.randint(3, vocab, (1, PROMPT), generator=gen).to(device)
    eight = torch.randint(3, vocab, (8, PROMPT), generator=gen).to(device)
    rows_mixed = [f"mix{i}" for i in range(8)]
    rows_lora_mixed = [f"lmix{i}" for i in range(8)]

    def run(adapter: str | list[str] | None, prompt: torch.Tensor,
            target: nn.Module = model) -> Callable[[], torch.Tensor]:
        """Greedy decoding through ``adapter``: one name, a list (row ``i`` through ``adapter[i]``) or the model."""
        def fn() -> torch.Tensor:
            if isinstance(adapter, list):
                with torchdora.mixed_batch(target, adapter):
                    return greedy(target, prompt, args.tokens)
            if adapter is not None:
                torchdora.set_adapter(target, adapter)
            return greedy(target, prompt, args.tokens)
        return fn

    fns = {
        "dora unmerged, batch 1": run("dora", one),
        "lora unmerged, batch 1": run("lora", one),
        "dora merged, batch 1": run(None, one, merged),
        "8 dora adapters mixed, batch 8": run(rows_mixed, eight),
        "8 lora adapters mixed, batch 8": run(rows_lora_mixed, eight, lora_mixed_model),
        "one lora adapter, batch 8": run("lora", eight),
    }
    checks = []
    same = torch.equal(fns["dora unmerged, batch 1"](), fns["dora merged, batch 1"]())
    checks.append(f"DoRA unmerged and merged generate the same {args.tokens} tokens: {same}")
    for method, names in (("dora", rows_mixed), ("lora", rows_lora_mixed)):
        mixed_out = fns[f"8 {method} adapters mixed, batch 8"]()
        alone = torch.cat([run(name, eight[i:i + 1])() for i, name in enumerate(names)])  # on `model`
        checks.append(f"{method} mixed batch rows equal each adapter run alone: {torch.equal(mixed_out, alone)}")
    one_lora, mixed = weight_bytes(model, ["lora"]), weight_bytes(model, rows_mixed)
    checks.append(f"weights read per decoding step: {one_lora / 1e6:.1f} MB through one LoRA adapter, "
                  f"{mixed / 1e6:.1f} MB through the 8 mixed adapters: a bandwidth floor of "
                  f"{mixed / one_lora:.3f} under the mixed / one-adapter time ratio")
    return interleaved_clocks(fns, args.repeats, 1, device), checks


def compile_rows(base: nn.Module, args, device) -> tuple[dict[str, float], list[str], float]:
    """Eager vs ``torch.compile`` on the model cut to ``--compile-layers`` blocks: a training step and decoding."""
    cut = copy.deepcopy(base)
    del cut.model.layers[args.compile_layers:]
    cut.config.num_hidden_layers = args.compile_layers
    fns, checks = {}, []
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(3, cut.config.vocab_size, (args.step_batch, args.step_seq), generator=gen).to(device)
    one = torch.randint(3, cut.config.vocab_size, (1, PROMPT), generator=gen).to(device)
    started = time.perf_counter()
    # each model compiles its own graphs (prefill, decoding, a training step): past dynamo's default limit of 8 per
    # function it would fall back to eager without a word, and the compiled rows would time eager code
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    # "lora copy": LoRA compiled again on a second copy of the model, the null baseline of the compiled ratio
    # (two identical variants differ by where their weights landed in memory, and by compiling twice)
    for method, adapter in (("dora", "dora"), ("lora", "lora"), ("lora copy", "lora")):
        model = with_adapters(cut, args.r, 0)
        torchdora.set_adapter(model, adapter)
        compiled = torch.compile(model, dynamic=True)  # the cache length varies: one graph for it, one prefill
        want = greedy(model, one, args.tokens)
        got = greedy(model, one, args.tokens, compiled)
        checks.append(f"{method}: compiled decoding gives the eager tokens: {torch.equal(want, got)}")
        fns[f"{method} decode, compiled"] = lambda m=model, c=compiled: greedy(m, one, args.tokens, c)
        if method == "lora copy":
            continue
        fns[f"{method} decode, eager"] = lambda m=model: greedy(m, one, args.tokens)

        train = copy.deepcopy(model).train()
        train_compiled = torch.compile(train)

        def step(m: nn.Module, call: Callable) -> Callable[[], None]:
            def fn() -> None:
                m.zero_grad(set_to_none=True)
                call(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            return fn

        fns[f"{method} train step, eager"] = step(train, train)
        fns[f"{method} train step, compiled"] = step(train, train_compiled)
        step(train, train_compiled)()  # compile outside the timing
    compile_s = time.perf_counter() - started
    return interleaved_clocks(fns, args.repeats, 1, device), checks, compile_s


def eager_tables(base: nn.Module, args, device) -> tuple[list[str], list[str]]:
    """The eager rows' tables and checks (:func:`decode_rows`)."""
    clocks, checks = decode_rows(base, args, device)
    times = clocks["wall"]
    lines = ["| row | ms per generation step (median) | tokens/s | CPU ms per step (median) |", "|---|---|---|---|"]
    per_token = {k: statistics.median(v) / args.tokens for k, v in times.items()}
    lines += [f"| {k} | {1e3 * v:.2f} | {(8 if 'batch 8' in k else 1) / v:.1f} | "
              f"{1e3 * statistics.median(clocks['cpu'][k]) / args.tokens:.2f} |" for k, v in per_token.items()]
    return lines + [""] + ratio_lines(clocks, [
        ("DoRA unmerged / LoRA unmerged, batch 1", "dora unmerged, batch 1", "lora unmerged, batch 1", 1.10),
        ("DoRA unmerged / DoRA merged, batch 1", "dora unmerged, batch 1", "dora merged, batch 1", None),
        ("8 DoRA adapters mixed / one LoRA adapter, batch 8", "8 dora adapters mixed, batch 8",
         "one lora adapter, batch 8", 1.15),
        ("8 DoRA adapters mixed / 8 LoRA adapters mixed, batch 8: DoRA's own cost", "8 dora adapters mixed, batch 8",
         "8 lora adapters mixed, batch 8", 1.10),
        ("8 LoRA adapters mixed / one LoRA adapter, batch 8: reading 8 adapters", "8 lora adapters mixed, batch 8",
         "one lora adapter, batch 8", None),
    ], args.repeats), checks


def ratio_cell(times: dict[str, list[float]], a: str, b: str, target: float | None = None) -> str:
    """Row ``a`` / row ``b`` repeat by repeat (the two ran side by side): :func:`run.ratio_summary`."""
    return ratio_summary([x / y for x, y in zip(times[a], times[b])], target, digits=3)


def ratio_lines(clocks: dict[str, dict[str, list[float]]], specs: list[tuple], repeats: int) -> list[str]:
    """A table of ratios ``(name, row a, row b, target)``, by wall time and by this process's CPU time."""
    lines = [f"| ratio (per repeat, {repeats} repeats) | wall time: median [95 % interval] | "
             "CPU time: median [95 % interval] |", "|---|---|---|"]
    for name, a, b, target in specs:
        lines.append(f"| {name} | {ratio_cell(clocks['wall'], a, b, target)} | "
                     f"{ratio_cell(clocks['cpu'], a, b, target)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens per timed run (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (default 5)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--compile", action="store_true", help="also the torch.compile rows (slow to compile)")
    parser.add_argument("--compile-layers", dest="compile_layers", type=int, default=4)
    parser.add_argument("--compile-only", dest="compile_only", action="store_true",
                        help="only the torch.compile rows (implies --compile): more repeats for their ratios")
    parser.add_argument("--step-batch", dest="step_batch", type=int, default=4)
    parser.add_argument("--step-seq", dest="step_seq", type=int, default=64)
    parser.add_argument("--random-init", dest="random_init", type=int, default=0, metavar="LAYERS",
                        help="a random-init SmolLM2-shaped model of LAYERS blocks instead of the embedded one")
    parser.add_argument("--output", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.random_init:
        from run import smollm2_architecture

        base = smollm2_architecture(args.random_init, device, dtype).eval()
        source = f"random-init SmolLM2-135M shape, {args.random_init} blocks"
    else:
        from torchdora.app.assets import load_model_and_tokenizer

        base, _ = load_model_and_tokenizer(None, dtype=dtype)
        base = base.to(device).eval()
        source = f"embedded SmolLM2-135M-Instruct, {base.config.num_hidden_layers} blocks"
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    lines = [(f"{source}, {args.dtype} on {args.device}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread(s), load average before: {' '.join(f'{x:.2f}' for x in load)}"), ""]
    checks: list[str] = []
    if not args.compile_only:
        table, checks = eager_tables(base, args, device)
        lines += table
    eager_lines = len(lines)
    print("\n".join(lines), flush=True)  # the eager rows now: the compiled ones take long
    if args.compile or args.compile_only:
        cclocks, cchecks, compile_s = compile_rows(base, args, device)
        ctimes = cclocks["wall"]
        checks += cchecks + [f"compiling (every model, decode and step, first calls): {compile_s:.0f} s"]
        lines += ["", (f"torch.compile rows: the model cut to {args.compile_layers} blocks; step: batch "
                       f"{args.step_batch} × {args.step_seq} tokens, loss + backward; decode: batch 1, ms per token"), "",
                  "| row | ms |", "|---|---|"]
        scale = {k: (args.tokens if "decode" in k else 1) for k in ctimes}
        lines += [f"| {k} | {1e3 * statistics.median(v) / scale[k]:.2f} |" for k, v in ctimes.items()]
        lines += [""] + ratio_lines(cclocks, [
            ("DoRA / LoRA decode, compiled", "dora decode, compiled", "lora decode, compiled", 1.10),
            ("LoRA / LoRA on a second copy, decode, compiled: null baseline", "lora copy decode, compiled",
             "lora decode, compiled", None),
            ("DoRA / LoRA decode, eager (cut model)", "dora decode, eager", "lora decode, eager", 1.10),
            ("DoRA decode compiled / eager", "dora decode, compiled", "dora decode, eager", None),
            ("LoRA decode compiled / eager", "lora decode, compiled", "lora decode, eager", None),
            ("DoRA step compiled / eager", "dora train step, compiled", "dora train step, eager", None),
            ("LoRA step compiled / eager", "lora train step, compiled", "lora train step, eager", None),
            ("DoRA / LoRA step, compiled", "dora train step, compiled", "lora train step, compiled", None),
        ], args.repeats)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    lines += ["", *[f"- {c}" for c in checks], f"- load average after: {' '.join(f'{x:.2f}' for x in load)}"]
    text = "\n".join(lines)
    print(text[len("\n".join(lines[:eager_lines])):])
    if args.output:
        from torchdora.files import atomic_write_bytes

        atomic_write_bytes(args.output, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
