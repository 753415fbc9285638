"""DoRA vs LoRA vs full fine-tuning on the default task, 3 seeds each, and a Markdown table of the results.

Every run is a separate ``torchdora train`` process (so each peak RSS is that run's own) on the embedded
SmolLM2-135M-Instruct and Rotten Tomatoes sentiment, with the same steps, batch, data and evaluation for all
methods; only the method and its learning rate differ (adapters 3e-4, full fine-tuning 3e-5: the usual
ten-fold gap, since full fine-tuning moves every weight). Writes ``docs/results-methods.md``.

    python experiments/compare_methods.py                 # the table in docs/results-methods.md
    python experiments/compare_methods.py --steps 40 --seeds 0 1 2 --max-eval 200
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from torchdora.analysis.stats import binomial_se, describe_difference, paired_difference
from torchdora.io import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
LEARNING_RATES = {"dora": 3e-4, "lora": 3e-4, "full": 3e-5}


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict:
    """One ``torchdora train`` process; returns its ``summary.json`` (reused if the run already finished)."""
    out = Path(args.runs) / f"{method}-seed{seed}"
    summary = out / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    command = [sys.executable, "-m", "torchdora", "train", "--method", method, "--seed", str(seed),
               "--steps", str(args.steps), "--lr", str(LEARNING_RATES[method]), "--max-eval", str(args.max_eval),
               "--warmup-steps", str(max(1, args.steps // 10)), "--eval-every", "0", "--checkpoint-every", "0",
               "--output-dir", str(out)]
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def render(results: dict[str, list[dict]], args: argparse.Namespace, command: str, minutes: float) -> str:
    any_run = next(iter(results.values()))[0]
    lines = [
        "# DoRA vs LoRA vs full fine-tuning (torchdora, CPU)",
        "",
        f"SmolLM2-135M-Instruct (embedded), Rotten Tomatoes sentiment, {args.steps} optimizer steps of batch 8 "
        f"(max length 96), seeds {', '.join(map(str, args.seeds))}; test accuracy on {any_run['test_examples']} "
        "held-out examples per seed (log-likelihood of \" positive\" vs \" negative\"). Adapters: rank 16, alpha 32 "
        "on q/k/v/up/down, lr 3e-4; full fine-tuning: lr 3e-5. Linear schedule, 10 % warm-up. Each seed also "
        "draws its own train/validation/test split, the same one for every method.",
        "",
        f"These runs are shorter than the default `torchdora train` ({args.steps} steps instead of 120) so that "
        f"the {len(results) * len(args.seeds)} runs fit in about half an hour on 2 CPU cores (this table took "
        f"{minutes:.0f} min). Wall time is the whole run (loading, evaluation before and after, training) and "
        "depends on what else the machine runs; peak memory is the process's peak RSS.",
        "",
        "| method | trainable params | test accuracy before | test accuracy after (mean ± std) | wall time s | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for method, runs in results.items():
        lines.append(
            f"| {method} | {runs[0]['trainable_params']:,} | {mean_std([r['accuracy_before'] for r in runs])} | "
            f"{mean_std([r['accuracy_after'] for r in runs])} | {mean_std([r['wall_time_s'] for r in runs], 0)} | "
            f"{mean_std([r['peak_rss_mb'] for r in runs], 0)} |"
        )
    n_test = int(any_run["test_examples"])
    lines += ["", "Differences in test accuracy, paired by seed (same split, order and data for both methods), with a "
              "95 % Student-t interval over seeds; \"not distinguishable\" when it contains 0. For scale: one run's "
              f"accuracy near 0.8 on {n_test} examples has a binomial SE of {100 * binomial_se(0.8, n_test):.1f} points.",
              "", "| comparison | difference [95 % CI] |", "|---|---|"]
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = paired_difference([r["accuracy_after"] for r in results[a]], [r["accuracy_after"] for r in results[b]])
            lines.append(f"| {a} − {b} | {describe_difference(diff)} |")
    lines += ["", "Per run:", "", "| method | seed | accuracy before | accuracy after | final loss | wall time s |",
              "|---|---|---|---|---|---|"]
    for method, runs in results.items():
        for seed, r in zip(args.seeds, runs):
            lines.append(f"| {method} | {seed} | {r['accuracy_before']:.3f} | {r['accuracy_after']:.3f} | "
                         f"{r['final_loss']:.4f} | {r['wall_time_s']:.0f} |")
    lines += ["", "Regenerate with:", "", "```", command, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-eval", dest="max_eval", type=int, default=200)
    p.add_argument("--methods", nargs="+", default=["dora", "lora", "full"], choices=["dora", "lora", "full"])
    p.add_argument("--runs", default=str(ROOT / "runs" / "compare-methods"), help="folder for the run folders")
    p.add_argument("--output", default=str(ROOT / "docs" / "results-methods.md"))
    args = p.parse_args(argv)
    start = time.perf_counter()
    results = {m: [run_one(m, seed, args) for seed in args.seeds] for m in args.methods}
    command = "python experiments/compare_methods.py " + shlex.join(
        ["--steps", str(args.steps), "--max-eval", str(args.max_eval), "--seeds", *map(str, args.seeds)])
    text = render(results, args, command, (time.perf_counter() - start) / 60)
    atomic_write_bytes(args.output, text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
