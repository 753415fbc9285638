"""``torchdora analyze``: magnitude/direction weight-decomposition analysis of training checkpoints.

    torchdora analyze --model smollm2-135m runs/full runs/lora runs/dora --output-dir analysis/

writes ``decomposition.csv`` and ``decomposition.json`` (columns run, method, step, module, layer, dM, dD; the
JSON adds each run's fitted slope and Pearson correlation), ``decomposition_scatter.png`` (the paper's Figure 2:
ΔD on x, ΔM on y) and ``decomposition_layers.png`` (ΔM and ΔD per layer at the last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from torchdora.analysis import (
    DEFAULT_MODULES,
    BaseWeights,
    DecompositionRow,
    Verdict,
    compare_to_null,
    discover_checkpoints,
    random_update_rows,
    LineFit,
    analyze,
    fit_rows,
    plot_layers,
    plot_scatter,
    write_csv,
    write_json,
)
from torchdora.analysis.decomposition import adapter_ranks
from torchdora.analysis.report import format_verdicts, plot_statistics, verdicts_json, write_stats_csv

__all__ = ["AnalyzeArgs", "parse_args", "run", "main", "format_fits"]


@dataclass(frozen=True)
class AnalyzeArgs:
    """Options of ``torchdora analyze``."""

    checkpoints: tuple[str, ...]
    model: str | None = None
    modules: str = DEFAULT_MODULES
    output_dir: str = "analysis"
    labels: tuple[str, ...] = ()
    color_by: str = "layer"
    bootstrap: int = 2000
    seed: int = 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchdora analyze",
        description="Magnitude (ΔM) and direction (ΔD) change of trained weights against the pre-trained ones, "
        "per module and checkpoint (DoRA paper, section 3, Figure 2). LoRA/DoRA adapters are merged first.",
    )
    parser.add_argument("checkpoints", nargs="+", metavar="RUN_OR_SNAPSHOT",
                        help="a run folder of `torchdora train --save-every N` (its snapshots/step-* are read) or "
                        "one snapshot folder (a torchdora or PEFT adapter, or model.safetensors of full fine-tuning)")
    parser.add_argument("--model", default=None,
                        help="the pre-trained base model: a name ('smollm2-135m'), a model folder, or a .safetensors "
                        "state-dict file (default: the \"model\" in the run's config.json, else 'smollm2-135m')")
    parser.add_argument("--modules", default=DEFAULT_MODULES,
                        help=f"regex matched against whole dotted module names (default: {DEFAULT_MODULES!r}, the "
                        "query and value projections the paper analyses)")
    parser.add_argument("--output-dir", default="analysis", help="folder for the CSV, JSON and figures")
    parser.add_argument("--label", action="append", default=[], dest="labels",
                        help="a name per RUN_OR_SNAPSHOT, in order (default: the run's method)")
    parser.add_argument("--color-by", choices=("step", "layer"), default="layer",
                        help="what the scatter plot's colour shows (the other is shown by marker shape or lines)")
    parser.add_argument("--bootstrap", type=int, default=2000,
                        help="resamples of the layers for the 95 %% intervals (default 2000; 0: no statistics)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the null's random updates")
    return parser


def parse_args(argv: list[str]) -> AnalyzeArgs:
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.bootstrap < 0 or ns.bootstrap == 1:
        parser.error(f"--bootstrap {ns.bootstrap}: give 0 (no statistics) or at least 2 resamples, e.g. 2000")
    if ns.labels and len(ns.labels) != len(ns.checkpoints):
        parser.error(f"got {len(ns.labels)} --label for {len(ns.checkpoints)} checkpoints; give one per checkpoint")
    return AnalyzeArgs(checkpoints=tuple(ns.checkpoints), model=ns.model, modules=ns.modules,
                       output_dir=ns.output_dir, labels=tuple(ns.labels), color_by=ns.color_by,
                       bootstrap=ns.bootstrap, seed=ns.seed)


def format_fits(fits: list[LineFit]) -> str:
    """A plain-text table of the fitted lines, one per run and module type."""
    lines = [f"{'run':<22} {'modules':<8} {'points':>6} {'slope':>10} {'pearson r':>9}"]
    for f in fits:
        r = "n/a" if not math.isfinite(f.pearson) else f"{f.pearson:+.3f}"
        slope = "n/a" if not math.isfinite(f.slope) else f"{f.slope:+.4g}"
        lines.append(f"{f.run:<22} {f.modules:<8} {f.n:>6} {slope:>10} {r:>9}")
    return "\n".join(lines)


def _model_of_runs(checkpoints: tuple[str, ...]) -> str | None:
    """The ``"model"`` a run's ``config.json`` names, so ``--model`` can be left out for a run folder."""
    for path in checkpoints:
        for folder in (Path(path), Path(path).parent.parent):
            try:
                config = json.loads((folder / "config.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
            # a run's config names its "method"; a model folder's config.json does not
            if isinstance(config, dict) and "method" in config and isinstance(config.get("model"), str):
                return config["model"]
    return None


def statistics(model: str | None, rows: list[DecompositionRow], checkpoints: tuple[str, ...], n_boot: int,
               seed: int) -> list[Verdict]:
    """The across-layer statistics of ``rows`` against random updates of the measured size (the null)."""
    base = BaseWeights(model)
    modules = list(dict.fromkeys(r.module for r in rows))
    ranks = adapter_ranks(c for path in checkpoints for c in discover_checkpoints(path)[:1])
    null = random_update_rows({m: base.rows(m) for m in modules}, rows, ranks, seed=seed)
    usable = [r for r in rows if r.step != 0 and r.layer is not None]
    if len({r.layer for r in usable}) < 3 or len(usable) == 0:
        raise ValueError("the across-layer statistics need snapshots (step > 0) of at least 3 layers")
    return compare_to_null(rows, null, n_boot=n_boot, seed=seed)


def run(args: AnalyzeArgs) -> tuple[list[DecompositionRow], list[Verdict]]:
    """Measure, then write ``decomposition.{csv,json}``, ``decomposition_stats.csv`` and the figures."""
    model = args.model if args.model is not None else _model_of_runs(args.checkpoints)
    rows = analyze(model, args.checkpoints, args.modules, list(args.labels) or None)
    out = Path(args.output_dir)
    verdicts: list[Verdict] = []
    trained = [r for r in rows if r.step != 0 and r.layer is not None]
    if args.bootstrap and len({r.layer for r in trained}) >= 3:
        verdicts = statistics(model, rows, args.checkpoints, args.bootstrap, args.seed)
        write_stats_csv(verdicts, out / "decomposition_stats.csv")
        plot_statistics(verdicts, out / "decomposition_stats.png")
    write_csv(rows, out / "decomposition.csv")
    write_json(rows, out / "decomposition.json",
               {"model": model, "modules": args.modules, "checkpoints": list(args.checkpoints),
                "statistics": verdicts_json(verdicts), "bootstrap": args.bootstrap, "seed": args.seed})
    if any(r.step != 0 for r in rows):
        plot_scatter(rows, out / "decomposition_scatter.png", color_by=args.color_by)
    if any(r.layer is not None for r in rows):
        plot_layers(rows, out / "decomposition_layers.png")
    return rows, verdicts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        rows, verdicts = run(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"torchdora analyze: error: {err}", file=sys.stderr)
        return 2
    print(format_fits(fit_rows(rows)))
    if verdicts:
        print("\ncorrelations of ΔM on ΔD with 95 % bootstrap intervals over layers, against random updates of the "
              "measured size (null);\npooled = over all layers × snapshots, within/spearman = across layers within "
              "each snapshot, partial = step-centred\n" + format_verdicts(verdicts))
    print(f"{len(rows)} measurements written to {args.output_dir}/decomposition.csv, .json and figures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
