"""Rank → relative weight error → test accuracy of a DoRA adapter's LoRA approximation (``torchdora export-lora``)
loaded in plain PEFT, beside the exact DoRA adapter's accuracy on the same test examples (paired).

For each rank R the adapter is exported with :func:`torchdora.app.export.lora.export_lora` (the command's own code),
loaded with ``peft.PeftModel.from_pretrained`` on a fresh base, and scored with the project's multiple-choice scorer
(:func:`torchdora.app.evaluate.score_options`). The difference to the exact adapter is the mean over examples of
``correct_R − correct_DoRA`` with its 95 % Student-t interval (:func:`torchdora.analysis.stats.paired_difference`;
paired over examples, so the examples both get right or both get wrong cancel). Writes a CSV (docs/data/) and
prints the table.

    python experiments/export_lora_accuracy.py --adapter runs/main/adapter --ranks 1 4 16 64 192 --max-errors 0.1 \
        --max-eval 400
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import time
from pathlib import Path

from torchdora.analysis.stats import describe_difference, paired_difference
from torchdora.files import atomic_write_bytes

COLUMNS = ["variant", "rank", "max_error", "lora_parameters", "file_bytes", "export_seconds",
           "overall_relative_error", "max_layer_error", "mean_layer_error", "accuracy", "n", "diff_vs_dora", "diff_low",
           "diff_high", "only_lora_right", "only_dora_right", "verdict"]


def write_csv(rows: list[dict], out: str) -> str:
    """The rows as CSV at ``out`` (atomically, after every variant, so an interrupted run keeps what it measured)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buffer.getvalue().encode())
    return buffer.getvalue()


def correct(model, tokenizer, examples, max_length: int) -> list[float]:
    """1.0 where the gold option alone has the highest log-likelihood (ties count as wrong, as in evaluate)."""
    from torchdora.app.evaluate import score_options

    out = []
    for example, scores in zip(examples, score_options(model, tokenizer, examples, max_length)):
        best = max(scores)
        gold = example.options.index(example.completion)
        out.append(float(scores[gold] == best and scores.count(best) == 1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default="runs/main/adapter")
    p.add_argument("--ranks", type=int, nargs="*", default=[4, 16, 64])
    p.add_argument("--max-errors", type=float, nargs="*", default=[],
                   help="also export with --max-error E (a rank per layer) for each E")
    p.add_argument("--max-eval", type=int, default=100, help="test examples (a fixed prefix of the split)")
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--work", default="runs/export-lora", help="folder for the exported adapters")
    p.add_argument("--out", default="docs/data/export_lora_ranks.csv")
    args = p.parse_args(argv)

    import torch
    from peft import PeftModel

    import torchdora
    from torchdora.app.assets import load_model_and_tokenizer, model_for_adapter
    from torchdora.app.data import load_dataset
    from torchdora.app.export.lora import REPORT_FILE, ExportLoraConfig, export_lora

    torch.manual_seed(0)
    adapter = Path(args.adapter)
    run_config = adapter.parent / "config.json"  # a torchdora run folder: test on the run's own held-out split
    seed = json.loads(run_config.read_text()).get("seed", 0) if run_config.is_file() else 0
    data = json.loads(run_config.read_text()).get("data") if run_config.is_file() else None
    examples = load_dataset(data, seed=seed, max_eval=args.max_eval).test
    base, tokenizer = load_model_and_tokenizer(model_for_adapter(None, str(adapter)))

    rows = []
    exact = correct(torchdora.load_model(str(adapter), base=copy.deepcopy(base)), tokenizer, examples, args.max_length)
    rows.append({"variant": "DoRA (exact)", "file_bytes": sum(f.stat().st_size for f in adapter.glob("*.safetensors")),
                 "accuracy": sum(exact) / len(exact), "n": len(exact)})
    print(f"DoRA (exact): accuracy {rows[-1]['accuracy']:.3f} on {len(exact)} test examples", flush=True)
    variants = [("rank", r) for r in args.ranks] + [("max_error", e) for e in args.max_errors]
    for option, value in variants:
        folder = Path(args.work) / f"{option}-{value}"
        start = time.perf_counter()
        export_lora(ExportLoraConfig(adapter=str(adapter), output=str(folder), overwrite=True, **{option: value}),
                    log=lambda *_: None)
        seconds = time.perf_counter() - start
        report = json.loads((folder / REPORT_FILE).read_text())
        model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        values = correct(model, tokenizer, examples, args.max_length)
        diff = paired_difference(values, exact)
        layers = report["layers"].values()
        errors = [layer["relative_error"] for layer in layers]
        ranks = sorted({layer["rank"] for layer in layers})
        verdict = describe_difference(diff)
        rows.append({"variant": "LoRA (export-lora)", "rank": value if option == "rank" else f"{ranks[0]}-{ranks[-1]}",
                     "max_error": value if option == "max_error" else "", "lora_parameters": report["parameters"],
                     "file_bytes": (folder / "adapter_model.safetensors").stat().st_size,
                     "export_seconds": round(seconds, 1), "overall_relative_error": report["overall_relative_error"],
                     "max_layer_error": max(errors), "mean_layer_error": sum(errors) / len(errors),
                     "accuracy": sum(values) / len(values), "n": len(values), "diff_vs_dora": diff.estimate,
                     "diff_low": diff.low, "diff_high": diff.high,
                     "only_lora_right": sum(v > e for v, e in zip(values, exact)),
                     "only_dora_right": sum(e > v for v, e in zip(values, exact)), "verdict": verdict.split(", ")[-1]})
        print(f"{option} {value}: overall error {report['overall_relative_error']:.3f}, accuracy "
              f"{rows[-1]['accuracy']:.3f}, vs DoRA {verdict}", flush=True)
        write_csv(rows, args.out)
        del model

    print(write_csv(rows, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
