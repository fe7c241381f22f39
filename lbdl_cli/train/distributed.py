"""torchrun integration: DistributedDataParallel (or FSDP) when WORLD_SIZE > 1.

gloo on CPU, nccl on CUDA. Rank 0 alone writes files and reports progress.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..kernels import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def sum(self, value: float) -> float:
        """Sum a scalar over ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def mean(self, value: float) -> float:
        """Average a scalar over ranks."""
        return self.sum(value) / self.world

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return t.item() > 0

    def barrier(self):
        if self.enabled:
            dist.barrier()


def setup(device: str) -> Dist:
    """Join the process group that torchrun describes (a no-op without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str | None):
    """The Dist of this process on `device` (auto | cpu | cuda | cuda:N), torn down however the block ends."""
    d = setup(str(resolve_device(device)))
    try:
        yield d
    finally:
        teardown(d)


def wrap(model: torch.nn.Module, d: Dist, fsdp: bool) -> torch.nn.Module:
    """DDP for data parallelism; FSDP (fully_shard per block) for models too large for one device."""
    if not d.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.startswith("cuda") else None)


def full_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """Whole model and optimizer state on CPU, keyed by parameter name (gathered from every rank
    under FSDP; a collective there, so every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def load_full_state(model: torch.nn.Module, optimizer, model_state: dict, optim_state: dict) -> None:
    """The inverse of full_state: every rank loads the full state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
