"""``torchdora export-lora``: the rank-R LoRA adapter closest to a DoRA adapter, for servers that take only LoRA.

Multi-LoRA servers (vLLM, SGLang, TGI, LoRAX) read ``lora_A``/``lora_B`` and nothing else, so they cannot serve
DoRA's magnitude. Per adapted layer the exact update of the merged DoRA weight (paper eq. 5) is

    ΔW = W' − W,   W' = m · (W + s·B·A) / ||W + s·B·A||   (per output row)

and its best rank-R approximation in the Frobenius norm (Eckart–Young) is the truncated SVD
``ΔW ≈ U_R Σ_R V_Rᵀ``, written as PEFT LoRA factors ``lora_B = U_R Σ_R^{1/2}`` ``(out, R)``,
``lora_A = Σ_R^{1/2} V_Rᵀ`` ``(R, in)`` with ``lora_alpha = R`` (scale 1). Its relative error is
``||ΔW − U_R Σ_R V_Rᵀ||_F / ||ΔW||_F = sqrt(Σ_{j>R} σ_j²) / sqrt(Σ_j σ_j²)``. A LoRA adapter of rank r has
``rank(ΔW) ≤ r`` and exports exactly at ``R = r``; a DoRA adapter's ΔW holds ``diag(m/||W + sBA|| − 1) W``, full rank
in general, so R trades file size for error (docs/serving.md measures it). ``--max-error E`` picks, per layer, the
smallest rank whose error is at most E, written as PEFT's ``rank_pattern``/``alpha_pattern``.

``torchdora export-lora --adapter DIR --rank R --output OUT``  (or ``--max-error E`` instead of ``--rank``)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["ExportLoraConfig", "LayerExport", "relative_errors", "rank_for_error", "lowrank_factors", "merged_updates",
           "export_lora", "main"]

#: written beside the adapter: the rank and relative error of every layer
REPORT_FILE = "lora_export.json"


@dataclass(frozen=True)
class ExportLoraConfig:
    """Options of ``torchdora export-lora``.

    Args:
        adapter: the adapter folder (torchdora or PEFT format; DoRA, LoRA, DVoRA) to approximate.
        output: folder to write (PEFT LoRA: ``adapter_config.json``, ``adapter_model.safetensors``, and
            :data:`REPORT_FILE`); it must not exist yet unless ``overwrite``.
        rank: one rank R for every layer (1 ≤ R ≤ min(out, in) of each layer); or
        max_error: the largest relative error allowed per layer (0 < E < 1); each layer gets the smallest rank that
            meets it.
        model: base model name or folder; ``None``: the base the adapter records, else the embedded SmolLM2-135M.
        overwrite: replace an existing ``output`` folder.
    """

    adapter: str
    output: str
    rank: int | None = None
    max_error: float | None = None
    model: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.max_error is None):
            raise ValueError("pass exactly one of --rank R (one rank for every layer) and --max-error E (a rank "
                             "per layer)")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"--rank must be at least 1, got {self.rank}")
        if self.max_error is not None and not 0.0 < self.max_error < 1.0:
            raise ValueError(f"--max-error is a relative Frobenius error between 0 and 1 (exclusive), got "
                             f"{self.max_error}")


@dataclass(frozen=True)
class LayerExport:
    """One layer's LoRA factors (fp32), the relative error of ``lora_B @ lora_A`` against ΔW, and ``||ΔW||_F``."""

    lora_A: Tensor  # (R, in)
    lora_B: Tensor  # (out, R)
    relative_error: float
    delta_norm: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


def relative_errors(singular_values: Tensor) -> Tensor:
    """``e[R] = sqrt(Σ_{j>R} σ_j²) / sqrt(Σ_j σ_j²)`` for ``R = 0..n`` (``σ`` of length n, descending); all zeros
    when every ``σ`` is 0 (an update of zero is exact at any rank)."""
    sq = singular_values.double().square()
    tail = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])  # (n+1,): Σ_{j≥R+1} σ_j², 1-based j
    total = tail[0]
    return (tail / total).sqrt() if total > 0 else torch.zeros_like(tail)


def rank_for_error(singular_values: Tensor, max_error: float) -> int:
    """The smallest rank ``R ≥ 1`` with ``relative_errors(σ)[R] ≤ max_error``."""
    errors = relative_errors(singular_values)
    meets = (errors[1:] <= max_error).nonzero()
    return int(meets[0]) + 1 if len(meets) else len(singular_values)


def lowrank_factors(delta: Tensor, rank: int | None = None, max_error: float | None = None) -> LayerExport:
    """The truncated SVD of ``delta`` ``(out, in)`` as LoRA factors with scale 1: ``lora_B @ lora_A ≈ delta``.

    The SVD runs in float64, so the factors' own round-off (stored in fp32) dominates the exact-rank error.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (out, n), (n,), (n, in)
    r = rank if rank is not None else rank_for_error(s, max_error)
    if not 1 <= r <= len(s):
        raise ValueError(f"rank {r} is outside 1..{len(s)} for an update of shape {tuple(delta.shape)}")
    root = s[:r].sqrt()
    return LayerExport(lora_A=(root[:, None] * vh[:r]).float().contiguous(),
                       lora_B=(u[:, :r] * root).float().contiguous(),
                       relative_error=float(relative_errors(s)[r]), delta_norm=float(s.square().sum().sqrt()))


def merged_updates(model: nn.Module) -> dict[str, Tensor]:
    """``{module name: W' − W}`` (float64, ``(out, in)``) for every adapter layer of ``model``, which this merges
    and unloads (:func:`torchdora.merge_and_unload`): W is read before, W' after.

    Raises:
        ValueError: an adapted layer that is not an ``nn.Linear`` (PEFT LoRA of convolutions and embeddings has
            other shapes; not written here).
    """
    import torchdora

    layers = torchdora.adapter_layers(model)
    bases = {}
    for name, layer in layers.items():
        if not isinstance(layer, torchdora.LinearAdapter) or not isinstance(layer.base, nn.Linear):
            raise ValueError(f"export-lora writes nn.Linear layers; {name} is a {type(layer).__name__} around a "
                             f"{type(getattr(layer, 'base', None)).__name__}")
        bases[name] = layer.weight_2d().detach().double().clone()
    torchdora.merge_and_unload(model)
    return {name: model.get_submodule(name).weight.detach().double() - w for name, w in bases.items()}


def _check_rank_fits(rank: int, shapes: dict[str, tuple[int, int]]) -> None:
    name, shape = min(shapes.items(), key=lambda kv: min(kv[1]))
    if rank > min(shape):
        raise ValueError(f"--rank {rank} is above the size of {name} ({shape[0]}×{shape[1]}: rank at most "
                         f"{min(shape)}); pass --rank {min(shape)} or less, or --max-error")


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Short names (``q_proj``) when they pick exactly the exported layers, else the full module names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    picked = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in short}
    return short if picked == set(names) else sorted(names)


def _peft_config(model: nn.Module, exports: dict[str, LayerExport], uniform: bool, base_name: str | None) -> dict:
    from torchdora.peft_format import infer_task_type

    ranks = {name: e.rank for name, e in exports.items()}
    r = max(ranks.values())
    pattern = {} if uniform else ranks
    return {
        "peft_type": "LORA", "task_type": infer_task_type(model), "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": _target_modules(model, sorted(exports)), "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
    }


def export_lora(config: ExportLoraConfig, log=print) -> Path:
    """Load base + adapter, merge, approximate each layer's update and write the PEFT LoRA folder atomically.

    Returns the output folder. Raises FileNotFoundError (no adapter, no model) or ValueError (bad options, an
    output that exists, a rank above a layer's size, an adapter with ``modules_to_save`` or non-Linear layers).
    """
    import torchdora
    from torchdora.app.assets import load_model_and_tokenizer, model_for_adapter, recorded_base_name
    from torchdora.files import atomic_save_safetensors, atomic_write_json, replace_dir

    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise ValueError(f"--output {output} already exists; choose another folder or pass --overwrite")
    adapter_config, _, _ = torchdora.read_adapter(config.adapter)  # missing or corrupt: fail before the model loads
    if adapter_config.modules_to_save:
        raise ValueError(f"the adapter also trains whole modules ({', '.join(adapter_config.modules_to_save)}); "
                         "export-lora writes lora_A/lora_B only: serve a merged model instead (torchdora merge)")
    base = model_for_adapter(config.model, config.adapter)
    model, _ = load_model_and_tokenizer(base)
    model = torchdora.load_model(config.adapter, base=model)
    shapes = {name: tuple(layer.weight_2d().shape) for name, layer in torchdora.adapter_layers(model).items()}
    if config.rank is not None:
        _check_rank_fits(config.rank, shapes)
    exports = {name: lowrank_factors(delta, config.rank, config.max_error)
               for name, delta in merged_updates(model).items()}
    for name, e in exports.items():
        log(f"{name:<48} rank {e.rank:>5}  relative error {e.relative_error:.3e}")
    tensors = {f"base_model.model.{name}.{part}.weight": getattr(e, part)
               for name, e in exports.items() for part in ("lora_A", "lora_B")}
    total = sum(e.delta_norm**2 for e in exports.values())
    report = {
        "adapter": str(Path(config.adapter).resolve()), "rank": config.rank, "max_error": config.max_error,
        "max_relative_error": max(e.relative_error for e in exports.values()),
        # ||ΔW − B·A||_F / ||ΔW||_F over all layers stacked
        "overall_relative_error": (sum((e.relative_error * e.delta_norm) ** 2 for e in exports.values()) / total) ** 0.5
        if total > 0 else 0.0,
        "parameters": sum(t.numel() for t in tensors.values()),
        "layers": {name: {"rank": e.rank, "relative_error": e.relative_error, "delta_norm": e.delta_norm,
                          "shape": list(shapes[name])}
                   for name, e in exports.items()},
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        atomic_save_safetensors(tensors, tmp / "adapter_model.safetensors")
        atomic_write_json(tmp / "adapter_config.json",
                          _peft_config(model, exports, config.rank is not None, recorded_base_name(base)))
        atomic_write_json(tmp / REPORT_FILE, report)
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    worst = report["max_relative_error"]
    log(f"{len(exports)} layers, {report['parameters']:,} LoRA parameters; largest relative error {worst:.3e} "
        f"(mean {sum(e.relative_error for e in exports.values()) / len(exports):.3e})")
    return output


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchdora export-lora",
        description="Write the rank-R LoRA adapter closest to an adapter's merged update (truncated SVD of W' − W "
                    "per layer), in PEFT's LoRA format, for multi-LoRA servers (vLLM, SGLang, TGI, LoRAX).")
    p.add_argument("--adapter", required=True, help="adapter folder (torchdora or PEFT format)")
    p.add_argument("--output", required=True, help="folder to write (adapter_config.json, adapter_model.safetensors, "
                                                   f"{REPORT_FILE} with each layer's rank and relative error)")
    p.add_argument("--rank", type=int, default=None, help="rank of every layer (1 to the layer's smaller side)")
    p.add_argument("--max-error", dest="max_error", type=float, default=None,
                   help="instead of --rank: the largest relative Frobenius error per layer; each layer gets the "
                        "smallest rank that meets it (PEFT rank_pattern)")
    p.add_argument("--model", default=None,
                   help="base model name or folder (default: the one --adapter records, else the embedded SmolLM2-135M)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        path = export_lora(ExportLoraConfig(**vars(args)))
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"torchdora export-lora: error: {err}", file=sys.stderr)
        return 2
    print(f"LoRA adapter written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
