"""transformers integration: score the prompt, evict per head, decode greedily from the smaller cache.

The research and accuracy path (docs/design.md §9): it runs any HF causal LM or VLM whose decoder attention goes through
transformers' ``AttentionInterface`` (Llama, Qwen2, Qwen2-VL, Qwen2.5-VL, LLaVA, ...) with any registered policy,
and the cache really shrinks: after the prefill only the kept K/V of each head stay in memory.

1. :func:`prefill` runs the prompt once. A custom attention function, set on the decoder only (vision towers keep
   their own), delegates to SDPA and records psi per layer on the way: the window scores of the last W queries
   (``scoring.window_scores``) or, for ``h2o``, the accumulated attention of every query.
2. :func:`select_tokens` hands the scores and the visual mask to the policy from the registry.
3. :func:`compress` keeps, per layer, each head's kept K/V in a ``[R, H, P, D]`` buffer (P = the fullest head of
   that layer) plus per-head valid counts; generated tokens are appended after the P cells.
4. :func:`generate` decodes greedily; a second attention function masks each head to its valid cells. The cache
   reports the *logical* length (n + generated), so position ids, ``cache_position`` and Qwen2-VL's M-RoPE
   ``rope_deltas`` are those of the uncompressed model.

Scope: :func:`prefill`, :func:`select_tokens` and :func:`compress` take R prompts of equal length (no padding
mask); :func:`generate` takes one request. Both passes run through SDPA, whatever attention the model was loaded
with; models with sliding-window or linear-attention layers are refused (their cache does not hold the prompt).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from madakv_sglang.config import PolicyConfig
from madakv_sglang.policies import PolicyInputs, Selection, get_policy
from madakv_sglang.policies.base import ScoreSource
from madakv_sglang.policies.scoring import accumulated_scores, window_scores

CAPTURE_ATTENTION = "madakv_capture"
DECODE_ATTENTION = "madakv_decode"


class _DecoderAttention(Protocol):
    """What the attention functions read from the decoder's attention module (every HF decoder has these)."""

    layer_idx: int
    scaling: float
    num_key_value_groups: int


# ---------------------------------------------------------------------------------------------------------------
# Prefill: one forward that also scores the prompt
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Prefill:
    """What one prompt forward leaves behind.

    Attributes:
        cache: the dense ``DynamicCache``, ``[R, H, n, D]`` keys and values per layer (post-RoPE).
        logits: ``[R, V]`` float32 logits at the last prompt position (they pick the first generated token).
        scores: ``[R, L, H, n]`` float32 psi of every KV head (see ``scoring``); None for score-free policies.
        visual: ``[R, n]`` bool, True at image and video token positions.
        prompt_len: n.
        scored_by: (score source, window W, GQA reduction) of ``scores``: the policies it can serve.
    """

    cache: DynamicCache
    logits: Tensor
    scores: Tensor | None
    visual: Tensor
    prompt_len: int
    scored_by: tuple[str, int, str]


@dataclass
class _Recorder:
    """Capture-time state read by :func:`_capture_attention`; ``scores`` fills as layers run."""

    source: ScoreSource
    window: int
    gqa: str
    scores: dict[int, Tensor]


_RECORDER: ContextVar[_Recorder | None] = ContextVar("madakv_recorder", default=None)


def _capture_attention(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Tensor | None]:
    """SDPA attention that also stores psi of this layer, ``[R, H, n]``.

    ``query`` is ``[R, Hq, n, D]`` and ``key`` ``[R, H, n, D]``, both after RoPE: exactly what the model attends
    with, so psi sees the same geometry as decode will.
    """
    recorder = _RECORDER.get()
    if recorder is None:
        raise RuntimeError(f"{CAPTURE_ATTENTION} attention runs only inside madakv_sglang.hf.prefill")
    if query.shape[2] != key.shape[2]:
        raise ValueError("prefill must see the whole prompt in one forward (the cache was not empty)")
    if recorder.source != "none":
        attention = cast(_DecoderAttention, module)
        recorder.scores[attention.layer_idx] = _layer_scores(query, key, attention.scaling, recorder)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _layer_scores(query: Tensor, key: Tensor, scale: float, recorder: _Recorder) -> Tensor:
    """psi of one layer for every request, ``[R, H, n]`` float32."""
    rows = []
    for q, k in zip(query.transpose(1, 2), key.transpose(1, 2), strict=True):  # [n, Hq, D], [n, H, D] per request
        if recorder.source == "accumulated":
            rows.append(accumulated_scores(q, k, scale=scale, gqa=recorder.gqa))
        else:
            w = min(recorder.window, q.shape[0])
            rows.append(window_scores(q[-w:], k, scale=scale, gqa=recorder.gqa))
    return torch.stack(rows)


@torch.no_grad()
def prefill(
    model: PreTrainedModel, inputs: Mapping[str, Any], cfg: PolicyConfig, *, source: ScoreSource | None = None
) -> Prefill:
    """Run the prompt once and record psi per layer; also the helper tests and benchmarks use for scores.

    Args:
        model: a causal LM or VLM in eval mode.
        inputs: the model's prompt kwargs (``input_ids`` ``[R, n]``, plus ``pixel_values``, ``image_grid_thw``,
            ``mm_token_type_ids``, ... for VLMs). Every row must be a full prompt: no padding.
        cfg: window W and the GQA reduction come from here.
        source: ``window`` (the last W queries), ``accumulated`` (every query, H2O) or ``none``; defaults to the
            score source of ``cfg.policy``.
    """
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("padded prompts are not supported: give prompts of equal length without padding")
    source = get_policy(cfg.policy).score_source if source is None else source
    recorder = _Recorder(source=source, window=cfg.window, gqa=cfg.gqa, scores={})
    _reset_rope_deltas(model)
    cache = DynamicCache(config=model.config)
    with _decoder_attention(model, CAPTURE_ATTENTION), _bound(_RECORDER, recorder):
        out = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    scores = None
    if source != "none":
        scores = torch.stack([recorder.scores[i] for i in range(len(recorder.scores))], dim=1)
    return Prefill(
        cache=cache,
        logits=out.logits[:, -1].float(),
        scores=scores,
        visual=placeholder_mask(model, input_ids),
        prompt_len=input_ids.shape[1],
        scored_by=score_key(cfg, source),
    )


def score_key(cfg: PolicyConfig, source: ScoreSource | None = None) -> tuple[str, int, str]:
    """What a prefill must have captured for ``cfg``: prefills with equal keys serve each other's policies."""
    source = get_policy(cfg.policy).score_source if source is None else source
    return (source, cfg.window, cfg.gqa) if source != "none" else ("none", 0, "")


def placeholder_mask(model: PreTrainedModel, input_ids: Tensor) -> Tensor:
    """``[R, n]`` bool: positions holding the config's image (or video) placeholder id; all False for text LMs."""
    config = model.config
    visual = torch.zeros_like(input_ids, dtype=torch.bool)
    for name in ("image_token_id", "video_token_id"):
        token = getattr(config, name, None)
        if token is not None:
            visual |= input_ids == token
    return visual


def _reset_rope_deltas(model: PreTrainedModel) -> None:
    """Forget M-RoPE offsets of an earlier request.

    Qwen2-VL keeps ``rope_deltas`` on the model and, for a text-only prompt, reuses a stale value from the
    previous image request during decode; a fresh prompt must start from None.
    """
    for module in model.modules():
        if getattr(module, "rope_deltas", None) is not None:
            module.rope_deltas = None  # type: ignore[assignment]  # mypy types Module attributes as Tensor | Module


# ---------------------------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------------------------


def select_tokens(pre: Prefill, cfg: PolicyConfig) -> Selection:
    """Run ``cfg.policy`` on the captured scores: the kept positions of every layer and KV head."""
    layers = dense_kv(pre.cache)
    requests, heads = layers[0][0].shape[:2]
    device = pre.visual.device
    inputs = PolicyInputs(
        visual=pre.visual,
        prompt_len=torch.full((requests,), pre.prompt_len, dtype=torch.long, device=device),
        nominal_budget=torch.full((requests,), cfg.budget.tokens_for(pre.prompt_len), dtype=torch.long, device=device),
        num_layers=len(layers),
        total_heads=heads,
        scores=pre.scores,
    )
    return get_policy(cfg.policy).select(inputs, cfg)


# ---------------------------------------------------------------------------------------------------------------
# The compressed cache
# ---------------------------------------------------------------------------------------------------------------


class CompressedLayer(DynamicLayer):
    """One layer's kept K/V, head by head, padded to the fullest head, with generated tokens appended.

    ``keys`` / ``values`` are ``[R, H, P + T, D]``: cell ``s < P`` of head ``(r, h)`` holds its ``s``-th kept
    prompt token (ascending positions) when ``s < counts[r, h]`` and zeros otherwise; cells ``P + t`` hold the
    t-th generated token of every head. ``get_seq_length`` is the logical length n + T, so the model computes
    the positions of the uncompressed sequence.
    """

    def __init__(self, keys: Tensor, values: Tensor, counts: Tensor, prompt_len: int) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys, values
        self.is_initialized = True
        self.counts = counts  # [R, H] int64
        self.padded = keys.shape[-2]  # P
        self.prompt_len = prompt_len  # n
        # Decided once: every decode step of every layer asks, and the question costs a device sync.
        self.unpadded = bool((counts == self.padded).all())

    def get_seq_length(self) -> int:
        assert self.keys is not None
        return self.prompt_len + self.keys.shape[-2] - self.padded

    def attend_mask(self, query_len: int) -> Tensor | None:
        """``[R, H, q, S]`` bool cells each of the last ``q`` queries may see, or None if it may see them all.

        Kept prompt cells are always visible; generated cells are causal (query i sees up to its own token).
        """
        assert self.keys is not None
        total = self.keys.shape[-2]  # S, the new tokens included
        if query_len == 1 and self.unpadded:
            return None  # no padding: exactly the dense attention call
        cell = torch.arange(total, device=self.keys.device)
        kept = (cell >= self.padded) | (cell < self.counts[..., None])  # [R, H, S]
        query = torch.arange(query_len, device=self.keys.device)
        causal = cell[None, :] <= total - query_len + query[:, None]  # [q, S]
        return kept[:, :, None, :] & causal

    def kv_bytes(self) -> int:
        assert self.keys is not None and self.values is not None
        return self.keys.nbytes + self.values.nbytes


class CompressedCache(Cache):
    """A transformers ``Cache`` of :class:`CompressedLayer` (one per decoder layer)."""

    layers: list[CompressedLayer]  # type: ignore[assignment]

    def __init__(self, layers: list[CompressedLayer]) -> None:
        super().__init__(layers=list(layers))

    def kv_bytes(self) -> int:
        """Bytes of K/V storage held now, padding included."""
        return sum(layer.kv_bytes() for layer in self.layers)


def dense_kv(cache: DynamicCache) -> list[tuple[Tensor, Tensor]]:
    """(keys, values), ``[R, H, n, D]`` each, of every layer of a dense prompt cache.

    Only full-attention layers can be compressed: a sliding-window or linear-attention layer does not hold the
    whole prompt, so such models are refused here.
    """
    out = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or isinstance(layer, DynamicSlidingWindowLayer):
            raise TypeError(f"cannot compress a {type(layer).__name__}: only full-attention layers are supported")
        if layer.keys is None or layer.values is None:
            raise ValueError("the cache is empty: run prefill first")
        out.append((layer.keys, layer.values))
    return out


def dense_kv_bytes(cache: DynamicCache) -> int:
    """Bytes of K/V storage held by a dense cache."""
    return sum(keys.nbytes + values.nbytes for keys, values in dense_kv(cache))


def compress(cache: DynamicCache, keep: Tensor) -> CompressedCache:
    """Keep, per layer and head, only the positions of ``keep``.

    Args:
        cache: the dense prompt cache, ``[R, H, n, D]`` per layer.
        keep: ``[R, L, H, n]`` bool (``Selection.keep``).
    """
    layers = []
    for index, (dense_keys, dense_values) in enumerate(dense_kv(cache)):
        keep_l = keep[:, index]  # [R, H, n]
        counts = keep_l.sum(dim=-1)
        padded = int(counts.max())
        # Kept positions first, each head's in ascending order; the first P columns cover every head's kept set.
        order = torch.sort((~keep_l).to(torch.int8), dim=-1, stable=True).indices[..., :padded]
        valid = (torch.arange(padded, device=keep.device) < counts[..., None])[..., None]  # [R, H, P, 1]
        index_kv = order[..., None].expand(-1, -1, -1, dense_keys.shape[-1])
        keys = torch.where(valid, dense_keys.gather(2, index_kv), 0)
        values = torch.where(valid, dense_values.gather(2, index_kv), 0)
        layers.append(CompressedLayer(keys, values, counts, prompt_len=keep.shape[-1]))
    return CompressedCache(layers)


_DECODE_CACHE: ContextVar[CompressedCache | None] = ContextVar("madakv_decode_cache", default=None)


def _decode_attention(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Tensor | None]:
    """SDPA over the compressed layer, each head restricted to its valid cells.

    ``key`` / ``value`` are the layer's whole storage ``[R, H, S, D]`` (returned by ``CompressedLayer.update``);
    the model's own mask is not used (this name has no mask function: prompts carry no padding).
    """
    cache = _DECODE_CACHE.get()
    if cache is None:
        raise RuntimeError(f"{DECODE_ATTENTION} attention runs only inside madakv_sglang.hf.generate")
    attention = cast(_DecoderAttention, module)
    mask = cache.layers[attention.layer_idx].attend_mask(query.shape[2])
    if mask is not None:
        mask = mask.repeat_interleave(attention.num_key_value_groups, dim=1)  # query head j reads KV head j // G
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class HFResult:
    """Greedy output from the compressed cache (one request).

    Attributes:
        tokens: generated ids.
        step_logits: ``[V]`` float32 logits that chose each generated token.
        selection: the policy's decision (``keep`` is ``[1, L, H, n]``).
        kv_bytes_full: K/V bytes of the dense prompt cache.
        kv_bytes_kept: K/V bytes of the compressed prompt cache (padding included), before any generated token.
        prompt_len: n.
        step_seconds: wall time of each decode forward, from one chosen token to the next. Choosing a token
            reads it to the host (``int(argmax)``), which waits for the device, so on a GPU these are device
            times too, with no extra synchronisation.
    """

    tokens: list[int]
    step_logits: list[Tensor]
    selection: Selection
    kv_bytes_full: int
    kv_bytes_kept: int
    prompt_len: int
    step_seconds: list[float] = field(default_factory=list)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    inputs: Mapping[str, Any],
    cfg: PolicyConfig,
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    prefilled: Prefill | None = None,
) -> HFResult:
    """Prefill, evict with ``cfg.policy``, then decode greedily from the compressed cache.

    Args:
        model: a causal LM or VLM in eval mode.
        inputs: the prompt kwargs of one request (``input_ids`` ``[1, n]`` and the vision inputs).
        cfg: the policy and its settings.
        max_new_tokens: tokens to generate (stops earlier after ``eos_token_id`` when given).
        prefilled: the :func:`prefill` of ``inputs`` to evict from instead of running the prompt again (a sweep
            evicts one prompt with many policies and budgets; nothing here changes it). Its ``scored_by`` must
            be ``score_key(cfg)``, and no other prompt may have run on ``model`` since (Qwen2-VL keeps the
            prompt's M-RoPE offsets on the model for decoding).
    """
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("generate takes one request (input_ids of shape [1, n])")
    if prefilled is not None and prefilled.scored_by != score_key(cfg):
        raise ValueError(f"the prefill was scored for {prefilled.scored_by}, {cfg.policy} needs {score_key(cfg)}")
    pre = prefill(model, inputs, cfg) if prefilled is None else prefilled
    selection = select_tokens(pre, cfg)
    cache = compress(pre.cache, selection.keep)
    result = HFResult([], [], selection, dense_kv_bytes(pre.cache), cache.kv_bytes(), pre.prompt_len)
    logits = pre.logits[0]
    del pre  # releases the dense K/V (unless the caller holds it as ``prefilled``): only the kept cells remain
    with _decoder_attention(model, DECODE_ATTENTION), _bound(_DECODE_CACHE, cache):
        step_started = None
        while True:
            token = int(logits.argmax())
            if step_started is not None:
                result.step_seconds.append(time.perf_counter() - step_started)
            result.tokens.append(token)
            result.step_logits.append(logits)
            if len(result.tokens) == max_new_tokens or token == eos_token_id:
                return result
            step_started = time.perf_counter()
            step = torch.tensor([[token]], device=inputs["input_ids"].device)
            out = model(input_ids=step, past_key_values=cache, use_cache=True)
            logits = out.logits[0, -1].float()


# ---------------------------------------------------------------------------------------------------------------
# Switching the decoder's attention function
# ---------------------------------------------------------------------------------------------------------------


def _register() -> None:
    """Make both attention functions known to transformers (idempotent).

    The capture function gets SDPA's mask builder, so the prefill is the model's own SDPA forward; the decode
    function gets none (transformers then passes no mask), since it builds per-head masks itself.
    """
    AttentionInterface.register(CAPTURE_ATTENTION, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)
    AttentionInterface.register(DECODE_ATTENTION, _decode_attention)


@contextmanager
def _decoder_attention(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Use attention function ``name`` in the text decoder only (vision towers keep theirs), then restore."""
    _register()
    has_text_config = "text_config" in getattr(model.config, "sub_configs", {})
    previous = model.config.get_text_config(decoder=True)._attn_implementation

    def target(impl: str) -> str | dict[str, str]:
        return {"text_config": impl} if has_text_config else impl

    model.set_attn_implementation(target(name))
    try:
        yield
    finally:
        model.set_attn_implementation(target(previous))


@contextmanager
def _bound(var: ContextVar[Any], value: Any) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


__all__ = [
    "CompressedCache",
    "CompressedLayer",
    "HFResult",
    "Prefill",
    "compress",
    "dense_kv",
    "dense_kv_bytes",
    "generate",
    "prefill",
    "select_tokens",
    "placeholder_mask",
]
