"""The transformers path (madakv_sglang.hf) on tiny random models, CPU, fp32.

Each check compares the compressed path with something computed another way: HF's own ``generate`` (budget
>= n), dense attention over the full cache with the evicted cells masked (any budget), the model's eager
attention probabilities (the scores), and the lead's pure-Python spec (the kept sets).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel

from madakv_sglang import hf
from madakv_sglang import tiny_models as hf_models
from madakv_sglang.config import Budget, PolicyConfig
from madakv_sglang.policies import Selection
from tests.spec_impl import spec_select

WINDOW = 4
STEPS = 6
MODELS = ["llama", "qwen2", "qwen2_vl", "qwen2_5_vl", "llava"]
VLMS = ["qwen2_vl", "qwen2_5_vl", "llava"]

_cache: dict[str, hf_models.Built] = {}


def build(name: str) -> hf_models.Built:
    """One model per name for the whole module (building is the slow part; the models are never modified)."""
    if name not in _cache:
        _cache[name] = hf_models.BUILDERS[name]()
    return _cache[name]


def prompt_len(inputs: dict[str, Any]) -> int:
    return int(inputs["input_ids"].shape[1])


def hf_greedy(model: PreTrainedModel, inputs: dict[str, Any], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' own greedy generate over the dense cache: tokens and the raw logits of each step."""
    out = model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    tokens = out.sequences[0, prompt_len(inputs) :].tolist()
    return tokens, [step[0].float() for step in out.logits]


# ---- budget >= n: the compressed path is the uncompressed model --------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("budget", ["n+10", "ratio 1.0"])
@pytest.mark.parametrize("policy", ["madakv", "snapkv", "h2o"])
def test_full_budget_reproduces_dense_logits(name: str, budget: str, policy: str) -> None:
    model, inputs = build(name)
    n = prompt_len(inputs)
    chosen = Budget(tokens=n + 10) if budget == "n+10" else Budget.parse(1.0)
    res = hf.generate(model, inputs, PolicyConfig(policy=policy, budget=chosen, window=WINDOW, min_prompt=0), STEPS)

    tokens, logits = hf_greedy(model, inputs, STEPS)
    assert bool(res.selection.keep.all())
    assert res.kv_bytes_kept == res.kv_bytes_full
    assert res.tokens == tokens
    # Bit-identical: the kept K/V are exact copies in the original order and, with no padding, decode makes the
    # very same SDPA call as the dense model.
    for step, (ours, theirs) in enumerate(zip(res.step_logits, logits, strict=True)):
        assert torch.equal(ours, theirs), f"step {step}"


# ---- any budget: compressed decode == dense decode with the evicted cells masked --------------------------------

_MASKED = "test_hf_masked_dense"
_masked_keep: list[torch.Tensor] = []  # [1, L, H, n] keep mask of the running reference


def _masked_dense_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Plain softmax attention over the *full* cache, each head blind to the prompt positions it evicted.

    ``query`` ``[1, Hq, q, D]``, ``key``/``value`` ``[1, H, S, D]`` with S = n + generated; decode only (q = 1).
    """
    assert query.shape[2] == 1, "the masked reference is for decode steps"
    keep = _masked_keep[-1][0, module.layer_idx]  # [H, n]
    groups = module.num_key_value_groups
    visible = torch.ones(key.shape[1], key.shape[2], dtype=torch.bool)
    visible[:, : keep.shape[-1]] = keep
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    logits = (query @ k.transpose(-1, -2)) * scaling  # [1, Hq, 1, S]
    logits = logits.masked_fill(~visible.repeat_interleave(groups, dim=0)[None, :, None, :], float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v
    return out.transpose(1, 2).contiguous(), None


def _decoder_impl(model: PreTrainedModel, impl: str) -> str | dict[str, str]:
    return {"text_config": impl} if "text_config" in model.config.sub_configs else impl


def masked_dense_logits(
    model: PreTrainedModel, inputs: dict[str, Any], selection: Selection, tokens: list[int]
) -> list[torch.Tensor]:
    """Teacher-forced decode of ``tokens`` over a full ``DynamicCache`` with evicted cells masked per head."""
    AttentionInterface.register(_MASKED, _masked_dense_attention)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = [model(**inputs, past_key_values=cache, use_cache=True).logits[0, -1].float()]
        previous = model.config.get_text_config(decoder=True)._attn_implementation
        model.set_attn_implementation(_decoder_impl(model, _MASKED))
        _masked_keep.append(selection.keep)
        try:
            for token in tokens[:-1]:
                out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                logits.append(out.logits[0, -1].float())
        finally:
            _masked_keep.pop()
            model.set_attn_implementation(_decoder_impl(model, previous))
    return logits


HEADWISE = {
    "madakv-paper": {"policy": "madakv", "hcc": "paper"},
    "adakv": {"policy": "adakv"},
    "h2o": {"policy": "h2o"},
    "streamingllm": {"policy": "streamingllm"},
}


@pytest.mark.parametrize("name", ["llama", "qwen2_vl", "qwen2_5_vl", "llava"])
@pytest.mark.parametrize("setting", sorted(HEADWISE))
def test_compressed_decode_matches_masked_dense(name: str, setting: str) -> None:
    model, inputs = build(name)
    cfg = PolicyConfig(budget=0.2, window=WINDOW, min_prompt=0, **HEADWISE[setting])
    res = hf.generate(model, inputs, cfg, STEPS)
    assert not bool(res.selection.keep.all()), "the budget must evict something for this test to mean anything"

    reference = masked_dense_logits(model, inputs, res.selection, res.tokens)
    # Same softmax over the same kept cells, but a different summation order (SDPA over the packed, padded
    # buffer vs an explicit matmul over all n + t cells with -inf masks): fp32 rounding only, far below the
    # ~1e-1 logit gaps between tokens of these random models (observed: at most 1.1e-7).
    for step, (ours, theirs) in enumerate(zip(res.step_logits, reference, strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=f"step {step}")


# ---- the cache shrinks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen2_vl", "llava"])
@pytest.mark.parametrize("policy", ["madakv", "adakv"])
def test_cache_shrinks_to_padded_storage(name: str, policy: str) -> None:
    model, inputs = build(name)
    cfg = PolicyConfig(policy=policy, budget=0.2, window=WINDOW, min_prompt=0)
    n = prompt_len(inputs)
    pre = hf.prefill(model, inputs, cfg)
    selection = hf.select_tokens(pre, cfg)
    text = model.config.get_text_config(decoder=True)
    layers, heads, dim = text.num_hidden_layers, text.num_key_value_heads, text.head_dim
    assert hf.dense_kv_bytes(pre.cache) == 2 * layers * heads * n * dim * 4

    cache = hf.compress(pre.cache, selection.keep)
    counts = selection.head_counts[0]  # [L, H]
    padded = counts.max(dim=-1).values  # the fullest head of each layer
    assert cache.kv_bytes() == sum(2 * heads * int(p) * dim * 4 for p in padded)
    assert cache.kv_bytes() < hf.dense_kv_bytes(pre.cache)
    for index, layer in enumerate(cache.layers):
        assert layer.keys.shape == (1, heads, int(padded[index]), dim)
        assert torch.equal(layer.counts[0], counts[index])
        assert layer.get_seq_length() == n  # the model sees the logical length
        # Each head holds its kept positions in order, and zeros in its padding.
        for head in range(heads):
            kept = selection.keep[0, index, head].nonzero().flatten()
            stored = layer.keys[0, head]
            assert torch.equal(stored[: len(kept)], pre.cache.layers[index].keys[0, head, kept])
            assert not bool(stored[len(kept) :].any())

    res = hf.generate(model, inputs, cfg, 2)
    # generate() reports the same numbers, counted from the shapes here (fp32: 4 bytes), not from hf's helpers.
    assert res.kv_bytes_full == 2 * layers * heads * n * dim * 4
    assert res.kv_bytes_kept == sum(2 * heads * int(p) * dim * 4 for p in padded)


# ---- the scores are the model's own attention --------------------------------------------------------------------


def eager_psi(model: PreTrainedModel, inputs: dict[str, Any], rows: slice) -> torch.Tensor:
    """``[L, H, n]`` psi from the eager attention probabilities: sum the chosen query rows, mean over a group."""
    previous = model.config.get_text_config(decoder=True)._attn_implementation
    model.set_attn_implementation(_decoder_impl(model, "eager"))
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(_decoder_impl(model, previous))
    heads = model.config.get_text_config(decoder=True).num_key_value_heads
    psi = []
    for probs in attentions:  # [1, Hq, n, n] per decoder layer
        per_query_head = probs[0, :, rows, :].sum(dim=1)  # [Hq, n]
        psi.append(per_query_head.view(heads, -1, per_query_head.shape[-1]).mean(dim=1))
    return torch.stack(psi)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("source", ["window", "accumulated"])
def test_captured_scores_match_eager_attention(name: str, source: str) -> None:
    model, inputs = build(name)
    cfg = PolicyConfig(policy="full", budget=0.2, window=WINDOW)
    assert hf.prefill(model, inputs, cfg).scores is None  # the default follows the policy: `full` needs none
    pre = hf.prefill(model, inputs, cfg, source=source)  # type: ignore[arg-type]
    rows = slice(-WINDOW, None) if source == "window" else slice(None)
    assert pre.scores is not None
    # Two fp32 computations of the same softmax (eager matmul vs our bmm): rounding only.
    torch.testing.assert_close(pre.scores[0], eager_psi(model, inputs, rows), rtol=1e-5, atol=1e-6)

    expected_visual = torch.zeros(prompt_len(inputs), dtype=torch.bool)
    if name in VLMS:
        expected_visual = inputs["input_ids"][0] == hf_models.IMAGE_TOKEN
        assert int(expected_visual.sum()) == 16
    assert torch.equal(pre.visual[0], expected_visual)


@pytest.mark.parametrize("name", ["llama", "qwen2_vl", "llava"])
@pytest.mark.parametrize("setting", ["madakv", "madakv-paper", "madakv-no-mpa", "snapkv", "adakv"])
def test_kept_sets_match_spec(name: str, setting: str) -> None:
    extra = {
        "madakv-paper": {"policy": "madakv", "hcc": "paper"},
        "madakv-no-mpa": {"policy": "madakv", "mpa": False},
    }.get(setting, {"policy": setting})
    cfg = PolicyConfig(budget=0.2, window=WINDOW, min_prompt=0, **extra)
    model, inputs = build(name)
    selection = hf.select_tokens(hf.prefill(model, inputs, cfg), cfg)

    psi = eager_psi(model, inputs, slice(-WINDOW, None))  # computed without madakv_sglang
    visual = (inputs["input_ids"][0] == hf_models.IMAGE_TOKEN).tolist() if name in VLMS else [False] * psi.shape[-1]
    expected = spec_select(psi.tolist(), visual, prompt_len(inputs), cfg, psi.shape[1])
    got = [[row.nonzero().flatten().tolist() for row in layer] for layer in selection.keep[0]]
    assert got == expected


# ---- text-only requests, request isolation, stopping, batching ---------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_text_only_request_on_a_vlm(name: str) -> None:
    model, image_inputs = build(name)
    _, text_inputs = hf_models.BUILDERS[name](image=False)
    cfg = PolicyConfig(budget=0.2, window=WINDOW, min_prompt=0)
    fresh = hf.generate(model, text_inputs, cfg, STEPS)
    assert not bool(fresh.selection.keep.all())
    assert not bool(hf.placeholder_mask(model, text_inputs["input_ids"]).any())

    # An image request leaves M-RoPE offsets on the model; the next text request must not inherit them.
    hf.generate(model, image_inputs, cfg, 2)
    again = hf.generate(model, text_inputs, cfg, STEPS)
    assert again.tokens == fresh.tokens
    for ours, theirs in zip(again.step_logits, fresh.step_logits, strict=True):
        assert torch.equal(ours, theirs)

    full = hf.generate(model, text_inputs, cfg.replace(budget=Budget.parse(1.0)), STEPS)
    fresh_model, _ = hf_models.BUILDERS[name](image=False)
    assert full.tokens == hf_greedy(fresh_model, text_inputs, STEPS)[0]


def test_generation_stops_at_eos() -> None:
    model, inputs = build("llama")
    cfg = PolicyConfig(budget=0.2, window=WINDOW, min_prompt=0)
    tokens = hf.generate(model, inputs, cfg, STEPS).tokens
    stopped = hf.generate(model, inputs, cfg, STEPS, eos_token_id=tokens[2])
    assert stopped.tokens == tokens[: tokens.index(tokens[2]) + 1]


@pytest.mark.parametrize("name", ["qwen2", "qwen2_vl"])
def test_one_prefill_serves_every_policy_that_scores_alike(name: str) -> None:
    """The accuracy sweep evicts one prefill with many policies: each answer must equal its own fresh run."""
    model, inputs = build(name)
    configs = [
        PolicyConfig(policy=policy, budget=budget, window=WINDOW, min_prompt=0)
        for policy in ("madakv", "snapkv", "adakv")
        for budget in (0.2, 0.5)
    ]
    assert len({hf.score_key(cfg) for cfg in configs}) == 1, "the window policies share one key"
    pre = hf.prefill(model, inputs, configs[0])
    for cfg in configs:
        reused = hf.generate(model, inputs, cfg, STEPS, prefilled=pre)
        fresh = hf.generate(model, inputs, cfg, STEPS)
        assert reused.tokens == fresh.tokens, cfg
        assert torch.equal(reused.selection.keep, fresh.selection.keep), cfg
        for ours, theirs in zip(reused.step_logits, fresh.step_logits, strict=True):
            assert torch.equal(ours, theirs)
    full_pre = hf.prefill(model, inputs, PolicyConfig(policy="full"))
    assert hf.score_key(PolicyConfig(policy="full")) == full_pre.scored_by == ("none", 0, "")
    with pytest.raises(ValueError, match="scored for"):
        hf.generate(model, inputs, configs[0], 1, prefilled=full_pre)
    with pytest.raises(ValueError, match="scored for"):
        hf.generate(model, inputs, configs[0].replace(window=WINDOW + 1), 1, prefilled=pre)


def test_prefill_scores_a_batch_of_equal_length_prompts() -> None:
    model, first = build("qwen2")
    _, second = hf_models.qwen2(seed=5)
    cfg = PolicyConfig(budget=0.2, window=WINDOW, min_prompt=0)
    batch = {"input_ids": torch.cat([first["input_ids"], second["input_ids"]])}
    together = hf.prefill(model, batch, cfg)
    selection = hf.select_tokens(together, cfg)
    cache = hf.compress(together.cache, selection.keep)
    assert cache.layers[0].keys.shape[0] == 2
    for row, single in enumerate((first, second)):
        alone = hf.prefill(model, single, cfg)
        assert together.scores is not None and alone.scores is not None
        # Batched and single projections may round differently in the last bit.
        torch.testing.assert_close(together.scores[row], alone.scores[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together.logits[row], alone.logits[0], rtol=1e-5, atol=1e-5)


def test_rejects_what_it_does_not_support() -> None:
    model, inputs = build("llama")
    cfg = PolicyConfig(budget=0.2, window=WINDOW, min_prompt=0)
    padded = dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"]))
    padded["attention_mask"][0, 0] = 0
    with pytest.raises(ValueError, match="padded"):
        hf.prefill(model, padded, cfg)
    with pytest.raises(ValueError, match="one request"):
        hf.generate(model, {"input_ids": inputs["input_ids"].repeat(2, 1)}, cfg, 1)


@pytest.fixture(autouse=True)
def _attention_restored() -> Iterator[None]:
    """Every test leaves each shared model on its original attention implementation."""
    yield
    for model, _ in _cache.values():
        assert model.config.get_text_config(decoder=True)._attn_implementation == "sdpa"
