"""Device-side layout kernels against slow references: the decode index tables (``kernels/index_tables.py``,
``kernels/triton_index_tables.py``) against the per-row, per-head loop the backend used to run, and the
all-layer packing (``kernels/pack.py``, ``kernels/triton_pack.py``) against ``tests.oracles.apply_pack`` layer by layer;
the dispatch that picks them for a backend (``kernels/dispatch.py``) against the kernels it wraps.

Integer tables and pure copies: every comparison is exact. The Triton kernels run on CPU under the Triton
interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set before ``@triton.jit`` runs, and must not leak
into the rest of the suite); on a GPU they run natively on larger shapes and inside a CUDA graph.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from madakv_sglang.kernels.dispatch import LAYOUT_KERNEL_ENV, index_tables, layer_packer, layout_kernel_for
from madakv_sglang.kernels.index_tables import build_index_inputs, concat_ranges, decode_index_tables
from madakv_sglang.kernels.pack import layer_stack_view, pack_cells, pack_moves
from madakv_sglang.layout import pack_plan
from madakv_sglang.packing import PackedRow
from tests.oracles import apply_pack

ROOT = Path(__file__).resolve().parents[2]


# ---- random batches ----


def _layer_cells(layout: str, req_to_token: Tensor, heads: int) -> int:
    """Cells per layer of the pool ``_random_batch`` draws from (every slot of the table plus the padding slot 0)
    under ``layout`` (0 for ``per-layer``: ids are local to a layer)."""
    return 0 if layout == "per-layer" else (req_to_token.numel() + 1) * heads


def _random_batch(
    layers: int,
    heads: int,
    batch: int,
    seed: int,
    prompt: tuple[int, int] = (3, 12),
    tail: tuple[int, int] = (0, 6),
    layout: str = "per-layer",
) -> tuple[list[PackedRow | None], list[int], list[int], Tensor]:
    """A decode batch over a shuffled pool, on shuffled rows: about half the requests compressed through the real
    ``pack_plan`` for ``layout``, with empty and single-entry heads forced in, and one compressed request with no
    tail. Returns (packed states, rows, seq_lens, req_to_token)."""
    gen = torch.Generator().manual_seed(seed)
    context = prompt[1] + tail[1] + 8  # room for a few more decode steps
    table_rows = batch + 3
    slots = torch.randperm(table_rows * context, generator=gen) + 1  # slot 0 is padding
    req_to_token = slots.view(table_rows, context).to(torch.int32)
    rows = (torch.randperm(table_rows, generator=gen)[:batch]).tolist()
    packed: list[PackedRow | None] = []
    seqs = []
    for b, row in enumerate(rows):
        n = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=gen))
        extra = int(torch.randint(tail[0], tail[1] + 1, (1,), generator=gen))
        if b == 1:
            extra = 0  # a compressed request whose dense tail is empty
        compressed = b == 1 or bool(torch.rand(1, generator=gen) < 0.5)
        if not compressed:
            packed.append(None)
            seqs.append(n + max(extra, 1))
            continue
        keep = torch.rand(layers, heads, n, generator=gen) < 0.4
        keep[0, 0] = False  # empty head
        keep[-1, -1] = False
        keep[-1, -1, n // 2] = True  # single-entry head
        prompt_slots = req_to_token[row, :n].long()
        if layout == "per-layer":
            fullest = int(keep.sum(dim=(1, 2)).max())
            plan = pack_plan(keep, prompt_slots, prompt_slots[: max(1, -(-fullest // heads))])
        else:
            slots = max(1, -(-int(keep.sum()) // (layers * heads)))
            plan = pack_plan(keep, prompt_slots, prompt_slots[:slots], rows=req_to_token.numel() + 1)
        packed.append(
            PackedRow(
                prompt_len=n,
                slots=0,
                cells=plan.dst,
                indptr=plan.indptr,
                pending_free=None,
                waste_cells=0,
                compress_seconds=0.0,
            )
        )
        seqs.append(n + extra)
    return packed, rows, seqs, req_to_token


def _loop_tables(
    packed: Sequence[PackedRow | None],
    rows: Sequence[int],
    seqs: Sequence[int],
    req_to_token: Tensor,
    layers: int,
    heads: int,
    layer_cells: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """The slow oracle: what ``SGLangBackend._decode_index_tables`` computed, a Python loop over layers, rows
    and heads (a tail cell of layer l is ``l * layer_cells + slot * H + h``). Returns per layer (indptr
    ``[B * H + 1]``, indices ``[nnz]``) int64."""
    tables = []
    for layer in range(layers):
        column = torch.arange(heads) + layer * layer_cells
        pieces: list[Tensor] = []
        lengths: list[Tensor] = []
        for row, seq, state in zip(rows, seqs, packed, strict=True):
            start = 0 if state is None else state.prompt_len
            dense = req_to_token[row, start:seq].long()[None, :] * heads + column[:, None]
            if state is None:
                pieces.append(dense.reshape(-1))
                lengths.append(torch.full((heads,), dense.shape[1], dtype=torch.long))
                continue
            bounds = state.indptr[layer].tolist()
            for head in range(heads):
                pieces.append(state.cells[layer][bounds[head] : bounds[head + 1]])
                pieces.append(dense[head])
            lengths.append(state.indptr[layer].diff() + dense.shape[1])
        indptr = torch.zeros(len(rows) * heads + 1, dtype=torch.long)
        indptr[1:] = torch.cat(lengths).cumsum(0)
        tables.append((indptr, torch.cat(pieces).long()))
    return tables


def _assert_tables_equal(expected: list[tuple[Tensor, Tensor]], indptr: Tensor, indices: Tensor) -> None:
    assert indptr.shape == (len(expected), expected[0][0].numel())
    for layer, (want_ptr, want_idx) in enumerate(expected):
        assert torch.equal(indptr[layer].long().cpu(), want_ptr), f"indptr of layer {layer}"
        assert torch.equal(indices[layer, : want_idx.numel()].long().cpu(), want_idx), f"indices of layer {layer}"


# ---- index tables: torch ----


@pytest.mark.parametrize("seed", range(4))
def test_concat_ranges_equals_a_cat_of_aranges(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, 12, (1,), generator=gen))
    starts = torch.randint(0, 100, (count,), generator=gen)
    sizes = torch.randint(0, 4, (count,), generator=gen) * (torch.rand(count, generator=gen) < 0.7)  # empty ones too
    want = torch.cat([torch.arange(int(s), int(s + n)) for s, n in zip(starts, sizes, strict=True)])
    assert torch.equal(concat_ranges(starts, sizes, want.numel()), want)


SHAPES = [(heads, layers) for heads in (1, 2, 4, 7) for layers in (1, 2, 3, 4)]


@pytest.mark.parametrize("layout", ["per-layer", "shared"])
@pytest.mark.parametrize(("heads", "layers"), SHAPES)
def test_torch_tables_equal_the_loop(heads: int, layers: int, layout: str) -> None:
    packed, rows, seqs, req_to_token = _random_batch(layers, heads, batch=5, seed=heads * 10 + layers, layout=layout)
    layer_cells = _layer_cells(layout, req_to_token, heads)
    inputs = build_index_inputs(packed, rows, req_to_token, layers, heads, layer_cells=layer_cells)
    expected = _loop_tables(packed, rows, seqs, req_to_token, layers, heads, layer_cells)
    for dtype in (torch.int32, torch.int64):
        indptr, indices = decode_index_tables(inputs, torch.tensor(seqs), req_to_token, dtype=dtype)
        assert indptr.dtype == indices.dtype == dtype
        _assert_tables_equal(expected, indptr, indices)
        assert indices.shape[1] == max(int(t[1].numel()) for t in expected)  # capacity = the fullest layer


@pytest.mark.parametrize("layout", ["per-layer", "shared"])
def test_torch_tables_follow_seq_lens_and_capacity(layout: str) -> None:
    """The per-batch inputs serve every step: only seq_lens moves. A fixed capacity pads with 0 past each
    layer's count and truncates (indptr still shows the full count) when it is too small."""
    layers, heads = 3, 4
    packed, rows, seqs, req_to_token = _random_batch(layers, heads, batch=6, seed=7, layout=layout)
    layer_cells = _layer_cells(layout, req_to_token, heads)
    inputs = build_index_inputs(packed, rows, req_to_token, layers, heads, layer_cells=layer_cells)
    for step in range(3):
        now = [s + step for s in seqs]
        expected = _loop_tables(packed, rows, now, req_to_token, layers, heads, layer_cells)
        nnz = max(int(t[1].numel()) for t in expected)
        indptr, indices = decode_index_tables(inputs, torch.tensor(now), req_to_token, capacity=nnz + 9)
        _assert_tables_equal(expected, indptr, indices)
        for layer, (_, want) in enumerate(expected):
            assert not indices[layer, want.numel() :].any()
    short = nnz // 2
    indptr, indices = decode_index_tables(inputs, torch.tensor(now), req_to_token, capacity=short)
    _assert_tables_equal([(p, i[:short]) for p, i in expected], indptr, indices)
    assert int(indptr[:, -1].max()) == nnz


def test_inputs_for_a_batch_without_compressed_rows() -> None:
    layers, heads = 2, 2
    req_to_token = torch.arange(1, 31, dtype=torch.int32).view(3, 10)
    inputs = build_index_inputs([None, None], [2, 0], req_to_token, layers, heads)
    assert inputs.cells.numel() == 1 and not inputs.seg_len.any() and not inputs.tail_start.any()
    indptr, indices = decode_index_tables(inputs, torch.tensor([3, 1]), req_to_token)
    expected = _loop_tables([None, None], [2, 0], [3, 1], req_to_token, layers, heads)
    _assert_tables_equal(expected, indptr, indices)


def test_inputs_layout() -> None:
    """seg_start/seg_len point each (layer, request, head) at its own packed cells."""
    layers, heads = 3, 2
    packed, rows, _, req_to_token = _random_batch(layers, heads, batch=4, seed=3)
    inputs = build_index_inputs(packed, rows, req_to_token, layers, heads)
    assert inputs.seg_start.shape == (layers, 4, heads) and inputs.rows.tolist() == rows
    for b, state in enumerate(packed):
        for layer in range(layers):
            for head in range(heads):
                start, length = int(inputs.seg_start[layer, b, head]), int(inputs.seg_len[layer, b, head])
                if state is None:
                    assert length == 0 and int(inputs.tail_start[b]) == 0
                    continue
                lo, hi = int(state.indptr[layer, head]), int(state.indptr[layer, head + 1])
                assert torch.equal(inputs.cells[start : start + length].long(), state.cells[layer][lo:hi])


# ---- packing: torch ----


def _random_moves(
    layers: int, heads: int, requests: int, seed: int, n: int = 9
) -> tuple[list[Tensor], list[Tensor], int]:
    """Per-layer moves of several requests packed together (their plans concatenated per layer), over a pool
    of ``slots`` slots. Sources and destinations overlap, as in a real pack."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(requests * n + 4, generator=gen)[: requests * n].view(requests, n) + 1
    src: list[list[Tensor]] = [[] for _ in range(layers)]
    dst: list[list[Tensor]] = [[] for _ in range(layers)]
    for r in range(requests):
        keep = torch.rand(layers, heads, n, generator=gen) < 0.5
        keep[0, 0] = False
        fullest = int(keep.sum(dim=(1, 2)).max())
        plan = pack_plan(keep, slots[r], slots[r, : max(1, -(-fullest // heads))])
        for layer in range(layers):
            src[layer].append(plan.src[layer])
            dst[layer].append(plan.dst[layer])
    return [torch.cat(s) for s in src], [torch.cat(d) for d in dst], requests * n + 5


def _pools(
    layers: int, slots: int, heads: int, dim: int, dtype: torch.dtype, stacked: bool, seed: int
) -> tuple[list[Tensor], list[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(2, layers, slots, heads, dim, generator=gen).to(dtype)
    if stacked:
        return list(data[0].unbind(0)), list(data[1].unbind(0))
    return [t.clone() for t in data[0]], [t.clone() for t in data[1]]


def _apply_pack_per_layer(k_layers: list[Tensor], v_layers: list[Tensor], src: list[Tensor], dst: list[Tensor]) -> None:
    for keys, values, s, d in zip(k_layers, v_layers, src, dst, strict=True):
        apply_pack(keys.view(-1, keys.shape[-1]), s, d)
        apply_pack(values.view(-1, values.shape[-1]), s, d)


@pytest.mark.parametrize("stacked", [False, True], ids=["per-layer-tensors", "one-allocation"])
@pytest.mark.parametrize(("heads", "layers"), [(1, 1), (2, 3), (4, 2), (7, 4)])
def test_torch_pack_equals_apply_pack(heads: int, layers: int, stacked: bool) -> None:
    src, dst, slots = _random_moves(layers, heads, requests=3, seed=heads + layers)
    moves = pack_moves(src, dst)
    assert moves.bounds[-1] == moves.src.numel() and moves.num_layers == layers
    k_got, v_got = _pools(layers, slots, heads, 8, torch.float32, stacked, seed=1)
    k_want, v_want = [t.clone() for t in k_got], [t.clone() for t in v_got]
    assert (layer_stack_view(k_got) is not None) == (stacked or layers == 1)
    pack_cells(k_got, v_got, moves)
    _apply_pack_per_layer(k_want, v_want, src, dst)
    for got, want in zip(k_got + v_got, k_want + v_want, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout", ["per-layer", "shared"])
def test_heads_times_seq_lens_bounds_every_layer_of_the_tables(layout: str) -> None:
    """The Triton tables are sized ``H * sum(seq_lens)`` before the step (no host sync): check that no layer of
    the torch tables, over random batches, ever needs more."""
    for seed in range(40):
        heads, layers, batch = 1 + seed % 4, 1 + seed % 3, 1 + seed % 7
        packed, rows, seqs, req_to_token = _random_batch(layers, heads, batch, seed, layout=layout)
        inputs = build_index_inputs(
            packed, rows, req_to_token, layers, heads, layer_cells=_layer_cells(layout, req_to_token, heads)
        )
        indptr, _ = decode_index_tables(inputs, torch.tensor(seqs), req_to_token)
        assert int(indptr[:, -1].max()) <= heads * sum(seqs)


def test_torch_dispatch_returns_the_torch_tables_and_packs_like_pack_cells() -> None:
    packed, rows, seqs, req_to_token = _random_batch(3, 2, 5, seed=11)
    inputs = build_index_inputs(packed, rows, req_to_token, 3, 2)
    want = decode_index_tables(inputs, torch.tensor(seqs), req_to_token, dtype=torch.int64)
    got = index_tables("torch", inputs, torch.tensor(seqs), req_to_token, max_cells=2 * sum(seqs))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    src, dst, slots = _random_moves(3, 2, requests=2, seed=3)
    moves = pack_moves(src, dst)
    k_got, v_got = _pools(3, slots, 2, 4, torch.float32, stacked=False, seed=1)
    k_want, v_want = [t.clone() for t in k_got], [t.clone() for t in v_got]
    layer_packer("torch", k_got, v_got)(moves)
    pack_cells(k_want, v_want, moves)
    assert all(torch.equal(a, b) for a, b in zip(k_got + v_got, k_want + v_want, strict=True))
    with pytest.raises(ValueError, match="unknown layout kernel 'fast'"):
        layer_packer("fast", k_got, v_got)
    with pytest.raises(ValueError, match="unknown layout kernel 'fast'"):
        index_tables("fast", inputs, torch.tensor(seqs), req_to_token, max_cells=1)


def test_layout_kernel_choice_follows_the_device_and_the_environment() -> None:
    assert layout_kernel_for("cpu", {}) == "torch"
    assert layout_kernel_for("cpu", {LAYOUT_KERNEL_ENV: " "}) == "torch"
    assert layout_kernel_for("cpu", {LAYOUT_KERNEL_ENV: "torch"}) == "torch"
    with pytest.raises(ValueError, match="MADAKV_LAYOUT_KERNEL=triton: the triton layout kernel needs a CUDA device"):
        layout_kernel_for("cpu", {LAYOUT_KERNEL_ENV: "triton"})
    with pytest.raises(ValueError, match="unknown layout kernel; known: torch, triton"):
        layout_kernel_for("cpu", {LAYOUT_KERNEL_ENV: "fast", "TRITON_INTERPRET": "1"})
    if importlib.util.find_spec("triton") is not None:  # set-up installs it; the interpreter may run it on CPU
        assert layout_kernel_for("cpu", {LAYOUT_KERNEL_ENV: "triton", "TRITON_INTERPRET": "1"}) == "triton"


# ---- lazy imports and the Triton interpreter (subprocesses) ----


def test_importing_the_kernels_does_not_import_triton() -> None:
    code = (
        "import sys, madakv_sglang.kernels, madakv_sglang.kernels.index_tables, madakv_sglang.kernels.pack\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_triton_kernels_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "from tests.kernels.test_kernels_layout import interpreter_checks; interpreter_checks()"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "interpreter checks passed" in result.stdout


def test_triton_kernels_compile_for_hopper(tmp_path: Path) -> None:
    """Without a GPU, compile the kernels to sm_90 machine code (Triton frontend, LLVM, the ptxas Triton ships),
    so a GPU-only construct (pointer casts, 64-bit loop bounds) that the interpreter accepts is caught here."""
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        pytest.skip("triton is not installed")
    if not (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    code = "from tests.kernels.test_kernels_layout import compile_checks; compile_checks()"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compile checks passed" in result.stdout


def compile_checks() -> None:
    """Run in a subprocess: ahead-of-time compilation of every kernel for an H100 (no device needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from madakv_sglang.kernels import triton_index_tables, triton_pack

    def compile_for_sm90(fn: object, signature: dict[str, str], constexprs: dict[str, object]) -> None:
        kernel = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32)
        )
        assert kernel.asm["cubin"]

    tables = {"seg_len_ptr": "*i64", "tail_start_ptr": "*i64", "seq_lens_ptr": "*i32", "indptr_ptr": "*i32"}
    compile_for_sm90(
        triton_index_tables._indptr_kernel,
        {**tables, "num_virtual": "i32", "num_heads": "i32", "BLOCK_V": "constexpr"},
        {"BLOCK_V": 256},
    )
    for out in ("*i32", "*i64"):
        signature = {
            "cells_ptr": "*i32",
            "seg_start_ptr": "*i64",
            "seg_len_ptr": "*i64",
            "rows_ptr": "*i64",
            "tail_start_ptr": "*i64",
            "seq_lens_ptr": "*i64",
            "req_to_token_ptr": "*i32",
            "req_to_token_stride": "i32",
            "indptr_ptr": out,
            "indices_ptr": out,
            "capacity": "i32",
            "num_virtual": "i32",
            "num_heads": "i32",
            "layer_cells": "i64",
            "BLOCK": "constexpr",
        }
        compile_for_sm90(triton_index_tables._indices_kernel, signature, {"BLOCK": 128})
    for scatter in (False, True):
        signature = {
            "bases_ptr": "*i64",
            "layer_ptr": "*i32",
            "cells_ptr": "*i64",
            "tmp_ptr": "*i16",
            "num_moves": "i32",
            "num_layers": "i32",
            "k_width": "i32",
            "v_width": "i32",
            "tmp_width": "i32",
            "SCATTER": "constexpr",
            "BLOCK_T": "constexpr",
            "BLOCK_D": "constexpr",
        }
        compile_for_sm90(triton_pack._move_kernel, signature, {"SCATTER": scatter, "BLOCK_T": 32, "BLOCK_D": 128})
    print("compile checks passed")


def _check_triton_tables(
    packed: list[PackedRow | None],
    rows: list[int],
    seqs: list[int],
    req_to_token: Tensor,
    layers: int,
    heads: int,
    device: str,
    layer_cells: int = 0,
) -> None:
    from madakv_sglang.kernels.triton_index_tables import decode_index_tables_triton

    req_to_token = req_to_token.to(device)
    inputs = build_index_inputs(packed, rows, req_to_token, layers, heads, layer_cells=layer_cells)
    seq_lens = torch.tensor(seqs, dtype=torch.int32, device=device)
    for dtype in (torch.int32, torch.int64):
        want_ptr, want_idx = decode_index_tables(inputs, seq_lens, req_to_token, dtype=dtype)
        indptr = torch.full_like(want_ptr, -1)
        indices = torch.zeros(layers, want_idx.shape[1] + 5, dtype=dtype, device=device)
        decode_index_tables_triton(inputs, seq_lens, req_to_token, indptr, indices, block=16)
        assert torch.equal(indptr, want_ptr)
        for layer in range(layers):
            nnz = int(want_ptr[layer, -1])
            assert torch.equal(indices[layer, :nnz], want_idx[layer, :nnz])
    # Too small a capacity: each layer keeps its first entries and nothing is written past the buffer.
    short = max(1, want_idx.shape[1] // 2)
    guarded = torch.full((layers * short + 7,), -3, dtype=torch.int64, device=device)
    indices = guarded[: layers * short].view(layers, short)
    decode_index_tables_triton(inputs, seq_lens, req_to_token, indptr, indices, block=16)
    assert torch.equal(indptr, want_ptr)
    assert torch.equal(indices, want_idx[:, :short]) and bool((guarded[layers * short :] == -3).all())


def _check_triton_pack(
    layers: int, heads: int, dim: int, dtype: torch.dtype, device: str, requests: int = 2, n: int = 9
) -> None:
    from madakv_sglang.kernels.triton_pack import layer_table, pack_cells_triton

    src, dst, slots = _random_moves(layers, heads, requests=requests, seed=layers * heads, n=n)
    moves = pack_moves([s.to(device) for s in src], [d.to(device) for d in dst])
    k_got, v_got = _pools(layers, slots, heads, dim, dtype, stacked=False, seed=2)
    k_got, v_got = [t.to(device) for t in k_got], [t.to(device) for t in v_got]
    k_want, v_want = [t.clone() for t in k_got], [t.clone() for t in v_got]
    pack_cells_triton(k_got, v_got, moves, layer_table(k_got, v_got), block_elems=64 if device == "cpu" else 4096)
    pack_cells(k_want, v_want, moves)
    for got, want in zip(k_got + v_got, k_want + v_want, strict=True):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # bitwise, NaN-safe


def interpreter_checks() -> None:
    """Run in a subprocess with ``TRITON_INTERPRET=1``: the Triton kernels on small CPU shapes against the torch
    versions (which the tests above check against the loops)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    cases = ((1, 2, 3, 8), (2, 1, 4, 8), (4, 3, 3, 8), (7, 2, 2, 8), (2, 4, 9, 8), (3, 2, 3, 90))  # H, L, B, prompt
    for layout in ("per-layer", "shared"):
        for seed, (heads, layers, batch, prompt) in enumerate(cases):
            packed, rows, seqs, req_to_token = _random_batch(
                layers, heads, batch, seed, prompt=(3, prompt), tail=(0, 40), layout=layout
            )
            _check_triton_tables(
                packed, rows, seqs, req_to_token, layers, heads, "cpu", _layer_cells(layout, req_to_token, heads)
            )
    for layers, heads, dim, dtype in ((1, 1, 4, torch.float32), (3, 2, 8, torch.float16), (2, 4, 6, torch.bfloat16)):
        _check_triton_pack(layers, heads, dim, dtype, "cpu")
    _check_triton_dispatch()
    print("interpreter checks passed")


def _check_triton_dispatch() -> None:
    """The dispatch the backend calls with the ``triton`` layout kernel: tables as wide as the host bound, equal
    to the torch tables and zero past them; the per-layer packer equal to ``pack_cells``."""
    for layout in ("per-layer", "shared"):
        packed, rows, seqs, req_to_token = _random_batch(2, 3, 4, seed=9, layout=layout)
        inputs = build_index_inputs(packed, rows, req_to_token, 2, 3, layer_cells=_layer_cells(layout, req_to_token, 3))
        seq_lens = torch.tensor(seqs)
        want_ptr, want_idx = index_tables("torch", inputs, seq_lens, req_to_token, max_cells=0)
        bound = 3 * sum(seqs)
        got_ptr, got_idx = index_tables("triton", inputs, seq_lens, req_to_token, max_cells=bound)
        assert got_idx.shape == (2, bound) and torch.equal(got_ptr, want_ptr)
        assert torch.equal(got_idx[:, : want_idx.shape[1]], want_idx) and not got_idx[:, want_idx.shape[1] :].any()
    src, dst, slots = _random_moves(3, 2, requests=2, seed=4)
    moves = pack_moves(src, dst)
    k_got, v_got = _pools(3, slots, 2, 4, torch.bfloat16, stacked=False, seed=3)
    k_want, v_want = [t.clone() for t in k_got], [t.clone() for t in v_got]
    layer_packer("triton", k_got, v_got)(moves)
    pack_cells(k_want, v_want, moves)
    assert all(torch.equal(a, b) for a, b in zip(k_got + v_got, k_want + v_want, strict=True))


# ---- GPU ----


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["per-layer", "shared"])
@pytest.mark.parametrize(("heads", "layers"), [(1, 4), (4, 28), (8, 3)])
def test_triton_tables_on_cuda(heads: int, layers: int, layout: str) -> None:
    packed, rows, seqs, req_to_token = _random_batch(
        layers, heads, batch=48, seed=heads, prompt=(30, 600), tail=(0, 300), layout=layout
    )
    _check_triton_tables(
        packed, rows, seqs, req_to_token, layers, heads, "cuda", _layer_cells(layout, req_to_token, heads)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_pack_on_cuda(dtype: torch.dtype) -> None:
    _check_triton_pack(layers=28, heads=4, dim=128, dtype=dtype, device="cuda", requests=8, n=500)


@pytest.mark.gpu
def test_triton_tables_in_a_cuda_graph() -> None:
    """Capture once, replay with longer seq_lens and new tail slots: the tables follow without a rebuild."""
    from madakv_sglang.kernels.triton_index_tables import decode_index_tables_triton

    layers, heads = 4, 4
    packed, rows, seqs, req_to_token = _random_batch(layers, heads, batch=16, seed=5, prompt=(20, 200), tail=(0, 40))
    req_to_token = req_to_token.cuda()
    inputs = build_index_inputs(packed, rows, req_to_token, layers, heads)
    seq_lens = torch.tensor(seqs, dtype=torch.int64, device="cuda")
    capacity = heads * (sum(seqs) + 4 * len(seqs))
    indptr = torch.zeros(layers, len(rows) * heads + 1, dtype=torch.int32, device="cuda")
    indices = torch.zeros(layers, capacity, dtype=torch.int32, device="cuda")
    decode_index_tables_triton(inputs, seq_lens, req_to_token, indptr, indices)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_index_tables_triton(inputs, seq_lens, req_to_token, indptr, indices)
    for step in (1, 4):
        now = [s + step for s in seqs]
        seq_lens.copy_(torch.tensor(now))
        shuffled = torch.randperm(req_to_token.numel(), generator=torch.Generator().manual_seed(step))
        req_to_token.copy_(shuffled.view(req_to_token.shape).to(req_to_token.device) + 1)  # new tail slots
        graph.replay()
        torch.cuda.synchronize()
        expected = _loop_tables(packed, rows, now, req_to_token.cpu(), layers, heads)
        _assert_tables_equal(expected, indptr, indices)
