"""The little the trainer needs from torch.distributed, and nothing when run as one process.

`torchrun` sets WORLD_SIZE, RANK and LOCAL_RANK; without them every helper here is a no-op,
so the single-process path stays the plain one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start() -> World:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return World(size=size, rank=dist.get_rank(), local_rank=local_rank)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


FSDP = "fsdp"


def wrap(
    model: torch.nn.Module, world: World, device: torch.device, strategy: str = "ddp"
) -> torch.nn.Module:
    """The model a step runs: itself (one process), DDP's wrapper (every process holds the
    whole model), or, for FSDP, the model sharded in place with PyTorch's FSDP2 `fully_shard`:
    each transformer block, then the rest, so parameters, gradients and optimizer state are
    split over the processes and a block's parameters are gathered only while it runs."""
    if world.size == 1:
        return model
    if strategy == FSDP:
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (GPT-2's transformer.h, BERT's
    encoder.layer, ...) or of the lean GPT: the modules named in its _no_split_modules."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def frozen_names(model: torch.nn.Module) -> set[str]:
    """The parameters that do not train (a LoRA run's base): a checkpoint leaves them out,
    since the job loads them again from their source, which the run's identity pins."""
    named = model.named_parameters(remove_duplicate=False)  # a tied weight under each name
    return {name for name, p in named if not p.requires_grad}


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's trained weights, whole, on the CPU (a collective: every process calls it
    when sharded); frozen ones are left out (frozen_names)."""
    if not sharded(model):
        state = model.state_dict()
        if not frozen_names(model):
            return state
        # What trains, and the buffers: not a frozen weight, nor what a quantized layer adds
        # to its state (bitsandbytes' absmax, quant_map, SCB: no parameter, no buffer).
        keep = trained_names(model)
        keep |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
        return {k: v for k, v in state.items() if k in keep}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    if not sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model: torch.nn.Module, optimizer, model_state: dict, optimizer_state: dict):
    """A checkpoint's whole weights and optimizer state into the model (each process takes
    its shards when it is sharded)."""
    if not sharded(model):
        load_trained_state(model, model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def trained_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def load_trained_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Weights full_model_state kept: every one the model trains, and nothing else."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    left_out = {k for k in missing if k in trained_names(model)}
    if left_out or unexpected:
        raise RuntimeError(
            f"the saved weights do not fit the model: missing {sorted(left_out)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def local(value: torch.Tensor) -> torch.Tensor:
    """A reduced DTensor (FSDP's gradient norm) as the plain tensor every process holds."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def no_sync_unless(model: torch.nn.Module, last_micro_batch: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if last_micro_batch or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over every process, left on the device (no host sync)."""
    if not dist.is_initialized():
        return value
    total = value.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process if it is true on one (e.g. SIGTERM reached only some)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gathered(value, world: World) -> list:
    """Every process's `value` (a picklable object), in rank order, on every process."""
    if world.size == 1:
        return [value]
    out = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def process_seed(seed: int, rank: int) -> int:
    """Each process's seed: the configured one for process 0 (one process trains as before),
    an independent one derived from (seed, rank) for the others, so that their dropout masks
    differ and each can be restored on its own."""
    if rank == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
