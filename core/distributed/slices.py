"""Which rank holds which positions, and superlinear attention over the ranks' key slices."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from superlinear.errors import InvalidRequest
from superlinear.kernels import resolve_backend
from superlinear.kernels.attention.reference import reference_prefill


@dataclass(frozen=True)
class ContextSlices:
    """Rank ``r`` holds the positions ``[starts[r], starts[r + 1])``; the last rank's slice is
    open-ended (a session that grows past the planned length grows there)."""

    starts: tuple[int, ...]

    def __post_init__(self):
        ordered = all(a <= b for a, b in zip(self.starts, self.starts[1:], strict=False))
        if not self.starts or self.starts[0] != 0 or not ordered:
            raise InvalidRequest(f"slice starts must begin at 0 and not decrease, got {self.starts}")

    @classmethod
    def even(cls, max_seq_len: int, world_size: int) -> ContextSlices:
        """``world_size`` slices of equal length covering ``max_seq_len`` positions."""
        size = max(1, -(-int(max_seq_len) // int(world_size)))
        return cls(tuple(r * size for r in range(world_size)))

    @property
    def world_size(self) -> int:
        return len(self.starts)

    def bounds(self, rank: int) -> tuple[int, int | None]:
        """``(first position, end)`` of ``rank``'s slice; end None for the last rank."""
        end = self.starts[rank + 1] if rank + 1 < self.world_size else None
        return self.starts[rank], end

    def held(self, rank: int, position: int) -> int:
        """How many of the positions ``[0, position)`` ``rank`` holds."""
        start, end = self.bounds(rank)
        top = position if end is None else min(position, end)
        return max(0, top - start)


def group_shape(group) -> tuple[int, int]:
    """(rank, world size) in ``group``; a process without torch.distributed is rank 0 of 1."""
    if group is None and not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """``[world, *x.shape]``: every rank's ``x`` in rank order (one tensor collective)."""
    _, world = group_shape(group)
    if world == 1:
        return x[None]
    shape = x.shape
    x = x.contiguous().reshape(1, -1)
    out = x.new_empty((world, x.shape[1]))  # the concatenated form: every backend takes it
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, x, group=group)
    return out.view(world, *shape)


def merge_partials(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Softmax outputs over disjoint key sets joined into the one over their union: ``out
    [N, ..., D]`` (each normalised over its keys, 0 where it has none) and ``lse [N, ...]``
    (their log-sum-exp, -inf where none) -> ``[..., D]`` (0 where no set has a key)."""
    top = lse.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight = torch.exp(lse - top)  # [N, ...]: 0 for an empty part
    total = weight.sum(0)
    merged = (weight[..., None] * out).sum(0)
    return torch.where(total[..., None] > 0, merged / total.clamp(min=1e-30)[..., None], torch.zeros_like(merged))


class ContextParallel:
    """One rank's part in a context-parallel sequence: its slice and the collectives that join
    its partial attention with the other ranks' (the ``exchange`` of ``reference_prefill``)."""

    def __init__(self, slices: ContextSlices, group=None):
        self.group = group
        self.rank, world = group_shape(group)
        if world != slices.world_size:
            raise InvalidRequest(f"{slices.world_size} slices for a group of {world} ranks")
        self.slices = slices
        self.key_start, self.key_end = slices.bounds(self.rank)
        # the longest the sequence may grow (the cache's max_seq_len): the Triton decode's static sizes
        self.length_bound = 0

    @property
    def world_size(self) -> int:
        return self.slices.world_size

    def attend(self, q1, q2, k, v, positions, params, mode: str = "superlinear", backend: str | None = None):
        """Superlinear attention of the query rows (the same on every rank) over all ranks'
        keys; ``k``/``v`` are this rank's slice. A decode step runs the Triton kernels where
        the backend is Triton (CUDA), everything else the PyTorch reference."""
        if mode != "superlinear":
            raise InvalidRequest(f"context parallelism runs superlinear attention, not {mode!r}")
        if q2.shape[2] == 1 and resolve_backend(backend, q2.device) == "triton":
            from superlinear.kernels.attention.triton_decode import triton_decode

            return triton_decode(q1, q2, k, v, positions.reshape(-1), params, key_start=self.key_start,
                                 exchange=self, length_bound=self.length_bound)
        return reference_prefill(q1, q2, k, v, positions, params, key_start=self.key_start, exchange=self)

    # -- the exchange ---------------------------------------------------------------------------
    def topk(self, score: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each rank's top-k ``[..., k]`` (best first, -inf where none) -> the global top-k.
        A stable sort over the ranks' lists in rank order keeps the spec's tie rule: among equal
        scores the farther anchor wins, and a lower rank holds the farther anchors."""
        k = score.shape[-1]
        # fp64 carries the fp32 scores and the anchors (< 2**53) exactly in one collective
        both = all_gather(torch.stack([score.double(), anchor.double()], dim=-1), self.group)  # [N, ..., k, 2]
        both = both.movedim(0, -3).flatten(-3, -2)  # [..., N * k, 2], rank-major
        best, order = torch.sort(both[..., 0], dim=-1, descending=True, stable=True)
        return best[..., :k].to(score.dtype), both[..., 1].gather(-1, order[..., :k]).to(anchor.dtype)

    def combine(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """This rank's span partials ``out [..., D]`` with their ``lse [...]`` -> the spans'
        outputs over every rank's keys."""
        both = all_gather(torch.cat([out, lse[..., None].to(out.dtype)], dim=-1), self.group)
        return merge_partials(both[..., :-1], both[..., -1])
