"""DDP and FSDP2 with torchdora adapters: 2 CPU processes (gloo) against a single-process run.

Tolerances: the 2-process runs sum gradients in another order than one process does, so losses and
adapters agree to fp32 round-off (rtol 1e-5); the mixed-precision run (fp16 compute, fp32 master
weights and gradient reduction) is compared to the fp32 single-process run at half-precision resolution
(rtol 2e-2 on losses, atol 1e-2 on adapter entries of size ~0.1-1).
"""

from __future__ import annotations

import gc
import json
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import torchdora
from torchdora.distributed import full_tensor, shard_model

transformers = pytest.importorskip("transformers")

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(cfg)
    torchdora.inject(model, torchdora.DoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    return model


def _batch() -> torch.Tensor:
    return torch.randint(0, 64, (GLOBAL_BATCH, 8), generator=torch.Generator().manual_seed(1))


def _train(model: torch.nn.Module, ids: torch.Tensor, world: int) -> list[float]:
    # SGD: a parameter's difference between runs is then proportional to its gradient's difference, so one
    # tolerance bounds both (Adam's normalised steps would turn bf16 noise in a tiny gradient into a full step).
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(STEPS):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
    return losses


def _adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: full_tensor(v.detach()).float().clone() for k, v in torchdora.io.adapter_state_dict(model).items()}


def _worker(rank: int, mode: str, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            policy = None
            if mode == "fsdp-mixed":
                from torch.distributed.fsdp import MixedPrecisionPolicy

                # gloo cannot all-gather bf16 (the process aborts), so on CPU the low-precision compute
                # dtype is fp16; with NCCL on GPU the same policy runs with bf16.
                policy = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
            wrapped = shard_model(model, mp_policy=policy)
        per_rank = GLOBAL_BATCH // WORLD
        losses = _train(wrapped, _batch()[rank * per_rank:(rank + 1) * per_rank], WORLD)
        tensors = _adapter_tensors(model)  # collective under FSDP: every rank gathers
        torchdora.save_adapter(model, Path(out, "saved"))  # every rank calls; rank 0 writes
        if rank == 0:
            Path(out, "losses.json").write_text(json.dumps(losses))
            save_file(tensors, str(Path(out, "adapter.safetensors")))
        Path(out, f"done-rank{rank}").write_text("")  # its results are on disk: what the test judges
        # Leave together, and let the group's last references (FSDP's device mesh, held by the sharded parameters)
        # go before destroy_process_group rather than in interpreter shutdown, in whatever order that runs.
        dist.barrier()
        del wrapped, model, tensors
        gc.collect()
    finally:
        dist.destroy_process_group()


def _spawn_and_judge_by_files(mode: str, out: Path) -> None:
    """Run the workers; a rank that ends abnormally *after* writing its results (gloo's teardown has aborted a
    process, "terminate called without an active exception", once in a full-suite run) is reported as a warning
    and the results are judged from the files; any failure before that fails the test."""
    context = mp.spawn(_worker, args=(mode, _free_port(), str(out)), nprocs=WORLD, join=False)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as err:  # a crash or a signal, not a Python exception (ProcessRaisedException)
        if not all(Path(out, f"done-rank{rank}").exists() for rank in range(WORLD)):
            raise
        warnings.warn(f"rank {err.error_index} exited abnormally ({err.exit_code}) in process-group teardown, after "
                      "writing its results", RuntimeWarning)


@pytest.fixture(scope="module")
def single_process() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = _model()
    losses = _train(model, _batch(), 1)
    return losses, _adapter_tensors(model)


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-mixed"])
def test_two_processes_match_one(mode: str, tmp_path: Path, single_process) -> None:
    _spawn_and_judge_by_files(mode, tmp_path)
    losses = json.loads((tmp_path / "losses.json").read_text())
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    ref_losses, ref_tensors = single_process
    tol = {"rtol": 2e-2, "atol": 1e-2} if mode == "fsdp-mixed" else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **tol)
    assert set(tensors) == set(ref_tensors)
    for key, value in tensors.items():
        torch.testing.assert_close(value, ref_tensors[key], **tol, msg=lambda m, k=key: f"{k}: {m}")
    # an adapter saved by 2 (sharded) processes loads into 1 process with the same values
    reloaded = _model()
    torchdora.load_adapter(reloaded, tmp_path / "saved")
    for key, value in _adapter_tensors(reloaded).items():
        torch.testing.assert_close(value, tensors[key], rtol=0, atol=0)
    # the adapters trained: B moved away from its zero initialisation
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith("lora_B"))
