"""Tensor parallelism: which KV heads a rank holds, the collectives the policies use, and the start-up check
that every rank runs the same policy (docs/design.md §2 steps 1, 4, 6; §5).

SGLang shards KV heads in consecutive blocks (``QKVParallelLinear``): with H KV heads and TP size t, rank r holds
``H_r = max(1, H // t)`` heads starting at ``(r // replicas) * H_r``, where ``replicas = max(1, t // H)`` ranks
share a head when there are fewer heads than ranks. A shared head sees only ``G / replicas`` of its query heads on
each rank, so the replicas combine their partial window scores before the policy runs.

Everything goes over the TP group's gloo ``cpu_group`` (on GPU too): the exchanged tensors are small integer
demands, except the scores of replicated heads, and the decision ends on the host anyway (the slot count M).
This module takes the process group as an argument; only :func:`engine_group` reads SGLang's parallel state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from madakv_sglang.config import PolicyConfig


@dataclass(frozen=True)
class HeadShard:
    """The KV heads one TP rank holds."""

    tp_rank: int
    tp_size: int
    total_heads: int

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"TP rank {self.tp_rank} is outside a TP group of size {self.tp_size}")
        heads, size = self.total_heads, self.tp_size
        if heads % size and size % heads:
            raise ValueError(f"{heads} KV heads cannot be sharded over {size} TP ranks")

    @property
    def replicas(self) -> int:
        """Ranks holding each head (1 unless there are fewer KV heads than ranks)."""
        return max(1, self.tp_size // self.total_heads)

    @property
    def local_heads(self) -> int:
        return max(1, self.total_heads // self.tp_size)

    @property
    def head_offset(self) -> int:
        return (self.tp_rank // self.replicas) * self.local_heads

    @property
    def is_primary(self) -> bool:
        """The first replica of its heads: the one whose numbers count once in a sum over heads."""
        return self.tp_rank % self.replicas == 0


class TensorParallelComm:
    """The policies' :class:`~madakv_sglang.policies.base.Comm` over a TP process group, replica-aware.

    Args:
        shard: this rank's heads.
        group: a process group over the TP ranks in rank order (gloo: tensors are exchanged on the host).
    """

    def __init__(self, shard: HeadShard, group: Any) -> None:
        self.shard = shard
        self.group = group

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over heads: replicas hold identical numbers, so only the primary replica contributes."""
        host = tensor.detach().to("cpu", copy=True)
        if not self.shard.is_primary:
            host.zero_()
        dist.all_reduce(host, op=dist.ReduceOp.SUM, group=self.group)
        return host.to(tensor.device)

    def all_gather_heads(self, tensor: Tensor) -> Tensor:
        """Every head once, in global head order: the primary replicas' ``[R, L, H_r, ...]`` blocks along dim 2."""
        gathered = self._gather(tensor)
        primaries = gathered[:: self.shard.replicas]
        return torch.cat(primaries, dim=2).to(tensor.device)

    def merge_replica_scores(self, scores: Tensor, reduce: str) -> Tensor:
        """Combine the partial window scores of a replicated head. Each replica reduced its ``G / replicas`` query
        heads with ``reduce`` (mean or max); the mean of equal-sized means, or the max of maxes, is the reduction
        over the whole group. Summed in rank order, so every replica ends with the same bits."""
        if self.shard.replicas == 1:
            return scores
        gathered = self._gather(scores)
        first = (self.shard.tp_rank // self.shard.replicas) * self.shard.replicas
        mine = gathered[first : first + self.shard.replicas]
        if reduce == "max":
            merged = mine[0]
            for part in mine[1:]:
                merged = torch.maximum(merged, part)
        else:
            merged = mine[0].clone()
            for part in mine[1:]:
                merged += part
            merged /= self.shard.replicas
        return merged.to(scores.device)

    def _gather(self, tensor: Tensor) -> list[Tensor]:
        host = tensor.detach().to("cpu").contiguous()
        gathered = [torch.empty_like(host) for _ in range(self.shard.tp_size)]
        dist.all_gather(gathered, host, group=self.group)
        return gathered


class PolicyMismatchError(RuntimeError):
    """TP ranks (usually on different nodes) were started with different policy settings or package versions."""


def startup_identity(config: PolicyConfig) -> dict[str, str]:
    """What every rank must agree on: each policy field as the CLI spells it, and the package versions."""
    from importlib.metadata import PackageNotFoundError, version

    identity = {f"--kv-{name.replace('_', '-')}": value for name, value in config.to_strings().items()}
    for package in ("madakv-sglang", "sglang"):
        try:
            identity[f"{package} version"] = version(package)
        except PackageNotFoundError:
            identity[f"{package} version"] = "not installed"
    return identity


def differences(identities: list[dict[str, str]]) -> list[str]:
    """One line per item on which some rank differs from rank 0, naming the ranks and their values."""
    problems = []
    reference = identities[0]
    for key in sorted(set().union(*identities)):
        values = [identity.get(key, "<unset>") for identity in identities]
        if any(value != reference.get(key, "<unset>") for value in values):
            spelled = ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(values))
            problems.append(f"{key} differs between TP ranks ({spelled})")
    return problems


def check_same_policy(config: PolicyConfig, group: Any) -> None:
    """All-gather every rank's policy settings and refuse to start if any rank differs (collective: every rank
    of ``group`` must call it). Raises :class:`PolicyMismatchError` on every rank, naming the field."""
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, startup_identity(config), group=group)
    problems = differences(gathered)
    if problems:
        raise PolicyMismatchError(
            "madakv: the TP ranks were started with different settings; start every node with the same "
            "--kv-* flags and the same package versions:\n  " + "\n  ".join(problems)
        )


def engine_group() -> tuple[int, int, Any]:
    """(TP rank, TP size, gloo group of the TP ranks) from SGLang's parallel state (the process must be a
    scheduler whose distributed environment is initialized)."""
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    return int(parallel.tp_rank), int(parallel.tp_size), parallel.tp_group.cpu_group


__all__ = [
    "HeadShard",
    "PolicyMismatchError",
    "TensorParallelComm",
    "check_same_policy",
    "differences",
    "engine_group",
    "startup_identity",
]
