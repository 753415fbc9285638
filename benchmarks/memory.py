"""Memory of a training step on a low-precision base: fp32 / bf16 / NF4 weights, with and without gradient
checkpointing, torchdora-DoRA vs torchdora-LoRA vs PEFT-DoRA, side by side in one process.

    .venv/bin/python benchmarks/memory.py --output docs/memory-measured.md    # embedded SmolLM2-135M, 8×96 tokens
    .venv/bin/python benchmarks/memory.py --quick --output /tmp/m.md          # tiny random Llama: a smoke run

The model is the one ``torchdora train`` fine-tunes by default (the embedded SmolLM2-135M-Instruct, loaded through
:func:`torchdora.app.assets.load_model_and_tokenizer` with ``--base-dtype`` / ``--quantize`` exactly as the CLI
does), one default training micro-batch (8 sequences × 96 tokens, every token a target), adapters r = 16,
alpha = 32 on q, k, v, up, down (fp32 adapters, the default). The step is the CLI's: its loss
(:func:`torchdora.app.train.run.compute_loss`), and for DoRA its default ``--recompute auto`` choice (off under
gradient checkpointing, as in the CLI). For each base (fp32, bf16, NF4 with bf16 compute; see ``BASES``) the three
methods are loaded together and their steps (loss, backward, AdamW) interleaved in every repeat
(``benchmarks/run.py``'s helpers); then gradient checkpointing (non-reentrant) is switched on for all three and the
same is done again.

Columns: ``step`` is what the step allocates on top of what existed before it (activations, gradients,
temporaries; the CPU allocator's events replayed from ``torch.profiler``, exact, not sampled), ``resident`` the
weights, gradients and optimizer state held between steps, ``peak`` their sum. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import platform
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from torchdora import DoraConfig, inject
from torchdora.io import atomic_write_bytes

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
#: (label, --base-dtype, --quantize): how ``torchdora train`` would load the base
BASES = [("fp32", "float32", None), ("bf16", "bfloat16", None), ("nf4 (bf16 compute)", "bfloat16", "nf4")]
METHODS = ("dora", "lora", "peft-dora")


sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402  (benchmarks/run.py: interleaved timing, peak memory, tables)


def tiny_llama_folder(folder: Path) -> Path:
    """A 2-layer random Llama (hidden 64) and a word-level tokenizer, saved like ``save_pretrained``: the
    ``--quick`` stand-in."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), bos_token="<s>",
                            eos_token="</s>", pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(model: str | None, base_dtype: str, quantize: str | None) -> nn.Module:
    from torchdora.app.assets import load_model_and_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model_and_tokenizer(model, dtype=base_dtype, quantize=quantize)[0]


def variants(model: str | None, base_dtype: str, quantize: str | None, r: int) -> dict[str, nn.Module]:
    """The three methods, each on its own freshly loaded base, with the same trained-looking ``B``."""
    from peft import LoraConfig, get_peft_model

    out: dict[str, nn.Module] = {}
    for name in METHODS:
        m = load(model, base_dtype, quantize)
        if name == "peft-dora":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = get_peft_model(m, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, use_dora=True))
        else:
            inject(m, DoraConfig(target_modules=TARGETS, r=r, alpha=2.0 * r, use_dora=name == "dora"))
            if name == "dora":
                bench.recompute_as_cli(m)  # torchdora train's default, --recompute auto
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if pname.endswith("lora_B") or pname.endswith("lora_B.default.weight"):
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))
        out[name] = m
    return out


def resident(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights (NF4: packed bytes and block scales), gradients and optimizer state, bytes."""
    total = bench.resident_bytes(model, optimizer)
    for module in model.modules():  # a 4-bit layer's scales live in its quant_state, not in parameters()
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if getattr(state, "state2", None) is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


def measure(models: dict[str, nn.Module], ids: torch.Tensor, repeats: int, checkpointing: bool) -> dict[str, dict]:
    from torchdora.app.assets import enable_gradient_checkpointing
    from torchdora.app.train.run import compute_loss

    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models.items()}
    for m in models.values():
        inner = m.get_base_model() if hasattr(m, "get_base_model") else m
        if checkpointing:
            enable_gradient_checkpointing(inner, "non-reentrant")
            for layer in inner.modules():  # as torchdora train: checkpointed blocks keep nothing, nothing to recompute
                if getattr(layer, "recompute_output", False):
                    layer.recompute_output = False
        elif any(getattr(m, "gradient_checkpointing", False) for m in inner.modules()):
            (getattr(inner, "activation_checkpointing_disable", None) or inner.gradient_checkpointing_disable)()
        m.train()

    def step(name: str) -> Callable[[], None]:
        model, opt = models[name], opts[name]

        def run() -> None:
            compute_loss(model, batch)[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    fns = {n: step(n) for n in models}
    device = torch.device("cpu")
    seconds = bench.interleaved_medians(fns, repeats, warmup=1, device=device)
    rows = {}
    for n, fn in fns.items():
        peak = bench.peak_bytes(fn, device)
        rows[n] = {"seconds": seconds[n], "step": peak, "resident": resident(models[n], opts[n])}
    return rows


# ---- the formula: what a step needs on a Llama of a given shape --------------------------------------------------
#: (layers, hidden, intermediate, heads, kv heads, vocab, tied embeddings) of public Llama shapes
SHAPES = {
    "SmolLM2-135M": (30, 576, 1536, 9, 3, 49152, True),
    "Llama-3.2-1B": (16, 2048, 8192, 32, 8, 128256, True),
    "Llama-3.1-8B": (32, 4096, 14336, 32, 8, 128256, False),
    "Llama-3.1-70B": (80, 8192, 28672, 64, 8, 128256, False),
}
#: bytes per weight: NF4 is 4 bits plus one 8-bit scale per 64 weights plus one fp32 scale per 256 scales
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}


def estimate(shape: str, base: str, method: str, tokens: int, checkpointing: bool, r: int = 16) -> dict[str, float]:
    """Bytes of a training step, from the shape alone (adapters on q, k, v, up, down; fp32 adapters and AdamW).

    - weights: the linear layers at ``WEIGHT_BYTES[base]``; embeddings, norms (and an untied head) at bf16 for an
      NF4 base (transformers keeps them unquantized), else at the base's width;
    - adapter: ``A``, ``B`` (and DoRA's ``m``) in fp32 with their gradient and AdamW's two moments: 16 bytes each;
    - activations per token and layer (in the activation dtype, fp32 for an fp32 base, else bf16): what autograd
      keeps for a Llama block with sdpa attention and repeated KV heads, counted from the model code:
      ``10·h + 4·i`` elements (norm inputs and outputs, q/k/v as attention keeps them, attention output, the gated
      MLP's four ``i``-wide tensors); DoRA adds the down projection's output, which its magnitude gradient keeps
      (``h``; q, k and v recompute ``x Wᵀ`` instead, ``--recompute auto``); with gradient checkpointing only each
      block's input ``h`` stays, plus one block recomputed;
    - the loss (:func:`torchdora.app.train.loss.cross_entropy`): the logits and their gradient in the activation
      dtype, ``2·vocab`` elements per token.
    """
    layers, h, i, heads, kv_heads, vocab, tied = SHAPES[shape]
    kv = h // heads * kv_heads
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    other = vocab * h * (1 if tied else 2) + layers * 2 * h + h
    act_bytes = 4 if base == "fp32" else 2
    plain_bytes = 4 if base == "fp32" else 2
    weights = linear * WEIGHT_BYTES[base] + other * plain_bytes
    adapted = [(h, h), (h, kv), (h, kv), (h, i), (i, h)]  # (in, out) of q, k, v, up, down
    adapter = layers * sum(r * (a + b) + (b if method == "dora" else 0) for a, b in adapted)
    per_layer = 10 * h + 4 * i + (h if method == "dora" else 0) + 5 * r
    if checkpointing:
        activations = tokens * act_bytes * (layers * h + per_layer)
    else:
        activations = tokens * act_bytes * layers * per_layer
    loss = tokens * vocab * 2 * act_bytes
    return {"weights": weights, "adapter": 16.0 * adapter, "activations": activations + loss}


def formula_table(tokens: int) -> list[str]:
    gpus = [("24 GB", 24e9), ("40 GB", 40e9), ("80 GB", 80e9), ("141 GB", 141e9)]
    out = [f"| model | base | checkpointing | weights GB | adapter + Adam GB | activations GB ({tokens} tokens) | "
           "total GB | smallest GPU that fits |", "|---|---|---|---|---|---|---|---|"]
    for shape in list(SHAPES)[1:]:
        for base in ("fp32", "bf16", "nf4"):
            for ckpt in (False, True):
                e = estimate(shape, base, "dora", tokens, ckpt)
                total = sum(e.values()) * 1.1  # 10 %: allocator fragmentation, CUDA context, temporaries
                fits = next((name for name, cap in gpus if total <= cap), "none (shard it: docs/distributed.md)")
                out.append(f"| {shape} | {base} | {'on' if ckpt else 'off'} | {e['weights'] / 1e9:.1f} | "
                           f"{e['adapter'] / 1e9:.2f} | {e['activations'] / 1e9:.1f} | {total / 1e9:.1f} | {fits} |")
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def report(results: dict, args) -> str:
    """The markdown rows and ratios of what has been measured so far."""
    lines = [f"Training step memory, {args.batch}×{args.seq} tokens, r={args.rank}, targets {','.join(TARGETS)} "
             f"(torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
             f"median of {args.repeats} interleaved repeats)", "",
             "| base | checkpointing | method | step ms | step MiB | resident MiB | peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for (label, ckpt), rows in results.items():
        for n, r in rows.items():
            lines.append(f"| {label} | {'on' if ckpt else 'off'} | {n} | {r['seconds'] * 1e3:.0f} | "
                         f"{_mib(r['step'])} | {_mib(r['resident'])} | {_mib(r['step'] + r['resident'])} |")
    lines += ["", "Ratios (the issue's targets in brackets):", ""]

    def peak(label, ckpt, n):
        r = results[(label, ckpt)][n]
        return r["step"] + r["resident"]

    for (label, ckpt), rows in results.items():
        d, lo = rows["dora"], rows["lora"]
        lines.append(f"- {label}, checkpointing {'on' if ckpt else 'off'}: DoRA/LoRA time "
                     f"{d['seconds'] / lo['seconds']:.2f}, peak {peak(label, ckpt, 'dora') / peak(label, ckpt, 'lora'):.3f}, "
                     f"step {d['step'] / lo['step']:.3f}; DoRA/PEFT-DoRA time "
                     f"{d['seconds'] / rows['peft-dora']['seconds']:.2f}, peak "
                     f"{peak(label, ckpt, 'dora') / peak(label, ckpt, 'peft-dora'):.3f}")
    if ("fp32", False) in results and ("bf16", False) in results:
        lines.append(f"- bf16 base / fp32 base, DoRA peak: "
                     f"{peak('bf16', False, 'dora') / peak('fp32', False, 'dora'):.3f} [≤ 0.6]")
    for label in {k[0] for k in results}:
        if (label, True) in results:
            off, on = results[(label, False)]["dora"]["step"], results[(label, True)]["dora"]["step"]
            lines.append(f"- {label}: checkpointing keeps {on / off:.3f} of DoRA's step memory [≤ 0.5]")
    if args.model is None and not args.quick:
        lines += ["", "The formula (``estimate``) for the same shape and tokens, against the measured peak:", ""]
        label_of = {"fp32": "fp32", "bf16": "bf16", "nf4 (bf16 compute)": "nf4"}
        for (label, ckpt), rows in results.items():
            for n in ("dora", "lora"):
                e = estimate("SmolLM2-135M", label_of[label], n, args.batch * args.seq, ckpt, args.rank)
                lines.append(f"- {label}, checkpointing {'on' if ckpt else 'off'}, {n}: formula "
                             f"{_mib(sum(e.values()))} MiB, measured {_mib(peak(label, ckpt, n))} MiB")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny random Llama, one repeat: a smoke run")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=96)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bases", default=",".join(b[0] for b in BASES), help="comma-separated labels of BASES")
    p.add_argument("--output", default=None, help="markdown file to write (default: print only)")
    p.add_argument("--formula-only", action="store_true", help="print the formula table (1B/8B/70B) and stop")
    p.add_argument("--formula-tokens", type=int, default=2048, help="tokens per micro-batch in the formula table")
    args = p.parse_args(argv)
    if args.formula_only:
        print("\n".join(formula_table(args.formula_tokens)))
        return 0
    model = args.model
    if args.quick:
        import tempfile

        model = str(tiny_llama_folder(Path(tempfile.mkdtemp(prefix="torchdora-memory-"))))
        args.batch, args.seq, args.repeats = 2, 16, 1
    wanted = args.bases.split(",")
    results: dict[tuple[str, bool], dict[str, dict]] = {}
    for label, base_dtype, quantize in BASES:
        if label not in wanted:
            continue
        if quantize is not None and importlib.util.find_spec("bitsandbytes") is None:
            print(f"{label}: skipped, bitsandbytes is not installed", flush=True)
            continue
        models = variants(model, base_dtype, quantize, args.rank)
        vocab = models["dora"].config.vocab_size
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(3))
        for checkpointing in (False, True):
            results[(label, checkpointing)] = measure(models, ids, args.repeats, checkpointing)
            print(f"{label} checkpointing={checkpointing}: done", flush=True)
            if args.output:  # after every setting: a long run that is stopped keeps what it measured
                atomic_write_bytes(Path(args.output), report(results, args).encode())
        del models
        gc.collect()

    text = report(results, args)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
