"""Small models for tests that need to see inside a run. Importable from tests/; a test that sends
one to worker processes registers this module with cloudpickle by value, since the workers do not
have tests/ on their path."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class ShardProbe(nn.Module):
    """An MLP for digits whose first forward on each rank writes `rank{N}.json` into `record_dir`:
    whether its weights are DTensors there and how many elements this rank holds. Inside the root's
    forward, FSDP2 has not yet gathered the children's weights (each Linear is sharded on its own),
    so what it sees is what the rank keeps between steps."""

    def __init__(self, record_dir: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.record_dir = record_dir

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        # The first training step: the preparation's check of the model (in eval mode, before the
        # model is wrapped for the ranks) is not what a rank keeps between steps.
        if self.training and dist.is_available() and dist.is_initialized():
            path = Path(self.record_dir) / f"rank{dist.get_rank()}.json"
            if not path.exists():  # the first step only; the kernel side never records
                from torch.distributed.tensor import DTensor

                params = list(self.body.parameters())
                local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
                path.write_text(json.dumps({
                    "dtensor": [isinstance(p, DTensor) for p in params],
                    "local_numel": sum(t.numel() for t in local),
                    "full_numel": sum(p.numel() for p in params),
                }))
        return self.body(x)
