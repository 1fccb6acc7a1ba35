"""The few collectives calibration needs, as no-ops in a single process.

Statistics are reduced once per layer at the end of calibration, never per batch."""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Comm"]


class Comm:
    """Collectives over the default process group (or none when it is not initialised)."""

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.active else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.active else 1

    def _device(self, t: torch.Tensor) -> torch.Tensor:
        # nccl reduces CUDA tensors only; gloo CPU tensors only
        if dist.get_backend() == "nccl" and not t.is_cuda:
            return t.cuda()
        if dist.get_backend() == "gloo" and t.is_cuda:
            return t.cpu()
        return t

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if not self.active:
            return t
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        work = self._device(t.contiguous().clone())
        dist.all_reduce(work, op=ops[op])
        return work.to(t.device)

    def all_gather_cat(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's tensor along ``dim`` in rank order (sizes may differ)."""
        if not self.active:
            return t
        t = t.contiguous()
        size = torch.tensor([t.shape[dim]], dtype=torch.int64, device=t.device)
        sizes = [self._device(torch.zeros_like(size)) for _ in range(self.world_size)]
        dist.all_gather(sizes, self._device(size))
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)
        pad_shape = list(t.shape)
        pad_shape[dim] = longest - t.shape[dim]
        padded = self._device(torch.cat([t, t.new_zeros(pad_shape)], dim))
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p.narrow(dim, 0, s).to(t.device) for p, s in zip(parts, sizes)], dim)

    def gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, obj)
        return everyone

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        if not self.active:
            return flag
        return bool(self.all_reduce(torch.tensor([int(flag)]), "max").item())

    def broadcast_object(self, obj, src: int = 0):
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


