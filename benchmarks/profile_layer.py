"""Where one adapted layer's forward + backward spends its time, DoRA vs LoRA, by op (torch.profiler).

    python benchmarks/profile_layer.py --device cuda --dtype bfloat16 --shape 576 576 --rank 16 --tokens 2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import layer_models  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shape", type=int, nargs=2, default=[576, 576], metavar=("IN", "OUT"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=15, help="ops listed per method")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    models = layer_models(*args.shape, args.rank, device, dtype)
    x = torch.randn(args.tokens, args.shape[0], device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(args.tokens, args.shape[1], device=device, dtype=dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in ("dora", "lora"):
        model = models[name]
        for _ in range(3):  # warm-up (Triton compiles on first use)
            model(x).backward(g)
        with profile(activities=activities) as prof:
            for _ in range(10):
                model(x).backward(g)
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"== {name}: 10 steps")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
