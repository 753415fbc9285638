"""Cached values that cannot go stale: each entry remembers the *contents* it was computed from.

DoRA's unmerged eval path reuses ``m / ||W + s·B·A||`` and ``||W||²`` per output feature.
Tensor version counters do not see every edit: ``p.data`` has its own counter (so ``p.data.add_(…)`` leaves
``p._version`` alone), fused optimizers write without bumping it, and a parametrization rebuilds its tensor on
every access, possibly at a reused address. So an entry here is checked against what it was computed from
before it is used:

- small tensors (the adapter's ``A``, ``B``, ``m``: ``r·(in + out) + out`` numbers per layer) are compared
  exactly with a copy kept when the entry was filled (``torch.equal``);
- the large frozen base weight is compared by identity (address, version counter, dtype, device, shape,
  strides) plus :data:`SAMPLE` of its entries spread over the whole tensor, one per block of
  ``numel / SAMPLE`` consecutive entries at a varying offset inside the block. Reading every entry of ``W``
  would cost what the layer's matrix product costs when it reads ``W`` (one token at a time, as in decoding).

The rule for code that edits the base weight in place *behind autograd* (through ``.data`` or a raw pointer) in
a way that may touch none of the sampled entries (a few rows, a few columns): call
:func:`torchdora.clear_cache` on the model afterwards. Every other change is seen: an in-place edit through
the parameter, an optimizer step, ``.to()``, a state-dict load, ``swap_tensors``, a parametrization, and any
edit of ``A``, ``B`` or ``m`` however it is made.

On CUDA a check reads its verdict on the host: one synchronisation per cache lookup.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["SAMPLE", "Snapshot", "CachedValue", "sample_of"]

#: how many entries of a large tensor (the base weight) are compared on every lookup
SAMPLE = 4096
_CHUNK = 32768


@functools.lru_cache(maxsize=128)
def _sample_positions(numel: int, device: torch.device) -> Tensor:
    """``min(numel, SAMPLE)`` flat positions: one in each block of ``numel // n`` entries, at an offset that
    varies from block to block (a fixed column per row would miss column edits)."""
    n = min(numel, SAMPLE)
    step = numel // n
    k = torch.arange(n, dtype=torch.int64)
    return (k * step + (k * 2654435761) % step).to(device)  # Knuth's multiplicative hash spreads the offsets


def sample_of(t: Tensor) -> Tensor:
    """The :data:`SAMPLE` entries of ``t`` that stand for it (all of them when it is small), a view or a gather."""
    flat = t.detach()
    flat = flat.view(-1) if flat.is_contiguous() else flat.reshape(-1)  # a copy only for a non-contiguous weight
    if flat.numel() <= SAMPLE:
        return flat
    # index_select, not flat[idx]: advanced indexing runs a parallel kernel whose thread hand-off alone took
    # 8 ms here on a loaded 2-core machine (index_select: 4 µs)
    return flat.index_select(0, _sample_positions(flat.numel(), flat.device))


def _meta(exact: Sequence[Tensor | None], sampled: Sequence[Tensor | None], extra: tuple) -> tuple:
    # a sampled tensor's identity catches replacements and tracked edits that miss every sampled entry
    return (
        tuple(None if t is None else (t.dtype, t.device, tuple(t.shape)) for t in exact),
        tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), t.stride())
              for t in sampled),
        extra,
    )


def _current(exact: Sequence[Tensor | None], sampled: Sequence[Tensor | None]) -> list[Tensor]:
    return [t.detach() for t in exact if t is not None] + [sample_of(t) for t in sampled if t is not None]


def _all_equal(current: list[Tensor], kept: list[Tensor]) -> bool:
    """Element-wise equality; the shapes already agree (:func:`_meta` is compared first)."""
    if current and current[0].device.type != "cpu":
        # one host synchronisation for all of them rather than one per tensor
        return bool(torch.stack([(a == b).all() for a, b in zip(current, kept)]).all())
    # in chunks below ATen's parallel grain (32768): a parallel torch.equal's thread hand-off cost 8 ms on the
    # loaded 2-core machine, a serial chunk microseconds
    return all(torch.equal(a[i:i + _CHUNK], b[i:i + _CHUNK])
               for a, b in ((x.reshape(-1), y.reshape(-1)) for x, y in zip(current, kept))
               for i in range(0, a.numel(), _CHUNK))


class Snapshot:
    """What a cached value was computed from: exact copies of ``exact`` tensors, a sample of ``sampled`` ones
    (with their identity), and ``extra`` hashable settings (a scaling, a method name)."""

    __slots__ = ("meta", "values")

    def __init__(self, exact: Sequence[Tensor | None] = (), sampled: Sequence[Tensor | None] = (),
                 extra: tuple = ()) -> None:
        self.meta = _meta(exact, sampled, extra)
        self.values = [t.clone() for t in _current(exact, sampled)]

    def matches(self, exact: Sequence[Tensor | None] = (), sampled: Sequence[Tensor | None] = (),
                extra: tuple = ()) -> bool:
        """Whether the tensors still hold what they held when the snapshot was taken (see the module doc)."""
        return _meta(exact, sampled, extra) == self.meta and _all_equal(_current(exact, sampled), self.values)


class CachedValue:
    """One value computed without autograd and reused while its inputs' :class:`Snapshot` matches."""

    __slots__ = ("_entry",)

    def __init__(self) -> None:
        self._entry: tuple[Snapshot, Tensor] | None = None

    def get(self, compute: Callable[[], Tensor], exact: Sequence[Tensor | None] = (),
            sampled: Sequence[Tensor | None] = (), extra: tuple = ()) -> Tensor:
        entry = self._entry
        if entry is None or not entry[0].matches(exact, sampled, extra):
            snapshot = Snapshot(exact, sampled, extra)
            with torch.no_grad():
                entry = self._entry = (snapshot, compute())
        return entry[1]

    def clear(self) -> None:
        self._entry = None
