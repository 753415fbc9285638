"""Weight-decomposition analysis (paper section 3): ΔM/ΔD on constructed weights with known answers, adapters
merged before measuring, run/snapshot discovery, CSV/JSON/figures, and the errors users see."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import torchdora
from torchdora import analysis as A
from torchdora.analysis.cli import main as analyze_main

transformers = pytest.importorskip("transformers")

# float64 throughout; the measures are sums of K ≤ 64 terms, so round-off is ~1e-15 relative.
EXACT = dict(rtol=1e-12, atol=1e-14)


def _llama(hidden: int = 32, seed: int = 0) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    _llama().save_pretrained(folder)
    return folder


def _base_weights(folder: Path) -> dict[str, torch.Tensor]:
    return transformers.LlamaForCausalLM.from_pretrained(folder).state_dict()


def _reference(w0: torch.Tensor, wt: torch.Tensor) -> tuple[float, float]:
    """The definition, written the obvious way in float64."""
    w0, wt = w0.detach().double(), wt.detach().double()
    n0, nt = w0.norm(dim=1), wt.norm(dim=1)
    cos = (w0 * wt).sum(dim=1) / (n0 * nt)
    return float((nt - n0).abs().mean()), float((1 - cos).mean())


def _adapter_run(root: Path, base_dir: Path, use_dora: bool, steps=(10, 20), method: str | None = None,
                 targets=("q_proj", "v_proj"), model=None) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """A fake ``torchdora train`` run folder: snapshots with random adapters; returns the merged weights too."""
    model = model if model is not None else transformers.LlamaForCausalLM.from_pretrained(base_dir)
    config = torchdora.DoraConfig(r=4, alpha=8, target_modules=targets, use_dora=use_dora)
    torchdora.inject(model, config)
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for k, step in enumerate(steps):
        gen = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for layer in torchdora.adapter_layers(model).values():
                layer.lora_B.copy_(0.1 * (k + 1) * torch.randn(layer.lora_B.shape, generator=gen))
                if layer.magnitude is not None:
                    layer.magnitude.mul_(1 + 0.05 * torch.randn(layer.magnitude.shape, generator=gen))
        torchdora.save_adapter(model, root / "snapshots" / f"step-{step:06d}")
        merged[step] = {}
        for name, layer in torchdora.adapter_layers(model).items():
            w = layer.weight_2d().double()
            adapted = w + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
            if layer.magnitude is not None:
                adapted = (layer.magnitude.double() / adapted.norm(dim=1))[:, None] * adapted
            merged[step][name] = adapted
    (root / "config.json").write_text(json.dumps({"method": method or ("dora" if use_dora else "lora")}))
    return root, merged


# ---- the measure on constructed weights ---------------------------------------------------------------------
def test_row_rescale_changes_magnitude_only() -> None:
    torch.manual_seed(0)
    w0 = torch.randn(16, 24, dtype=torch.float64)
    scale = 0.5 + torch.rand(16, dtype=torch.float64)
    d_m, d_d = A.magnitude_direction_change(w0, scale[:, None] * w0)
    expected = float(((scale - 1).abs() * w0.norm(dim=1)).mean())
    torch.testing.assert_close(d_m, expected, **EXACT)
    assert abs(d_d) < 1e-15  # a positive rescale keeps every row's direction: 1 − cos is 0 up to round-off


def _rotation(dim: int, angle: float, seed: int = 0) -> torch.Tensor:
    """An orthogonal ``(dim, dim)`` matrix turning *every* vector by ``angle``: equal 2-D rotations in the planes
    of a random orthonormal basis (for x = Σ x_b over planes, x·xQ = Σ |x_b|² cos θ = |x|² cos θ)."""
    c, s = math.cos(angle), math.sin(angle)
    block = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    rot = torch.block_diag(*[block] * (dim // 2))
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=gen))
    return basis @ rot @ basis.T


@pytest.mark.parametrize("angle", [1e-4, 0.3, math.pi / 2, 2.5])
def test_row_rotation_changes_direction_only(angle: float) -> None:
    torch.manual_seed(1)
    w0 = torch.randn(12, 20, dtype=torch.float64)
    wt = w0 @ _rotation(20, angle)
    d_m, d_d = A.magnitude_direction_change(w0, wt)
    assert abs(d_m) < 1e-13  # rotations keep norms; round-off of norms ~ 1e-15 · ||w|| (≈ 5)
    # 1 − cos θ = 2 sin²(θ/2), which does not cancel; to 1e-9 relative even at θ = 1e-4, where computing
    # 1 − cos from the cosine would keep only ~8 digits (the rotation matrix itself is exact to ~1e-16)
    torch.testing.assert_close(d_d, 2 * math.sin(angle / 2) ** 2, rtol=1e-9, atol=0.0)


def test_small_angle_keeps_precision_where_naive_formula_cancels() -> None:
    w0 = torch.randn(8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    angle = 1e-7
    _, d_d = A.magnitude_direction_change(w0, w0 @ _rotation(64, angle))
    torch.testing.assert_close(d_d, angle**2 / 2, rtol=1e-6, atol=0.0)  # 1 − cos θ = θ²/2 − θ⁴/24 + ...


def test_matches_reference_on_random_pairs_and_float32_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(32, 16, generator=gen)
    wt = w0 + 0.3 * torch.randn(32, 16, generator=gen)
    torch.testing.assert_close(A.magnitude_direction_change(w0, wt), _reference(w0, wt), **EXACT)


def test_zero_rows_are_finite_and_follow_the_stated_convention() -> None:
    w0 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    wt = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    d_mag, d_dir = A.row_changes(w0, wt)
    torch.testing.assert_close(d_mag, torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64), **EXACT)
    torch.testing.assert_close(d_dir, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), **EXACT)


def test_shape_mismatch_of_raw_weights_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(3, 4\)"):
        A.magnitude_direction_change(torch.zeros(4, 3), torch.zeros(3, 4))


def test_layer_index_and_fit_line_against_numpy() -> None:
    np = pytest.importorskip("numpy")
    assert A.layer_index("model.layers.17.self_attn.q_proj") == 17
    assert A.layer_index("transformer.h.3.attn.c_attn") == 3
    assert A.layer_index("lm_head") is None
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(20, generator=gen, dtype=torch.float64)
    y = -0.6 * x + 0.1 * torch.rand(20, generator=gen, dtype=torch.float64)
    slope, intercept, r = A.fit_line(x.tolist(), y.tolist())
    ref_slope, ref_intercept = np.polyfit(x.numpy(), y.numpy(), 1)
    torch.testing.assert_close((slope, intercept, r), (float(ref_slope), float(ref_intercept),
                                                       float(np.corrcoef(x.numpy(), y.numpy())[0, 1])), **EXACT)
    assert all(math.isnan(v) for v in A.fit_line([1.0], [2.0]))
    assert all(math.isnan(v) for v in A.fit_line([1.0, 1.0], [2.0, 3.0]))  # no spread in x: no line


# ---- adapters are merged before measuring ----------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
def test_adapter_snapshots_are_measured_on_the_merged_weight(tmp_path: Path, base_dir: Path, use_dora: bool) -> None:
    run, merged = _adapter_run(tmp_path / "run", base_dir, use_dora)
    rows = A.analyze(base_dir, [run])
    base = _base_weights(base_dir)
    method = "dora" if use_dora else "lora"
    assert [(r.step, r.module) for r in rows] == [
        (step, f"model.layers.{i}.self_attn.{p}") for step in (10, 20) for i in (0, 1) for p in ("q_proj", "v_proj")
    ]
    for row in rows:
        assert (row.run, row.method, row.layer) == (method, method, A.layer_index(row.module))
        expected = _reference(base[f"{row.module}.weight"], merged[row.step][row.module])
        # merged in float64 from the same fp32 tensors on both sides: agreement to float64 round-off
        torch.testing.assert_close((row.dM, row.dD), expected, rtol=1e-10, atol=1e-15)
        assert row.dD > 1e-4 and row.dM > 1e-4  # the adapter really changed the weight


def test_untouched_adapter_measures_zero_and_perturbing_b_or_m_moves_it(tmp_path: Path, base_dir: Path) -> None:
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    torchdora.inject(model, torchdora.DoraConfig(r=4, alpha=8))
    torchdora.save_adapter(model, tmp_path / "fresh")  # B = 0, m = ||W||: the base weight exactly
    rows = A.analyze(base_dir, [tmp_path / "fresh"])
    assert all(r.dD < 1e-14 and r.dM < 1e-6 for r in rows)  # m = ||W|| was computed in fp32
    layer = torchdora.adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.magnitude.mul_(1.5)
    torchdora.save_adapter(model, tmp_path / "m_only")
    row = next(r for r in A.analyze(base_dir, [tmp_path / "m_only"]) if r.module.endswith("0.self_attn.q_proj"))
    w0 = layer.weight_2d().double()
    torch.testing.assert_close(row.dM, 0.5 * float(w0.norm(dim=1).mean()), rtol=1e-6, atol=0.0)  # fp32 m
    assert row.dD < 1e-14  # a magnitude change alone keeps directions


def test_full_fine_tuning_snapshot_is_read_tensor_by_tensor(tmp_path: Path, base_dir: Path) -> None:
    base = _base_weights(base_dir)
    gen = torch.Generator().manual_seed(5)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    snap = tmp_path / "ft" / "snapshots" / "step-000005"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tuned.items()}, snap / "model.safetensors")
    (tmp_path / "ft" / "config.json").write_text(json.dumps({"method": "full", "model": str(base_dir)}))
    rows = A.analyze(base_dir, [tmp_path / "ft"], modules=r".*\.(q_proj|o_proj)$")
    assert {r.module.rsplit(".", 1)[-1] for r in rows} == {"q_proj", "o_proj"}
    for row in rows:
        assert (row.run, row.method, row.step) == ("full", "full", 5)
        torch.testing.assert_close((row.dM, row.dD), _reference(base[f"{row.module}.weight"],
                                                                tuned[f"{row.module}.weight"]), rtol=1e-10, atol=1e-15)


def test_state_dict_file_as_base_and_gpt2_conv1d_orientation(tmp_path: Path) -> None:
    torch.manual_seed(6)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=32)).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    torchdora.inject(gpt2, torchdora.DoraConfig(r=4, alpha=8, target_modules=("c_attn",)))
    layer = torchdora.adapter_layers(gpt2)["transformer.h.1.attn.c_attn"]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    torchdora.save_adapter(gpt2, tmp_path / "adapter")
    w = layer.base.weight.double().T  # Conv1D stores (in, out); rows are output features
    adapted = w + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    merged = (layer.magnitude.double() / adapted.norm(dim=1))[:, None] * adapted
    expected = _reference(w, merged)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").state_dict()
    state = {k: v.clone() for k, v in loaded.items() if k != "lm_head.weight"}  # lm_head is tied to wte
    save_file(state, tmp_path / "gpt2.safetensors")
    for model in (tmp_path / "gpt2", tmp_path / "gpt2.safetensors"):  # architecture known / adapter's record
        row = next(r for r in A.analyze(model, [tmp_path / "adapter"], modules=r".*\.c_attn") if r.layer == 1)
        torch.testing.assert_close((row.dM, row.dD), expected, rtol=1e-10, atol=1e-15)


def test_pure_magnitude_vs_pure_direction_snapshots_separate_the_axes(tmp_path: Path, base_dir: Path) -> None:
    """Two full snapshots built to move only ΔM or only ΔD land on the right axis after the whole pipeline."""
    base = _base_weights(base_dir)
    key = "model.layers.1.self_attn.q_proj.weight"
    rotate = lambda w: (w.double() @ _rotation(w.shape[1], 0.2)).float()  # noqa: E731
    for name, change in (("mag", lambda w: 1.2 * w), ("dir", rotate)):
        folder = tmp_path / name
        folder.mkdir()
        save_file({key: change(base[key]).contiguous()}, folder / "model.safetensors")
    measured = A.analyze(base_dir, [tmp_path / "mag", tmp_path / "dir"], modules=r".*1\.self_attn\.q_proj",
                         labels=["mag", "dir"])
    rows = {r.run: r for r in measured}
    torch.testing.assert_close(rows["mag"].dM, 0.2 * float(base[key].double().norm(dim=1).mean()), rtol=1e-6, atol=0.0)
    assert rows["mag"].dD < 1e-12  # fp32 storage of 1.2·w leaves ~1e-14 of direction change
    assert rows["dir"].dM < 1e-6  # fp32 storage of the rotated rows: norm error ~1e-7 · ||w||
    torch.testing.assert_close(rows["dir"].dD, 2 * math.sin(0.1) ** 2, rtol=1e-6, atol=0.0)


# ---- discovery, labels, outputs -----------------------------------------------------------------------------------
def test_runs_and_single_snapshots_are_discovered_with_method_labels(tmp_path: Path, base_dir: Path) -> None:
    run, _ = _adapter_run(tmp_path / "lora_run", base_dir, use_dora=False, steps=(30, 5, 200))
    found = A.discover_checkpoints(run)
    assert [(c.run, c.method, c.step, c.kind) for c in found] == [("lora", "lora", s, "adapter") for s in (5, 30, 200)]
    single = A.discover_checkpoints(run / "snapshots" / "step-000030", label="mine")
    assert [(c.run, c.method, c.step) for c in single] == [("mine", "lora", 30)]
    # without a run config the method comes from the adapter itself
    (run / "config.json").unlink()
    assert A.discover_checkpoints(run)[0].method == "lora"
    # two runs of one method are told apart by folder name
    other, _ = _adapter_run(tmp_path / "lora_seed1", base_dir, use_dora=False, steps=(5,))
    labels = {r.run for r in A.analyze(base_dir, [run, other])}
    assert labels == {"lora:lora_run", "lora:lora_seed1"}


def test_cli_writes_csv_json_and_figures_with_the_same_numbers(tmp_path: Path, base_dir: Path, capsys) -> None:
    dora, _ = _adapter_run(tmp_path / "dora", base_dir, use_dora=True, steps=(10, 20, 30))
    lora, _ = _adapter_run(tmp_path / "lora", base_dir, use_dora=False, steps=(10, 20, 30))
    out = tmp_path / "out"
    assert analyze_main(["--model", str(base_dir), str(dora), str(lora), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dora" in printed and "pearson" in printed
    with open(out / "decomposition.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    data = json.loads((out / "decomposition.json").read_text())
    assert list(csv_rows[0]) == list(A.CSV_COLUMNS)
    assert len(csv_rows) == len(data["rows"]) == 2 * 3 * 4
    for c, j in zip(csv_rows, data["rows"]):
        assert (c["run"], c["method"], int(c["step"]), c["module"], int(c["layer"])) == (
            j["run"], j["method"], j["step"], j["module"], j["layer"])
        assert float(c["dM"]) == j["dM"] and float(c["dD"]) == j["dD"]  # exact: both written with repr()
    assert A.read_csv(out / "decomposition.csv") == [A.DecompositionRow(**r) for r in data["rows"]]
    fits = {(f["run"], f["modules"]): f for f in data["fits"]}
    assert set(fits) == {(run, m) for run in ("dora", "lora") for m in ("q_proj", "v_proj", "all")}
    q = [r for r in data["rows"] if r["run"] == "lora" and r["module"].endswith("q_proj")]
    slope, _, pearson = A.fit_line([r["dD"] for r in q], [r["dM"] for r in q])
    torch.testing.assert_close((fits["lora", "q_proj"]["slope"], fits["lora", "q_proj"]["pearson"]), (slope, pearson),
                               rtol=0.0, atol=0.0)  # the same function on the same numbers
    for figure in ("decomposition_scatter.png", "decomposition_layers.png"):
        blob = (out / figure).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temporaries


def test_step_zero_is_kept_in_the_table_but_not_in_the_fit() -> None:
    rows = [A.DecompositionRow("ft", "full", 0, "l.0.q_proj", 0, 0.0, 0.0)] + [
        A.DecompositionRow("ft", "full", s, f"l.{i}.q_proj", i, 1.0 - 0.1 * s - 0.01 * i, 0.1 * s + 0.02 * i)
        for s in (1, 2, 3) for i in (0, 1)
    ]
    (fit,) = A.fit_rows(rows)
    assert fit.n == 6 and fit.pearson < -0.9


# ---- errors users see -----------------------------------------------------------------------------------------
def test_adapter_from_another_base_model_names_module_and_shapes(tmp_path: Path, base_dir: Path) -> None:
    wide = tmp_path / "wide_base"
    _llama(hidden=48).save_pretrained(wide)
    run, _ = _adapter_run(tmp_path / "run", wide, use_dora=True, steps=(1,))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*\(4, 48\).*\(4, 32\).*--model"):
        A.analyze(base_dir, [run])


def test_full_snapshot_from_another_base_model_names_module_and_shapes(tmp_path: Path, base_dir: Path) -> None:
    snap = tmp_path / "step-000001"
    snap.mkdir()
    key = "model.layers.0.self_attn.q_proj.weight"
    save_file({key: torch.zeros(48, 48)}, snap / "model.safetensors")
    with pytest.raises(ValueError, match=r"q_proj.*\(48, 48\).*\(32, 32\)"):
        A.analyze(base_dir, [snap], modules=r".*0\.self_attn\.q_proj")
    with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.0\.self_attn\.k_proj\.weight'"):
        A.analyze(base_dir, [snap], modules=r".*0\.self_attn\.k_proj")


def test_pattern_selecting_nothing_lists_close_names(tmp_path: Path, base_dir: Path) -> None:
    run, _ = _adapter_run(tmp_path / "run", base_dir, use_dora=True, steps=(1,))
    with pytest.raises(ValueError, match=r"matches no weight.*Closest module names.*'q_proj'"):
        A.analyze(base_dir, [run], modules=r".*\.query_proj$")
    with pytest.raises(ValueError, match=r"not a valid regular expression"):
        A.analyze(base_dir, [run], modules="(")
    with pytest.raises(ValueError, match=r"adapts .*none of which --modules.*selects"):
        A.analyze(base_dir, [run], modules=r".*\.o_proj$")


def test_missing_and_empty_inputs(tmp_path: Path, base_dir: Path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match="not found: pass a run folder"):
        A.discover_checkpoints(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a snapshot.*--save-every"):
        A.discover_checkpoints(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="base weights file"):
        A.BaseWeights(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="got 1 labels for 2 checkpoints"):
        A.analyze(base_dir, [tmp_path / "a", tmp_path / "b"], labels=["x"])
    assert analyze_main(["--model", str(base_dir), str(tmp_path / "empty")]) == 2
    assert "neither a snapshot" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        analyze_main(["--label", "a", str(tmp_path / "x"), str(tmp_path / "y")])
    assert "one per checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="color_by must be"):
        A.plot_scatter([A.DecompositionRow("r", "full", 1, "m", 0, 1.0, 1.0)], tmp_path / "x.png", color_by="run")


def test_peft_format_adapter_measures_like_the_torchdora_file(tmp_path: Path, base_dir: Path) -> None:
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    torchdora.inject(model, torchdora.DoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for layer in torchdora.adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    torchdora.save_adapter(model, tmp_path / "ours")
    torchdora.save_adapter(model, tmp_path / "peft", format="peft")
    ours = A.analyze(base_dir, [tmp_path / "ours"])
    peft = A.analyze(base_dir, [tmp_path / "peft"])
    assert [(r.module, r.method) for r in ours] == [(r.module, r.method) for r in peft]
    # the same fp32 tensors through two file formats: identical numbers
    torch.testing.assert_close([(r.dM, r.dD) for r in peft], [(r.dM, r.dD) for r in ours], rtol=0.0, atol=0.0)
    assert all(r.dD > 1e-4 for r in ours)


def test_unusable_base_models_are_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # offline: the unknown name is refused by resolve_model; online: the hub name is refused here. Both name it.
    with pytest.raises(ValueError, match="some-org/some-model.*local"):
        A.BaseWeights("some-org/some-model")
    folder = tmp_path / "no_weights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        A.BaseWeights(folder)


def test_plots_refuse_empty_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="every row is step 0"):
        A.plot_scatter([A.DecompositionRow("r", "full", 0, "l.0.q", 0, 0.0, 0.0)], tmp_path / "s.png")
    with pytest.raises(ValueError, match="no selected module name holds a layer index"):
        A.plot_layers([A.DecompositionRow("r", "full", 1, "lm_head", None, 1.0, 1.0)], tmp_path / "l.png")
