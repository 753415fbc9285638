"""Serving several DoRA fine-tunes of one base: a mixed-adapter batch vs one forward per adapter vs a merged model.

    python benchmarks/multi_adapter.py                    # 8 DoRA adapters, SmolLM2-135M architecture, 6 layers
    python benchmarks/multi_adapter.py --layers 30 --seq 128 --output docs/multi_adapter.md

Eval forwards (no gradient) of a batch of ``--adapters`` rows, row ``i`` for adapter ``i``, timed side by side in
one process (methods interleaved in every repeat, rotating order; ``benchmarks/run.py``'s
:func:`interleaved_medians`), the medians of ``--rounds`` rounds reported with their spread:

- **mixed**: one forward of the whole batch under :func:`torchdora.mixed_batch` (one base product per layer,
  each adapter's low-rank product and cached factor on its own row);
- **separate**: one forward per adapter, of its row alone (:func:`torchdora.set_adapter` between them);
- **merged**: the whole batch through a model with one adapter merged in (``merge_and_unload``): the cost of a
  single fine-tune with zero overhead, a floor for serving one adapter, not a way to serve eight.
This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import TARGETS, interleaved_medians, smollm2_architecture  # noqa: E402

import torchdora  # noqa: E402
from torchdora import DoraConfig  # noqa: E402
from torchdora.io import atomic_write_bytes  # noqa: E402


def build(layers: int, n_adapters: int, r: int) -> tuple[torch.nn.Module, torch.nn.Module, list[str]]:
    """The base with ``n_adapters`` random-looking DoRA adapters, and a copy with the first one merged."""
    model = smollm2_architecture(layers, torch.device("cpu"), torch.float32).eval()
    names = [f"task{i}" for i in range(n_adapters)]
    gen = torch.Generator().manual_seed(1)
    for name in names:
        torchdora.add_adapter(model, name, DoraConfig(target_modules=TARGETS, r=r, alpha=2.0 * r))
        with torch.no_grad(), torchdora.using_adapter(model, name):
            for layer in torchdora.adapter_layers(model).values():
                layer.lora_B.copy_(0.02 * torch.randn(layer.lora_B.shape, generator=gen))
                layer.magnitude.mul_(1 + 0.01 * torch.randn(layer.magnitude.shape, generator=gen))
    merged = copy.deepcopy(model)
    torchdora.set_adapter(merged, names[0])
    torchdora.merge_and_unload(merged)
    return model, merged, names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, merged, names = build(args.layers, args.adapters, args.r)
    ids = torch.randint(0, 49152, (args.adapters, args.seq), generator=torch.Generator().manual_seed(3))

    def mixed() -> None:
        with torch.no_grad(), torchdora.mixed_batch(model, names):
            model(input_ids=ids)

    def separate() -> None:
        with torch.no_grad():
            for i, name in enumerate(names):
                torchdora.set_adapter(model, name)
                model(input_ids=ids[i:i + 1])

    def merged_model() -> None:
        with torch.no_grad():
            merged(input_ids=ids)

    fns = {"mixed": mixed, "separate": separate, "merged": merged_model}
    rounds = [interleaved_medians(fns, args.repeats, 1, torch.device("cpu")) for _ in range(args.rounds)]

    def summary(key) -> str:
        values = [key(s) for s in rounds]
        return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    lines = [
        f"# Mixed-adapter batches: {args.adapters} DoRA adapters on one base",
        "",
        f"Written by `python benchmarks/multi_adapter.py {' '.join(argv if argv is not None else sys.argv[1:])}` in "
        f"{(time.perf_counter() - started) / 60:.1f} min; CPU, {torch.get_num_threads()} threads, fp32, torch "
        f"{torch.__version__}. SmolLM2-135M architecture with {args.layers} layers, random weights; DoRA r={args.r} "
        f"on {', '.join(TARGETS)}; a batch of {args.adapters} rows × {args.seq} tokens, row i for adapter i. "
        f"Median of each round's median (of {args.repeats} interleaved repeats), over {args.rounds} rounds: "
        "median (min–max over rounds).",
        "",
        "| method | ms | ÷ merged | ÷ separate |",
        "|---|---|---|---|",
    ]
    for name, what in (("mixed", "one mixed batch (torchdora.mixed_batch)"),
                       ("separate", f"{args.adapters} forwards, one row each"),
                       ("merged", "one merged adapter, whole batch (floor)")):
        lines.append(f"| {what} | {summary(lambda s: s[name] * 1e3)} | {summary(lambda s: s[name] / s['merged'])} "
                     f"| {summary(lambda s: s[name] / s['separate'])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        atomic_write_bytes(args.output, text.encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
