"""DoRA at LoRA's cost? torchdora-DoRA vs torchdora-LoRA vs PEFT-DoRA, side by side in one process.

    .venv/bin/python benchmarks/run.py            # full grid on CPU, fp32; writes docs/benchmarks.md
    .venv/bin/python benchmarks/run.py --quick    # two small shapes, one repeat: a smoke run
    python benchmarks/run.py --device cuda --dtype bfloat16 --output $OUT/benchmarks_gpu.md

Three measurements, each one a median over repeats with the methods interleaved inside every repeat (in a
rotating order) so that noise from other processes hits all methods alike:

1. one adapted linear layer, forward + backward (input gradient included, as inside a network);
2. a whole-model training step (loss, backward, AdamW step) on the SmolLM2-135M architecture with random
   weights, adapters on q, k, v, up, down;
3. the same model's unmerged eval forward.

Peak memory: on CPU, the allocator's allocation and free events recorded by ``torch.profiler`` with
``profile_memory=True`` during one extra step, replayed in time order; the peak of the running sum is the
most memory the step held on top of what existed before it (activations, gradients, temporaries). On CUDA,
``torch.cuda.max_memory_allocated`` minus the allocation before the step. Whole-model rows also give the peak
including everything resident (weights, optimizer state). This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from torchdora import AdapterLayer, DoraConfig, inject
from torchdora.files import atomic_write_bytes
from torchdora.layers import LinearAdapter

METHODS = ("dora", "lora", "peft-dora")
SHAPES = [(576, 576), (576, 1536), (2048, 2048), (4096, 4096), (4096, 11008)]  # (in, out)
RANKS = [8, 16, 64]
TOKENS = [512, 2048]
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
#: targets whose output no later op keeps in this architecture (up_proj's is kept by the gated product), and whose
#: recomputed product is cheap per byte saved: the cost per byte is in_features, 576 here against down_proj's 1536
RECOMPUTE = ["q_proj", "k_proj", "v_proj"]


@dataclasses.dataclass
class Row:
    what: str
    seconds: dict[str, float]
    peak: dict[str, int]
    total_peak: dict[str, int] | None = None
    #: every repeat's times by clock (``"wall"``, ``"cpu"``: :func:`interleaved_clocks`), for ratio intervals
    clocks: dict[str, dict[str, list[float]]] | None = None
    #: a variant in ``clocks`` that runs the same computation as this row's DoRA: their ratio is a null baseline
    same_as: str | None = None


# ---- measuring ---------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int, warmup: int,
                        device: torch.device, budget_s: float = 0.0) -> dict[str, float]:
    """Median wall time of each function; every repeat runs all of them, starting from a rotating one.

    With ``budget_s``, cheap rows get more repeats (up to 5× ``repeats``) until about that much time is spent.
    """
    times = interleaved_clocks(fns, repeats, warmup, device, budget_s)["wall"]
    return {n: statistics.median(t) for n, t in times.items()}


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The median of ``values`` and a distribution-free ``level`` interval for it (order statistics: the
    ranks ``j < k`` with ``P(j ≤ Binomial(n, ½) < k) ≥ level``; the whole range when ``n`` is too small)."""
    xs, n = sorted(values), len(values)
    cdf, total, j = [], 0.0, 0
    for i in range(n + 1):
        total += math.comb(n, i) / 2 ** n
        cdf.append(total)
    while j + 1 < n - j - 2 and cdf[n - j - 2] - cdf[j + 1] >= level:
        j += 1  # narrow symmetrically while the coverage holds: [x_(j+1), x_(n-j)] (1-based)
    return statistics.median(xs), xs[j], xs[n - 1 - j]


def interleaved_clocks(fns: dict[str, Callable[[], None]], repeats: int, warmup: int,
                       device: torch.device, budget_s: float = 0.0) -> dict[str, dict[str, list[float]]]:
    """Every repeat's times of each row by two clocks: ``"wall"`` (``time.perf_counter``) and ``"cpu"`` (this
    process's CPU time, ``time.process_time``: on a CPU shared with other work it leaves out the time the
    process waited for a core, but not what it lost to shared caches and memory bandwidth). Repeat ``i`` of
    each row ran side by side; see :func:`interleaved_medians`."""
    names = list(fns)
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    i = 0
    while True:
        if i >= warmup + repeats:
            spent = sum(sum(t) for t in times["wall"].values())
            per_repeat = spent / max(1, i - warmup)
            if i >= warmup + 5 * repeats or spent + per_repeat > budget_s:
                break
        k = i % len(names)
        gc.collect()  # once per repeat, outside the timed region (a full collection takes tens of ms)
        for name in names[k:] + names[:k]:
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            _sync(device)
            if i >= warmup:
                times["wall"][name].append(time.perf_counter() - start)
                times["cpu"][name].append(time.process_time() - start_cpu)
        i += 1
    return times


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Most bytes held during ``fn`` on top of what was allocated before it (see the module doc)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()  # > 0 allocation, < 0 free
        peak = max(peak, running)
    return peak


def resident_bytes(*objects) -> int:
    """Bytes of the distinct tensors reachable from modules/optimizers (weights, gradients, optimizer state)."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    for obj in objects:
        if isinstance(obj, nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                add(t)
                add(t.grad)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for t in state.values():
                    add(t)
    return sum(seen.values())


# ---- per layer ---------------------------------------------------------------------------------------------------
class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def peft_dora(module: nn.Module, targets: list[str], r: int, alpha: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    # autocast_adapter_dtype=False: adapter weights in the base dtype, as torchdora's here (PEFT would upcast to fp32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_dora=True)
    return get_peft_model(module, config, autocast_adapter_dtype=False)


def layer_models(in_f: int, out_f: int, r: int, device, dtype) -> dict[str, nn.Module]:
    """The three methods around copies of one random ``nn.Linear`` (no bias, as in Llama), same A, B, m."""
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=False).to(device, dtype)
    dora = _Holder(LinearAdapter(copy.deepcopy(base), r=r, alpha=2.0 * r, dtype=dtype))
    with torch.no_grad():
        dora.proj.lora_B.normal_(std=0.02)  # trained-looking B (B = 0 would be a special case for nobody)
        dora.proj.magnitude.copy_(dora.proj.row_norm().to(dtype))
    lora = _Holder(LinearAdapter(copy.deepcopy(base), r=r, alpha=2.0 * r, dtype=dtype, use_dora=False))
    peft = peft_dora(_Holder(copy.deepcopy(base)), ["proj"], r, 2.0 * r)
    with torch.no_grad():
        for model in (lora, peft):
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.copy_(dora.proj.lora_A)
                elif "lora_B" in name:
                    p.copy_(dora.proj.lora_B)
                elif "lora_magnitude_vector" in name:
                    p.copy_(dora.proj.magnitude)
    return {"dora": dora, "lora": lora, "peft-dora": peft}


def bench_layer(in_f: int, out_f: int, r: int, tokens: int, repeats: int, device, dtype,
                budget_s: float = 0.0) -> Row:
    models = layer_models(in_f, out_f, r, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, in_f, device=device, generator=gen).to(dtype).requires_grad_(True)
    g = torch.randn(tokens, out_f, device=device, generator=gen).to(dtype)

    def step(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            model(x).backward(g)
            x.grad = None
            for p in model.parameters():
                p.grad = None
        return run

    fns = {name: step(m) for name, m in models.items()}
    seconds = interleaved_medians(fns, repeats, warmup=1, device=device, budget_s=budget_s)
    peak = {name: peak_bytes(fn, device) for name, fn in fns.items()}
    return Row(f"{in_f}×{out_f} r={r} tokens={tokens}", seconds, peak)


# ---- whole model -------------------------------------------------------------------------------------------------
#: Llama shapes of the whole-model rows: (hidden, intermediate, heads, kv heads, vocab); embeddings tied
MODEL_SHAPES = {
    "smollm2-135m": (576, 1536, 9, 3, 49152),  # the embedded model, the one ``torchdora train`` fine-tunes
    "4096-wide": (4096, 14336, 32, 8, 32000),  # a Llama-3-8B block (hidden 4096, intermediate 14336, 32/8 heads)
}


def llama_architecture(shape: str, layers: int, device, dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, heads, kv_heads, vocab = MODEL_SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype)


def smollm2_architecture(layers: int, device, dtype) -> nn.Module:
    return llama_architecture("smollm2-135m", layers, device, dtype)


def recompute_as_cli(model: nn.Module) -> list[str]:
    """What ``torchdora train --recompute auto`` (the default) does after injecting DoRA: one 16-token probe forward
    decides which layers recompute ``x Wᵀ`` in backward (:func:`torchdora.recompute.choose_recompute`)."""
    from torchdora.recompute import choose_recompute

    probe = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(4))
    probe = probe.to(next(model.parameters()).device)
    model.train()
    return choose_recompute(model, lambda: model(input_ids=probe, labels=probe).loss)


def model_variants(base: nn.Module, r: int, fixed_recompute: bool = True) -> dict[str, nn.Module]:
    """DoRA as ``torchdora train`` runs it (``--recompute auto``: :func:`torchdora.recompute.choose_recompute` on a
    16-token probe), DoRA keeping every output, DoRA recomputing ``RECOMPUTE``, LoRA and PEFT-DoRA, on copies of
    ``base`` (the last variant gets ``base`` itself) with the same trained-looking ``B``; ``fixed_recompute=False``
    leaves out the ``RECOMPUTE`` variant (one copy of the model less)."""
    configs = {
        "dora": DoraConfig(target_modules=TARGETS, r=r, alpha=2.0 * r, dtype=None),
        "dora-keep": DoraConfig(target_modules=TARGETS, r=r, alpha=2.0 * r, dtype=None),
        "dora-recompute": DoraConfig(target_modules=TARGETS, r=r, alpha=2.0 * r, dtype=None,
                                     recompute_modules=RECOMPUTE),
        "lora": DoraConfig(target_modules=TARGETS, r=r, alpha=2.0 * r, dtype=None, use_dora=False),
    }
    if not fixed_recompute:
        del configs["dora-recompute"]
    models = {name: copy.deepcopy(base) for name in configs}
    for name, config in configs.items():
        inject(models[name], config)
    models["peft-dora"] = peft_dora(base, TARGETS, r, 2.0 * r)
    recompute_as_cli(models["dora"])
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # trained-looking B, the same in all of them
        for model in models.values():
            for name, p in model.named_parameters():
                if name.endswith("lora_B") or name.endswith("lora_B.default.weight"):
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))
            gen.manual_seed(2)
    return models


def recomputing(model: nn.Module) -> list[str]:
    """The short names of the DoRA layers that recompute their product (e.g. ``['k_proj', 'q_proj', 'v_proj']``)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, AdapterLayer) and m.recompute_output})


def bench_model(shape: str, layers: int, batch: int, seq: int, r: int, repeats: int, device,
                dtype) -> tuple[Row, ...]:
    """Training steps as ``torchdora train`` takes them (its loss, :func:`torchdora.app.train.run.compute_loss`,
    on every token), all variants timed in the same interleaved repeats; and the unmerged eval forward.

    Returns the rows of DoRA as the CLI runs it (``--recompute auto``), DoRA keeping every output, DoRA with
    ``recompute_modules=RECOMPUTE`` (only for the SmolLM2 shape: the 4096-wide model takes ~2.3 GB per copy), and
    the eval forward; LoRA and PEFT-DoRA are the same in all of them."""
    from torchdora.app.train.run import compute_loss

    models = model_variants(llama_architecture(shape, layers, device, dtype), r,
                            fixed_recompute=shape == "smollm2-135m")
    ids = torch.randint(0, models["lora"].config.vocab_size, (batch, seq),
                        generator=torch.Generator().manual_seed(3)).to(device)
    batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models.items()}

    def train_step(name: str) -> Callable[[], None]:
        model, opt = models[name], opts[name]

        def run() -> None:
            model.train()
            compute_loss(model, batch_)[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    def eval_forward(name: str) -> Callable[[], None]:
        model = models[name]

        def run() -> None:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        return run

    train = {n: train_step(n) for n in models}
    clocks = interleaved_clocks(train, repeats, warmup=1, device=device)
    seconds = {n: statistics.median(t) for n, t in clocks["wall"].items()}
    peak = {n: peak_bytes(fn, device) for n, fn in train.items()}
    total = {n: peak[n] + resident_bytes(models[n], opts[n]) for n in models}
    what = f"{shape}, {layers} layers, training step, {batch}×{seq} tokens, r={r}"

    def as_dora(variant: str) -> list:  # the row of one DoRA variant: its numbers under the "dora" key
        return [*({**v, "dora": v[variant]} for v in (seconds, peak, total)),
                {c: {**t, "dora": t[variant]} for c, t in clocks.items()}]

    same = "dora-recompute" if "dora-recompute" in models and recomputing(models["dora"]) == sorted(RECOMPUTE) else None
    rows = [Row(f"{what}, DoRA as `torchdora train` runs it (recompute auto: {','.join(recomputing(models['dora']))})",
                seconds, peak, total, clocks, same),
            Row(f"{what}, DoRA keeping every output", *as_dora("dora-keep"))]
    if "dora-recompute" in models:
        rows.append(Row(f"{what}, DoRA with recompute_modules={','.join(RECOMPUTE)}", *as_dora("dora-recompute")))
    evals = {n: eval_forward(n) for n in ("dora", "lora", "peft-dora")}  # recompute changes backward only
    clocks = interleaved_clocks(evals, repeats, warmup=1, device=device)
    seconds = {n: statistics.median(t) for n, t in clocks["wall"].items()}
    peak = {n: peak_bytes(fn, device) for n, fn in evals.items()}
    total = {n: peak[n] + resident_bytes(models[n]) for n in evals}
    eval_row = Row(f"{shape}, {layers} layers, unmerged eval forward, {batch}×{seq} tokens, r={r}", seconds, peak,
                   total, clocks)
    return (*rows, eval_row)


# ---- report ------------------------------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def table(rows: list[Row], total: bool = False) -> list[str]:
    head = ("| what | DoRA ms | LoRA ms | PEFT-DoRA ms | time DoRA/LoRA | time DoRA/PEFT | "
            "peak MiB DoRA | LoRA | PEFT | mem DoRA/LoRA | mem DoRA/PEFT |")
    if total:
        head += " total MiB DoRA | LoRA | PEFT | total DoRA/LoRA | total DoRA/PEFT |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        s, p = row.seconds, row.peak
        line = (f"| {row.what} | {s['dora'] * 1e3:.1f} | {s['lora'] * 1e3:.1f} | {s['peft-dora'] * 1e3:.1f} | "
                f"{_ratio(s['dora'], s['lora'])} | {_ratio(s['dora'], s['peft-dora'])} | "
                f"{_mib(p['dora'])} | {_mib(p['lora'])} | {_mib(p['peft-dora'])} | "
                f"{_ratio(p['dora'], p['lora'])} | {_ratio(p['dora'], p['peft-dora'])} |")
        if total and row.total_peak:
            t = row.total_peak
            line += (f" {_mib(t['dora'])} | {_mib(t['lora'])} | {_mib(t['peft-dora'])} | "
                     f"{_ratio(t['dora'], t['lora'])} | {_ratio(t['dora'], t['peft-dora'])} |")
        out.append(line)
    return out


def verdicts(layer_rows: list[tuple[tuple[int, int, int, int], Row]], model_rows: dict[str, list[Row]]) -> list[str]:
    """The targets, each judged from the numbers above (CPU fp32 targets; on other setups informative only)."""
    lines = []

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    for shape, (default, keep, *_) in model_rows.items():
        for train, label in ((default, "DoRA as `torchdora train` runs it"), (keep, "DoRA keeping every output")):
            m = train.total_peak["dora"] / train.total_peak["lora"]
            ma = train.peak["dora"] / train.peak["lora"]
            if train.same_as and train.clocks:
                null = [d / v for d, v in zip(train.clocks["wall"]["dora"], train.clocks["wall"][train.same_as])]
                lines.append(f"- {shape} null baseline: DoRA as `torchdora train` runs it / DoRA with recompute_modules="
                             f"{','.join(RECOMPUTE)}, the same computation: wall {ratio_summary(null)} (the spread "
                             "of a ratio of equals in this run)")
            lines.append(f"- {shape} training step ({label}) DoRA/LoRA time ≤ 1.10: {judged_time(train, 1.10)}; "
                         f"peak memory ≤ 1.05: {m:.3f} including weights and optimizer state → "
                         f"{verdict(m <= 1.05)}, {ma:.3f} counting only what the step allocates → {verdict(ma <= 1.05)}")
    big = [(k, row) for k, row in layer_rows if k[3] >= 2048]
    if big:
        worst_key, worst = max(big, key=lambda kr: kr[1].seconds["dora"] / kr[1].seconds["lora"])
        w = worst.seconds["dora"] / worst.seconds["lora"]
        lines.append(f"- Per layer DoRA/LoRA time ≤ 1.15 at ≥ 2048 tokens on every shape: worst {w:.2f} "
                     f"({worst.what}) → {verdict(w <= 1.15)}")
    wide = [(k, row) for k, row in layer_rows if k[0] >= 4096]
    if wide:
        slowest = min(row.seconds["peft-dora"] / row.seconds["dora"] for _, row in wide)
        ceiling = min(row.seconds["peft-dora"] / row.seconds["lora"] for _, row in wide)
        lines.append(f"- ≥ 2× faster than PEFT-DoRA on the 4096-wide shapes: smallest speed-up {slowest:.2f}× "
                     f"→ {verdict(slowest >= 2.0)} (LoRA itself is only {ceiling:.2f}× faster than PEFT-DoRA on the least "
                     "favourable of these rows: all three share the frozen base's products, which dominate)")
    for shape, rows in model_rows.items():
        lines.append(f"- {shape} unmerged eval forward DoRA/LoRA ≤ 1.05: {judged_time(rows[-1], 1.05)}")
    return lines


def judged_time(row: Row, target: float) -> str:
    """A whole-model row's DoRA/LoRA time ratio against ``target``, repeat by repeat, by wall and by CPU time
    (:func:`ratio_summary`)."""
    ratios = {c: [d / l for d, l in zip(t["dora"], t["lora"])] for c, t in row.clocks.items()}
    return f"wall {ratio_summary(ratios['wall'], target)}; CPU time {ratio_summary(ratios['cpu'], target)}"


#: fewest repeats whose range covers the median with 95 % (1 − 2·2⁻ⁿ ≥ 0.95 from n = 6)
MIN_INTERVAL_REPEATS = 6


def ratio_summary(ratios: list[float], target: float | None = None, digits: int = 2) -> str:
    """Per-repeat ratios as ``median [95 % interval]`` and, against ``target``: **met** (the interval below it),
    **not met** (above) or not distinguishable. Under :data:`MIN_INTERVAL_REPEATS` repeats no interval reaches
    95 %: the median alone, with no verdict."""
    median, low, high = median_interval(ratios)
    if len(ratios) < MIN_INTERVAL_REPEATS:
        return f"{median:.{digits}f} (median of {len(ratios)}: too few repeats for a 95 % interval, no verdict)"
    text = f"{median:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    if target is None:
        return text
    if high <= target:
        return f"{text} → **met**"
    if low > target:
        return f"{text} → **not met** (target ≤ {target:.2f})"
    return f"{text} → not distinguishable from the target {target:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes, rank 8/64, one repeat, 4-layer model")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 3; quick 1)")
    parser.add_argument("--model-repeats", type=int, default=None,
                        help="timed repeats of the whole-model rows (default max(--repeats, 7); quick 1): a step "
                             "takes seconds and its time varies more from run to run than a layer's")
    parser.add_argument("--budget", type=float, default=8.0,
                        help="seconds of timed runs per layer row: cheap rows repeat more (up to 5× --repeats)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"))
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model rows")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer rows")
    parser.add_argument("--layers", type=int, default=None, help="depth of the SmolLM2 model (default 30, quick 4)")
    parser.add_argument("--wide-layers", type=int, default=2,
                        help="depth of the 4096-wide model, measured in the same run (0: skip it; quick: skipped)")
    parser.add_argument("--wide-seq", type=int, default=128, help="tokens per sequence of the 4096-wide rows")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    shapes = SHAPES[:2] if args.quick else SHAPES
    ranks = [8, 64] if args.quick else RANKS
    depth = args.layers or (4 if args.quick else 30)

    started = time.perf_counter()
    layer_rows: list[tuple[tuple[int, int, int, int], Row]] = []
    if not args.no_layers:
        for in_f, out_f in shapes:
            for r in ranks:
                for tokens in TOKENS:
                    row = bench_layer(in_f, out_f, r, tokens, repeats, device, dtype, args.budget)
                    layer_rows.append(((in_f, out_f, r, tokens), row))
                    print("\n".join(table([row])[2:]), flush=True)
    model_rows: dict[str, list[Row]] = {}
    model_repeats = args.model_repeats or (1 if args.quick else max(repeats, 7))
    models = [("smollm2-135m", depth, args.seq)]
    if args.wide_layers > 0 and not args.quick:
        models.append(("4096-wide", args.wide_layers, args.wide_seq))
    for shape, layers, seq in [] if args.no_model else models:
        model_rows[shape] = list(bench_model(shape, layers, args.batch, seq, 32, model_repeats, device, dtype))
        gc.collect()
        print("\n".join(table(model_rows[shape], total=True)[2:]), flush=True)
    elapsed = time.perf_counter() - started

    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    import peft

    lines = [
        "# Benchmarks: DoRA at LoRA's cost",
        "",
        f"Written by `{' '.join(['python', 'benchmarks/run.py'] + (argv if argv is not None else sys.argv[1:]))}` "
        f"in {elapsed / 60:.1f} min. Device: {machine}; dtype {args.dtype}; torch {torch.__version__}; "
        f"peft {peft.__version__}; medians of {repeats} to {5 * repeats} repeats per layer row (cheap rows repeat "
        f"more) and of {model_repeats} per whole-model row, after one warm-up, the methods interleaved in every "
        "repeat (rotating order).",
        "",
        "- **DoRA**: torchdora's default path (factored norm, cached `||W||²`, fused autograd function); in the "
        "whole-model rows, as `torchdora train` runs it: `--recompute auto` lets the layers whose output no later op "
        "keeps recompute `x Wᵀ` in backward (`torchdora.recompute.choose_recompute`, on a 16-token probe).",
        "- **LoRA**: torchdora with `use_dora=False` (the plain `base(x) + s·B(A(x))` composition, as in PEFT).",
        "- **PEFT-DoRA**: `peft.get_peft_model(..., LoraConfig(use_dora=True))` on the same module or model.",
        "- **DoRA keeping every output** / **DoRA with recompute_modules=...** (whole model only): the same model "
        "with no layer recomputing, or with the named ones (the library's default is to keep every output).",
        "",
        "Time: forward + backward of one layer (the input needs a gradient, as inside a network), or a whole training",
        "step. Peak memory: " + ("`torch.cuda.max_memory_allocated` during one step, minus what was allocated "
                                 "before it." if device.type == "cuda" else
                                 "one extra step under `torch.profiler` with `profile_memory=True`; its allocation "
                                 "and free events are replayed in time order and the peak of the running sum is the "
                                 "most the step held on top of what existed before it."),
        "For the whole model, *total* adds the resident weights, gradients and AdamW state to that peak; the step is "
        "`torchdora train`'s (its loss, `compute_loss`, on every token), the variants interleaved in every repeat.",
        "Random weights (timings do not depend on values); `B` is set to small random values in all methods.",
        "",
    ]
    if layer_rows:
        lines += ["## One linear layer (in × out), forward + backward", ""] + table([r for _, r in layer_rows]) + [""]
    for shape, rows in model_rows.items():
        hidden, intermediate, heads, kv_heads, vocab = MODEL_SHAPES[shape]
        lines += [f"## Whole model: {shape} (Llama, hidden {hidden}, intermediate {intermediate}, {heads}/{kv_heads} "
                  f"heads, vocab {vocab}, tied), adapters on {', '.join(TARGETS)}", ""]
        lines += table(rows, total=True) + [""]
    if device.type == "cpu" and dtype == torch.float32:
        lines += ["## Targets (CPU, fp32, medians)", ""] + verdicts(layer_rows, model_rows) + [""]
    else:
        lines += ["## Ratios against the CPU targets (informative: the targets are stated for CPU fp32)", ""]
        lines += verdicts(layer_rows, model_rows) + [""]
    text = "\n".join(lines)
    print(text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, text.encode())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
