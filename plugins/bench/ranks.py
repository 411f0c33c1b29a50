"""The processes one bench runs on: this process alone, or the ranks ``torchrun`` started, with
one session's context split over them (``superlinear.distributed``).

Every rank runs the same steps on its own cache; numbers are joined with tensor collectives
and only rank 0 prints. torch is imported only when a bench runs.
"""

from __future__ import annotations

import os

from superlinear.errors import InvalidRequest


class Ranks:
    def __init__(self, world_size: int, device: str | None):
        self.world_size = int(world_size)
        self.device = device
        self.rank = 0
        if self.world_size < 1:
            raise InvalidRequest(f"--world-size must be at least 1, got {world_size}")
        if self.world_size == 1:
            return
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.world_size:
            raise InvalidRequest(f"--world-size {self.world_size} runs under torchrun with as many processes: "
                                 f"torchrun --nproc-per-node {self.world_size} -m superlinear.cli.main bench "
                                 f"generate --world-size {self.world_size} ... (this process sees {launched})")
        from superlinear.distributed import init_from_env

        self.rank, _, here = init_from_env(device)
        self.device = str(here)

    @property
    def split(self) -> bool:
        return self.world_size > 1

    def variant(self, model, attention: str):
        """The model as this bench runs it: a split context decodes eagerly (a capture that
        failed on one rank only would leave the others waiting in a collective; graphs of the
        split step are untried on GPUs, docs/distributed.md)."""
        return model.with_attention(attention, cuda_graph=False) if self.split else model.with_attention(attention)

    def new_cache(self, model, tokens: int):
        if not self.split:
            return model.new_cache(tokens)
        from superlinear.distributed import new_cache

        cache = new_cache(model, tokens)
        ok = True
        try:  # every rank allocates its slice now, and all agree before any collective runs
            cache.reserve(tokens, exact=True)
        except Exception:  # noqa: BLE001 - reported below on every rank alike
            ok = False
        if not self.agree(ok):
            from superlinear.errors import TooLarge

            raise TooLarge(f"a cache of {tokens} tokens does not fit on every one of {self.world_size} ranks")
        return cache

    def _reduce(self, value: float, op: str) -> float:
        if not self.split:
            return value
        import torch
        import torch.distributed as dist

        device = self.device if str(self.device).startswith("cuda") else "cpu"
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}[op])
        return float(t.item())

    def agree(self, ok: bool) -> bool:
        return self._reduce(1.0 if ok else 0.0, "min") > 0

    def max(self, value: float) -> float:
        return self._reduce(value, "max")

    def sum(self, value: float) -> float:
        return self._reduce(value, "sum")

    def barrier(self) -> None:
        self.agree(True)
