"""The fused Triton kernels (:mod:`torchdora.kernels`) run by Triton's CPU interpreter against float64 references,
so every run of the suite executes them, GPU or not (the CUDA tests in ``test_fast.py`` check them on a device).

``TRITON_INTERPRET=1`` must be set before Triton defines a kernel, and another test may already have imported
Triton in this process, so the checks run in a fresh interpreter: ``python tests/test_kernels_interpret.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# (rows, columns, rank): one partial block, several blocks with ragged edges, a rank past BLOCK_R = 16
SHAPES = [(3, 5, 1), (70, 130, 5), (33, 200, 20)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _close_after_one_rounding(got: torch.Tensor, want64: torch.Tensor) -> None:
    """The kernels accumulate in fp32 and round once to the output dtype: within one unit in the last place of
    the float64 reference rounded to that dtype, plus fp32 accumulation error (1e-5 absolute at these sizes)."""
    rounded = want64.to(got.dtype).double()
    torch.testing.assert_close(got.double(), rounded, rtol=torch.finfo(got.dtype).eps, atol=1e-5)


def check_all() -> int:
    """Every kernel, dtype, shape, with and without the LoRA product and the bias; returns the number of cases."""
    from torchdora import kernels

    cases = 0
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for n, out, r in SHAPES:
            def rand(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
                return torch.randn(*shape, generator=gen).to(dtype)

            z, h, b, g, saved = rand(n, out), rand(n, r), rand(out, r), rand(n, out), rand(n, out)
            factor = torch.rand(out, generator=gen) + 0.5  # fp32, as the layer passes it
            for bias in (None, rand(out)):
                bias64 = 0.0 if bias is None else bias.double()
                for with_lora in (True, False):
                    lora = 0.7 * h.double() @ b.double().T if with_lora else 0.0
                    want = factor.double() * (z.double() + lora) + bias64  # f ⊙ (z + s·h Bᵀ) + b
                    got = kernels.lora_combine_(z.clone(), h if with_lora else None, b if with_lora else None,
                                                factor, bias, 0.7)
                    _close_after_one_rounding(got, want)
                    cases += 1
                dz, colsum = kernels.scale_and_colsum(g, saved, factor, bias)
                _close_after_one_rounding(dz, g.double() * factor.double())
                assert colsum.dtype == torch.float32
                want_sum = (g.double() * (saved.double() - bias64)).sum(0)  # Σ_rows g ⊙ (saved − b)
                torch.testing.assert_close(colsum.double(), want_sum, rtol=1e-5, atol=1e-5)
                cases += 1
    return cases


def test_kernels_under_the_triton_interpreter():
    pytest.importorskip("triton")
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    expected = len(DTYPES) * len(SHAPES) * 2 * 3
    assert f"checked {expected} cases" in done.stdout, done.stdout + done.stderr  # guard: the checks ran


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (pytest tests/test_kernels_interpret.py does)")
    print(f"checked {check_all()} cases")
