"""Fused Triton kernels for the memory-bound parts of the DoRA linear layer on CUDA.

Imported lazily by :mod:`torchdora.fast` only for CUDA tensors; without Triton or CUDA :func:`available` is
``False`` and the PyTorch ops run instead (same results up to rounding order).

- :func:`lora_combine_`: ``y = f ⊙ (z + s·h Bᵀ) + b`` in place, the rank-``r`` product computed inside the
  elementwise pass, so the ``(tokens, out)`` output is read and written once instead of three times
  (``addmm_`` then ``addcmul``). Accumulates in fp32 and rounds once.
- :func:`scale_and_colsum`: backward's ``g ⊙ f`` and ``Σ_tokens g ⊙ (saved − b)`` (the magnitude gradient's
  reduction) in one read of ``g`` and ``saved``; the column sums are reduced per block of rows and then added
  up in a fixed order, so results are deterministic (no atomics).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

__all__ = ["available", "lora_combine_", "scale_and_colsum"]


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether CUDA is present and Triton imports (checked once). The kernels take fp32, bf16 and fp16."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _build():
    """Define the kernels on first use (``triton.jit`` needs Triton at import; Triton is optional)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _combine_kernel(z_ptr, h_ptr, b_ptr, f_ptr, bias_ptr, n_rows, n_cols, r, scaling,
                        stride_zm, stride_zn, stride_hm, stride_hr, stride_bn, stride_br,
                        HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        col_ok = cols < n_cols
        tile_ok = row_ok[:, None] & col_ok[None, :]
        z_offs = rows[:, None] * stride_zm + cols[None, :] * stride_zn
        acc = tl.load(z_ptr + z_offs, mask=tile_ok, other=0.0).to(tl.float32)
        if HAS_LORA:
            ks = tl.arange(0, BLOCK_R)
            k_ok = ks < r
            h = tl.load(h_ptr + rows[:, None] * stride_hm + ks[None, :] * stride_hr,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_R)
            bt = tl.load(b_ptr + cols[None, :] * stride_bn + ks[:, None] * stride_br,
                         mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_N) = Bᵀ tile
            if DOT_FP32:  # fp32 layers: full fp32 products, as torch's matmul does (no TF32)
                acc += scaling * tl.dot(h.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
            else:  # bf16/fp16: tensor cores, fp32 accumulation
                acc += scaling * tl.dot(h, bt)
        f = tl.load(f_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc * f[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(z_ptr + z_offs, acc.to(z_ptr.dtype.element_ty), mask=tile_ok)

    @triton.jit
    def _scale_colsum_kernel(g_ptr, s_ptr, f_ptr, bias_ptr, dz_ptr, part_ptr, n_rows, n_cols,
                             stride_gm, stride_gn, stride_sm, stride_sn, stride_dm,
                             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        ok = (rows < n_rows)[:, None] & col_ok[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sn, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            s = tl.where(ok, s - bias[None, :], 0.0)
        f = tl.load(f_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(dz_ptr + rows[:, None] * stride_dm + cols[None, :], (g * f[None, :]).to(dz_ptr.dtype.element_ty),
                 mask=ok)
        tl.store(part_ptr + pid_m * n_cols + cols, tl.sum(g * s, axis=0), mask=col_ok)

    return triton, _combine_kernel, _scale_colsum_kernel


def lora_combine_(z: Tensor, h: Tensor | None, lora_B: Tensor | None, factor: Tensor, bias: Tensor | None,
                  scaling: float) -> Tensor:
    """``z ← f ⊙ (z + s·h Bᵀ) + b``. ``z``: ``(N, out)``, ``h``: ``(N, r)``, ``lora_B``: ``(out, r)``, ``factor``,
    ``bias``: ``(out,)``. ``h``, ``lora_B`` in ``z``'s dtype. Returns ``z``."""
    triton, combine, _ = _build()
    n_rows, n_cols = z.shape
    has_lora = h is not None
    r = h.shape[1] if has_lora else 1
    block_r = max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16
    block_m, block_n = (64, 64) if block_r <= 64 else (32, 64)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    h_arg = h if has_lora else z
    b_arg = lora_B if has_lora else z
    combine[grid](
        z, h_arg, b_arg, factor.contiguous(), bias if bias is not None else factor, n_rows, n_cols, r, float(scaling),
        z.stride(0), z.stride(1), h_arg.stride(0), h_arg.stride(1), b_arg.stride(0), b_arg.stride(1),
        HAS_LORA=has_lora, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        # Triton's CPU interpreter (TRITON_INTERPRET=1, used to test these kernels without a GPU) has no bf16 dot
        DOT_FP32=z.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1",
    )
    return z


def scale_and_colsum(grad: Tensor, saved: Tensor, factor: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(grad ⊙ f, Σ_rows grad ⊙ (saved − b))`` for ``(N, out)`` tensors; the sum is fp32 ``(out,)``."""
    triton, _, colsum = _build()
    n_rows, n_cols = grad.shape
    dz = torch.empty((n_rows, n_cols), dtype=grad.dtype, device=grad.device)
    block_m, block_n = 64, 128
    row_blocks = triton.cdiv(n_rows, block_m)
    # one fp32 partial sum per block of rows, added up afterwards in a fixed order (deterministic, no atomics);
    # the partials are 1/64 the size of the gradient
    partial = torch.empty((row_blocks, n_cols), dtype=torch.float32, device=grad.device)
    colsum[(row_blocks, triton.cdiv(n_cols, block_n))](
        grad, saved, factor.contiguous(), bias if bias is not None else factor, dz, partial, n_rows, n_cols,
        grad.stride(0), grad.stride(1), saved.stride(0), saved.stride(1), dz.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return dz, partial.sum(0)
