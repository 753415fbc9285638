"""Test the DoRA paper's weight-decomposition finding (section 3, Figure 2) at small scale, against a null.

The paper plots ΔM (mean |change of row norm|) against ΔD (mean 1 − cos to the pre-trained row) for the query
matrices of several layers at several checkpoints and reports one correlation per method: full fine-tuning
−0.62, LoRA +0.83, DoRA −0.31. Pooling checkpoints builds in a positive correlation (every layer's ΔM and ΔD
grow over training), so this script reports, per method, the pooled r *and* correlations across layers within
each snapshot (Pearson, step-centred partial, Spearman) with 95 % bootstrap intervals over layers, compares
each with random updates of the same size (:mod:`torchdora.analysis.null`) and gives a verdict.

Runs (all on the embedded SmolLM2-135M-Instruct and Rotten Tomatoes, snapshots spread over the run, every
method with each seed), in two plans (``--plan``; any option overrides the plan's value):

- ``pilot``: 0.2 epoch at a constant learning rate after 5 warm-up steps, 2 seeds (the first rerun);
- ``plateau``: the positive control's length, one epoch of 2,000 examples at batch 8 (250 steps), linear decay
  to 0 after 10 warm-up steps, a snapshot every 25 steps, 3 seeds.

Methods: ``full`` (full fine-tuning, lr 1e-4), ``full-qv`` (full fine-tuning of the q_proj and v_proj weights
only, ``--train-only``), ``lora``/``dora`` (q_proj and v_proj adapters, r 8, alpha 16, lr 1e-3). The one-change
ablations (``--dropout``, ``--magnitude-lr-ratio``, ``--weight-decay``, ``--magnitude-weight-decay``) apply to the
adapter runs, which then get their own folders (``dora-seed0-mlr0.1``) and result set (``plateau-mlr0.1``).

    python experiments/reproduce_decomposition.py --plan plateau --methods full --seeds 0   # the control
    python experiments/reproduce_decomposition.py --plan plateau --methods lora dora        # then 3 seeds each
    python experiments/reproduce_decomposition.py --plan plateau --analyze-only             # measure what is there
    python experiments/reproduce_decomposition.py --plan plateau --seeds 0 --adapter-steps 8 --adapter-save-every 2 \\
        --full-steps 4 --full-save-every 1 --max-train 32 --max-eval 16 --output-dir /tmp/decomp-smoke \\
        --docs /tmp/decomp-smoke/results.md --figures-dir /tmp/decomp-smoke/fig --data-dir /tmp/decomp-smoke/data

A finished run (``summary.json`` present and its ``config.json`` agreeing with these settings) is reused; an
unfinished one with a checkpoint of these settings is resumed (``torchdora train --resume``); any other run folder
is deleted and trained again. Full fine-tuning snapshots are whole models (~540 MB each). Measuring writes the
result set's CSVs (``<data-dir>/<set>/``), then ``experiments/decomposition_page.py`` writes the page from the CSVs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from decomposition_page import PageSettings, write_page
from torchdora.analysis import BaseWeights, analyze, layer_index, random_update_rows, write_csv
from torchdora.analysis.page import write_norms, write_table
from torchdora.analysis.sensitivity import row_norm_means

REPO = Path(__file__).resolve().parents[1]
METHODS = ("full", "full-qv", "lora", "dora")


#: named settings; explicit options override a plan's values. "pilot": the first rerun (constant lr, 0.2 epoch of
#: the 8,614 training examples); "plateau": the positive control's length, sized for a shared 2-core CPU: one
#: epoch of 2,000 training examples at batch 8 (250 steps) with a linear decay to 0, a snapshot every 25 steps,
#: resumable from checkpoints every 50 steps.
PLANS: dict[str, dict] = {
    "pilot": dict(seeds=[0, 1], methods=list(METHODS), adapter_steps=200, adapter_save_every=20, full_steps=120,
                  full_save_every=20, schedule="constant", warmup_steps=5, batch_size=8, checkpoint_every=0,
                  max_train=None, output_dir=Path("experiments/runs/decomposition")),
    "plateau": dict(seeds=[0, 1, 2], methods=["full", "lora", "dora"], adapter_steps=250, adapter_save_every=25,
                    full_steps=250, full_save_every=25, schedule="linear", warmup_steps=10, batch_size=8,
                    checkpoint_every=50, max_train=2000, output_dir=Path("experiments/runs/decomposition-plateau")),
}


@dataclass(frozen=True)
class Settings:
    plan: str
    model: str
    data: str
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    adapter_steps: int
    adapter_save_every: int
    adapter_lr: float
    full_steps: int
    full_save_every: int
    full_lr: float
    schedule: str
    warmup_steps: int
    batch_size: int
    max_length: int
    rank: int
    alpha: float
    dropout: float
    magnitude_lr_ratio: float
    weight_decay: float
    magnitude_weight_decay: float | None
    max_train: int | None
    max_eval: int | None
    checkpoint_every: int
    bootstrap: int
    output_dir: Path
    docs: Path
    figures_dir: Path
    data_dir: Path
    analyze_only: bool
    skip_analysis: bool


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=sorted(PLANS), default="pilot",
                   help="named settings (default pilot); the options below override its values")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="rotten_tomatoes")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--methods", nargs="+", choices=METHODS, help="what to train (the analysis takes every run "
                   "of the plan found in --output-dir)")
    p.add_argument("--adapter-steps", type=int)
    p.add_argument("--adapter-save-every", type=int)
    p.add_argument("--adapter-lr", type=float, default=1e-3)
    p.add_argument("--full-steps", type=int)
    p.add_argument("--full-save-every", type=int)
    p.add_argument("--full-lr", type=float, default=1e-4)
    p.add_argument("--schedule", choices=("constant", "linear", "cosine"), help="after the linear warm-up")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    ablation = p.add_argument_group("one-change ablations of the adapter runs (their runs get their own folders)")
    ablation.add_argument("--dropout", type=float, default=0.0, help="adapter input dropout (the paper: 0.05)")
    ablation.add_argument("--magnitude-lr-ratio", type=float, default=1.0,
                          help="DoRA: the magnitude's learning rate is lr × this")
    ablation.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of A and B")
    ablation.add_argument("--magnitude-weight-decay", type=float, default=None,
                          help="DoRA: AdamW weight decay of the magnitude (default: --weight-decay)")
    p.add_argument("--max-train", type=int, help="training examples kept (pilot: all 8,614)")
    p.add_argument("--max-eval", type=int, default=200)
    p.add_argument("--checkpoint-every", type=int, help="resume checkpoints every N steps (0: at the end only); "
                   "an unfinished run with a checkpoint is resumed, not restarted")
    p.add_argument("--bootstrap", type=int, default=2000, help="layer resamples for the 95 %% intervals")
    p.add_argument("--output-dir", type=Path)
    p.add_argument("--docs", type=Path, default=Path("docs/results-decomposition.md"))
    p.add_argument("--figures-dir", type=Path, default=Path("docs/figures"))
    p.add_argument("--data-dir", type=Path, default=Path("docs/data/decomposition"))
    p.add_argument("--analyze-only", action="store_true",
                   help="train nothing: analyse the snapshots already in --output-dir (also of unfinished runs)")
    p.add_argument("--skip-analysis", action="store_true", help="train only; analyse later with --analyze-only")
    a = p.parse_args(argv)
    for key, value in PLANS[a.plan].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    for kind in ("adapter", "full"):
        steps, every = getattr(a, f"{kind}_steps"), getattr(a, f"{kind}_save_every")
        if every < 1 or steps // every < 3:
            p.error(f"--{kind}-steps {steps} / --{kind}-save-every {every}: need at least 3 snapshots per run")
    return Settings(a.plan, a.model, a.data, tuple(a.seeds), tuple(a.methods), a.adapter_steps, a.adapter_save_every,
                    a.adapter_lr, a.full_steps, a.full_save_every, a.full_lr, a.schedule, a.warmup_steps,
                    a.batch_size, a.max_length, a.rank, a.alpha, a.dropout, a.magnitude_lr_ratio, a.weight_decay,
                    a.magnitude_weight_decay, a.max_train, a.max_eval, a.checkpoint_every, a.bootstrap,
                    a.output_dir, a.docs, a.figures_dir, a.data_dir, a.analyze_only, a.skip_analysis)


def lr_of(s: Settings, method: str) -> float:
    return s.adapter_lr if method in ("lora", "dora") else s.full_lr


def steps_of(s: Settings, method: str) -> tuple[int, int]:
    return (s.adapter_steps, s.adapter_save_every) if method in ("lora", "dora") else (s.full_steps, s.full_save_every)


def ablation_options(s: Settings, method: str) -> dict[str, float]:
    """The ablation settings that differ from the default and apply to ``method`` (train option → value)."""
    out: dict[str, float] = {}
    if method in ("lora", "dora") and s.dropout:
        out["dropout"] = s.dropout
    if method in ("lora", "dora") and s.weight_decay:
        out["weight_decay"] = s.weight_decay
    if method == "dora" and s.magnitude_lr_ratio != 1.0:
        out["magnitude_lr_ratio"] = s.magnitude_lr_ratio
    if method == "dora" and s.magnitude_weight_decay is not None and s.magnitude_weight_decay != s.weight_decay:
        out["magnitude_weight_decay"] = s.magnitude_weight_decay
    return out


def train_options(s: Settings, method: str, seed: int) -> list[str]:
    """The ``torchdora train`` options of one run (without the output folder)."""
    steps, every = steps_of(s, method)
    opts = ["--method", "full" if method == "full-qv" else method, "--model", s.model, "--data", s.data,
            "--lr", str(lr_of(s, method)), "--schedule", s.schedule, "--warmup-steps", str(s.warmup_steps),
            "--steps", str(steps), "--save-every", str(every), "--batch-size", str(s.batch_size),
            "--max-length", str(s.max_length), "--seed", str(seed), "--eval-every", "0",
            "--checkpoint-every", str(s.checkpoint_every)]
    if method == "full-qv":
        opts += ["--train-only", "q_proj,v_proj"]
    if method in ("lora", "dora"):
        opts += ["--targets", "q_proj,v_proj", "--rank", str(s.rank), "--alpha", str(s.alpha)]
    for key, value in ablation_options(s, method).items():
        opts += ["--" + key.replace("_", "-"), str(value)]
    if s.max_train is not None:
        opts += ["--max-train", str(s.max_train)]
    if s.max_eval is not None:
        opts += ["--max-eval", str(s.max_eval)]
    return opts


#: config.json values of settings an older run's config may lack
_CONFIG_DEFAULTS = {"dropout": 0.0, "weight_decay": 0.0, "magnitude_lr_ratio": 1.0, "magnitude_weight_decay": None}


def _expected_config(s: Settings, method: str, seed: int) -> dict:
    """The config.json fields a reusable run must have (the others are defaults or do not change the weights)."""
    steps, every = steps_of(s, method)
    want = {"method": "full" if method == "full-qv" else method, "lr": lr_of(s, method), "schedule": s.schedule,
            "warmup_steps": s.warmup_steps, "steps": steps, "save_every": every, "batch_size": s.batch_size,
            "max_length": s.max_length, "seed": seed, "max_train": s.max_train,
            "train_only": "q_proj,v_proj" if method == "full-qv" else ""}
    if method in ("lora", "dora"):
        want.update(rank=s.rank, alpha=s.alpha)
    want.update({k: v for k, v in _CONFIG_DEFAULTS.items() if k != "magnitude_weight_decay"})
    want.update(ablation_options(s, method))
    return want


def run_dir(s: Settings, method: str, seed: int) -> Path:
    """``<output_dir>/<method>-seed<seed>``, with the ablation settings in the name (``dora-seed0-mlr10``)."""
    short = {"dropout": "drop", "weight_decay": "wd", "magnitude_lr_ratio": "mlr", "magnitude_weight_decay": "mwd"}
    suffix = "".join(f"-{short[k]}{v:g}" for k, v in ablation_options(s, method).items())
    return s.output_dir / f"{method}-seed{seed}{suffix}"


def _matches(s: Settings, method: str, seed: int, config: dict) -> bool:
    return all(config.get(k, _CONFIG_DEFAULTS.get(k)) == v for k, v in _expected_config(s, method, seed).items())


def reusable(s: Settings, method: str, seed: int) -> bool:
    folder = run_dir(s, method, seed)
    if not (folder / "summary.json").is_file():
        return False
    return _matches(s, method, seed, json.loads((folder / "config.json").read_text()))


def resumable(s: Settings, method: str, seed: int) -> bool:
    """An unfinished run of these settings with a resume checkpoint."""
    folder = run_dir(s, method, seed)
    if (folder / "summary.json").is_file() or not (folder / "checkpoint").is_dir():
        return False
    return (folder / "config.json").is_file() and _matches(s, method, seed, json.loads((folder / "config.json").read_text()))


def train(s: Settings, method: str, seed: int) -> float:
    """Train one run unless a matching finished one exists (an unfinished one with a checkpoint is resumed);
    returns the minutes it took (NaN if reused)."""
    folder = run_dir(s, method, seed)
    if reusable(s, method, seed):
        print(f"[{method} seed {seed}] reusing {folder}", flush=True)
        return math.nan
    if resumable(s, method, seed):
        cmd = [sys.executable, "-m", "torchdora", "train", "--resume", str(folder)]
    else:
        if folder.exists():  # unfinished without a checkpoint, or other settings: train refuses a used folder
            shutil.rmtree(folder)
        cmd = [sys.executable, "-m", "torchdora", "train", *train_options(s, method, seed), "--output-dir", str(folder)]
    print(shlex.join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return (time.perf_counter() - start) / 60


# ---- what each run did ----------------------------------------------------------------------------------------
def run_record(s: Settings, method: str, seed: int) -> dict:
    """Accuracy before/after, the mean training loss of each quarter of the run (a plateau shows as equal late
    quarters), and the wall time."""
    folder = run_dir(s, method, seed)
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    losses = []
    if (folder / "metrics.jsonl").is_file():
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if isinstance(record.get("loss"), (int, float)):
                losses.append(float(record["loss"]))
    snapshots = [int(p.name.split("-")[-1]) for p in (folder / "snapshots").glob("step-*")]
    quarter = max(1, len(losses) // 4)
    quarters = [losses[i * quarter:(i + 1) * quarter if i < 3 else None] for i in range(4)]
    record = {"method": method, "seed": seed, "lr": lr_of(s, method), "steps": max([len(losses), *snapshots]),
              "planned_steps": steps_of(s, method)[0], "schedule": s.schedule, "batch_size": s.batch_size,
              "max_train": s.max_train or "", "accuracy_before": summary.get("accuracy_before", math.nan),
              "accuracy_after": summary.get("accuracy_after", math.nan), "test_examples": summary.get("test_examples")}
    for i, q in enumerate(quarters, 1):
        record[f"loss_q{i}"] = sum(q) / len(q) if q else math.nan
    record.update(wall_minutes=summary.get("wall_time_s", math.nan) / 60, finished=bool(summary))
    return record


def set_name(s: Settings) -> str:
    """The result set of these settings: the plan, with the ablation settings of its DoRA runs (``plateau-mlr10``)."""
    return s.plan + run_dir(s, "dora", 0).name.removeprefix("dora-seed0")


def measure(s: Settings) -> Path:
    """ΔM and ΔD of every snapshot of every run of these settings, their null and the run records, as the CSVs
    of the result set ``<data-dir>/<set>/`` (and the model's ``base_norms.csv`` once)."""
    runs = [(m, seed) for seed in s.seeds for m in METHODS if (run_dir(s, m, seed) / "snapshots").is_dir()]
    if not runs:
        raise SystemExit(f"no run with snapshots under {s.output_dir}: train first (drop --analyze-only)")
    folder = s.data_dir / set_name(s)
    print(f"measuring ΔM and ΔD of {len(runs)} runs ...", flush=True)
    rows = analyze(s.model, [run_dir(s, m, seed) for m, seed in runs], labels=[f"{m}-seed{seed}" for m, seed in runs])
    family = {f"{m}-seed{seed}": m for m, seed in runs}
    rows = [dataclasses.replace(r, method=family[r.run]) for r in rows]
    base = BaseWeights(s.model)
    weights = {m: base.rows(m) for m in dict.fromkeys(r.module for r in rows)}
    print("random updates of the same size (the null) ...", flush=True)
    null = random_update_rows(weights, rows, ranks={"lora": s.rank, "dora": s.rank}, seed=0)
    write_csv(rows, folder / "decomposition.csv")
    write_csv(null, folder / "null.csv")
    records = [run_record(s, m, seed) for m, seed in runs]
    write_table(folder / "runs.csv", list(records[0]), [list(r.values()) for r in records])
    if not (s.data_dir / "base_norms.csv").is_file():
        means = row_norm_means(weights)
        write_norms({m: (layer_index(m), int(weights[m].shape[0]), means[m]) for m in weights},
                    s.data_dir / "base_norms.csv")
    return folder


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    s = parse_args(argv)
    if not s.analyze_only:
        for seed in s.seeds:
            for method in s.methods:
                train(s, method, seed)
    if s.skip_analysis:
        return 0
    measure(s)
    return write_page(PageSettings(s.docs, s.figures_dir, s.data_dir, s.bootstrap))


if __name__ == "__main__":
    raise SystemExit(main())
