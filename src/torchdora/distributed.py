"""torch.distributed helpers: FSDP2 sharding of adapted models and gathering sharded adapter tensors.

The adapters need nothing special under DDP. Under FSDP2 (``fully_shard``) every parameter (the frozen
base weight, ``A``, ``B`` and ``m``) is a sharded ``DTensor`` between forwards; FSDP all-gathers a block's
parameters before its forward, so the layer always sees whole base-weight rows and computes the exact norm.
The norm cache is keyed on tensor identity and version, so a re-gathered, updated ``A``/``B`` never reuses
a stale norm.
"""

from __future__ import annotations

import os

import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["is_distributed", "rank", "world_size", "is_main_process", "shard_model", "full_tensor"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def full_tensor(tensor: Tensor) -> Tensor:
    """A plain tensor with the whole value of ``tensor``; a sharded ``DTensor`` is all-gathered.

    Collective for a ``DTensor``: every rank must call it, in the same order.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _block_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """Transformer block classes: Hugging Face models name them in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def shard_model(model: nn.Module, *, mp_policy: object | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to each transformer block and then to the root (the usual recipe).

    Call after :func:`torchdora.inject` and before building the optimizer. ``mp_policy`` is passed to
    ``fully_shard`` (e.g. ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``
    for bf16 compute with fp32 master weights).
    """
    from torch.distributed.fsdp import fully_shard

    if not is_distributed():
        raise RuntimeError("shard_model needs torch.distributed initialised (launch with torchrun)")
    kwargs: dict[str, object] = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    blocks = _block_classes(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} names no transformer block class in _no_split_modules; "
            "apply torch.distributed.fsdp.fully_shard to its blocks yourself"
        )
    for module in list(model.modules()):
        if isinstance(module, blocks):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model
