"""The DoRA equations as pure functions: one place for the math.

DoRA (Liu et al., ICML 2024, arXiv 2402.09353, eq. 5) re-parametrises an adapted weight as

    W' = m * (W + s·B·A) / ||W + s·B·A||

with one 2-norm per output feature (a row of the weight in PyTorch orientation). Every adapter layer,
merging, the weight-decomposition analysis and the tests call the functions here with the weight seen as
a 2-D ``(out, in)`` matrix of output-feature rows; the layers own only the reshaping.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "lora_scaling",
    "delta_weight",
    "dense_row_norm",
    "factored_row_norm",
    "base_row_sq_norm",
    "dequantized_row_blocks",
    "blockwise_row_sq_norm",
    "blockwise_weight_times_At",
    "row_norm_from_terms",
    "dora_scale",
    "merged_weight",
    "unmerged_weight",
    "merged_weight_of_adapters",
    "unmerged_weight_of_adapters",
    "dora_combine",
    "vera_projections",
    "vera_factors",
    "vera_update",
    "weighted_combination",
    "weight_sketch",
    "sketch_difference",
]


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """LoRA's scale ``s``: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (Kalajdzievski, 2023)."""
    if r <= 0:
        raise ValueError(f"rank r must be a positive integer, got r={r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``s·B·A`` as an ``(out, in)`` matrix. ``lora_A``: ``(r, in)``, ``lora_B``: ``(out, r)``."""
    return scaling * (lora_B @ lora_A)  # (out, in)


def dense_row_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``||W + s·B·A||`` per row, by building the dense ``(out, in)`` matrix.

    The obvious formula; the reference the factored norm is tested against. Accumulates in at least fp32.
    Returns ``(out,)`` in fp32 (or fp64 for fp64 inputs).
    """
    acc = torch.promote_types(weight.dtype, torch.float32)
    adapted = weight.to(acc) + delta_weight(lora_A.to(acc), lora_B.to(acc), scaling)  # (out, in)
    return torch.linalg.vector_norm(adapted, dim=1)


#: rows of a low-precision weight upcast at a time: bounds the fp32 temporary to about this many elements
_UPCAST_BLOCK_ELEMENTS = 1 << 22


def _row_blocks(weight: Tensor) -> list[Tensor]:
    """``weight`` split into blocks of whole rows of at most ``_UPCAST_BLOCK_ELEMENTS`` elements (views)."""
    rows = max(1, _UPCAST_BLOCK_ELEMENTS // max(1, weight.shape[1]))
    return list(weight.split(rows, dim=0))


def base_row_sq_norm(weight: Tensor) -> Tensor:
    """``||W||²`` per row, accumulated in fp32 without an fp32 copy of ``W``. ``(out, in)`` → ``(out,)``."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    if weight.dtype == acc:
        return torch.einsum("oi,oi->o", weight, weight)
    # Upcast a block of rows at a time: einsum on the low-precision tensor would round every product to
    # bf16/fp16, and weight.float() (or vector_norm(dtype=...), which upcasts the whole input on CPU) would
    # allocate a full fp32 copy of W.
    return torch.cat([torch.einsum("oi,oi->o", blk.to(acc), blk.to(acc)) for blk in _row_blocks(weight)])


def _weight_times_At(weight: Tensor, lora_A: Tensor, acc: torch.dtype) -> Tensor:
    """``W Aᵀ`` ``(out, r)`` in the accumulation dtype ``acc``, with no full-size upcast copy of ``W``."""
    a = lora_A.to(acc)
    if weight.dtype == acc:
        return weight @ a.T
    return torch.cat([blk.to(acc) @ a.T for blk in _row_blocks(weight)])


def dequantized_row_blocks(
    dequantize_rows: Callable[[int, int], Tensor], out_features: int, block_rows: int
) -> Iterator[Tensor]:
    """Rows ``[i, i + block_rows)`` of a quantized ``(out, in)`` weight, dequantized one block at a time.

    ``dequantize_rows(start, stop)`` returns rows ``start:stop`` as a float tensor ``(stop − start, in)``; only one
    block is alive at a time, so a caller that reduces each block holds ``block_rows × in`` floats, never ``W``.
    """
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got block_rows={block_rows}")
    for start in range(0, out_features, block_rows):
        yield dequantize_rows(start, min(start + block_rows, out_features))


def blockwise_row_sq_norm(blocks: Iterator[Tensor] | list[Tensor]) -> Tensor:
    """``||W||²`` per row from consecutive row blocks of ``W`` (each ``(rows, in)``), ``(out,)`` in fp32 or fp64.

    Each block is upcast to at least fp32 before squaring: bf16/fp16 products would round every term.
    """
    parts = []
    for blk in blocks:
        blk = blk.to(torch.promote_types(blk.dtype, torch.float32))
        parts.append(torch.einsum("oi,oi->o", blk, blk))
    return torch.cat(parts)


def blockwise_weight_times_At(blocks: Iterator[Tensor] | list[Tensor], lora_A: Tensor) -> Tensor:
    """``W Aᵀ`` ``(out, r)`` from consecutive row blocks of ``W`` (each ``(rows, in)``), ``lora_A`` ``(r, in)``.

    In at least fp32 with ``A`` unrounded: the factored norm's cross term cancels against ``||W||²``.
    """
    parts = []
    for blk in blocks:
        acc = torch.promote_types(torch.promote_types(blk.dtype, lora_A.dtype), torch.float32)
        parts.append(blk.to(acc) @ lora_A.to(acc).T)  # (rows, r)
    return torch.cat(parts)


def factored_row_norm(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    base_sq_norm: Tensor | None = None,
) -> Tensor:
    """``||W + s·B·A||`` per row without forming the ``(out, in)`` matrix.

        n² = ||W||² + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B (A Aᵀ)) ⊙ B)

    ``W Aᵀ`` is ``(out, r)`` and ``A Aᵀ`` is ``(r, r)``. ``base_sq_norm`` (``||W||²`` per row, a constant
    of the frozen base) may be passed in from a cache. All sums are accumulated in at least fp32;
    round-off can make ``n²`` slightly negative when ``W + s·B·A`` nearly vanishes, so it is clamped at 0.
    """
    acc = torch.promote_types(weight.dtype, torch.float32)
    if base_sq_norm is None:
        base_sq_norm = base_row_sq_norm(weight)
    # W Aᵀ: the one O(out·in·r) product, in fp32 with A unrounded (the cross term must not lose bits to
    # cancellation), upcasting W a block of rows at a time.
    wa = _weight_times_At(weight, lora_A, acc)  # (out, r)
    return row_norm_from_terms(base_sq_norm, wa, lora_A, lora_B, scaling)


def row_norm_from_terms(base_sq_norm: Tensor, weight_At: Tensor, lora_A: Tensor, lora_B: Tensor,
                        scaling: float) -> Tensor:
    """``||W + s·B·A||`` per row from ``||W||²`` ``(out,)`` and ``W Aᵀ`` ``(out, r)``, the two terms that read ``W``.

        n² = ||W||² + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B (A Aᵀ)) ⊙ B)

    The rest of :func:`factored_row_norm`, for callers that produce the terms another way (a quantized base
    dequantized block by block, :func:`blockwise_weight_times_At`). Accumulates in ``weight_At``'s dtype.
    """
    acc = weight_At.dtype
    wa = weight_At
    a = lora_A.to(acc)
    b = lora_B.to(acc)
    cross = (b * wa).sum(dim=1)  # (out,)
    gram = a @ a.T  # (r, r)
    quad = ((b @ gram) * b).sum(dim=1)  # (out,)
    sq = base_sq_norm.to(acc) + (2.0 * scaling) * cross + (scaling * scaling) * quad
    sq = sq.clamp_min(0.0)
    # sqrt'(0) = inf would turn a zero row's zero upstream gradient into NaN (exact-gradient mode);
    # take 0 there instead, the same subgradient vector_norm uses.
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def dora_scale(magnitude: Tensor, norm: Tensor) -> Tensor:
    """The per-row factor ``m / n``; ``0`` where ``n == 0``.

    A row with ``n = 0`` has ``W + s·B·A = 0``, so its adapted weight is zero whatever the factor is;
    choosing 0 keeps outputs and gradients finite (no ``m / 0 = inf`` times ``0 = NaN``).
    """
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return torch.where(norm > 0, magnitude / safe, torch.zeros_like(magnitude))


def merged_weight(
    weight: Tensor, lora_A: Tensor | None, lora_B: Tensor | None, magnitude: Tensor | None, scaling: float
) -> tuple[Tensor, Tensor | None]:
    """The merged ``(out, in)`` weight and the per-row factor used (``None`` for plain LoRA).

    DoRA: ``W' = (m / n)[:, None] * (W + s·B·A)``; LoRA (``magnitude is None``): ``W + s·B·A``;
    magnitude-only DoRA (``lora_A is None``): ``(m / ||W||)[:, None] * W``. Computed in at least fp32 and
    returned in ``weight.dtype``. Keep the factor to undo the merge exactly with :func:`unmerged_weight`.
    """
    acc = torch.promote_types(weight.dtype, torch.float32)
    adapted = weight.to(acc)
    if lora_A is not None and lora_B is not None:
        adapted = adapted + delta_weight(lora_A.to(acc), lora_B.to(acc), scaling)
    if magnitude is None:
        return adapted.to(weight.dtype), None
    factor = dora_scale(magnitude.to(acc), torch.linalg.vector_norm(adapted, dim=1))  # (out,)
    return (factor[:, None] * adapted).to(weight.dtype), factor


def unmerged_weight(
    merged: Tensor, lora_A: Tensor | None, lora_B: Tensor | None, factor: Tensor | None, scaling: float
) -> Tensor:
    """Invert :func:`merged_weight`: ``W = W' / factor[:, None] − s·B·A``.

    A row whose factor is 0 (zero norm) had ``W = −s·B·A``, which is what this returns for it.
    """
    acc = torch.promote_types(merged.dtype, torch.float32)
    weight = merged.to(acc)
    if factor is not None:
        factor = factor.to(acc)
        safe = torch.where(factor != 0, factor, torch.ones_like(factor))
        weight = torch.where(factor[:, None] != 0, weight / safe[:, None], torch.zeros_like(weight))
    if lora_A is not None and lora_B is not None:
        weight = weight - delta_weight(lora_A.to(acc), lora_B.to(acc), scaling)
    return weight.to(merged.dtype)


#: one adapter's part of a merge: ``(A (r, in) | None, B (out, r) | None, m (out,) | None, s)``
AdapterTerms = tuple[Tensor | None, Tensor | None, Tensor | None, float]


def merged_weight_of_adapters(weight: Tensor, adapters: Sequence[AdapterTerms]) -> tuple[Tensor, list[Tensor | None]]:
    """The one weight that computes what several adapters active together compute, and each DoRA factor.

    Active adapters add their updates to the shared base (PEFT's rule), each DoRA adapter normalised against the
    *pre-trained* ``W`` (paper eq. 5 per adapter)::

        W' = W + Σ_DoRA [diag(f_i)(W + s_i B_i A_i) − W] + Σ_LoRA s_i B_i A_i,    f_i = m_i / ||W + s_i B_i A_i||

    With one adapter this is :func:`merged_weight`. Merging one adapter after another instead (each normalised
    against the already-merged weight) is a different model. Computed in at least fp32, returned in
    ``weight.dtype``; the factors (``None`` for LoRA) let :func:`unmerged_weight_of_adapters` undo it.
    """
    acc = torch.promote_types(weight.dtype, torch.float32)
    base = weight.to(acc)
    out = base.clone()
    factors: list[Tensor | None] = []
    for lora_A, lora_B, magnitude, scaling in adapters:
        adapted = base if lora_A is None or lora_B is None else base + delta_weight(
            lora_A.to(acc), lora_B.to(acc), scaling)
        if magnitude is None:
            factors.append(None)
            out += adapted - base
            continue
        factor = dora_scale(magnitude.to(acc), torch.linalg.vector_norm(adapted, dim=1))  # (out,)
        factors.append(factor)
        out += factor[:, None] * adapted - base
    return out.to(weight.dtype), factors


def unmerged_weight_of_adapters(
    merged: Tensor, adapters: Sequence[tuple[Tensor | None, Tensor | None, Tensor | None, float]]
) -> tuple[Tensor, Tensor]:
    """Invert :func:`merged_weight_of_adapters` from its factors: ``(W, lost)`` with ``lost`` ``(out,)`` bool.

    ``adapters``: ``(A, B, f, s)`` per merged adapter, ``f`` the factor the merge returned (``None``: LoRA). The
    merged weight is ``W' = c ⊙ W + Σ_i g_i ⊙ s_i B_i A_i`` with ``c = 1 + Σ_DoRA (f_i − 1)`` and ``g_i = f_i``
    (DoRA) or 1 (LoRA), so ``W = (W' − Σ_i g_i ⊙ s_i B_i A_i) / c``. Rows where ``c = 0`` carry no trace of ``W``;
    they are returned as 0 and flagged in ``lost`` (keep them aside when merging to restore them exactly).
    """
    acc = torch.promote_types(merged.dtype, torch.float32)
    rest = merged.to(acc).clone()
    c = torch.ones(merged.shape[0], dtype=acc, device=merged.device)
    for lora_A, lora_B, factor, scaling in adapters:
        g = None if factor is None else factor.to(acc)
        if g is not None:
            c += g - 1
        if lora_A is not None and lora_B is not None:
            delta = delta_weight(lora_A.to(acc), lora_B.to(acc), scaling)
            rest -= delta if g is None else g[:, None] * delta
    lost = c == 0
    safe = torch.where(lost, torch.ones_like(c), c)
    weight = torch.where(lost[:, None], torch.zeros_like(rest), rest / safe[:, None])
    return weight.to(merged.dtype), lost


def dora_combine(
    base_out: Tensor,
    lora_out: Tensor | None,
    factor: Tensor,
    scaling: float,
    dropped_base_out: Tensor | None = None,
) -> Tensor:
    """Combine the bias-free base product and the LoRA product into the DoRA output (bias excluded).

    ``factor`` (``m / n``) must already be shaped to broadcast over the output-feature axis.
    Without dropout (``dropped_base_out is None``): ``factor ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ)``.
    With dropout, ``x~ = dropout(x)`` (the form of the official code and PEFT)::

        x Wᵀ + (factor − 1) ⊙ (x~ Wᵀ) + factor ⊙ s·(x~ Aᵀ) Bᵀ
    """
    if dropped_base_out is None:
        adapted = base_out if lora_out is None else base_out + scaling * lora_out
        return factor * adapted
    out = base_out + (factor - 1) * dropped_base_out
    if lora_out is not None:
        out = out + factor * (scaling * lora_out)
    return out


# ---- VeRA and DVoRA ---------------------------------------------------------------------------------------
def vera_projections(r: int, in_features: int, out_features: int, seed: int) -> tuple[Tensor, Tensor]:
    """VeRA's frozen random pair ``A`` ``(r, in)`` and ``B`` ``(out, r)`` from ``seed`` (Kopiczko et al., §3.1).

    Kaiming-uniform with gain ``√2`` and the fan-in of each matrix (``in`` for ``A``, ``r`` for ``B``):
    ``U(−√(6/fan_in), √(6/fan_in))``, drawn ``A`` first then ``B`` from one CPU generator seeded with ``seed``.
    This is PEFT's ``projection_prng_key`` rule, so the same seed and sizes give PEFT's ``vera_A``/``vera_B``
    bit for bit. Returned in fp32 on the CPU.
    """
    if r <= 0 or in_features <= 0 or out_features <= 0:
        raise ValueError(f"VeRA projections need positive sizes, got r={r}, in={in_features}, out={out_features}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    pair = []
    for shape, fan_in in (((r, in_features), in_features), ((out_features, r), r)):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in)
        pair.append(torch.empty(shape).uniform_(-bound, bound, generator=generator))
    return pair[0], pair[1]


def vera_factors(vera_A: Tensor, vera_B: Tensor, lambda_d: Tensor, lambda_b: Tensor) -> tuple[Tensor, Tensor]:
    """VeRA's update as a LoRA pair: ``A' = Λ_d A`` ``(r, in)`` and ``B' = Λ_b B`` ``(out, r)``.

    ``ΔW = Λ_b B Λ_d A = B' A'`` (Kopiczko et al., eq. 1) is still rank ``r``, so every LoRA/DoRA function here
    (:func:`delta_weight`, :func:`factored_row_norm`, :func:`merged_weight`) applies with scale 1; this is how
    DVoRA (DoRA paper §5.4) gets DoRA's factored norm. ``vera_A``/``vera_B``: the layer's slices of the shared
    pair; ``lambda_d``: ``(r,)``; ``lambda_b``: ``(out,)``.
    """
    return lambda_d[:, None] * vera_A, lambda_b[:, None] * vera_B  # (r, in), (out, r)


def vera_update(x: Tensor, vera_A: Tensor, vera_B: Tensor, lambda_d: Tensor, lambda_b: Tensor) -> Tensor:
    """VeRA's output term ``x (Λ_b B Λ_d A)ᵀ = ((x Aᵀ) ⊙ d) Bᵀ ⊙ b`` without forming the ``(out, in)`` matrix.

    ``x``: ``(..., in)``; returns ``(..., out)``. Same order as PEFT's forward, so float32 results agree to
    round-off: two thin products and two scalings per row.
    """
    return lambda_b * ((lambda_d * (x @ vera_A.T)) @ vera_B.T)  # (..., r) -> (..., out)


def weighted_combination(
    parts: Sequence[tuple[float, Tensor | None, Tensor | None, Tensor | None, float]], base_norm: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(A, B, m)`` at scale 1 of the adapter whose updates are the weighted updates of ``parts``.

    ``parts``: ``(w_i, A_i (r_i, in) | None, B_i (out, r_i) | None, m_i (out,) | None, s_i)``; ``base_norm``:
    ``||W||`` per row ``(out,)``. ``A = [A_1; …; A_k]`` ``(Σ r_i, in)`` and ``B = [w_1 s_1 B_1, …, w_k s_k B_k]``
    ``(out, Σ r_i)``, so ``B A = Σ_i w_i s_i B_i A_i`` exactly; DoRA: ``m = ||W|| + Σ_i w_i (m_i − ||W||)``, each
    magnitude change relative to the base's norm weighted like its directional update (``Σ_i w_i m_i`` when the
    weights sum to 1); LoRA (``m_i`` is ``None``): ``m`` is ``None``. Magnitude-only parts have no ``A``/``B``.
    """
    with_ab = [(w, a, b, s) for w, a, b, _, s in parts if a is not None]
    a = torch.cat([a for _, a, _, _ in with_ab]) if with_ab else None
    b = torch.cat([w * s * b for w, _, b, s in with_ab], dim=1) if with_ab else None
    if parts[0][3] is None:
        return a, b, None
    base = base_norm.to(parts[0][3].dtype)
    m = base + sum(w * (m_i - base) for w, _, _, m_i, _ in parts)
    return a, b, m


#: rows and columns of :func:`weight_sketch`'s random projections
SKETCH_SIZE = 4


def weight_sketch(weight: Tensor) -> Tensor:
    """``Uᵀ W V`` ``(4, 4)`` in float64, with ``U`` ``(out, 4)`` and ``V`` ``(in, 4)`` standard normal drawn from a
    seed fixed by the weight's shape: a 16-number fingerprint of an ``(out, in)`` weight.

    Two weights of one shape give sketches whose difference estimates theirs (a Johnson-Lindenstrauss sketch):
    ``||S(W) − S(W')||_F / ||S(W)||_F`` is about ``||W − W'||_F / ||W||_F`` (:func:`sketch_difference`; within a
    factor of about 1.5 with 16 numbers), and exactly 0 for identical weights.
    """
    out_features, in_features = weight.shape
    gen = torch.Generator().manual_seed(1_000_003 * out_features + in_features)
    u = torch.randn(out_features, SKETCH_SIZE, generator=gen, dtype=torch.float64)
    v = torch.randn(in_features, SKETCH_SIZE, generator=gen, dtype=torch.float64)
    return u.T @ (weight.detach().to("cpu", torch.float64) @ v)  # (4, 4)


def sketch_difference(sketch: Tensor, other: Tensor) -> float:
    """The relative difference of two weights estimated from their :func:`weight_sketch` (0 for equal weights)."""
    scale = float(torch.linalg.vector_norm(sketch))
    return float(torch.linalg.vector_norm(sketch - other)) / scale if scale > 0 else float(other.abs().max() > 0)
