"""Peak host memory per process of `torchdora train` on N CPU processes: DDP (``--sharding none``) against FSDP2.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/distributed_memory.py --repeats 2
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/distributed_memory.py --repeats 2 --malloc-mmap-threshold 1048576

Each run is a short ``torchdora train`` of the embedded SmolLM2-135M-Instruct (2 steps, per-device batch 2) under
``torchrun --nproc-per-node N`` on gloo; the methods alternate (DDP, FSDP, DDP, FSDP, ...) so drifting load hits
both alike. Peak RSS per process is ``ru_maxrss`` as ``summary.json`` records it (``peak_rss_mb_per_process``,
rank order); it includes the Python, torch and transformers runtime each process carries (about 400-500 MiB).
``--malloc-mmap-threshold`` sets glibc's ``MALLOC_MMAP_THRESHOLD_`` in both runs, so that blocks above it
are returned to the system when freed (FSDP2 on CPU all-gathers and frees block-sized buffers every step).
The loss sequences of the two methods are printed side by side: the same run, up to fp32 round-off. A
benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(sharding: str, processes: int, out: Path, model: str | None, threshold: int | None) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "torchdora", "train", "--steps", "2", "--per-device-batch-size", "2", "--max-train", "64",
               "--max-eval", "8", "--eval-every", "0", "--checkpoint-every", "0", "--warmup-steps", "0",
               "--sharding", sharding, "--output-dir", str(out)]
    if model:
        command += ["--model", model]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{sharding} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    return {"peaks": summary["peak_rss_mb_per_process"], "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--malloc-mmap-threshold", type=int, help="MALLOC_MMAP_THRESHOLD_ for every run, bytes")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"none": [], "fsdp": []}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            for sharding in results:
                results[sharding].append(run(sharding, args.processes, Path(root, f"{sharding}-{repeat}"),
                                             args.model, args.malloc_mmap_threshold))
                print(f"repeat {repeat} {sharding}: peak RSS per process {results[sharding][-1]['peaks']} MiB",
                      flush=True)
    print(f"\n| --sharding | rank | peak RSS MiB (median of {args.repeats}, min-max) |\n|---|---|---|")
    for sharding, runs in results.items():
        for rank in range(args.processes):
            values = [r["peaks"][rank] for r in runs]
            print(f"| {sharding} | {rank} | {statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f}) |")
    print("\nlosses, DDP:  ", results["none"][0]["losses"])
    print("losses, FSDP: ", results["fsdp"][0]["losses"])


if __name__ == "__main__":
    main()
