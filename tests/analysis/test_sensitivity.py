"""torchdora.analysis.sensitivity on planted data with known answers, against plain numpy versions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torchdora.analysis import DecompositionRow
from torchdora.analysis.sensitivity import (
    leave_one_layer_out, log_rows, normalized_rows, row_norm_means, run_curves, seed_statistics,
)
from torchdora.analysis.stats import compare_to_null

# float64 sums of ≤ 200 terms: round-off ~1e-15 relative
EXACT = dict(rel=1e-12, abs=1e-12)


def _rows(d_dir: np.ndarray, d_mag: np.ndarray, run: str, method: str = "dora",
          module: str = "q_proj") -> list[DecompositionRow]:
    """An (S, L) grid as rows of one run: snapshots at steps 10, 20, ...; layer l is model.layers.l.self_attn.<module>."""
    return [DecompositionRow(run, method, 10 * (s + 1), f"model.layers.{l}.self_attn.{module}", l,
                             float(d_mag[s, l]), float(d_dir[s, l]))
            for s in range(d_dir.shape[0]) for l in range(d_dir.shape[1])]


def _partial(x: np.ndarray, y: np.ndarray) -> float:
    """Step-centred Pearson r, written out: subtract each snapshot's mean, correlate all points."""
    xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    return float((xc * yc).sum() / math.sqrt((xc ** 2).sum() * (yc ** 2).sum()))


def _planted_run(rng: np.random.Generator, rho: float, snapshots: int = 5, layers: int = 20):
    """ΔD grows over snapshots; within a snapshot ΔM correlates with ΔD at about ``rho`` across layers."""
    base = rng.normal(size=(snapshots, layers))
    noise = rng.normal(size=(snapshots, layers))
    growth = np.arange(1, snapshots + 1)[:, None]
    d_dir = growth * (2 + 0.3 * base)
    d_mag = growth * (5 + 0.3 * (rho * base + math.sqrt(1 - rho ** 2) * noise))
    return d_dir, d_mag


def test_run_curves_read_a_planted_sign_per_snapshot_and_its_null():
    layers = np.arange(8, dtype=float)
    d_dir = np.stack([layers + 1, 2 * layers + 1])  # (2, 8)
    measured = _rows(d_dir, 10 - d_dir, "dora-seed0")  # ΔM falls exactly as ΔD rises: r = −1 in each snapshot
    null = _rows(d_dir, 3 * d_dir, "dora-seed0")  # rises with it: r = +1
    curve = run_curves(measured, null, modules=("q_proj",))
    assert [(p.step, p.modules, p.run, p.method) for p in curve] == [(10, "q_proj", "dora-seed0", "dora"),
                                                                     (20, "q_proj", "dora-seed0", "dora")]
    for p in curve:
        assert p.r == pytest.approx(-1.0, **EXACT) and p.null_r == pytest.approx(1.0, **EXACT)


def test_seed_statistics_equal_per_run_values_and_a_t_interval_over_runs():
    rng = np.random.default_rng(0)
    rows, null, grids = [], [], []
    for seed, rho in enumerate((-0.8, -0.5, -0.2)):
        x, y = _planted_run(rng, rho)
        nx, ny = _planted_run(rng, 0.0)
        rows += _rows(x, y, f"dora-seed{seed}")
        null += _rows(nx, ny, f"dora-seed{seed}")
        grids.append((x, y, nx, ny))
    got = seed_statistics(rows, null, "dora", "q_proj", "partial")
    want = [_partial(x, y) for x, y, _, _ in grids]
    want_null = [_partial(nx, ny) for _, _, nx, ny in grids]
    assert got.runs == ("dora-seed0", "dora-seed1", "dora-seed2")
    assert got.per_run == pytest.approx(want, **EXACT) and got.null_per_run == pytest.approx(want_null, **EXACT)
    # Student t with 2 degrees of freedom: t_0.975 = 4.303; sd with n − 1
    for values, interval in ((want, got.mean), (np.subtract(want, want_null), got.difference)):
        mean, sd = np.mean(values), np.std(values, ddof=1)
        assert (interval.estimate, interval.low, interval.high) == pytest.approx(
            (mean, mean - 4.303 * sd / math.sqrt(3), mean + 4.303 * sd / math.sqrt(3)), **EXACT)
    one = seed_statistics(rows[:100], null[:100], "dora", "q_proj")  # one run: an estimate, no interval
    assert one.mean.estimate == pytest.approx(want[0], **EXACT) and math.isnan(one.mean.low)
    with pytest.raises(ValueError, match="statistic must be one of"):
        seed_statistics(rows, null, "dora", "q_proj", "slope")


def test_normalizing_by_the_row_norm_recovers_a_relation_that_the_row_norm_hides():
    """Planted: the relative change of size u_l rises with ΔD, but layers with large rows (large ρ_l) get small ΔD,
    so raw ΔM = ρ_l·u_l falls with ΔD; ΔM/ρ_l = u_l rises again."""
    rng = np.random.default_rng(2)
    layers = 24
    rho = np.exp(rng.uniform(0, 2.5, size=layers))  # mean row norms spread over a decade
    d_dir = np.stack([s / rho ** 2 for s in (1.0, 2.0, 3.0)])  # ΔD ∝ 1/ρ² (the null's law)
    u = 1e-2 * d_dir ** 0.25 * (1 + 0.05 * rng.normal(size=(3, layers)))  # rises with ΔD; ρ·u falls
    rows = _rows(d_dir, u * rho, "full-seed0", "full")
    norms = {f"model.layers.{l}.self_attn.q_proj": float(rho[l]) for l in range(layers)}
    scaled = normalized_rows(rows, norms)
    for r, s in zip(rows, scaled):
        assert s.dM == r.dM / rho[r.layer] and s.dD == r.dD
    raw_x = np.array([[r.dD for r in rows if r.step == st] for st in (10, 20, 30)])
    raw_y = np.array([[r.dM for r in rows if r.step == st] for st in (10, 20, 30)])
    new_y = np.array([[r.dM for r in scaled if r.step == st] for st in (10, 20, 30)])
    assert _partial(raw_x, raw_y) < 0 < _partial(raw_x, new_y)
    with pytest.raises(ValueError, match="no pre-trained row norm"):
        normalized_rows(rows, {})
    weights = {"a": torch.tensor([[3.0, 4.0], [0.0, 1.0]])}
    assert row_norm_means(weights) == {"a": pytest.approx(3.0, **EXACT)}


def test_log_scale_makes_a_power_law_exactly_linear():
    d_dir = np.outer([1.0, 2.0, 3.0], np.linspace(1, 30, 15))
    d_mag = 0.1 * d_dir ** 0.5
    rows = _rows(d_dir, d_mag, "lora-seed0", "lora")
    logged = log_rows(rows + [DecompositionRow("lora-seed0", "lora", 0, "model.layers.0.self_attn.q_proj", 0, 0.0, 0.0)])
    point = [r for r in logged if r.step == 10 and r.layer == 3][0]
    assert (point.dD, point.dM) == pytest.approx((math.log(d_dir[0, 3]), math.log(d_mag[0, 3])), **EXACT)
    x = np.array([[r.dD for r in logged if r.step == st] for st in (10, 20, 30)])
    y = np.array([[r.dM for r in logged if r.step == st] for st in (10, 20, 30)])
    assert _partial(x, y) == pytest.approx(1.0, **EXACT)
    with pytest.raises(ValueError, match="log scale needs"):
        log_rows([DecompositionRow("r", "lora", 10, "model.layers.0.self_attn.q_proj", 0, 0.0, 1.0)])


def test_leave_one_layer_out_finds_the_one_layer_that_makes_the_correlation():
    """Planted: no relation among 11 layers, one extreme layer 0 in every snapshot: dropping it alone removes r."""
    rng = np.random.default_rng(3)
    d_dir = rng.normal(size=(4, 12)) + 10
    d_mag = rng.normal(size=(4, 12)) + 10
    d_dir[:, 0] += 8
    d_mag[:, 0] -= 8
    rows = _rows(d_dir, d_mag, "full-seed0", "full")
    dropped = leave_one_layer_out(rows, "full", "q_proj", "partial")
    assert sorted(dropped) == list(range(12))
    for layer, value in dropped.items():
        keep = [l for l in range(12) if l != layer]
        assert value == pytest.approx(_partial(d_dir[:, keep], d_mag[:, keep]), **EXACT)
    assert _partial(d_dir, d_mag) < -0.5 and abs(dropped[0]) < 0.4 and max(dropped.values()) == dropped[0]


def test_transformed_rows_go_through_compare_to_null():
    rng = np.random.default_rng(4)
    x, y = _planted_run(rng, -0.9)
    nx, ny = _planted_run(rng, 0.0)
    rows, null = _rows(x, y, "dora-seed0"), _rows(nx, ny, "dora-seed0")
    (v,) = compare_to_null(log_rows(rows), log_rows(null), modules=("q_proj",), n_boot=300)
    assert v.verdicts["partial"] == "negative"
