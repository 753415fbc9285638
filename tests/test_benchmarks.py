"""The benchmark script runs end to end (tiny sizes) and writes every table and verdict; it measures nothing here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_benchmark(script: str = "run"):
    """``benchmarks/<script>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"torchdora_benchmark_{script}", REPO / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_writes_layer_model_and_target_rows(tmp_path):
    bench = _load_benchmark()
    out = tmp_path / "bench.md"
    assert bench.main(["--quick", "--layers", "1", "--batch", "1", "--seq", "8", "--budget", "0",
                       "--output", str(out)]) == 0
    text = out.read_text()
    layer_rows = [line for line in text.splitlines() if line.startswith("| 576×")]
    assert len(layer_rows) == 8  # two shapes × ranks 8, 64 × 512, 2048 tokens
    assert "| smollm2-135m, 1 layers, training step, 1×8 tokens, r=32, DoRA as `torchdora train` runs it" in text
    assert "| smollm2-135m, 1 layers, training step, 1×8 tokens, r=32, DoRA keeping every output |" in text
    assert f"DoRA with recompute_modules={','.join(bench.RECOMPUTE)} |" in text
    assert "| smollm2-135m, 1 layers, unmerged eval forward" in text
    verdicts = [line for line in text.splitlines() if line.startswith("- ") and "→ **" in line]
    assert len(verdicts) == 3  # whole model ×2 (their memory), per layer (no 4096-wide model in --quick)
    # one repeat per whole-model row: its time ratios get no interval and no verdict
    eval_line = next(line for line in text.splitlines() if line.startswith("- smollm2-135m unmerged eval forward"))
    assert "too few repeats for a 95 % interval, no verdict" in eval_line and "→" not in eval_line


def test_whole_model_rows_of_the_wide_shape_and_the_cli_recompute_choice(tmp_path, monkeypatch):
    """The 4096-wide model's rows are written beside the SmolLM2 ones (shrunk here), and the default DoRA variant
    recomputes what ``torchdora train --recompute auto`` would."""
    bench = _load_benchmark()
    monkeypatch.setitem(bench.MODEL_SHAPES, "4096-wide", (64, 224, 4, 2, 500))  # the real one needs ~12 GB
    monkeypatch.setitem(bench.MODEL_SHAPES, "smollm2-135m", (36, 96, 3, 1, 500))
    out = tmp_path / "bench.md"
    assert bench.main(["--no-layers", "--layers", "1", "--wide-layers", "1", "--batch", "1", "--seq", "8",
                       "--wide-seq", "8", "--model-repeats", "1", "--output", str(out)]) == 0
    text = out.read_text()
    assert "recompute auto: k_proj,q_proj,v_proj)" in text  # what the CLI picks for a Llama block
    for shape in ("smollm2-135m", "4096-wide"):
        assert f"## Whole model: {shape}" in text
        assert sum(line.startswith(f"- {shape} training step") for line in text.splitlines()) == 2


def test_gpu_benchmark_runs_at_tiny_sizes_on_cpu(tmp_path):
    """benchmarks/gpu.py (the device run's script) at tiny sizes: every row and target line is written."""
    module = _load_benchmark("gpu")
    out = tmp_path / "gpu.md"
    assert module.main(["--quick", "--device", "cpu", "--dtype", "float32", "--no-nf4", "--output", str(out)]) == 0
    text = out.read_text()
    assert sum(line.startswith("| 64×") for line in text.splitlines()) == 4  # 2 shapes × 2 token counts
    for method in ("dora", "lora", "peft-dora"):
        assert f"| {method} | " in text
    targets = [line for line in text.splitlines() if line.startswith("- ") and "→ **" in line]
    assert len(targets) == 4 + 4  # whole-model checks + one per layer row


def test_ratio_summary_judges_from_the_interval():
    """Met only when the whole 95 % interval is below the target, not met when it is all above, else not
    distinguishable; fewer than 6 repeats give no verdict (their range covers the median with < 95 %)."""
    bench = _load_benchmark()
    assert "**met**" in bench.ratio_summary([0.9, 0.95, 1.0, 1.02, 1.05, 1.08], 1.10)
    assert "**not met**" in bench.ratio_summary([1.2, 1.25, 1.3, 1.22, 1.21, 1.28], 1.10)
    assert "not distinguishable" in bench.ratio_summary([1.0, 1.05, 1.08, 1.12, 1.15, 1.2], 1.10)
    assert "no verdict" in bench.ratio_summary([0.5, 0.6, 0.7, 0.8, 0.9], 1.10)
    median, low, high = bench.median_interval([float(i) for i in range(1, 16)])
    assert (median, low, high) == (8.0, 4.0, 12.0)  # n = 15: ranks 4 and 12 (P = 0.965 ≥ 0.95)


def test_decode_benchmark_runs_and_checks_its_tokens(tmp_path):
    """One repeat of the eager decoding rows on a one-block random model: every token check holds, and the
    bandwidth floor is the bytes the parameters' names say a step reads (the base once, each adapter read)."""
    decode = _load_benchmark("decode")
    out = tmp_path / "decode.md"
    assert decode.main(["--random-init", "1", "--repeats", "1", "--tokens", "2", "--output", str(out)]) == 0
    text = out.read_text()
    checks = [line for line in text.splitlines() if "generate the same" in line or "equal each adapter" in line]
    assert len(checks) == 3 and all(line.endswith(": True") for line in checks)
    assert "| DoRA unmerged / LoRA unmerged, batch 1 |" in text and "bandwidth floor of" in text

    import torch

    model = decode.with_adapters(_load_benchmark().smollm2_architecture(1, "cpu", torch.float32), 16, 8)
    named = dict(model.named_parameters())  # a tied embedding once
    base = sum(p.nbytes for n, p in named.items() if ".adapters." not in n)
    per = {a: sum(p.nbytes for n, p in named.items() if f".adapters.{a}." in n) for a in ("lora", "mix0", "mix7")}
    assert decode.weight_bytes(model, ["lora"]) == base + per["lora"]
    assert decode.weight_bytes(model, ["mix0", "mix7", "mix0"]) == base + per["mix0"] + per["mix7"]
