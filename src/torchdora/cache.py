"""Cached values checked against what the host already knows: no device synchronisation, no tensor comparison.

DoRA's unmerged forward reuses ``||W||²`` and ``m / ||W + s·B·A||`` per output feature (the norm is a constant
of the adapter while it is not trained: paper §4.3, ``docs/architecture.md``). A :class:`CachedValue` entry
remembers, for each tensor it was computed from, facts that live on the host:

- the tensor's storage (a weak reference: a storage that was freed or replaced never matches again, even when
  the new one sits at the same address), the storage's address, and the tensor's offset, shape, strides, dtype;
- the tensor's version counter, which every in-place edit through the tensor or a view of it bumps:
  ``with torch.no_grad(): p.add_(…)``, ``p.copy_(…)``, ``load_state_dict``, the for-loop and ``foreach``
  optimizers;
- for an entry computed from a trainable tensor (``requires_grad``), how many ``torch.optim.Optimizer.step()``
  calls the process has made: fused optimizers (``fused=True``) write the parameters without bumping their
  version counters (torch 2.13), so any step invalidates such entries (the frozen base's ``||W||²`` stays).

Reading these costs about a microsecond per tensor and never waits for the device, so an unmerged DoRA forward
at one token (decoding) costs what LoRA's does.

**The rule for edits these facts cannot see**: call :func:`torchdora.clear_cache` on the model after

- an in-place edit through ``.data`` (``p.data.add_(…)``, ``p.data.copy_(…)``): ``p.data`` is a new tensor with
  a version counter of its own, so ``p``'s does not move (measured: ``p._version`` is unchanged);
- a write through memory shared outside autograd (``t.numpy()``, DLPack, a raw pointer, a custom kernel that
  does not declare its output mutated);
- a parameter update by code that is not a ``torch.optim.Optimizer`` and writes behind the version counter.

Everything else is seen: an in-place edit through the tensor (``torch.no_grad()`` included), an optimizer step,
``.to()``/``.half()`` and back, ``p.data = new_tensor``, ``load_state_dict``, ``torch.utils.swap_tensors``, a
parametrization (its tensor is rebuilt on every access, so it is never reused), and any change of shape or dtype.

Under ``torch.compile`` the eager lookup is not traceable; :func:`in_graph` reads the cached value through a
custom operator that runs at run time, so a compiled eval forward reads the norm instead of recomputing it.
``docs/cache.md`` has the table of what is seen and the tests behind it.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["SAMPLE", "CachedValue", "in_graph", "optimizer_steps", "sample_of"]

#: how many entries of a large tensor stand for it in :func:`sample_of`
SAMPLE = 4096


@functools.lru_cache(maxsize=128)
def _sample_positions(numel: int, device: torch.device) -> Tensor:
    """``min(numel, SAMPLE)`` flat positions: one in each block of ``numel // n`` entries, at an offset that
    varies from block to block (a fixed column per row would miss column edits)."""
    n = min(numel, SAMPLE)
    step = numel // n
    k = torch.arange(n, dtype=torch.int64)
    return (k * step + (k * 2654435761) % step).to(device)  # Knuth's multiplicative hash spreads the offsets


def sample_of(t: Tensor) -> Tensor:
    """The :data:`SAMPLE` entries of ``t`` that stand for it (all of them when it is small), a view or a gather.

    Not used by the cache (its checks read no tensor data); merging keeps one to recognise the weight it wrote.
    """
    flat = t.detach()
    flat = flat.view(-1) if flat.is_contiguous() else flat.reshape(-1)  # a copy only for a non-contiguous weight
    if flat.numel() <= SAMPLE:
        return flat
    # index_select, not flat[idx]: advanced indexing runs a parallel kernel whose thread hand-off alone took
    # 8 ms here on a loaded 2-core machine (index_select: 4 µs)
    return flat.index_select(0, _sample_positions(flat.numel(), flat.device))


# ---- optimizer steps ------------------------------------------------------------------------------------------
_steps = 0
_hook: Any = None


def _count_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _steps
    _steps += 1


def optimizer_steps() -> int:
    """How many ``torch.optim.Optimizer.step()`` calls this process has made since the first cache was built."""
    return _steps


def _watch_optimizers() -> None:
    """Count optimizer steps from now on (a global post-step hook, installed once, on the first cache)."""
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_count_step)


# ---- host-side facts ------------------------------------------------------------------------------------------
#: how many times some :meth:`CachedValue.clear` ran (a compiled graph's copies are read again after one)
_clears = 0


def _fact(t: Tensor, storage: Any) -> tuple:
    return storage.data_ptr(), t._version, t.storage_offset(), t.shape, t.stride(), t.dtype


class CachedValue:
    """One value computed without autograd and reused while the host-side facts of its inputs hold (see the
    module doc): the tensors' storages, addresses, version counters and layout, the optimizer step count (for
    trainable inputs) and ``extra`` hashable settings (a scaling, a method name)."""

    __slots__ = ("_kept", "_extra", "_steps", "_value", "_inference", "__weakref__")

    def __init__(self) -> None:
        _watch_optimizers()
        self._reset()

    def _holds(self, tensors: Sequence[Tensor | None], extra: tuple) -> bool:
        kept = self._kept
        if kept is None or len(kept) != len(tensors) or extra != self._extra:
            return False
        if self._inference and not torch.is_inference_mode_enabled():
            return False  # a value made under inference_mode cannot enter autograd's graph outside it
        trainable = False
        for t, (fact, ref) in zip(tensors, kept):  # a plain loop: this runs per layer per generated token
            if t is None:
                if ref is not None:
                    return False
                continue
            storage = t.untyped_storage()
            if ref is None or ref() is not storage or _fact(t, storage) != fact:
                return False
            trainable = trainable or t.requires_grad
        return not trainable or self._steps == _steps

    def get(self, compute: Callable[[], Any], tensors: Sequence[Tensor | None] = (), extra: tuple = ()) -> Any:
        """The cached value, or ``compute()`` (run under ``torch.no_grad()``) when some fact changed."""
        if self._holds(tensors, extra):
            return self._value
        with torch.no_grad():
            value = compute()
        kept = []
        for t in tensors:
            if t is None:
                kept.append((None, None))
            else:
                storage = t.untyped_storage()
                kept.append((_fact(t, storage), weakref.ref(storage)))
        self._kept, self._extra, self._steps, self._value = kept, extra, _steps, value
        self._inference = isinstance(value, Tensor) and value.is_inference()
        return value

    def clear(self) -> None:
        """Forget the value (:func:`torchdora.clear_cache`); every compiled graph's copy of a cached value
        (:func:`in_graph`) is read again too."""
        global _clears
        _clears += 1
        self._reset()

    def _reset(self) -> None:
        self._kept: list | None = None
        self._extra: tuple = ()
        self._steps = -1
        self._value: Any = None
        self._inference = False

    def __deepcopy__(self, memo: dict) -> "CachedValue":
        return CachedValue()  # a copy's tensors are new storages: nothing cached would match

    def __reduce__(self) -> tuple:
        return (CachedValue, ())  # pickled empty (torch.save of a whole model)


# ---- under torch.compile ------------------------------------------------------------------------------------
#: per handle: the owner's bound method (weakly), its arguments, and the operator's copy of what it returned
_reads: dict[int, tuple[weakref.WeakMethod, tuple, CachedValue]] = {}
_handles: dict[tuple[int, str, tuple, tuple], int] = {}
_next_handle = itertools.count()


@torch.compiler.assume_constant_result
def _handle(owner: nn.Module, method: str, args: tuple, settings: tuple) -> int:
    """A number naming ``owner.<method>(*args)`` under ``settings``, baked into the compiled graph; run once,
    while tracing (Dynamo guards the graph on ``owner``'s identity and on ``settings``)."""
    key = (id(owner), method, args, settings)
    handle = _handles.get(key)
    bound = None if handle is None else _reads[handle][0]()
    if bound is None or bound.__self__ is not owner:  # new, or a dead owner's id reused
        handle = next(_next_handle)
        _handles[key] = handle
        _reads[handle] = (weakref.WeakMethod(getattr(owner, method)), args, CachedValue())
    return handle


# Defined through torch.library.Library rather than the custom_op decorator: a call then costs about 4 µs of
# dispatch instead of about 17 µs (measured on CPU, torch 2.13), paid per adapted layer per compiled eval forward.
_LIBRARY = torch.library.Library("torchdora", "DEF")
_LIBRARY.define("cached_value(int handle, Tensor[] inputs, float[] numbers, int size, ScalarType dtype) -> Tensor")


def _read(handle: int) -> Tensor:
    method, args, _ = _reads[handle]
    read = method()
    if read is None:
        raise RuntimeError("torchdora: the module this compiled graph reads a cached norm from no longer exists; "
                           "compile the model again")
    return read(*args)


def _cached_value(handle: int, inputs: list[Tensor], numbers: list[float], size: int, dtype: torch.dtype) -> Tensor:
    """At run time: ``owner.<method>(*args)`` (an eager cache lookup), copied: the compiled graph may reuse an
    operator's output buffer, and the cache's own tensor must stay as it is.

    This runs once per adapted layer per compiled eval forward, between products that evict the interpreter's
    data from the CPU caches, so every Python step costs several times what it costs in a loop (about 50 µs per
    call for the owner's own lookup, measured during decoding). The operator therefore keeps a copy of the value
    per handle (per graph and layer), checked against the operator's ``inputs`` (the tensors the value depends on) by the same host-side
    facts, and against the settings the graph passes: ``numbers`` at run time (Dynamo may trace a scaling that
    changed as a variable), the others baked into the handle. The copy is also dropped at any
    :meth:`CachedValue.clear` (``clear_cache``) and any optimizer step (a fused one writes without bumping
    version counters, and the inputs arrive detached)."""
    return _reads[handle][2].get(lambda: _read(handle), inputs, (_clears, _steps, *numbers)).clone()


_LIBRARY.impl("cached_value", _cached_value, "CompositeExplicitAutograd")


@torch.library.register_fake("torchdora::cached_value", lib=_LIBRARY)
def _cached_value_fake(handle: int, inputs: list[Tensor], numbers: list[float], size: int,
                       dtype: torch.dtype) -> Tensor:
    return inputs[0].new_empty(size, dtype=dtype)


def in_graph(owner: nn.Module, method: str, args: tuple, inputs: Sequence[Tensor | None], size: int,
             dtype: torch.dtype, settings: tuple = ()) -> Tensor:
    """Under ``torch.compile``: the ``(size,)`` ``dtype`` tensor ``owner.<method>(*args)`` returns in eager mode
    (where it is cached), read at run time by an operator the compiler does not trace into.

    ``inputs`` are the tensors the value depends on (the first one non-``None``): graph inputs of the operator,
    so the compiler neither folds it into a constant nor moves it before their updates. ``method`` must return
    a value that does not need autograd (computed under ``torch.no_grad()``, as :meth:`CachedValue.get` does).
    ``settings`` are the values besides ``inputs`` that it depends on (the cache's ``extra``): numbers are passed
    at run time, anything else (a method name) is a constant of the graph, which Dynamo guards.
    """
    tensors = [t.detach() for t in inputs if t is not None]
    numbers, constants = [], []
    for v in settings:
        is_number = isinstance(v, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(v, bool)
        (numbers if is_number else constants).append(v)
    handle = _handle(owner, method, args, tuple(constants))
    return torch.ops.torchdora.cached_value(handle, tensors, numbers, size, dtype)
