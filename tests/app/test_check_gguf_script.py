"""scripts/check_gguf_llamacpp.py's per-prompt evidence (the llama.cpp run itself needs the optional build and is not
part of the suite): which steps share a context, the first difference, the margins there, the near-tie verdict."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from check_gguf_llamacpp import compare, top2_margin


def logits(*rows: list[float]) -> list[np.ndarray]:
    return [np.array(r, dtype=np.float64) for r in rows]


def test_top2_margin_names_the_two_largest_and_their_gap():
    assert top2_margin(np.array([0.5, 3.0, -1.0, 2.75])) == {"top2": [1, 3], "margin": 0.25}


def test_equal_runs_compare_every_step():
    ref = ([1, 0], logits([0.0, 2.0, 1.0], [3.0, 1.0, 0.0]))
    got = ([1, 0], logits([0.0, 2.0, 1.5], [3.0, 1.0, 0.25]))
    result = compare(ref, got)
    assert result["equal"] and result["matching_tokens"] == 2 and result["first_difference_at"] is None
    assert result["max_abs_logit_diff"] == pytest.approx(0.5)  # step 0, token 2
    assert result["max_rel_logit_diff"] == pytest.approx(0.25)  # 0.5 / max |logit| 2.0 of that step
    assert result["min_torch_margin_on_shared"] == pytest.approx(1.0)
    assert "near_tie" not in result


def test_a_flipped_near_tie_is_reported_with_both_margins():
    # step 1 is a tie within the noise (margin 0.1 < the 0.3 difference seen on the shared steps); step 2's logits
    # follow different contexts and must not count
    ref = ([2, 0, 1], logits([0.0, 1.0, 4.0], [2.0, 1.9, 0.0], [0.0, 9.0, 0.0]))
    got = ([2, 1, 0], logits([0.0, 1.3, 4.0], [1.9, 2.0, 0.0], [9.0, 0.0, 0.0]))
    result = compare(ref, got)
    assert not result["equal"] and result["matching_tokens"] == 1 and result["first_difference_at"] == 1
    assert result["max_abs_logit_diff"] == pytest.approx(0.3)  # steps 0 and 1 only: step 2's 9.0 is excluded
    assert result["torch_at_difference"] == {"top2": [0, 1], "margin": pytest.approx(0.1)}
    assert result["llamacpp_at_difference"] == {"top2": [1, 0], "margin": pytest.approx(0.1)}
    assert result["near_tie"]


def test_a_difference_with_a_margin_above_the_noise_is_not_a_near_tie():
    # margin 1.0, every logit moved by 0.6 at most: the flip is not explained by a difference of that size
    ref = ([0], logits([2.0, 1.0]))
    got = ([1], logits([1.4, 1.6]))
    result = compare(ref, got)
    assert result["first_difference_at"] == 0 and result["max_abs_logit_diff"] == pytest.approx(0.6)
    assert not result["near_tie"]
