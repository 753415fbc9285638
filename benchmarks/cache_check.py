"""What checking the norm cache costs (issue 20): the unmerged eval forward, DoRA vs LoRA, and one lookup.

    python benchmarks/cache_check.py                 # SmolLM2-135M architecture, 30 layers, 2×256 tokens
    python benchmarks/cache_check.py --rounds 5 --layers 30

Every eval forward of a DoRA layer looks its factor ``m / ||W + s·B·A||`` up in a cache checked from host-side
facts of ``A``, ``B``, ``m`` and ``W`` (storage, address, version counter, layout: :mod:`torchdora.cache`). This prints

1. the whole-model unmerged eval forward (the row of ``benchmarks/run.py``), DoRA and LoRA interleaved, as the
   median DoRA/LoRA ratio of each of ``--rounds`` rounds, so the spread from a loaded machine shows;
2. one cache lookup (``dora_factor()`` with a warm cache) against one layer's eval forward, per target shape,
   at the benchmark's token count and at one token (decoding, where the matrix product is smallest).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import interleaved_medians, model_variants, smollm2_architecture  # noqa: E402

from torchdora import adapter_layers  # noqa: E402


def _per_call(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    models = model_variants(smollm2_architecture(args.layers, device, torch.float32), 32)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(3))

    def eval_forward(model):
        def run() -> None:
            with torch.no_grad():
                model(input_ids=ids)
        return run

    for m in models.values():
        m.eval()
    ratios = []
    for _ in range(args.rounds):
        s = interleaved_medians({n: eval_forward(models[n]) for n in ("dora", "lora")}, args.repeats, 1, device)
        ratios.append(s["dora"] / s["lora"])
        print(f"round: DoRA {s['dora'] * 1e3:.1f} ms, LoRA {s['lora'] * 1e3:.1f} ms, ratio {ratios[-1]:.3f}",
              flush=True)
    print(f"unmerged eval forward DoRA/LoRA over {args.rounds} rounds: median {statistics.median(ratios):.3f}, "
          f"min {min(ratios):.3f}, max {max(ratios):.3f}")

    seen = set()
    for name, layer in adapter_layers(models["dora"]).items():
        shape = tuple(layer.weight_2d().shape)
        if shape in seen:
            continue
        seen.add(shape)
        with torch.no_grad():
            lookup = _per_call(layer.dora_factor, 2000)
            for tokens in (args.batch * args.seq, 1):
                x = torch.randn(tokens, layer.in_features)
                fwd = _per_call(lambda: layer(x), 20 if tokens > 1 else 500)
                print(f"{name.rsplit('.', 1)[-1]} {shape}: lookup {lookup * 1e6:.1f} µs, layer eval forward at "
                      f"{tokens} tokens {fwd * 1e6:.1f} µs → lookup/forward {lookup / fwd:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
