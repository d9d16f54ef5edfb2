"""Run NVIDIA kvpress's SnapKVPress and AdaKVPress(SnapKVPress) on a tiny random Llama and dump what they kept.

Runs in .venv-kvpress (scripts/setup-kvpress.sh), never in the project's venv: kvpress 0.5.5 needs
transformers<5.3. tests/policies/test_kvpress_oracle.py calls it in a subprocess and replays the dumped tensors through
our policies.

    .venv-kvpress/bin/python tests/kvpress_dump.py OUT.pt '[{"press": "snapkv", "window_size": 16, ...}, ...]'

Each case is one prefill of the same model on the same input with one press. Per case and layer the dump holds

* ``q_window`` ``[W, Hq, D]``: the post-RoPE window queries kvpress itself scored with (captured inside
  ``SnapKVPress.compute_window_attention`` by re-running its own lines, then checked bit for bit against the
  attention it returned);
* ``keys`` ``[n, H, D]``: the post-RoPE cache keys handed to the press (before compression);
* ``scores`` ``[H, n]``: ``SnapKVPress.score``'s output (window padded with max + 1), before AdaKV edits it;
* ``keep`` ``[H, n]`` bool: the positions kvpress kept. SnapKVPress gathers keys into a shorter cache, so the
  kept positions are found by matching the compressed cache's keys against the original keys (exact row
  equality, asserted unique). AdaKVPress leaves the cache whole and records the evicted cells in
  ``module.masked_key_indices``; kept = the complement.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import sys

import torch
from kvpress import AdaKVPress, SnapKVPress
from kvpress.presses import snapkv_press
from kvpress.utils import compute_n_kept
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

MODEL_SEED = 0
INPUT_SEED = 1
PROMPT_LEN = 96
MODEL_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    # Larger than the default 0.02 so attention is peaked, not near-uniform: the kept sets are then decided by
    # clear score gaps (the test asserts the margins) rather than by float noise.
    initializer_range=0.25,
    tie_word_embeddings=False,
)
# Per layer, a factor on each query head's q_proj rows (a softmax temperature): flat and peaked heads side by
# side, so AdaKV's cross-head top-k gives the KV heads unequal budgets and its safeguard binds. A plain random
# init makes every head about equally flat, and the safeguard never binds.
QUERY_HEAD_SHARPNESS = ((0.4, 0.7, 1.6, 2.4), (2.4, 1.6, 0.7, 0.4))

_captured: dict[int, dict[str, torch.Tensor]] = {}


def _capture_window_attention(module, hidden_states, keys, window_size, position_embeddings):
    attn = _original_window_attention(module, hidden_states, keys, window_size, position_embeddings)
    # The same lines as SnapKVPress.compute_window_attention (kvpress 0.5.5): deterministic, so bitwise equal.
    q = snapkv_press.get_prerope_query_states(module, hidden_states[:, -window_size:])
    cos, sin = position_embeddings
    cos, sin = cos[:, -window_size:], sin[:, -window_size:]
    q = (q * cos.unsqueeze(1)) + (rotate_half(q) * sin.unsqueeze(1))
    again = _attention_from_queries(module, q, keys, window_size)
    assert torch.equal(again, attn), "re-derived window queries do not reproduce kvpress's attention"
    _captured[module.layer_idx] = {"q_window": q[0].transpose(0, 1).clone(), "keys": keys[0].transpose(0, 1).clone()}
    return attn


def _attention_from_queries(module, q, keys, window_size):
    """The rest of compute_window_attention, from post-RoPE queries (the self-check above)."""
    k_len = keys.shape[2]
    key_states = repeat_kv(keys, module.config.num_attention_heads // module.config.num_key_value_heads)
    attn = torch.matmul(q, key_states.transpose(2, 3)) / math.sqrt(module.head_dim)
    mask = torch.triu(torch.ones_like(attn) * float("-inf"), diagonal=k_len - window_size + 1)
    attn += mask
    attn = torch.nn.functional.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
    return attn[..., :-window_size]


_original_window_attention = SnapKVPress.compute_window_attention
_original_score = SnapKVPress.score


def _capture_score(self, module, hidden_states, keys, values, attentions, kwargs):
    scores = _original_score(self, module, hidden_states, keys, values, attentions, kwargs)
    _captured[module.layer_idx]["scores"] = scores[0].clone()  # AdaKVPress scatters into it afterwards
    return scores


SnapKVPress.compute_window_attention = staticmethod(_capture_window_attention)  # type: ignore[method-assign]
SnapKVPress.score = _capture_score  # type: ignore[method-assign]


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(MODEL_SEED)
    config = LlamaConfig(**MODEL_CONFIG)
    config._attn_implementation = "sdpa"  # AdaKVPress refuses eager; sdpa returns no attentions, so SnapKV
    # computes the window attention itself (compute_window_attention)
    model = LlamaForCausalLM(config).float().eval()
    head_dim = MODEL_CONFIG["head_dim"]
    with torch.no_grad():
        for layer, factors in zip(model.model.layers, QUERY_HEAD_SHARPNESS, strict=True):
            weight = layer.self_attn.q_proj.weight  # [Hq * D, hidden]
            weight.view(len(factors), head_dim, -1).mul_(torch.tensor(factors)[:, None, None])
    return model


def run_case(model: LlamaForCausalLM, input_ids: torch.Tensor, case: dict) -> dict:
    snap = SnapKVPress(
        compression_ratio=case["compression_ratio"], window_size=case["window_size"], kernel_size=case["kernel_size"]
    )
    if case["press"] == "snapkv":
        press = snap
    elif case["press"] == "adakv":
        press = AdaKVPress(snap, alpha_safeguard=case["alpha_safeguard"])
    else:
        raise ValueError(f"unknown press {case['press']!r}")
    n = input_ids.shape[1]
    _captured.clear()
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(input_ids, past_key_values=cache, use_cache=True)

    layers = []
    for idx, layer in enumerate(model.model.layers):
        got = dict(_captured[idx])
        original = got["keys"].transpose(0, 1)  # [H, n, D]
        heads = original.shape[0]
        if case["press"] == "snapkv":
            compressed = cache.layers[idx].keys[0]  # [H, n_kept, D]
            match = (compressed[:, :, None, :] == original[:, None, :, :]).all(-1)  # [H, n_kept, n]
            assert bool((match.sum(-1) == 1).all()), "a compressed key matches no, or several, original keys"
            keep = match.any(1)
        else:
            assert cache.layers[idx].keys.shape[2] == n, "AdaKVPress should leave the cache whole (masking)"
            batch, head, seq = layer.self_attn.masked_key_indices
            keep = torch.ones(heads, n, dtype=torch.bool)
            keep[head, seq] = False
            assert bool((batch == 0).all())
        got["keep"] = keep
        layers.append(got)
    n_kept = compute_n_kept(n, case["compression_ratio"])
    out = {"case": case, "n_kept": n_kept, "layers": layers}
    if case["press"] == "adakv":
        n_safe = int(n_kept * case["alpha_safeguard"])  # AdaKVPress.compress, verbatim
        out["n_safe"] = (max(1, n_safe) if n_kept > 0 else 0) if case["alpha_safeguard"] > 0 else n_safe
    return out


def main() -> None:
    out_path, cases = sys.argv[1], json.loads(sys.argv[2])
    model = build_model()
    generator = torch.Generator().manual_seed(INPUT_SEED)
    input_ids = torch.randint(0, MODEL_CONFIG["vocab_size"], (1, PROMPT_LEN), generator=generator)
    results = [run_case(model, input_ids, case) for case in cases]
    versions = {name: md.version(name) for name in ("kvpress", "transformers", "torch")}
    torch.save(
        {
            "versions": versions,
            "model_config": MODEL_CONFIG,
            "input_ids": input_ids[0],
            "head_dim": MODEL_CONFIG["head_dim"],
            "results": results,
        },
        out_path,
    )


if __name__ == "__main__":
    main()
