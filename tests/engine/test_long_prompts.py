"""The arithmetic of prompts longer than the pool (``madakv_sglang.engine.long_prompts``), without a server; the
engine test is ``test_prompts_longer_than_the_pool_are_served_by_what_they_hold``."""

from __future__ import annotations

from madakv_sglang.engine.long_prompts import PoolLimits, output_limit, refusal
from madakv_sglang.settings import policy_config


def limits(**settings: object) -> PoolLimits:
    config = policy_config(prefill_evict="chunk", window=8, sink=4, **settings)
    return PoolLimits(config, stride=256, pool_input_len=2394, capacity=2400, page_size=1)


def test_a_prompt_is_refused_only_when_its_cut_size_plus_one_chunk_does_not_fit() -> None:
    # 4,100 tokens on a 2,400-slot pool (SGLang's limit 2,394), 256-token chunks.
    assert refusal(4100, limits(budget=0.1)) is None  # cuts of 4B = 1,640 (the default) + 256
    message = refusal(4100, limits(budget=0.2))  # 3,280 + 256
    assert message is not None and "3536 slots" in message and "--kv-prefill-evict chunk" in message
    assert refusal(4100, limits(budget=0.5, prefill_keep=1.0)) is None  # 2,050 + 256 = 2,306
    assert refusal(4100, limits(budget=0.6, prefill_keep=1.0)) is not None  # 2,460 + 256


def test_the_output_is_clipped_by_the_kept_slots() -> None:
    assert output_limit(4100, limits(budget=0.1)) == 2400 - 410 - 1 - 2
    assert output_limit(4100, limits(budget=0.1, layout="per-layer", cap=2.0)) == 2400 - 820 - 1 - 2
