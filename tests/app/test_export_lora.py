"""``torchdora export-lora``: the rank-R LoRA approximation of an adapter's merged update, checked against a direct
computation from the DoRA equation (paper eq. 5) and loaded in plain PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import torchdora
from conftest import perturb_adapters
from test_train import make_tiny_model, one_thread  # noqa: F401 (one_thread: autouse fixture)
from torchdora.app import cli
from torchdora.app.export.lora import REPORT_FILE, lowrank_factors, rank_for_error, relative_errors

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("export-lora") / "model")


def _adapter(model_dir: Path, folder: Path, use_dora: bool, r: int = 4) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torchdora.inject(model, torchdora.DoraConfig(r=r, alpha=2 * r, target_modules=TARGETS, use_dora=use_dora))
    perturb_adapters(model, seed=3)  # off the identity: B = 0 would make every export trivially exact
    return torchdora.save_adapter(model, folder, format="peft", base_model_name_or_path=str(model_dir))


def _ids(model_dir: Path) -> torch.Tensor:
    return torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(7))


def _logits_with_adapter(model_dir: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    model = torchdora.load_model(adapter, base=str(model_dir))
    with torch.no_grad():
        return model(ids).logits


def _peft_logits(model_dir: Path, lora: Path, ids: torch.Tensor):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), lora).eval()
    with torch.no_grad():
        return model(ids).logits, model


def _dora_merged_reference(model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW = m · (W + s·B·A)/||W + s·B·A|| − W per output row, from the saved tensors (PEFT file, REFERENCE §1, §5)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = json.loads((adapter / "adapter_config.json").read_text())
    s = config["lora_alpha"] / config["r"]
    tensors = {k.replace("base_model.model.", ""): v.double()
               for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    deltas = {}
    for name, module in base.named_modules():
        if f"{name}.lora_A.weight" not in tensors:
            continue
        w = module.weight.detach().double()
        v = w + s * tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"]  # (out, in)
        m = tensors[f"{name}.lora_magnitude_vector"]
        deltas[name] = m[:, None] * v / v.norm(dim=1, keepdim=True) - w
    return deltas


def test_relative_error_formula_matches_the_reconstruction():
    delta = torch.randn(12, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = relative_errors(torch.linalg.svdvals(delta))
    assert errors[0] == pytest.approx(1.0) and errors[-1] == 0.0 and bool((errors[:-1] > errors[1:]).all())
    for r in range(1, 9):
        e = lowrank_factors(delta, rank=r)
        direct = (delta - e.lora_B.double() @ e.lora_A.double()).norm() / delta.norm()
        # fp32 factors: their round-off (~1e-7 relative) is the only difference from the exact tail formula
        assert e.relative_error == pytest.approx(float(direct), abs=1e-6)
        assert e.relative_error == pytest.approx(float(errors[r]), abs=1e-12)
    r = rank_for_error(torch.linalg.svdvals(delta), 0.3)
    assert errors[r] <= 0.3 < errors[r - 1]  # the smallest rank that meets the bound


def test_exact_when_the_rank_reaches_the_update_rank():
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(20, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 16, generator=gen,
                                                                                 dtype=torch.float64)
    e = lowrank_factors(delta, rank=3)
    assert e.relative_error < 1e-7  # σ_4.. are float64 round-off of a rank-3 matrix
    assert_close(e.lora_B.double() @ e.lora_A.double(), delta, rtol=1e-6, atol=1e-6)  # fp32 factors
    assert e.lora_A.shape == (3, 16) and e.lora_B.shape == (20, 3)


def test_lora_adapter_exports_exactly_at_its_rank_and_loads_in_peft(tiny_model, tmp_path, capsys):
    adapter = _adapter(tiny_model, tmp_path / "lora", use_dora=False, r=4)
    out = tmp_path / "exported"
    assert cli.main(["export-lora", "--model", str(tiny_model), "--adapter", str(adapter), "--rank", "4",
                     "--output", str(out)]) == 0
    report = json.loads((out / REPORT_FILE).read_text())
    assert len(report["layers"]) == 2 * len(TARGETS) and report["max_relative_error"] < 1e-6
    assert "relative error" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (4, 4, False)
    ids = _ids(tiny_model)
    got, peft_model = _peft_logits(tiny_model, out, ids)
    expected = _logits_with_adapter(tiny_model, adapter, ids)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)  # exact rank: fp32 factors re-multiplied, ~1e-6 relative
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(ids).logits - expected).abs().max() > 1e-2  # the adapter changes the model


def test_dora_adapter_at_full_rank_is_exact_and_below_it_the_recorded_error_is_the_true_one(tiny_model, tmp_path):
    adapter = _adapter(tiny_model, tmp_path / "dora", use_dora=True, r=2)
    reference = _dora_merged_reference(tiny_model, adapter)
    ids = _ids(tiny_model)
    expected = _logits_with_adapter(tiny_model, adapter, ids)

    full = tmp_path / "full"  # --max-error below round-off: every layer at its own full rank, via rank_pattern
    assert cli.main(["export-lora", "--model", str(tiny_model), "--adapter", str(adapter), "--max-error", "1e-9",
                     "--output", str(full)]) == 0
    config = json.loads((full / "adapter_config.json").read_text())
    report = json.loads((full / REPORT_FILE).read_text())
    got, peft_model = _peft_logits(tiny_model, full, ids)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32 factors of float64 SVD: logits to ~1e-6
    for name, layer in report["layers"].items():
        assert config["rank_pattern"][name] == layer["rank"] == config["alpha_pattern"][name]
        assert peft_model.get_submodule(f"base_model.model.{name}").r["default"] == layer["rank"]
    assert report["layers"]["model.layers.0.self_attn.k_proj"]["rank"] == 16  # GQA k_proj: 16×32, full rank 16

    low = tmp_path / "rank2"
    assert cli.main(["export-lora", "--model", str(tiny_model), "--adapter", str(adapter), "--rank", "2",
                     "--output", str(low)]) == 0
    from safetensors.torch import load_file

    tensors = load_file(low / "adapter_model.safetensors")
    report = json.loads((low / REPORT_FILE).read_text())
    residual = total = 0.0
    for name, delta in reference.items():
        b = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        a = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        direct = float((delta - b @ a).norm() / delta.norm())
        assert 0.01 < direct < 1  # DoRA's ΔW is not rank 2: a real approximation, not a trivial one
        assert report["layers"][name]["relative_error"] == pytest.approx(direct, rel=1e-4)  # fp32 factors
        assert report["layers"][name]["delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-6)
        residual, total = residual + float((delta - b @ a).norm()) ** 2, total + float(delta.norm()) ** 2
    assert report["overall_relative_error"] == pytest.approx((residual / total) ** 0.5, rel=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "--rank must be at least 1, got 0"),
    (["--rank", "17"], "--rank 17 is above the size of model.layers.0.self_attn.k_proj (16×32: rank at most 16)"),
    ([], "pass exactly one of --rank R"),
    (["--rank", "2", "--max-error", "0.1"], "pass exactly one of --rank R"),
    (["--max-error", "1.5"], "--max-error is a relative Frobenius error between 0 and 1"),
    (["--rank", "2", "--output-exists"], "already exists; choose another folder or pass --overwrite"),
])
def test_bad_input_is_one_line(tiny_model, tmp_path, capsys, args, message):
    adapter = _adapter(tiny_model, tmp_path / "dora", use_dora=True, r=2)
    out = tmp_path / "out"
    if "--output-exists" in args:
        args = [a for a in args if a != "--output-exists"]
        out.mkdir()
    capsys.readouterr()  # the progress bars of building the adapter
    code = cli.main(["export-lora", "--model", str(tiny_model), "--adapter", str(adapter), "--output", str(out),
                     *args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s]" not in line]  # transformers' bars
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
