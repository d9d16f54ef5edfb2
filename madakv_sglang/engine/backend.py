"""The ``madakv`` attention backend: dense prefill through the device's base backend, window scores on the
last prefill chunk, one policy decision per batch, packing, and head-wise decode over the packed cells.

Engine glue only: scores come from ``policies.scoring``, decisions and packing from ``madakv_sglang.packing``,
decode attention from ``madakv_sglang.kernels``. The scheduler side (freeing slots, accounting) is
``engine.reclaim``; the two meet in the process's ``engine.state.SchedulerState``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from madakv_sglang import chunk_eviction
from madakv_sglang.config import PolicyConfig
from madakv_sglang.engine import state as scheduler_state
from madakv_sglang.engine.environment import BASE_BACKEND_ENV, is_compressing, server_config
from madakv_sglang.engine.modality import visual_mask
from madakv_sglang.engine.radix import uses_prefix_cache
from madakv_sglang.engine.state import PendingPack, RequestInfo
from madakv_sglang.engine.tp import HeadShard, TensorParallelComm, check_same_policy, engine_group
from madakv_sglang.kernels import decode_kernel_for, headwise_decode
from madakv_sglang.kernels.dispatch import index_tables, layout_kernel_for
from madakv_sglang.kernels.index_tables import IndexInputs, build_index_inputs
from madakv_sglang.packing import (
    Decision,
    Finishing,
    Geometry,
    PackedRow,
    PoolView,
    Replay,
    decide,
    pack_batch,
    packed_slots,
    skip_code,
)
from madakv_sglang.policies import get_policy
from madakv_sglang.policies.base import LOCAL, NOT_SKIPPED, SKIP_REASONS, Comm
from madakv_sglang.policies.scoring import window_scores

logger = logging.getLogger(__name__)

DUMP_ENV = "MADAKV_DEBUG_DUMP_DIR"  # write every decision (scores, visual mask, kept set) there, for tests


def create_backend(model_runner: Any) -> Any:
    """Factory registered as ``--attention-backend madakv``: wraps the base backend SGLang would have used."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    base_name = os.environ.get(BASE_BACKEND_ENV) or ("torch_native" if model_runner.device == "cpu" else "triton")
    if base_name == "madakv" or base_name not in ATTENTION_BACKENDS:
        raise ValueError(f"madakv: cannot use {base_name!r} as the dense base backend")
    unsupported = unsupported_attention_layers(getattr(model_runner, "model", None))
    if unsupported:
        raise ValueError(
            f"madakv: this model has {' and '.join(unsupported)}, which the head-wise decode does not implement; "
            "serve it with --kv-policy full"
        )
    base = ATTENTION_BACKENDS[base_name](model_runner)
    return _backend_class()(model_runner, base, base_name, server_config())


def unsupported_attention_layers(model: Any) -> list[str]:
    """What the model's attention layers do that the packed decode cannot (checked once the weights are loaded,
    so a model like Gemma 2 fails at start-up rather than at its first decode step)."""
    if model is None:
        return []
    caps, windows = set(), set()
    for module in model.modules():
        if not hasattr(module, "tp_q_head_num") or not hasattr(module, "layer_id"):
            continue  # not an attention layer (RadixAttention)
        if getattr(module, "logit_cap", 0):
            caps.add(float(module.logit_cap))
        if (getattr(module, "sliding_window_size", -1) or -1) > -1:
            windows.add(int(module.sliding_window_size))
    problems = []
    if caps:
        problems.append(f"attention logit soft-capping ({', '.join(str(c) for c in sorted(caps))})")
    if windows:
        problems.append(f"sliding-window layers (window {', '.join(str(w) for w in sorted(windows))})")
    return problems


def _backend_class() -> type:
    """The class is built on first use so that importing this module does not import SGLang."""
    global _CLASS
    if _CLASS is None:
        from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

        _CLASS = type("MadaKVAttnBackend", (_MadaKVMixin, AttentionBackend), {})
    return _CLASS


_CLASS: type | None = None


@dataclass
class _ExtendEntry:
    """One request of an extend batch that the backend must act on."""

    rid: str
    row: int
    generation: int  # the row's req_generation, read once per forward rather than once per layer
    token_start: int  # first row of this request in the batch's token dim
    token_end: int
    prefix_len: int  # positions before this chunk
    config: PolicyConfig
    needs_tail: bool  # a later chunk finishes the prompt and will need this chunk's last queries
    finishing: Finishing | None
    replay: Replay | None  # a retracted request's stored decision: its later positions attend through it
    remember: Callable[[Replay], None] | None  # where this prompt's decision is stored for a retraction
    view: _ChunkView | None = None  # what the chunk attends to when that is not plain causal, and any cut after it


@dataclass
class _ChunkView:
    """How one chunk of a cut or replayed prompt attends, worked out once per forward (``chunk_eviction``).

    Attributes:
        key_pos: ``[Tk]`` the positions the chunk's queries may read, in order: what survives before the chunk,
            then the chunk itself.
        key_slots: ``[Tk]`` their slots.
        visual: ``[Tk]`` bool, which of them are visual.
        first_row: rows of the chunk before this one are plain causal over every position, as the base backend
            computed them; from it on the backend computes them itself (``None``: the base backend is right for
            every row, the view only serves a cut's scores).
        mask: ``[Tq - first_row, Tk]`` what each computed row sees (``None`` with ``first_row``).
        late_rows: ``[Tq - first_row]`` bool, rows past a replay's stored prompt (they read each head's kept set).
        cut_target: survivors after the cut that follows this chunk; ``None`` when none follows.
        scores: ``[L, H_r, Tk]`` the window scores a cut ranks by, filled layer by layer.
    """

    key_pos: Tensor
    key_slots: Tensor
    visual: Tensor
    first_row: int | None
    mask: Tensor | None
    late_rows: Tensor | None
    cut_target: int | None
    scores: Tensor | None


class _MadaKVMixin:
    """Mixed into SGLang's ``AttentionBackend`` by :func:`_backend_class`."""

    def __init__(self, model_runner: Any, base: Any, base_name: str, config: PolicyConfig) -> None:
        super().__init__()  # type: ignore[call-arg]
        self.base = base
        self.base_name = base_name
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.config = config
        self.state = scheduler_state.create()
        pool = self.token_to_kv_pool
        self.start_layer = int(getattr(pool, "start_layer", 0) or 0)
        self.num_layers = int(pool.layer_num)
        self.local_heads = int(pool.head_num)
        self.geometry, self.comm = _tensor_parallel_view(model_runner, self.num_layers, self.local_heads, config)
        self.layout_kernel = layout_kernel_for(self.device)
        self.pool = PoolView.of(
            [pool.get_key_buffer(self.start_layer + layer) for layer in range(self.num_layers)],
            [pool.get_value_buffer(self.start_layer + layer) for layer in range(self.num_layers)],
            config.layout,
            self.layout_kernel,
        )
        self._extend: list[_ExtendEntry] = []
        self._decode_tables: list[tuple[Tensor, Tensor]] | None = None
        self._index_inputs: tuple[tuple[tuple[int, int, int], ...], IndexInputs] | None = None
        self.decode_kernel = decode_kernel_for(self.device)
        geometry = self.geometry
        logger.info(
            "madakv: backend ready (base %s, policy %s, budget %s, window %d, layout %s, %d layers x %d KV heads; "
            "TP %d: heads %d..%d of %d%s, %d replica(s) per head; decode kernel %s, layout kernel %s)",
            base_name,
            config.policy,
            config.budget,
            config.window,
            config.layout,
            self.num_layers,
            self.local_heads,
            geometry.tp_size,
            geometry.head_offset,
            geometry.head_offset + geometry.local_heads - 1,
            geometry.total_heads,
            "" if geometry.real_heads is None else f" ({geometry.total_heads - geometry.real_heads} zero padding)",
            geometry.replicas,
            self.decode_kernel,
            self.layout_kernel,
        )

    # ---- SGLang's backend interface ----

    def init_forward_metadata(self, forward_batch: Any) -> None:
        self.base.init_forward_metadata(forward_batch)
        self._extend = []
        self._decode_tables = None
        mode = forward_batch.forward_mode
        if mode.is_decode():
            self._decode_tables = self._decode_index_tables(forward_batch)
        elif mode.is_extend():
            self._extend = self._plan_extend(forward_batch)

    def forward_extend(
        self, q: Tensor, k: Tensor, v: Tensor, layer: Any, forward_batch: Any, save_kv_cache: bool = True, **kwargs: Any
    ) -> Tensor:
        out = self.base.forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        if not self._extend:
            return out
        layer_index = layer.layer_id - self.start_layer
        queries = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        keys_all = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        rows_map = self.req_to_token_pool.req_to_token
        for entry in self._extend:
            chunk = queries[entry.token_start : entry.token_end]
            state = self.state.open(entry.row, entry.generation)
            previous = state.query_tail.get(layer_index)
            view = entry.view
            if view is not None and view.first_row is not None:
                self._attend_view(out, q, layer, entry, view)
            joined = chunk if previous is None else torch.cat([previous, chunk])
            if entry.needs_tail:
                state.query_tail[layer_index] = joined[-entry.config.window :].clone()
            finishing = entry.finishing
            scores = finishing.scores if finishing is not None else None
            if view is not None and view.scores is not None:
                scores = view.scores
            if scores is not None:
                if view is not None:
                    keys = keys_all[view.key_slots]
                else:
                    seq = entry.prefix_len + (entry.token_end - entry.token_start)
                    keys = keys_all[rows_map[entry.row, :seq].long()]
                width = min(entry.config.window, keys.shape[0], joined.shape[0])
                scores[layer_index] = window_scores(joined[-width:], keys, scale=layer.scaling, gqa=entry.config.gqa)
        if layer_index == self.num_layers - 1:
            self._cut_chunks()
            self._free_replayed_cuts()
            self._compress_finished()
        return out

    def forward_decode(
        self, q: Tensor, k: Tensor, v: Tensor, layer: Any, forward_batch: Any, save_kv_cache: bool = True, **kwargs: Any
    ) -> Tensor:
        if self._decode_tables is None:
            return self.base.forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc

        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        layer_index = layer.layer_id - self.start_layer
        indptr, indices = self._decode_tables[layer_index]
        if self.pool.k_cells is not None and self.pool.v_cells is not None:  # shared: ids span every layer
            k_cells, v_cells = self.pool.k_cells, self.pool.v_cells
        else:
            keys, values = self.pool.k_layers[layer_index], self.pool.v_layers[layer_index]
            k_cells, v_cells = keys.view(-1, keys.shape[-1]), values.view(-1, values.shape[-1])
        batch = forward_batch.batch_size
        queries = q.reshape(batch, layer.tp_q_head_num, layer.qk_head_dim)
        out, _ = headwise_decode(
            queries,
            k_cells,
            v_cells,
            indptr,
            indices,
            self.local_heads,
            layer.scaling,
            backend=self.decode_kernel,
        )
        return out.to(q.dtype).reshape(batch, layer.tp_q_head_num * layer.v_head_dim)

    def support_triton(self) -> bool:
        return bool(self.base.support_triton())

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return int(self.base.get_cuda_graph_seq_len_fill_value())

    # ---- extend: which requests finish their prompt, and what they need ----

    def _plan_extend(self, forward_batch: Any) -> list[_ExtendEntry]:
        infos = self.state.batch()
        if infos is not None and len(infos) != forward_batch.batch_size:
            infos = None  # not the batch the scheduler published (e.g. a warm-up forward)
        rows = _as_list(forward_batch.req_pool_indices_cpu, forward_batch.req_pool_indices)
        prefixes = _as_list(forward_batch.extend_prefix_lens_cpu, forward_batch.extend_prefix_lens)
        extends = _as_list(forward_batch.extend_seq_lens_cpu, forward_batch.extend_seq_lens)
        mm_inputs = forward_batch.mm_inputs or [None] * len(rows)
        entries, token = [], 0
        for i, (row, prefix, extend) in enumerate(zip(rows, prefixes, extends, strict=True)):
            start, token = token, token + extend
            info = infos[i] if infos is not None else None
            config = info.config if info is not None else self.config
            if not is_compressing(config):
                continue
            seq = prefix + extend
            full_len = info.full_len if info is not None else seq
            replay = _replay_of(info)
            skipped = NOT_SKIPPED if replay is not None else skip_code(full_len, config)
            scored = replay is None and not skipped and get_policy(config.policy).score_source == "window"
            generation = self._generation(row)
            state = self.state.get(row, generation)
            if scored and config.prefill_evict == "chunk" and seq < full_len and prefix == 0:
                state = self.state.open(row, generation)
                state.cut_at = torch.full((full_len,), chunk_eviction.NEVER, dtype=torch.int32, device=self.device)
            cut_at = replay.cut_at if replay is not None else (state.cut_at if state is not None else None)
            needs_view = cut_at is not None or (replay is not None and seq > replay.keep.shape[-1])
            # The visual mask is needed by a cut or a decision only: not on a plain intermediate chunk.
            visual = visual_mask(mm_inputs[i], seq).to(self.device) if needs_view or seq >= full_len else None
            view = None
            if needs_view:
                assert visual is not None
                view = self._chunk_view(row, prefix, seq, full_len, config, cut_at, replay, visual)
            finishing = None
            # Every finished prompt gets a decision, even one too short to evict from: a retraction then replays
            # "keep everything" instead of compressing the longer re-prefill afresh.
            if seq >= full_len:
                assert visual is not None
                positions = view.key_pos if view is not None and replay is None else None
                decided = seq if positions is None else int(positions.numel())
                finishing = Finishing(
                    row=row,
                    prompt_len=seq,
                    visual=visual if positions is None else visual[positions],
                    config=config,
                    scores=(
                        torch.zeros(self.num_layers, self.local_heads, decided, device=self.device) if scored else None
                    ),
                    replay=replay,
                    skipped=skipped,
                    positions=positions,
                )
            needs_tail = seq < full_len and scored
            if finishing is None and not needs_tail and view is None:
                continue
            rid = info.rid if info is not None else f"row{row}"
            entries.append(
                _ExtendEntry(
                    rid,
                    row,
                    generation,
                    start,
                    token,
                    prefix,
                    config,
                    needs_tail,
                    finishing,
                    replay,
                    info.remember if info is not None else None,
                    view,
                )
            )
        return entries

    def _chunk_view(
        self,
        row: int,
        prefix: int,
        seq: int,
        full_len: int,
        config: PolicyConfig,
        cut_at: Tensor | None,
        replay: Replay | None,
        visual: Tensor,
    ) -> _ChunkView | None:
        """What the chunk ``[prefix, seq)`` reads when chunk eviction cut its prompt (``cut_at``) or a replay's
        positions past the stored prompt read each head's kept set; ``None`` when plain causal attention over
        every position is right and no cut follows."""
        device = self.device
        n0 = replay.keep.shape[-1] if replay is not None else full_len
        # Where each position up to this chunk's end is cut (positions past the stored prompt never are).
        key_cut = torch.full((seq,), chunk_eviction.NEVER, dtype=torch.int32, device=device)
        if cut_at is not None:
            known = min(seq, cut_at.numel())
            key_cut[:known] = cut_at[:known].to(device)
        # Positions a cut dropped at or before this chunk's start are gone (their slots already freed).
        prior = torch.nonzero(key_cut[:prefix] > prefix).flatten()
        key_pos = torch.cat([prior, torch.arange(prefix, seq, device=device)])
        cut_target = None
        if replay is None and seq < full_len:
            budget = config.effective_budget(full_len)
            protected = min(config.sink + config.window, int(key_pos.numel()))
            target = chunk_eviction.survivor_target(
                budget, config.prefill_keep_fraction, protected, int(key_pos.numel())
            )
            cut_target = target if target < key_pos.numel() else None
        # The base backend's rows are right while every earlier position is present and none is dropped inside
        # this chunk; replay rows past the stored prompt are always ours.
        first = None
        if int(prior.numel()) < prefix or bool((key_cut[key_pos] <= seq - 1).any()):
            first = prefix
        elif replay is not None and seq > n0:
            first = max(prefix, n0)
        needs_scores = cut_target is not None or (seq >= full_len and replay is None and cut_at is not None)
        if first is None and not needs_scores:
            return None
        key_slots = self.req_to_token_pool.req_to_token[row, key_pos].long()
        mask = late = None
        if first is not None:
            query_pos = torch.arange(first, seq, device=device)
            mask = chunk_eviction.visible(query_pos, key_pos, key_cut[key_pos])
            late = query_pos >= n0 if replay is not None else None
        scores = None
        if cut_target is not None:
            scores = torch.zeros(self.num_layers, self.local_heads, int(key_pos.numel()), device=device)
        first_row = None if first is None else first - prefix
        return _ChunkView(key_pos, key_slots, visual[key_pos], first_row, mask, late, cut_target, scores)

    def _attend_view(self, out: Tensor, q: Tensor, layer: Any, entry: _ExtendEntry, view: _ChunkView) -> None:
        """Overwrite the base backend's rows from ``view.first_row`` on with attention over what the view says
        each row sees; rows past a replay's stored prompt read, per head, the kept set it stores."""
        assert view.first_row is not None and view.mask is not None
        hq, dim = layer.tp_q_head_num, layer.qk_head_dim
        rows = slice(entry.token_start + view.first_row, entry.token_end)
        keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)[view.key_slots]
        values = self.token_to_kv_pool.get_value_buffer(layer.layer_id)[view.key_slots]
        mask = view.mask
        if entry.replay is not None and view.late_rows is not None and bool(view.late_rows.any()):
            replay = entry.replay
            n0 = replay.keep.shape[-1]
            stored = view.key_pos < n0
            head_keep = torch.ones(self.local_heads, view.key_pos.numel(), dtype=torch.bool, device=mask.device)
            layer_keep = replay.keep[layer.layer_id - self.start_layer].to(mask.device)
            head_keep[:, stored] = layer_keep[:, view.key_pos[stored]]
            mask = mask[None] & torch.where(view.late_rows[None, :, None], head_keep[:, None, :], True)
        attended = chunk_eviction.attend(q.view(-1, hq, dim)[rows], keys, values, mask, layer.scaling)
        out.view(-1, hq, layer.v_head_dim)[rows] = attended.to(out.dtype)

    def _cut_chunks(self) -> None:
        """After the last layer: cut every prompt whose chunk asks for it, and point the dropped positions at the
        padding slot; the scheduler frees their slots after the forward (``RowState.cut_pending``). Every rank
        cuts the same requests in the same order, so the collectives line up."""
        padding = self.geometry.padding_columns()
        for entry in self._extend:
            view = entry.view
            if view is None or view.cut_target is None or view.scores is None:
                continue
            totals = chunk_eviction.position_scores(
                view.scores, self.comm, self.geometry.replicas, padding, entry.config.gqa
            )
            seq = entry.prefix_len + (entry.token_end - entry.token_start)
            protected = chunk_eviction.protected_positions(
                int(view.key_pos.numel()), entry.config.sink, entry.config.window, device=totals.device
            )
            keep = chunk_eviction.cut(
                totals, view.visual, protected, view.cut_target, entry.config, entry.config.prefill_split
            )
            dropped = view.key_pos[~keep]
            state = self.state.open(entry.row, entry.generation)
            assert state.cut_at is not None
            state.cut_at[dropped] = seq
            self._drop_positions(state, entry.row, dropped)

    def _free_replayed_cuts(self) -> None:
        """A replay drops what the original run's cuts dropped, once its re-prefill has passed the cut."""
        rows_map = self.req_to_token_pool.req_to_token
        for entry in self._extend:
            replay = entry.replay
            if replay is None or replay.cut_at is None:
                continue
            seq = min(entry.prefix_len + (entry.token_end - entry.token_start), replay.cut_at.numel())
            cut_at = replay.cut_at[:seq].to(self.device)
            present = rows_map[entry.row, :seq] != 0
            dropped = torch.nonzero(present & (cut_at <= seq)).flatten()
            if dropped.numel():
                self._drop_positions(self.state.open(entry.row, entry.generation), entry.row, dropped)

    def _drop_positions(self, state: scheduler_state.RowState, row: int, positions: Tensor) -> None:
        rows_map = self.req_to_token_pool.req_to_token
        slots = rows_map[row, positions].clone()
        rows_map[row, positions] = 0
        state.cut_pending = slots if state.cut_pending is None else torch.cat([state.cut_pending, slots])

    def _compress_finished(self) -> None:
        entries = [e for e in self._extend if e.finishing is not None]
        finishing = [e.finishing for e in entries if e.finishing is not None]
        if not finishing:
            return
        started = time.perf_counter()
        decisions = decide(finishing, self.geometry, self.comm)
        decide_share = (time.perf_counter() - started) / len(finishing)
        dump_dir = os.environ.get(DUMP_ENV)
        if dump_dir:
            for entry, request, decision in zip(entries, finishing, decisions, strict=True):
                _dump(dump_dir, entry.rid, request, decision, self.geometry)
        rows_map = self.req_to_token_pool.req_to_token
        compressed = [(r, d) for r, d in zip(finishing, decisions, strict=True) if not r.skipped]
        # Rows whose prompt slots the prefix tree may share are packed by the scheduler, into slots it picks.
        deferred = {id(r) for r, _ in compressed if self.state.prefix_cache and uses_prefix_cache(r.config)}
        in_place = [(r, d) for r, d in compressed if id(r) not in deferred]
        packed_rows = pack_batch(
            [r for r, _ in in_place], [d for _, d in in_place], rows_map, self.pool, self.geometry.tp_size
        )
        packed_of = {id(r): p for (r, _), p in zip(in_place, packed_rows, strict=True)}
        for entry, request, decision in zip(entries, finishing, decisions, strict=True):
            state = self.state.open(request.row, self._generation(request.row))
            if entry.remember is not None and request.replay is None:
                entry.remember(_stored(decision, state.cut_at))
            state.query_tail.clear()
            state.cut_at = None
            if request.skipped:
                state.skipped = SKIP_REASONS[request.skipped]
                continue
            if id(request) in deferred:
                whole = bool(decision.keep.all())
                state.pending_pack = PendingPack(
                    None if whole else functools.partial(self._pack_into, request, decision, decide_share),
                    request.prompt_len if whole else packed_slots(decision, self.geometry.tp_size, self.pool.layout),
                    request.prompt_len,
                )
                continue
            packed = packed_of[id(request)]
            if packed is None:
                continue
            packed.compress_seconds += decide_share
            state.packed = packed

    def _pack_into(self, request: Finishing, decision: Decision, decide_seconds: float, targets: Tensor) -> PackedRow:
        """``PendingPack.pack``: the kept cells into ``targets``, and the row pointed at them."""
        rows_map = self.req_to_token_pool.req_to_token
        (packed,) = pack_batch([request], [decision], rows_map, self.pool, self.geometry.tp_size, targets=[targets])
        assert packed is not None, "a pending pack whose decision keeps everything"
        packed.compress_seconds += decide_seconds
        return packed

    # ---- decode: per-layer, per-head cell lists ----

    def _decode_index_tables(self, forward_batch: Any) -> list[tuple[Tensor, Tensor]] | None:
        """Per-layer (indptr, indices) over packed cells plus generated tokens, built on the device; the
        per-batch inputs are gathered again only when the batch composition (or a row's packing) changes."""
        rows = _as_list(forward_batch.req_pool_indices_cpu, forward_batch.req_pool_indices)
        packed = [self.state.packed(row) for row in rows]
        if all(p is None for p in packed):
            return None  # nothing compressed in this batch: the base backend runs it unchanged
        rows_map = self.req_to_token_pool.req_to_token
        key = tuple((row, self._generation(row), id(state)) for row, state in zip(rows, packed, strict=True))
        if self._index_inputs is None or self._index_inputs[0] != key:
            inputs = build_index_inputs(
                packed, rows, rows_map, self.num_layers, self.local_heads, layer_cells=self.pool.layer_cells
            )
            self._index_inputs = (key, inputs)
        indptr, indices = index_tables(
            self.layout_kernel,
            self._index_inputs[1],
            forward_batch.seq_lens,
            rows_map,
            max_cells=self._max_cells_per_layer(forward_batch),
        )
        return [(indptr[layer], indices[layer]) for layer in range(self.num_layers)]

    def _max_cells_per_layer(self, forward_batch: Any) -> int:
        """A bound on any layer's cell count this step, known on the host: a head keeps at most its request's
        positions (``H * sum(seq_lens)``), and a layer's lists never share a cell (the layer's buffer, or every
        layer's in ``shared``)."""
        total = forward_batch.seq_lens_sum
        if total is None:  # SGLang may stop keeping the host sum; then one sync
            total = int(forward_batch.seq_lens.sum())
        buffers = self.num_layers if self.pool.layout == "shared" else 1
        return self.local_heads * min(int(total), self.pool.rows * buffers)

    def _generation(self, row: int) -> int:
        return int(self.req_to_token_pool.req_generation[row])


def _tensor_parallel_view(
    model_runner: Any, num_layers: int, local_heads: int, config: PolicyConfig
) -> tuple[Geometry, Comm]:
    """This rank's heads and the collectives over its TP group; with TP > 1, first check that every rank runs
    the same policy (every rank builds its backend at the same point of start-up, so the all-gather lines up)."""
    tp_rank, tp_size, group = engine_group()
    model_config = model_runner.model_config
    total_heads = int(model_config.get_total_num_kv_heads())
    # On CPU, SGLang pads the KV heads to a multiple of the TP size with zero weights
    # (adjust_config_with_unaligned_cpu_tp).
    real_heads = int(getattr(model_config.hf_text_config, "original_total_num_kv_heads", total_heads) or total_heads)
    shard = HeadShard(tp_rank=tp_rank, tp_size=tp_size, total_heads=total_heads)
    if shard.local_heads != local_heads:
        raise ValueError(f"madakv: the KV pool holds {local_heads} heads per rank, expected {shard.local_heads}")
    geometry = Geometry(
        num_layers=num_layers,
        total_heads=total_heads,
        local_heads=local_heads,
        head_offset=shard.head_offset,
        tp_size=tp_size,
        replicas=shard.replicas,
        tp_rank=tp_rank,
        real_heads=real_heads if real_heads < total_heads else None,
    )
    if tp_size == 1:
        return geometry, LOCAL
    check_same_policy(config, group)
    return geometry, TensorParallelComm(shard, group)


def _dump(directory: str, rid: str, request: Finishing, decision: Decision, geometry: Geometry) -> None:
    """One file per request and rank: what the policy saw and decided (``<rid>.pt``, ``<rid>.tp<r>.pt`` under TP)."""
    record = {
        "prompt_len": request.prompt_len,
        "positions": None if request.positions is None else request.positions.cpu(),
        "visual": request.visual.cpu(),
        "scores": None if request.scores is None else request.scores.cpu(),
        "keep": decision.keep.cpu(),
        "all_head_counts": decision.all_head_counts.cpu(),
        "policy": request.config.to_strings(),
        "head_offset": geometry.head_offset,
        "total_heads": geometry.total_heads,
        "tp_size": geometry.tp_size,
    }
    name = f"{rid}.pt" if geometry.tp_size == 1 else f"{rid}.tp{geometry.tp_rank}.pt"
    torch.save(record, os.path.join(directory, name))


def _as_list(cpu_values: Any, values: Any) -> list[int]:
    source = cpu_values if cpu_values is not None else values
    return [int(x) for x in (source.tolist() if hasattr(source, "tolist") else source)]


def _replay_of(info: RequestInfo | None) -> Replay | None:
    return None if info is None else info.replay


def _stored(decision: Decision, cut_at: Tensor | None) -> Replay:
    """What a retraction replays: the decision over the original prompt and where chunk eviction cut it (host
    copies: the request outlives the forward, and a retraction frees its device memory)."""
    return Replay(
        keep=decision.keep.cpu(),
        all_head_counts=decision.all_head_counts.cpu(),
        cut_at=None if cut_at is None else cut_at.cpu(),
    )


__all__ = ["BASE_BACKEND_ENV", "PackedRow", "create_backend"]
