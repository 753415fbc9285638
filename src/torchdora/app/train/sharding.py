"""``torchdora train --sharding fsdp``: FSDP2 for the training loop, and saving that every process takes part in.

What each process holds (``N`` processes, ``P`` base parameters, adapters ``a`` << ``P``):

* Loading: process 0 loads the model once on the CPU (the base dtype ``load_model_and_tokenizer`` uses),
  the others build it on the meta device (no memory). All inject the adapters, apply ``fully_shard`` to every
  decoder block and to the root (:func:`torchdora.distributed.shard_model`), then process 0 scatters each
  tensor in turn: every process keeps ``1/N`` of every parameter, process 0 also keeps its full copy until
  the scatter ends. Peak host memory: process 0 about ``P + P/N``, the others ``P/N`` plus one tensor.
* Training: ``P/N`` sharded base (frozen), ``a/N`` adapters, their gradients and AdamW moments; FSDP
  all-gathers one block's parameters for its forward and backward and frees them after.
* Saving: adapter tensors and optimizer moments are gathered one tensor at a time on every process (a
  collective), process 0 writes them in the same files a 1-process run writes, so a checkpoint resumes on
  any number of processes, sharded or not. Reading: every process reads the files and keeps its shard.

FSDP's all-gathers are collectives: every process must run the same number of forward passes. Training
does (equal micro-batches); evaluation pads the processes that have fewer scoring batches with one-token
forwards (:func:`evaluate_in_lockstep`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn

from torchdora.app.assets import recorded_base_name
from torchdora.app.checkpoint import optimizer_state_from_flat, optimizer_state_to_flat
from torchdora.app.evaluate import EvalResult, evaluate_examples, tokenized_requests, selected_logits
from torchdora.app.train.config import TrainConfig
from torchdora.distributed import full_tensor, is_main_process, shard_model
from torchdora.files import atomic_save_safetensors, atomic_write_json

__all__ = ["use_fsdp", "refuse_accelerate_sharding", "skeleton_model", "shard_and_fill", "save_trainable", "load_optimizer",
           "evaluate_in_lockstep"]


def use_fsdp(config: TrainConfig, num_processes: int, backend: str | None) -> bool:
    """Whether this run shards with FSDP2; refuses the combinations that cannot work, naming the fix.

    One process has nothing to shard: ``--sharding fsdp`` then trains as a plain single process (so an FSDP
    run resumes on one process unchanged).
    """
    if config.sharding != "fsdp" or num_processes < 2:
        return False
    if config.method == "full":
        raise ValueError("--sharding fsdp trains adapters (--method dora or lora); full fine-tuning under "
                         "torchrun uses the default --sharding none (DDP)")
    for option, value in (("--dtype", config.dtype), ("--base-dtype", config.base_dtype)):
        if value == "bfloat16" and backend == "gloo":
            raise ValueError(f"--sharding fsdp {option} bfloat16 needs GPUs (NCCL): the CPU backend gloo cannot "
                             f"all-gather bfloat16 tensors. Use {option} float32 on CPU processes")
    if config.quantize is not None:  # bitsandbytes' packed 4-bit weights (Params4bit) have no DTensor form
        raise ValueError(f"--sharding fsdp cannot shard a quantized base (--quantize {config.quantize}); use "
                         "--sharding none (DDP, a whole 4-bit base per process)")
    return True


def refuse_accelerate_sharding(distributed_type: object) -> None:
    """A launch configured for accelerate's own FSDP/DeepSpeed is refused: the loop shards with ``--sharding``."""
    name = str(getattr(distributed_type, "value", distributed_type)).upper()
    if name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(
            f"accelerate is configured for {name}; torchdora train shards the model itself. Launch without "
            f"accelerate's {name} settings (e.g. accelerate launch --multi_gpu) and pass --sharding fsdp"
        )


def skeleton_model(source: Path | str, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """The model's modules on the meta device (no weights, no memory): what processes other than 0 build.

    ``dtype`` is the base dtype process 0 loads (a ``torch`` dtype or its name, e.g. ``"bfloat16"``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=dtype)
    return model.eval()


def _mixed_precision(config: TrainConfig) -> object | None:
    if config.dtype != "bfloat16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # bf16 all-gathers and compute; fp32 gradient reduction and fp32 master weights for AdamW.
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


@torch.no_grad()
def shard_and_fill(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """Shard ``model`` with FSDP2 on every process and fill the shards from process 0's weights.

    Process 0 passes its loaded, adapter-injected model; the others the same modules on the meta device
    (:func:`skeleton_model`, then the same injection). Parameters are scattered one at a time, buffers (which
    FSDP does not shard, e.g. rotary frequencies) broadcast, and process 0's random state is copied to all,
    as if every process had loaded and initialised the model itself (as under DDP).
    """
    from torch.distributed.tensor import distribute_tensor

    main = dist.get_rank() == 0
    full = dict(model.named_parameters()) if main else {}  # keeps process 0's full tensors alive until filled
    shard_model(model, mp_policy=_mixed_precision(config))
    if not main:
        model.to_empty(device=device)  # allocates only this process's shards
    for name, param in model.named_parameters():
        source = full.pop(name) if main else torch.empty(param.shape, dtype=param.dtype)
        # src_data_rank=0: process 0 scatters, each process receives its own chunk only
        param.copy_(distribute_tensor(source.detach().to(device), param.device_mesh, param.placements,
                                      src_data_rank=0))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    rng = torch.get_rng_state().to(device)  # NCCL sends device tensors only
    dist.broadcast(rng, src=0)
    torch.set_rng_state(rng.cpu())
    return model


# ---- saving and loading ------------------------------------------------------------------------------------
class _GatheredOptimizer:
    """An optimizer's ``param_groups`` and its ``state_dict()`` with every sharded tensor gathered (collective)."""

    def __init__(self, optimizer: Any) -> None:
        self.param_groups = optimizer.param_groups
        state = optimizer.state_dict()
        # state_dict() lists parameters in param_groups order, the same on every process: gathers line up
        self._state = {**state, "state": {
            index: {key: full_tensor(value) if isinstance(value, Tensor) else value for key, value in fields.items()}
            for index, fields in state["state"].items()
        }}

    def state_dict(self) -> dict[str, Any]:
        return self._state


def save_trainable(folder: Path, model: nn.Module, optimizer: Any, names: Mapping[nn.Parameter, str],
                   config: TrainConfig) -> None:
    """The adapter (or the trainable tensors of full fine-tuning) and the optimizer state into ``folder``.

    Every process calls it: sharded tensors are gathered, one at a time, by all; process 0 writes, each file
    to a temporary name renamed when complete. The files are those of an unsharded run.
    """
    if config.method == "full":  # never sharded (use_fsdp refuses it)
        if is_main_process():
            atomic_save_safetensors({n: p for p, n in names.items()}, folder / "model.safetensors")
    else:
        from torchdora.io import save_adapter

        save_adapter(model, folder / "adapter", base_model_name_or_path=recorded_base_name(config.model))
    tensors, index = optimizer_state_to_flat(_GatheredOptimizer(optimizer), names)  # type: ignore[arg-type]
    if is_main_process():
        atomic_save_safetensors(tensors, folder / "optimizer.safetensors")
        atomic_write_json(folder / "optimizer.json", index)


def load_optimizer(folder: Path, optimizer: Any, names: Mapping[nn.Parameter, str]) -> None:
    """Load ``optimizer.safetensors``/``.json`` (whole tensors); each moment is sharded like its parameter."""
    index = json.loads((folder / "optimizer.json").read_text())
    tensors = load_file(folder / "optimizer.safetensors")
    by_name = {name: param for param, name in names.items()}
    for key in list(tensors):
        _, name, _ = key.split("/", 2) if key.count("/") >= 2 else ("", "", "")
        param = by_name.get(name)
        mesh = getattr(param, "device_mesh", None)
        if mesh is not None and tensors[key].shape == param.shape:
            from torch.distributed.tensor import distribute_tensor

            # every process read the same file: each keeps its own chunk, no communication
            tensors[key] = distribute_tensor(tensors[key].to(param.device), mesh, param.placements,
                                             src_data_rank=None)
    optimizer_state_from_flat(optimizer, names, tensors, index)


# ---- evaluation ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_in_lockstep(model: nn.Module, tokenizer: Any, examples: Sequence, max_length: int, batch_size: int,
                         autocast: Callable[[], ContextManager] | None = None) -> EvalResult:
    """:func:`evaluate_examples` on this process's examples, then one-token forwards until every process has run
    as many forward passes as the busiest one (FSDP's all-gathers pair up across processes).

    Without exact match: greedy generation stops when its batch ends, a number of forwards no process knows in
    advance (the summary then records no exact match for generative data).
    """
    device = next(model.parameters()).device
    mine = math.ceil(len(tokenized_requests(tokenizer, examples, max_length)) / batch_size)
    most = torch.tensor([mine], dtype=torch.long, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)  # before any forward, so no process is inside one
    result = evaluate_examples(model, tokenizer, examples, max_length, batch_size, autocast, exact_match=False)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((1, 1), pad, dtype=torch.long, device=device)
    for _ in range(int(most.item()) - mine):  # the same call as a scoring batch: the same all-gathers
        selected_logits(model, ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
    model.train(was_training)
    return result
