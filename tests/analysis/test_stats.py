"""Statistics of the decomposition analysis on constructed data with known answers: the across-layer
correlations against plain numpy versions, a planted negative relation under a positive time trend, pure random
updates read as null, and the random-update null's size and rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torchdora.analysis import DecompositionRow
from torchdora.analysis.null import calibrate_scale, random_update_rows, random_weight
from torchdora.analysis.stats import (
    STATISTICS, Interval, average_ranks, bootstrap_layers, compare_to_null, decide, decomposition_grid,
    grid_statistics, percentile_interval,
)

# float64 sums of ≤ 200 terms: round-off ~1e-15 relative
EXACT = dict(rtol=1e-12, atol=1e-12)


def _rows(d_dir: np.ndarray, d_mag: np.ndarray, method: str = "full", run: str | None = None,
          module: str = "q_proj") -> list[DecompositionRow]:
    """An (S, L) grid as rows: snapshots at steps 10, 20, ...; layer l is ``model.layers.l.self_attn.<module>``."""
    return [DecompositionRow(run or method, method, 10 * (s + 1), f"model.layers.{l}.self_attn.{module}", l,
                             float(d_mag[s, l]), float(d_dir[s, l]))
            for s in range(d_dir.shape[0]) for l in range(d_dir.shape[1])]


def _rankdata(values: np.ndarray) -> np.ndarray:
    """Average ranks, the obvious O(L²) way (scipy.stats.rankdata's 'average')."""
    return np.array([1 + sum(v < x for v in values) + (sum(v == x for v in values) - 1) / 2 for x in values])


def test_grid_statistics_equal_plain_numpy_versions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 12)) + np.arange(4)[:, None]
    y = 0.5 * x + rng.normal(size=(4, 12))
    y[1, :4] = y[1, 4]  # ties for the rank version
    got = {k: float(v) for k, v in grid_statistics(torch.tensor(x), torch.tensor(y)).items()}
    want_within = np.mean([np.corrcoef(x[s], y[s])[0, 1] for s in range(4)])
    # partial correlation given the snapshot: residuals of a regression on one indicator per snapshot
    dummies = np.kron(np.eye(4), np.ones((12, 1)))  # (48, 4)
    res = lambda v: v.ravel() - dummies @ np.linalg.lstsq(dummies, v.ravel(), rcond=None)[0]  # noqa: E731
    want = {
        "pooled": np.corrcoef(x.ravel(), y.ravel())[0, 1],
        "within": want_within,
        "partial": np.corrcoef(res(x), res(y))[0, 1],
        "spearman": np.mean([np.corrcoef(_rankdata(x[s]), _rankdata(y[s]))[0, 1] for s in range(4)]),
    }
    for k in STATISTICS:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), k
    torch.testing.assert_close(average_ranks(torch.tensor(y[1])), torch.tensor(_rankdata(y[1])), **EXACT)


def test_bootstrap_interval_covers_a_known_correlation():
    rng = np.random.default_rng(1)
    rho, n = -0.6, 120
    xy = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=n).T  # (2, n)
    x, y = torch.tensor(xy[:1]), torch.tensor(xy[1:])  # one snapshot, n layers
    (boot,) = bootstrap_layers([(x, y)], n_boot=500, seed=0)
    interval = percentile_interval(float(grid_statistics(x, y)["within"]), boot["within"])
    assert interval.low < rho < interval.high and interval.high < 0
    # a percentile interval of a Pearson r at n = 120 is about ±2·(1 − ρ²)/√n wide
    assert 0.6 * 2 * 0.64 / math.sqrt(n) < (interval.high - interval.low) / 2 < 1.5 * 2 * 0.64 / math.sqrt(n)


def test_planted_negative_relation_under_a_positive_time_trend_is_negative():
    """Within each snapshot layers that turn more change their norm less; both grow over time. The pooled r
    is positive (the trap), every within-snapshot statistic negative, and the verdict says so."""
    rng = np.random.default_rng(2)
    n_steps, n_layers = 5, 30
    t = np.arange(1, n_steps + 1)[:, None] * 1.0  # (S, 1): the time trend
    u = rng.normal(size=(1, n_layers))
    noise = lambda: 0.15 * rng.normal(size=(n_steps, n_layers))  # noqa: E731
    d_dir = 1e-4 * t * np.exp(0.3 * u + noise())
    d_mag = 1e-3 * t * np.exp(-0.3 * u + noise())
    null_dir = 1e-4 * t * np.exp(0.3 * rng.normal(size=(1, n_layers)) + noise())
    null_mag = 1e-3 * t * np.exp(0.3 * rng.normal(size=(1, n_layers)) + noise())
    (verdict,) = compare_to_null(_rows(d_dir, d_mag), _rows(null_dir, null_mag), n_boot=500)
    assert verdict.statistics["pooled"].estimate > 0.3  # pooling snapshots builds in a positive relation
    for k in ("within", "partial", "spearman"):
        assert verdict.statistics[k].high < 0, k
        assert verdict.verdicts[k] == "negative", k
    assert verdict.verdict == "negative" and verdict.statistic == "partial"


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
def test_pure_random_updates_are_reported_as_null(method):
    """'Measured' rows that are themselves random updates (another seed of the null) are not told apart."""
    gen = torch.Generator().manual_seed(3)
    n_layers = 24
    weights = {f"model.layers.{l}.self_attn.q_proj": torch.randn(16, 32, generator=gen, dtype=torch.float64)
               * (0.5 + torch.rand(1, generator=gen, dtype=torch.float64)) for l in range(n_layers)}
    size = np.arange(1, 5)[:, None] * np.ones((1, n_layers))
    template = _rows(1e-4 * size, 1e-3 * size, method=method)
    measured = random_update_rows(weights, template, ranks={method: 2}, seed=1)
    null = random_update_rows(weights, template, ranks={method: 2}, seed=2)
    (verdict,) = compare_to_null(measured, null, n_boot=500)
    assert all(math.isfinite(verdict.difference[k].low) for k in STATISTICS)  # not "null" by way of NaN
    assert verdict.verdict == "not distinguishable from the null"
    assert verdict.verdicts["within"] == "not distinguishable from the null"
    # the null is not trivially flat: random updates on these weights do relate ΔM to ΔD
    assert math.isfinite(verdict.null["within"].estimate)


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
def test_null_has_the_measured_size_and_rank(method):
    gen = torch.Generator().manual_seed(4)
    weights = {f"m.{l}.q_proj": torch.randn(12, 20, generator=gen, dtype=torch.float64) for l in range(6)}
    d_dir = np.array([[1e-5, 3e-5, 2e-5, 1e-5, 4e-5, 2e-5], [4e-5, 5e-5, 6e-5, 2e-5, 9e-5, 3e-5]])
    d_mag = 10 * d_dir[:, ::-1].copy()
    template = [DecompositionRow(method, method, 10 * (s + 1), f"m.{l}.q_proj", l, float(d_mag[s, l]),
                                 float(d_dir[s, l])) for s in range(2) for l in range(6)]
    null = random_update_rows(weights, template, ranks={method: 3}, seed=0)
    x, y, _, _ = decomposition_grid(null, method, "q_proj")
    # one scale per snapshot: the mean ΔD over layers is the measured one (bisection/secant tolerance 1e-7)
    torch.testing.assert_close(x.mean(dim=1), torch.tensor(d_dir.mean(axis=1)), rtol=1e-6, atol=0)
    if method == "dora":  # and the magnitude scale gives the measured mean ΔM exactly (it is linear in τ)
        torch.testing.assert_close(y.mean(dim=1), torch.tensor(d_mag.mean(axis=1)), rtol=1e-10, atol=0)
    assert not torch.allclose(x, x.mean(dim=1, keepdim=True))  # layers differ: the spread is left to chance
    w0 = weights["m.0.q_proj"]
    walk = torch.randn(12, 3, generator=gen, dtype=torch.float64) if method != "full" else \
        torch.randn(12, 20, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    wt = random_weight(w0, method, walk, 0.1, a, torch.randn(12, generator=gen, dtype=torch.float64), 0.01)
    if method == "lora":
        assert torch.linalg.matrix_rank(wt - w0) == 3  # a rank-r update, as LoRA's
    if method == "dora":  # row norms are the magnitude, rows point along W0 + s·B·A
        v = w0 + 0.1 * walk @ a
        torch.testing.assert_close(wt / wt.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True), **EXACT)


def test_calibrate_scale_solves_quadratic_and_saturating_curves():
    assert calibrate_scale(lambda c: 3 * c * c, 2.7e-7) == pytest.approx(3e-4, rel=1e-6)
    saturating = lambda c: 1 - 1 / (1 + c * c)  # noqa: E731
    c = calibrate_scale(saturating, 0.9)
    assert saturating(c) == pytest.approx(0.9, rel=1e-6)
    assert calibrate_scale(saturating, 0.0) == 0.0


@pytest.mark.parametrize("measured, difference, want", [
    (Interval(-0.3, -0.5, -0.1), Interval(-0.4, -0.6, -0.2), "negative"),
    (Interval(0.3, 0.1, 0.5), Interval(0.2, 0.05, 0.4), "positive"),
    (Interval(-0.3, -0.5, -0.1), Interval(-0.1, -0.3, 0.1), "not distinguishable from the null"),
    (Interval(0.3, 0.1, 0.5), Interval(-0.3, -0.5, -0.1), "below the null"),
    (Interval(0.0, -0.2, 0.2), Interval(0.3, 0.1, 0.5), "above the null"),
])
def test_decide(measured, difference, want):
    assert decide(measured, difference) == want


def test_grid_needs_every_layer_in_every_snapshot():
    rows = _rows(np.ones((2, 3)), np.ones((2, 3)))[:-1]
    with pytest.raises(ValueError, match="lacks layers \\[2\\]"):
        decomposition_grid(rows, "full", "q_proj")


def test_analyze_cli_writes_the_statistics_and_their_null(tmp_path, capsys):
    """End to end on a 4-layer model: the printed table, the stats CSV (recomputed here from the rows CSV), the
    JSON and the figure."""
    transformers = pytest.importorskip("transformers")
    import csv
    import json

    import torchdora
    from torchdora.analysis import read_csv
    from torchdora.analysis.cli import main as analyze_main
    from torchdora.analysis.report import STATS_COLUMNS
    from torchdora.analysis.stats import VERDICTS

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    runs = []
    for method in ("lora", "dora"):
        model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
        torchdora.inject(model, torchdora.DoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"),
                                                     use_dora=method == "dora"))
        root = tmp_path / method
        for step in (10, 20, 30):
            with torch.no_grad():
                for layer in torchdora.adapter_layers(model).values():
                    layer.lora_B.add_(0.05 * torch.randn(layer.lora_B.shape))
                    if layer.magnitude is not None:
                        layer.magnitude.mul_(1 + 0.01 * torch.randn(layer.magnitude.shape))
            torchdora.save_adapter(model, root / "snapshots" / f"step-{step:06d}")
        (root / "config.json").write_text(json.dumps({"method": method}))
        runs.append(str(root))
    out = tmp_path / "out"
    assert analyze_main(["--model", str(tmp_path / "base"), *runs, "--output-dir", str(out), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "random updates" in printed and "partial" in printed
    with open(out / "decomposition_stats.csv", newline="") as f:
        stats = list(csv.DictReader(f))
    assert tuple(stats[0]) == STATS_COLUMNS and len(stats) == 2 * 2 * len(STATISTICS)
    assert all(s["verdict"] in VERDICTS for s in stats)
    rows = read_csv(out / "decomposition.csv")
    for s in stats:  # the estimates are those of the measured rows
        x, y, _, layers = decomposition_grid(rows, s["method"], s["modules"])
        assert layers == [0, 1, 2, 3] and int(s["snapshots"]) == 3
        assert float(s["estimate"]) == pytest.approx(float(grid_statistics(x, y)[s["statistic"]]), rel=1e-12)
        assert float(s["low"]) <= float(s["high"])
    data = json.loads((out / "decomposition.json").read_text())
    assert [(v["method"], v["modules"]) for v in data["statistics"]] == [
        ("lora", "q_proj"), ("lora", "v_proj"), ("dora", "q_proj"), ("dora", "v_proj")]
    assert (out / "decomposition_stats.png").stat().st_size > 0 and (out / "decomposition_scatter.png").is_file()


@pytest.mark.parametrize("df", [1, 2, 4, 9, 29, 30, 31, 60])
def test_t_quantile_holds_95_percent_of_the_t_density(df):
    """Integrate Student's t density (torch.distributions) over [−t, t]: 0.95 to the table's 3 digits."""
    q = __import__("torchdora.analysis.stats", fromlist=["t_quantile_975"]).t_quantile_975(df)
    grid = torch.linspace(-q, q, 200_001, dtype=torch.float64)
    density = torch.distributions.StudentT(torch.tensor(float(df), dtype=torch.float64)).log_prob(grid).exp()
    mass = float(torch.trapezoid(density, grid))
    assert mass == pytest.approx(0.95, abs=2e-4)


def test_paired_difference_and_its_wording():
    from torchdora.analysis.stats import binomial_se, describe_difference, paired_difference

    a, b = [0.80, 0.75, 0.70], [0.78, 0.74, 0.67]  # differences 0.02, 0.01, 0.03: mean 0.02, sd 0.01
    interval = paired_difference(a, b)
    half = 4.303 * 0.01 / math.sqrt(3)
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((0.02, 0.02 - half, 0.02 + half))
    assert describe_difference(interval) == "+2.0 points [-0.5, +4.5], not distinguishable"
    assert describe_difference(paired_difference([0.9, 0.8], [0.5, 0.45])).endswith("higher")
    assert math.isnan(paired_difference([0.5], [0.4]).low)
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="same length"):
        paired_difference([0.1], [0.1, 0.2])


def test_closed_form_direction_change_equals_measuring_built_weights():
    """The null's O(rows) ΔD(c) against :func:`row_changes` of ``W_0 + c·E`` built and measured, from angles of
    1e-7 rad (where 1 − cos cancels) to large ones."""
    from torchdora.analysis.decomposition import row_changes
    from torchdora.analysis.null import _mean_direction_change

    gen = torch.Generator().manual_seed(5)
    w0s = [torch.randn(k, 24, generator=gen, dtype=torch.float64) for k in (8, 16)]
    updates = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in w0s]
    mean_dd = _mean_direction_change(w0s, updates)
    for c in (1e-7, 1e-3, 0.3, 5.0):
        want = sum(float(row_changes(w, w + c * u)[1].mean()) for w, u in zip(w0s, updates)) / 2
        assert mean_dd(c) == pytest.approx(want, rel=1e-9), c
