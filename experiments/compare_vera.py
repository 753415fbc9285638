"""LoRA, DoRA, VeRA and DVoRA on the default task at matched steps: accuracy with intervals, trainable parameters.

The DoRA paper (§5.4) reports DVoRA (VeRA's frozen shared random ``A``/``B`` with trained vectors ``d``, ``b``, plus
DoRA's magnitude) above VeRA and close to LoRA/DoRA with a small fraction of their trainable parameters. Here each
(method, seed) is one ``torchdora train`` process on the embedded SmolLM2-135M-Instruct and Rotten Tomatoes
sentiment, with the same targets, steps, batch, data and evaluation; only the method, its rank and its learning
rate differ (VeRA's vectors need a much larger learning rate than LoRA's matrices, as in PEFT's VeRA examples).
A seed fixes the data split and order, so all methods of one seed are scored on the same test examples.

Statistics: each accuracy with its binomial standard error; each difference of two methods paired by seed (mean
over seeds of the per-seed difference) with two 95 % intervals: ``± 1.96 · SE`` where the SE adds the two binomial
variances of every seed (it ignores the positive correlation of two models' answers on the same examples, so it is
conservative), and the Student-t interval over the per-seed differences
(:func:`torchdora.analysis.stats.paired_difference`), which carries the spread across training seeds and splits.
"Not distinguishable" unless both exclude 0.

Writes ``docs/results-vera.md`` and ``docs/data/vera-runs.csv``. Runs two trainings side by side; finished runs
(``summary.json`` present) are reused, so an interrupted comparison resumes.

    OMP_NUM_THREADS=1 nice -n 10 python experiments/compare_vera.py --steps 40 --max-eval 100
    python experiments/compare_vera.py --steps 2 --max-train 16 --max-eval 8 --seeds 0 \\
        --runs /tmp/vera-smoke --output /tmp/vera-smoke/results.md --csv /tmp/vera-smoke/runs.csv   # smoke run
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from torchdora.analysis.stats import binomial_se
from torchdora.analysis.stats import paired_difference as seed_interval
from torchdora.io import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "dora", "vera", "dvora")
#: (rank, alpha, learning rate) per method. LoRA/DoRA: the project's default recipe (r 16, alpha 32, lr 3e-4).
#: VeRA/DVoRA: r 128 (a quarter of the hidden size 576; VeRA's rank is far above LoRA's, and its trainable count
#: hardly depends on it) and lr 1e-2, the top of the range PEFT's VeRA examples use (4e-3 to 1e-2), because these
#: runs are short; alpha does not apply to them (VeRA has no scale).
SETTINGS = {"lora": (16, 32.0, 3e-4), "dora": (16, 32.0, 3e-4), "vera": (128, 32.0, 1e-2), "dvora": (128, 32.0, 1e-2)}
NAMES = {"lora": "LoRA", "dora": "DoRA", "vera": "VeRA", "dvora": "DVoRA"}
PAIRS = (("dvora", "vera"), ("dvora", "dora"), ("dvora", "lora"), ("dora", "lora"), ("vera", "lora"))
CSV_COLUMNS = ("method", "seed", "rank", "lr", "steps", "trainable_params", "test_examples", "accuracy_before",
               "accuracy_after", "final_loss", "wall_time_s")


def command_for(method: str, seed: int, args: argparse.Namespace, out: Path) -> list[str]:
    rank, alpha, lr = SETTINGS[method]
    command = [sys.executable, "-m", "torchdora", "train", "--method", method, "--seed", str(seed),
               "--rank", str(rank), "--alpha", str(alpha), "--lr", str(lr), "--steps", str(args.steps),
               "--warmup-steps", str(max(1, args.steps // 10)), "--max-eval", str(args.max_eval),
               "--eval-every", "0", "--checkpoint-every", "0", "--output-dir", str(out)]
    for flag, value in (("--max-train", args.max_train), ("--model", args.model), ("--data", args.data)):
        if value is not None:
            command += [flag, str(value)]
    return command


def run_all(args: argparse.Namespace) -> dict[tuple[str, int], dict]:
    """Every (method, seed) run, ``args.parallel`` at a time, seed by seed; returns their ``summary.json``."""
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    results: dict[tuple[str, int], dict] = {}
    running: list[tuple[tuple[str, int], subprocess.Popen, Path]] = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    while jobs or running:
        while jobs and len(running) < args.parallel:
            method, seed = jobs.pop(0)
            out = Path(args.runs) / f"{method}-seed{seed}"
            if (out / "summary.json").is_file():
                results[method, seed] = json.loads((out / "summary.json").read_text())
                continue
            command = command_for(method, seed, args, out)
            print("$", shlex.join(command), flush=True)
            log = open(Path(args.runs) / f"{method}-seed{seed}.log", "w")
            running.append(((method, seed), subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), out))
        for item in list(running):
            key, process, out = item
            if process.poll() is None:
                continue
            running.remove(item)
            if process.returncode != 0:
                raise SystemExit(f"run {key} failed (exit {process.returncode}); see {out}.log")
            results[key] = json.loads((out / "summary.json").read_text())
            print(f"done {key}: accuracy {results[key]['accuracy_after']:.3f}", flush=True)
        time.sleep(2)
    return results


# ---- statistics --------------------------------------------------------------------------------------------
def pooled(runs: list[dict]) -> tuple[float, float, int]:
    """Accuracy over all seeds' test examples together, its binomial SE, and the number of examples."""
    n = sum(r["test_examples"] for r in runs)
    correct = sum(round(r["accuracy_after"] * r["test_examples"]) for r in runs)
    p = correct / n
    return p, binomial_se(p, n), n


def paired_difference(a: dict[int, dict], b: dict[int, dict]) -> tuple[float, float, int]:
    """Mean over seeds of ``acc_a − acc_b`` and its conservative SE (binomial variances added); seeds used."""
    seeds = sorted(set(a) & set(b))
    diffs, variance = [], 0.0
    for s in seeds:
        pa, pb, n = a[s]["accuracy_after"], b[s]["accuracy_after"], a[s]["test_examples"]
        diffs.append(pa - pb)
        variance += binomial_se(pa, n) ** 2 + binomial_se(pb, n) ** 2
    if not seeds:
        return float("nan"), float("nan"), 0
    return statistics.fmean(diffs), math.sqrt(variance) / len(seeds), len(seeds)


def verdict(mean: float, se: float, first: str, second: str, seed_low: float = -math.inf,
            seed_high: float = math.inf) -> str:
    """"not distinguishable" unless the binomial interval and (when given) the seeds' t interval both exclude 0."""
    low, high = mean - 1.96 * se, mean + 1.96 * se
    if low <= 0 <= high or (math.isfinite(seed_low) and seed_low <= 0 <= seed_high):
        return "not distinguishable"
    return f"{NAMES[first]} higher" if mean > 0 else f"{NAMES[first]} lower"


# ---- outputs -----------------------------------------------------------------------------------------------
def write_csv(results: dict[tuple[str, int], dict], args: argparse.Namespace, path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for (method, seed), r in sorted(results.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
        rank, _, lr = SETTINGS[method]
        writer.writerow([method, seed, rank, lr, r["steps"], r["trainable_params"], r["test_examples"],
                         f"{r['accuracy_before']:.4f}", f"{r['accuracy_after']:.4f}", f"{r['final_loss']:.4f}",
                         f"{r['wall_time_s']:.0f}"])
    atomic_write_bytes(path, buffer.getvalue().encode())


def render(results: dict[tuple[str, int], dict], args: argparse.Namespace, argv: list[str], csv_path: Path) -> str:
    by_method = {m: {s: r for (mm, s), r in results.items() if mm == m} for m in METHODS if m in args.methods}
    by_method = {m: runs for m, runs in by_method.items() if runs}
    seeds = sorted({s for _, s in results})
    n_eval = sorted({r["test_examples"] for r in results.values()})
    csv_rel = os.path.relpath(csv_path, Path(args.output).parent)
    lines = [
        "# LoRA, DoRA, VeRA and DVoRA at matched steps (torchdora, CPU)",
        "",
        "Written by `experiments/compare_vera.py`; regenerate with",
        "",
        "```",
        "OMP_NUM_THREADS=1 nice -n 10 " + shlex.join(["python", "experiments/compare_vera.py",
                                                      *[a for a in argv if a != "--no-run"]]),
        "```",
        "",
        f"SmolLM2-135M-Instruct (embedded), Rotten Tomatoes sentiment, adapters on q/k/v/up/down_proj, {args.steps} "
        f"optimizer steps of batch 8 (10 % warm-up, linear decay), seeds {', '.join(map(str, seeds))}; test accuracy on "
        f"{'/'.join(map(str, n_eval))} held-out examples per seed (the option with the higher log-likelihood). A seed "
        "fixes the split, so every method of a seed sees the same test examples. LoRA and DoRA: r 16, alpha 32, lr "
        "3e-4. VeRA and DVoRA: r 128 (a quarter of the hidden size), frozen shared random A/B from projection seed 0, "
        "d = 0.1 and b = 0 at the start, lr 1e-2 (VeRA trains vectors, which need a much larger step; PEFT's VeRA "
        "examples use 4e-3 to 1e-2, and these runs are short). The learning rates were not tuned here.",
        "",
        f"These are short runs ({args.steps} steps, {'/'.join(map(str, n_eval))} test examples) so that the "
        f"{len(args.seeds) * len(args.methods)} planned runs fit in the compute this comparison was given on a shared "
        "2-core machine; with so few "
        "test examples only large differences can be told apart. Data per run: "
        f"[{csv_rel}]({csv_rel}).",
        "",
    ]
    planned = len(args.seeds) * len(args.methods)
    if len(results) < planned:
        missing = sorted(f"{m} seed {s}" for s in args.seeds for m in args.methods if (m, s) not in results)
        lines += [
            f"**Incomplete: {len(results)} of the {planned} planned runs finished** within the compute this "
            f"comparison had (a 2-core machine shared by several jobs); not run: {', '.join(missing)}. The same "
            "command without `--no-run` runs them (finished runs are reused) and rewrites this page.",
            "",
        ]
    lines += [
        "| method | trainable params | % of LoRA's | test accuracy (all seeds pooled) ± binomial SE | per seed |",
        "|---|---|---|---|---|",
    ]
    lora_params = next(iter(by_method.get("lora", {}).values()), {}).get("trainable_params")
    for method, runs in by_method.items():
        p, se, n = pooled(list(runs.values()))
        params = next(iter(runs.values()))["trainable_params"]
        share = f"{100 * params / lora_params:.1f} %" if lora_params else "–"
        per_seed = ", ".join(f"{runs[s]['accuracy_after']:.3f}" for s in sorted(runs))
        lines.append(f"| {NAMES[method]} | {params:,} | {share} | {100 * p:.1f} ± {100 * se:.1f} % (n = {n}) | {per_seed} |")
    before = [r["accuracy_before"] for r in results.values()]
    lines += ["", f"Before training (the base model): {100 * statistics.fmean(before):.1f} % on the same test examples.",
              "", "Paired differences (by seed). Two 95 % intervals: ± 1.96 SE with the SE from the binomial variances "
              "of the test accuracies (conservative: it ignores that two models answer the same examples alike), "
              "and the Student-t interval over the per-seed differences (training and split spread, t with "
              "seeds − 1 degrees of freedom). \"Not distinguishable\" unless both exclude 0.", "",
              "| comparison | difference (points) | binomial 95 % interval | seed t 95 % interval | seeds | verdict |",
              "|---|---|---|---|---|---|"]
    for first, second in PAIRS:
        if first not in by_method or second not in by_method:
            continue
        mean, se, k = paired_difference(by_method[first], by_method[second])
        seeds_both = sorted(set(by_method[first]) & set(by_method[second]))
        t = seed_interval([by_method[first][s]["accuracy_after"] for s in seeds_both],
                          [by_method[second][s]["accuracy_after"] for s in seeds_both])
        t_text = f"[{100 * t.low:+.1f}, {100 * t.high:+.1f}]" if math.isfinite(t.low) else "– (one seed)"
        lines.append(f"| {NAMES[first]} − {NAMES[second]} | {100 * mean:+.1f} | [{100 * (mean - 1.96 * se):+.1f}, "
                     f"{100 * (mean + 1.96 * se):+.1f}] | {t_text} | {k} | "
                     f"{verdict(mean, se, first, second, t.low, t.high)} |")
    lines += ["", "The paper's claim (§5.4: DVoRA above VeRA, close to DoRA and LoRA with a small fraction of their "
              "trainable parameters), checked here:", ""]
    for first, second in (("dvora", "vera"), ("dvora", "dora"), ("dvora", "lora")):
        if first in by_method and second in by_method:
            mean, se, _ = paired_difference(by_method[first], by_method[second])
            seeds_both = sorted(set(by_method[first]) & set(by_method[second]))
            t = seed_interval([by_method[first][s]["accuracy_after"] for s in seeds_both],
                              [by_method[second][s]["accuracy_after"] for s in seeds_both])
            lines.append(f"- {NAMES[first]} vs {NAMES[second]}: {100 * mean:+.1f} points, "
                         f"{verdict(mean, se, first, second, t.low, t.high)}.")
    if "dvora" in by_method and lora_params:
        params = next(iter(by_method["dvora"].values()))["trainable_params"]
        lines.append(f"- Trainable parameters: DVoRA {params:,}, {100 * params / lora_params:.1f} % of LoRA's.")
    lines += ["", "A difference that is not distinguishable is not evidence either way at this size. The paper's "
              "setting (LLaMA-7B and LLaMA2-7B instruction tuning scored on MT-Bench) is far from this one (a 135 M "
              "model, a two-way classification task, minutes of CPU training).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-eval", dest="max_eval", type=int, default=100)
    p.add_argument("--max-train", dest="max_train", type=int, default=None)
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="dataset (default: Rotten Tomatoes)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--no-run", dest="no_run", action="store_true", help="only tabulate the runs that finished")
    p.add_argument("--parallel", type=int, default=2, help="trainings side by side (default 2)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "compare-vera"), help="folder for the run folders")
    p.add_argument("--output", default=str(ROOT / "docs" / "results-vera.md"))
    p.add_argument("--csv", default=str(ROOT / "docs" / "data" / "vera-runs.csv"))
    args = p.parse_args(argv)
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    if args.no_run:  # tables from the runs that finished
        results = {(m, s): json.loads((Path(args.runs) / f"{m}-seed{s}" / "summary.json").read_text())
                   for s in args.seeds for m in args.methods
                   if (Path(args.runs) / f"{m}-seed{s}" / "summary.json").is_file()}
    else:
        results = run_all(args)
    write_csv(results, args, Path(args.csv))
    text = render(results, args, argv, Path(args.csv))
    atomic_write_bytes(args.output, text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
