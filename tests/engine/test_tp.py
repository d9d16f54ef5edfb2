"""Tensor-parallel decisions over real gloo process groups (docs/design.md §2, §5): ranks holding slices of the KV
heads, replicated heads included, decide exactly what one rank holding the heads' combined scores decides; the start-up
check refuses ranks with different settings.

Each test spawns its ranks once (torch.multiprocessing, gloo over loopback) and runs every scenario in them; the
ranks save what they saw and decided, and the checks run here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from madakv_sglang.config import PolicyConfig
from madakv_sglang.engine.tp import HeadShard, PolicyMismatchError, TensorParallelComm, check_same_policy, differences
from madakv_sglang.layout import slot_count
from madakv_sglang.packing import Finishing, Geometry, decide
from madakv_sglang.policies import get_policy
from madakv_sglang.policies.scoring import reduce_gqa
from madakv_sglang.server_process import free_port
from tests.random_scores import random_request

LAYERS = 3
LENGTHS = [40, 73, 9]  # the last budget (2) is below S + 2W: its kept window shrinks to 1, its sinks to 1
CONFIGS = [
    PolicyConfig(policy="madakv", budget="0.2", window=4, min_prompt=0),
    PolicyConfig(policy="madakv", budget="0.3", window=4, min_prompt=0, hcc="paper", gqa="max"),
    PolicyConfig(policy="madakv", budget="0.2", window=4, min_prompt=0, head_split="demand", pooling="none"),
    PolicyConfig(policy="madakv", budget="12", window=4, min_prompt=0, hcc="off", mpa=False),
    PolicyConfig(policy="adakv", budget="0.2", window=4, min_prompt=0),
    PolicyConfig(policy="snapkv", budget="0.25", window=4, min_prompt=0),
    PolicyConfig(policy="pyramidkv", budget="0.25", window=4, min_prompt=0),
    PolicyConfig(policy="streamingllm", budget="0.25", window=4, min_prompt=0),
]
# (KV heads, query heads per KV head) per TP size: even splits and replicated heads (fewer KV heads than ranks).
SHAPES = {2: [(2, 2), (4, 1), (1, 4)], 4: [(2, 2), (1, 4), (8, 1)]}


def request_scores(seed: int, kv_heads: int, group: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per request: window scores of every *query* head ``[L, Hq, n]`` and the visual mask ``[n]``."""
    return [random_request(seed + i, LAYERS, kv_heads * group, n, 0.5) for i, n in enumerate(LENGTHS)]


def _rank_main(rank: int, size: int, port: int, out_dir: str, budgets: list[str]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        try:  # budgets differ between ranks only in the mismatch test
            check_same_policy(PolicyConfig(policy="madakv", budget=budgets[rank]), dist.group.WORLD)
            torch.save({"ok": True}, Path(out_dir) / f"check.{rank}.pt")
        except PolicyMismatchError as err:
            torch.save({"ok": False, "message": str(err)}, Path(out_dir) / f"check.{rank}.pt")
            return
        for kv_heads, group in SHAPES[size]:
            shard = HeadShard(tp_rank=rank, tp_size=size, total_heads=kv_heads)
            comm = TensorParallelComm(shard, dist.group.WORLD)
            geometry = Geometry(LAYERS, kv_heads, shard.local_heads, shard.head_offset, size, shard.replicas, rank)
            q_per_rank = kv_heads * group // size  # SGLang gives rank r query heads [r * Hq/t, (r + 1) * Hq/t)
            for index, config in enumerate(CONFIGS):
                requests = []
                for scores, visual in request_scores(100 * index + kv_heads, kv_heads, group):
                    mine = scores[:, rank * q_per_rank : (rank + 1) * q_per_rank]
                    partial = torch.stack([reduce_gqa(layer, shard.local_heads, config.gqa) for layer in mine])
                    requests.append(
                        Finishing(row=0, prompt_len=scores.shape[-1], visual=visual, config=config, scores=partial)
                    )
                decisions = decide(requests, geometry, comm)
                torch.save(
                    {
                        "scores": [r.scores for r in requests],
                        "keep": [d.keep for d in decisions],
                        "all_head_counts": [d.all_head_counts for d in decisions],
                    },
                    Path(out_dir) / f"{kv_heads}x{group}.{index}.{rank}.pt",
                )
    finally:
        dist.destroy_process_group()


def _spawn(size: int, out_dir: Path, budgets: list[str]) -> None:
    mp.start_processes(
        _rank_main, args=(size, free_port(), str(out_dir), budgets), nprocs=size, start_method="spawn", join=True
    )


@pytest.mark.parametrize("size", [2, 4])
def test_ranks_decide_what_one_rank_decides_from_their_gathered_scores(size: int, tmp_path: Path) -> None:
    _spawn(size, tmp_path, ["0.2"] * size)
    for kv_heads, group in SHAPES[size]:
        shard0 = HeadShard(tp_rank=0, tp_size=size, total_heads=kv_heads)
        replicas, local = shard0.replicas, shard0.local_heads
        whole = Geometry(LAYERS, kv_heads, kv_heads, 0, 1)
        for index, config in enumerate(CONFIGS):
            scored = get_policy(config.policy).score_source != "none"  # streamingllm reads no scores
            ranks = [torch.load(tmp_path / f"{kv_heads}x{group}.{index}.{r}.pt") for r in range(size)]
            primaries = ranks[::replicas]
            for i, (full_scores, visual) in enumerate(request_scores(100 * index + kv_heads, kv_heads, group)):
                where = f"tp={size} heads={kv_heads}x{group} {config.policy} #{index} request {i}"
                for rank in range(size):  # replicas hold the same merged scores and decide the same, bit for bit
                    twin = ranks[rank - rank % replicas]
                    if scored:
                        assert torch.equal(ranks[rank]["scores"][i], twin["scores"][i]), where
                    assert torch.equal(ranks[rank]["keep"][i], twin["keep"][i]), where
                    assert torch.equal(ranks[rank]["all_head_counts"][i], ranks[0]["all_head_counts"][i]), where
                gathered = torch.cat([p["scores"][i] for p in primaries], dim=1)  # [L, H, n]
                if scored:
                    # Merging partial means reorders float sums: equal to the one-rank reduction up to rounding.
                    one_rank = torch.stack([reduce_gqa(layer, kv_heads, config.gqa) for layer in full_scores])
                    torch.testing.assert_close(gathered, one_rank, rtol=1e-5, atol=1e-6)
                reference = decide(
                    [Finishing(row=0, prompt_len=gathered.shape[-1], visual=visual, config=config, scores=gathered)],
                    whole,
                )[0]
                assert torch.equal(torch.cat([p["keep"][i] for p in primaries], dim=1), reference.keep), where
                assert torch.equal(ranks[0]["all_head_counts"][i], reference.all_head_counts), where
                for layout in ("shared", "per-layer"):
                    ranks_m = slot_count(ranks[0]["all_head_counts"][i][None], size, layout=layout)
                    assert (
                        ranks_m.tolist() == slot_count(reference.all_head_counts[None], size, layout=layout).tolist()
                    ), where
                assert all(p["keep"][i].shape[1] == local for p in ranks), where


def test_ranks_with_different_settings_refuse_to_start(tmp_path: Path) -> None:
    _spawn(2, tmp_path, ["0.2", "0.3"])
    for rank in range(2):
        result = torch.load(tmp_path / f"check.{rank}.pt")
        assert not result["ok"], "every rank must refuse, not only the one that differs"
        assert "--kv-budget differs between TP ranks (rank 0: 0.2, rank 1: 0.3)" in result["message"]
        assert "same --kv-* flags" in result["message"]


def test_differences_name_every_differing_field() -> None:
    same = {"--kv-policy": "madakv", "sglang version": "0.5.23"}
    assert differences([same, dict(same)]) == []
    lines = differences([same, {"--kv-policy": "snapkv", "sglang version": "0.5.22"}, dict(same)])
    assert lines == [
        "--kv-policy differs between TP ranks (rank 0: madakv, rank 1: snapkv, rank 2: madakv)",
        "sglang version differs between TP ranks (rank 0: 0.5.23, rank 1: 0.5.22, rank 2: 0.5.23)",
    ]


@pytest.mark.parametrize(
    ("rank", "size", "heads", "local", "offset", "replicas", "primary"),
    [
        (1, 2, 4, 2, 2, 1, True),
        (3, 4, 2, 1, 1, 2, False),
        (2, 4, 2, 1, 1, 2, True),
        (3, 4, 1, 1, 0, 4, False),
        (0, 1, 6, 6, 0, 1, True),
    ],
)
def test_head_shards_follow_sglang(rank, size, heads, local, offset, replicas, primary) -> None:
    shard = HeadShard(tp_rank=rank, tp_size=size, total_heads=heads)
    assert (shard.local_heads, shard.head_offset, shard.replicas, shard.is_primary) == (
        local,
        offset,
        replicas,
        primary,
    )


def test_head_shards_refuse_uneven_splits() -> None:
    with pytest.raises(ValueError, match="cannot be sharded"):
        HeadShard(tp_rank=0, tp_size=4, total_heads=6)
    with pytest.raises(ValueError, match="outside"):
        HeadShard(tp_rank=2, tp_size=2, total_heads=2)


def test_padding_heads_ask_only_for_their_window() -> None:
    """SGLang's CPU TP pads 2 KV heads to 4 at TP=4: ranks 2 and 3 hold zero-weight heads. Their scores are zeroed
    before the policy, so their demand is the window alone and they do not pull budget from the real heads."""
    real = Geometry(LAYERS, 4, 1, 1, 4, tp_rank=1, real_heads=2)
    padding = Geometry(LAYERS, 4, 1, 2, 4, tp_rank=2, real_heads=2)
    assert real.padding_columns() is None and padding.padding_columns() == slice(0, 1)
    assert Geometry(LAYERS, 4, 4, 0, 1, real_heads=3).padding_columns() == slice(3, 4)
    scores, visual = random_request(3, LAYERS, 1, 50, 0.5)
    request = Finishing(row=0, prompt_len=50, visual=visual, config=CONFIGS[0], scores=scores.clone())
    decide([request], padding)
    assert request.scores is not None and not request.scores.any()
