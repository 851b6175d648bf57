"""What a training run does differently on several processes (ranks) started by torchrun.

    ranks = Ranks.from_env("ddp", device="auto")   # inside a torchrun worker; Ranks() is one process
    mine = ranks.share(plan.step(step))              # this rank's micro-batches of the step

Every rank holds the same LoRA weights and the same optimizer and takes every
`processes`-th micro-batch of each optimizer step (the BatchPlan is a pure function of the
seed, so every rank knows the whole step). The loss of each micro-batch is divided by the
step's *global* answer-token count, so the sum of the ranks' gradients is exactly the one-process
gradient, up to the order of float additions. After the step's last backward the LoRA gradients
are summed in one flattened all_reduce; every rank then clips and steps identically.

Why a manual all_reduce, not DistributedDataParallel: LoRA gradients are a few MB, summed once
per optimizer step; DDP's overlap of communication with backward would hide one small bucket
at most, while its wrapper (`model.module`) gets in the way of PEFT's save/load, and its
hooks must be silenced with no_sync for every micro-batch but the last. The base model has no
gradients, so there is nothing else to reduce.

Under fsdp the frozen base layers are sharded with FSDP2 (`fully_shard`) and the LoRA weights
are left out of the sharding (`ignored_params`): they stay whole, replicated tensors, so the
gradient sum, the optimizer and the checkpoints are exactly those of ddp, while each decoder
layer's base weights are gathered only for its own forward and backward.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from expert.errors import ConfigError

log = logging.getLogger("expert.train")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes; the default is a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "single"

    @classmethod
    def from_env(cls, strategy: str, device: str) -> tuple[Ranks, str]:
        """Join the process group torchrun set up; returns the ranks and this rank's device."""
        import torch.distributed as dist

        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            if torch.cuda.device_count() <= local:
                raise ConfigError(f"train.processes is {world} but this machine shows "
                                  f"{torch.cuda.device_count()} GPU(s); use one process per GPU")
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
        else:
            device = "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
        return cls(rank, world, local, strategy), device

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, logs and outputs."""
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world > 1

    @property
    def lockstep(self) -> bool:
        """Whether every rank must run the same forwards (fsdp gathers shards inside each one)."""
        return self.strategy == "fsdp"

    def share(self, batches: list) -> list:
        """This rank's items of a list that all ranks see whole (strided, so lengths mix)."""
        return batches[self.rank::self.world]

    def rounds(self, count: int) -> int:
        """Forwards each rank runs for `count` batches shared out: lockstep ranks pad to the most."""
        return math.ceil(count / self.world) if self.lockstep else len(range(self.rank, count, self.world))

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place."""
        if self.many:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the LoRA gradients over the ranks: one flattened all_reduce per optimizer step."""
        if not self.many:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.sum_(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def agree(self, ok: bool) -> bool:
        """True only if `ok` holds on every rank (the memory plan's "fits" must fit every card)."""
        if not self.many:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=_collective_device())
        return not bool(self.sum_(flag).item())

    def same_weights(self, params: list[torch.nn.Parameter]) -> None:
        """Copy rank 0's LoRA weights to every rank (PEFT's init may draw on a GPU generator)."""
        if self.many:
            import torch.distributed as dist

            device = _collective_device()
            for p in params:
                # Through a copy on the collective device: NCCL takes CUDA tensors only, and under
                # fsdp a plain base (and so its LoRA weights) is still on the CPU until shard_base.
                # A copy on every backend, gloo's CPU too: one path, the one the tests run.
                sent = p.data.to(device, copy=True)
                dist.broadcast(sent, src=0)
                p.data.copy_(sent)

    def seed_dropout(self, seed: int) -> None:
        """Ranks other than 0 draw their own dropout masks (rank 0 keeps the one-process stream);
        checkpoints keep every rank's generator, so a resumed run draws what it would have."""
        if self.rank:
            torch.manual_seed(seed * 1_000_003 + self.rank)

    def gather(self, obj):
        """Every rank's `obj` on rank 0 (a list in rank order), None elsewhere."""
        if not self.many:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def settle(self, model) -> None:
        """Before rank 0 alone reads the model's state_dict (to save the adapter): under fsdp the
        root's weights stay gathered after a forward, and state_dict's hook would shard them on
        rank 0 only, so the ranks' next forwards would gather different things. All ranks shard now."""
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import FSDPModule

            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def barrier(self) -> None:
        if self.many:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def shard_base(model, ranks: Ranks, device: str) -> None:
    """FSDP2-shard the frozen base of a PEFT model across the ranks, each decoder layer apart.

    The LoRA weights are ignored by FSDP: they stay whole on every rank (see the module docstring).
    Layers are sharded one by one so that only one layer's full weights exist at a time.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (ranks.world,))
    lora = {p for p in model.parameters() if p.requires_grad}
    base = model.get_base_model()
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"train.strategy fsdp shards a model's decoder layers (model.layers), which "
                          f"{type(base).__name__} lacks; use strategy ddp")
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=lora)
    fully_shard(model, mesh=mesh, ignored_params=lora)  # embeddings, final norm, head
    if ranks.main:
        local, whole = _base_sizes(model)
        log.info("fsdp: the base's weights are sharded across %d processes; rank 0 holds %d of %d values "
                 "(%s)", ranks.world, local, whole, ", ".join(sorted(_stored_dtypes(model))))
    for p in lora:  # FSDP moves what it shards to the mesh's device, not what it ignores
        p.data = p.data.to(device)


def _base_sizes(model) -> tuple[int, int]:
    from torch.distributed.tensor import DTensor

    local = whole = 0
    for p in model.parameters():
        if isinstance(p, DTensor):
            local, whole = local + p.to_local().numel(), whole + p.numel()
    return local, whole


def _stored_dtypes(model) -> set[str]:
    return {str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad}
