"""torchdora.analysis.page: a result set read back from its CSVs, the control's verdict on planted data."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from torchdora.analysis import DecompositionRow, write_csv
from torchdora.analysis.page import (
    analyse_set, control_reproduced, read_norms, read_set, seed_lines, sensitivity_lines, write_norms,
    write_set_csvs, write_table,
)

LAYERS, SNAPSHOTS = 12, 4


def _grid_rows(run: str, method: str, rho: float, rng: np.random.Generator) -> list[DecompositionRow]:
    """q_proj and v_proj grids whose within-snapshot correlation of ΔM on ΔD is about ``rho``."""
    out = []
    for kind in ("q_proj", "v_proj"):
        base, noise = rng.normal(size=(SNAPSHOTS, LAYERS)), rng.normal(size=(SNAPSHOTS, LAYERS))
        for s in range(SNAPSHOTS):
            for layer in range(LAYERS):
                d_dir = (s + 1) * (2 + 0.3 * base[s, layer])
                d_mag = (s + 1) * (5 + 0.3 * (rho * base[s, layer] + np.sqrt(1 - rho ** 2) * noise[s, layer]))
                out.append(DecompositionRow(run, method, 10 * (s + 1), f"model.layers.{layer}.self_attn.{kind}", layer,
                                            float(d_mag), float(d_dir)))
    return out


def _write_set(folder, full_rho: float, seeds=(0, 1)) -> None:
    rng = np.random.default_rng(0)
    rows, null = [], []
    for seed in seeds:
        for method, rho in (("full", full_rho), ("dora", 0.9)):
            rows += _grid_rows(f"{method}-seed{seed}", method, rho, rng)
            null += _grid_rows(f"{method}-seed{seed}", method, 0.0, rng)
    write_csv(rows, folder / "decomposition.csv")
    write_csv(null, folder / "null.csv")
    write_table(folder / "runs.csv", ["method", "seed", "finished"], [[m, s, True] for s in seeds for m in ("full", "dora")])


@pytest.fixture
def norms(tmp_path):
    values = {f"model.layers.{l}.self_attn.{k}": (l, 4, 1.0 + l) for l in range(LAYERS) for k in ("q_proj", "v_proj")}
    return read_norms(write_norms(values, tmp_path / "base_norms.csv"))


@pytest.mark.parametrize("full_rho, reproduced", [(-0.95, True), (0.0, False)])
def test_the_control_verdict_follows_a_planted_full_fine_tuning_sign(tmp_path, norms, full_rho, reproduced):
    folder = tmp_path / "plateau"
    folder.mkdir()
    _write_set(folder, full_rho)
    rs = read_set(folder, norms)
    assert rs is not None and rs.name == "plateau" and rs.methods == ["full", "dora"]
    an = analyse_set(rs, n_boot=200)
    assert control_reproduced(an) is reproduced
    assert an.verdict("dora", "q_proj").verdicts["partial"] == "positive"
    assert set(an.verdicts) == {"raw", "normalized", "log"}
    assert an.seeds[("full", "q_proj")].runs == ("full-seed0", "full-seed1")
    written = write_set_csvs(an, folder)
    assert [p.name for p in written] == ["stats.csv", "sensitivity.csv", "seeds.csv", "curves.csv", "loo.csv"]
    with open(folder / "curves.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * 2 * 2 * SNAPSHOTS  # runs × methods × module types × snapshots
    table = sensitivity_lines(an, ["full", "dora"], {})
    assert len(table) == 2 + 2 * 6 and all(line.count("|") == 9 for line in table)
    assert len(seed_lines(an, ["full", "dora"], {})) == 2 + 4


def test_a_folder_without_points_is_no_result_set(tmp_path, norms):
    assert read_set(tmp_path, norms) is None
