"""One rank's part in a data-parallel run: the engine's `DistContext` over torch.distributed
(DistributedDataParallel, or FSDP2's `fully_shard` with `shard`)."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Rank", "init_process_group"]


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def init_process_group(backend: str) -> None:
    """`dist.init_process_group` from torchrun's environment. Where this process itself hosts the
    rendezvous store on a loopback address (the kernel's own `--workers`, no torchrun agent),
    the store listens on that address only: torch's TCPStore binds every interface otherwise,
    so anyone who can reach the machine could join or disrupt the run."""
    host, port = os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", "0") or 0)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if "TORCHELASTIC_RUN_ID" in os.environ or not _loopback(host) or not port:
        dist.init_process_group(backend)
        return
    timeout = datetime.timedelta(seconds=300)
    if rank == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(512)
        store = dist.TCPStore("127.0.0.1", port, world, True, timeout, master_listen_fd=sock.detach())
    else:
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


class Rank:
    """This process's part in a data-parallel run: the engine's DistContext."""

    def __init__(self, model: nn.Module, device: torch.device, shard: bool) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.sharded = shard
        self._device = device
        if shard:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (self.world_size,))
            # Innermost first: each module that owns weights gathers them only for its own
            # forward, then the root takes whatever is left.
            for module in reversed(list(model.modules())):
                if module is not model and next(module.parameters(recurse=False), None) is not None:
                    fully_shard(module, mesh=mesh)
            self.net: nn.Module = fully_shard(model, mesh=mesh)
        else:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def sync_gradients(self, enabled: bool) -> None:
        if self.sharded:
            self.net.set_requires_gradient_sync(enabled)  # type: ignore[operator]
        else:
            # The flag DDP's no_sync() context toggles; the loop decides per micro-batch.
            self.net.require_backward_grad_sync = enabled

    def all_sum(self, *values: float) -> list[float]:
        sums = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device)
        dist.all_reduce(sums)
        return sums.tolist()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0 (a collective when sharded; empty elsewhere)."""
        if not self.sharded:
            return model.state_dict() if self.rank == 0 else {}
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


