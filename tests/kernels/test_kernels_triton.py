"""The Triton head-wise decode (``kernels/triton_decode.py``) against the torch reference, and its dispatch row.

CPU: the ``test_interpreter_*`` tests run the kernels in the Triton interpreter. Triton fixes interpret mode when a
``@triton.jit`` function is defined, its own ``tl.cdiv`` / ``tl.sum`` included, i.e. when triton is first imported;
in a full pytest run something has usually imported it already. So they run in a child pytest process started with
TRITON_INTERPRET=1 (``test_kernels_in_the_triton_interpreter``) and are skipped, with that reason, in this one.
The interpreter's bfloat16 ``tl.dot`` is wrong (numpy has no bf16 matmul), so bf16 is checked on the GPU only.
GPU (marked ``gpu``): bf16 / fp16 / fp32 on NaN-poisoned buffers, CUDA-graph replay, model-shaped heads; inputs
are random on every run (the seed is printed on failure).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from madakv_sglang.kernels.torch_decode import headwise_decode as reference_decode

ROOT = Path(__file__).resolve().parents[2]
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
in_interpreter = pytest.mark.skipif(
    not INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child process of test_kernels_in_the_triton_interpreter"
)

# float32 in, float32 accumulation on both sides: only the summation order and exp2 vs exp differ (observed
# <= 5e-7 on unit-scale inputs).
FP32_TOL = 2e-6
# GPU bf16 / fp16: the reference sees the same rounded inputs in float32; the kernel rounds the probabilities to the
# value dtype for the P.V dot and the output once more (bf16 keeps 8 mantissa bits, fp16 11), so unit-scale outputs
# differ by a few ulps of the dtype.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}


def test_kernels_in_the_triton_interpreter() -> None:
    if INTERPRETER:
        pytest.skip("already in the interpreter: the test_interpreter_* tests run in this process")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(Path(__file__)),
        "-k",
        "test_interpreter_",
        "-m",
        "not gpu",
    ]
    result = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


def make_case(
    lengths: list[int],
    num_kv_heads: int,
    group: int,
    dim: int,
    dtype: torch.dtype,
    seed: int,
    indptr_dtype: torch.dtype = torch.int64,
    index_dtype: torch.dtype = torch.int64,
    device: str = "cpu",
) -> tuple[torch.Tensor, ...]:
    """Random q ``[B, H * G, D]``, a pool of flat cells, and tables with the given per-virtual-request lengths."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths) // num_kv_heads
    cells = max(64, 2 * sum(lengths))
    q = torch.randn(batch, num_kv_heads * group, dim, generator=generator)
    k = torch.randn(cells, dim, generator=generator)
    v = torch.randn(cells, dim, generator=generator)
    indptr = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    indptr[1:] = torch.tensor(lengths).cumsum(0)
    indices = torch.randint(0, cells, (int(indptr[-1]),), generator=generator)
    return (
        q.to(device, dtype),
        k.to(device, dtype),
        v.to(device, dtype),
        indptr.to(device, indptr_dtype),
        indices.to(device, index_dtype),
    )


def assert_matches_reference(
    out: torch.Tensor, lse: torch.Tensor, case: tuple[torch.Tensor, ...], heads: int, tol: float
) -> None:
    q, k, v, indptr, indices = case
    ref_out, ref_lse = reference_decode(
        q.float(), k.float(), v.float(), indptr.long(), indices.long(), heads, q.shape[-1] ** -0.5
    )
    torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)  # -inf where a head is empty, on both sides


# (G, D, H, per-virtual-request lengths, indptr dtype, indices dtype). Lengths 0 and 1 are the edge heads; 150+
# spans 5+ blocks of 32 keys and, with 3 splits, several blocks per split; D = 80 pads the head-dim block.
INTERPRETER_CASES = {
    "g1-d64": (1, 64, 3, [0, 1, 150, 33, 64, 2], torch.int32, torch.int64),
    "g4-d128": (4, 128, 2, [150, 0, 1, 97], torch.int64, torch.int32),
    "g7-d64": (7, 64, 2, [1, 170, 40, 0], torch.int32, torch.int64),
    "g7-d128": (7, 128, 1, [0, 1, 160], torch.int64, torch.int64),
    "g4-d80": (4, 80, 2, [150, 5], torch.int32, torch.int32),
}


@in_interpreter
@pytest.mark.parametrize("case_id", list(INTERPRETER_CASES))
def test_interpreter_float32_matches_reference(case_id: str) -> None:
    from madakv_sglang.kernels.triton_decode import DecodeBuffers, triton_headwise_decode

    group, dim, heads, lengths, indptr_dtype, index_dtype = INTERPRETER_CASES[case_id]
    seed = zlib.crc32(case_id.encode())
    generator = torch.Generator().manual_seed(seed)
    lengths = [n + int(torch.randint(0, 30, (1,), generator=generator)) if n > 1 else n for n in lengths]
    case = make_case(lengths, heads, group, dim, torch.float32, seed, indptr_dtype, index_dtype)
    scale = dim**-0.5

    one_split = triton_headwise_decode(*case, heads, scale, num_splits=1)
    assert_matches_reference(*one_split, case, heads, FP32_TOL)
    three_splits = triton_headwise_decode(*case, heads, scale, num_splits=3)
    assert_matches_reference(*three_splits, case, heads, FP32_TOL)
    max_splits = triton_headwise_decode(*case, heads, scale, num_splits=16)  # most splits past the list ends
    for split_out in (three_splits, max_splits):
        for a, b in zip(one_split, split_out, strict=True):
            torch.testing.assert_close(a, b, atol=FP32_TOL, rtol=FP32_TOL)

    # Caller-owned buffers sized for a larger batch and poisoned with NaN: same bits as the allocating call.
    batch = case[0].shape[0]
    buffers = DecodeBuffers.allocate(batch + 2, group * heads, heads, dim, torch.float32, "cpu", num_splits=3)
    for tensor in (buffers.out, buffers.lse, buffers.workspace):
        tensor.fill_(float("nan"))
    out, lse = triton_headwise_decode(
        *case, heads, scale, num_splits=3, out=buffers.out[:batch], lse=buffers.lse[:batch], workspace=buffers.workspace
    )
    assert out.data_ptr() == buffers.out.data_ptr() and lse.data_ptr() == buffers.lse.data_ptr()
    assert torch.equal(out, three_splits[0]) and torch.equal(lse, three_splits[1])


@in_interpreter
def test_interpreter_float16() -> None:
    from madakv_sglang.kernels.triton_decode import triton_headwise_decode

    # fp16 probabilities and output against float32 on the same fp16 inputs. fp16 rounds to 2^-11 relative
    # (4.9e-4); the probabilities of the P.V product each carry that error, which the weighted sum scales by up to
    # max |v| (about 4 for these N(0, 1) values), and the output's own rounding adds 4.9e-4 |out|: hence 2e-3.
    case = make_case([0, 1, 150, 60], 2, 7, 128, torch.float16, seed=11)
    out, lse = triton_headwise_decode(*case, 2, 128**-0.5, num_splits=2)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    assert_matches_reference(out, lse, case, 2, 2e-3)


@in_interpreter
def test_interpreter_dispatch_runs_triton() -> None:
    """``backend="triton"`` is listed under the interpreter and runs with the default split rule."""
    from madakv_sglang.kernels import available_backends, headwise_decode

    assert "triton" in available_backends()
    case = make_case([0, 90, 1, 40], 2, 4, 64, torch.float32, seed=3)
    out, lse = headwise_decode(*case, 2, 64**-0.5, backend="triton")
    assert_matches_reference(out, lse, case, 2, FP32_TOL)


@pytest.mark.parametrize(
    ("dtype", "group", "dim", "index"),
    [
        ("bf16", 7, 128, "i32"),
        ("fp16", 1, 64, "i64"),
        ("fp32", 4, 80, "i64"),
    ],
)
def test_kernels_compile_for_h100(
    dtype: str, group: int, dim: int, index: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interpreter accepts code the compiler may not, so both kernels are also compiled for sm_90 (H100) with
    Triton's bundled LLVM and ptxas; no GPU is needed. Half types must lower to tensor-core MMA."""
    import triton

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, not from an earlier run's cache
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from madakv_sglang.kernels import triton_decode

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    block_d = max(16, triton.next_power_of_2(dim))
    split_types = [f"*{dtype}"] * 3 + [f"*{index}"] * 2 + ["*fp32"] * 2 + ["fp32"] + ["i32"] * 5
    split = ASTSource(
        triton_decode._split_kernel,
        dict(zip(triton_decode._split_kernel.arg_names, split_types + ["constexpr"] * 5, strict=True)),
        constexprs={
            "GROUP": group,
            "HEAD_DIM": dim,
            "BLOCK_G": max(16, triton.next_power_of_2(group)),
            "BLOCK_D": block_d,
            "BLOCK_KEYS": triton_decode.BLOCK_KEYS,
        },
    )
    merge_types = ["*fp32", "*fp32", f"*{dtype}", "*fp32"] + ["i32"] * 5
    merge = ASTSource(
        triton_decode._merge_kernel,
        dict(zip(triton_decode._merge_kernel.arg_names, merge_types + ["constexpr"] * 4, strict=True)),
        constexprs={"GROUP": group, "HEAD_DIM": dim, "BLOCK_S": 4, "BLOCK_D": block_d},
    )
    target = GPUTarget("cuda", 90, 32)
    options = {"num_warps": triton_decode.split_warps(torch_dtype), "num_stages": 2, "enable_fp_fusion": True}
    compiled = triton.compile(split, target=target, options=options)
    assert compiled.asm["cubin"]
    assert ("mma" in compiled.asm["ptx"]) == (dtype != "fp32")
    assert triton.compile(merge, target=target, options={"num_warps": 4, "enable_fp_fusion": True}).asm["cubin"]


def test_bad_buffers_are_rejected() -> None:
    from madakv_sglang.kernels.triton_decode import triton_headwise_decode, workspace_numel

    case = make_case([3, 4], 2, 2, 64, torch.float32, seed=5)
    need = workspace_numel(1, 4, 64, 2)
    with pytest.raises(ValueError, match="workspace"):
        triton_headwise_decode(*case, 2, 0.1, num_splits=2, workspace=torch.empty(need - 1))
    with pytest.raises(ValueError, match="out must be"):
        triton_headwise_decode(*case, 2, 0.1, out=torch.empty(1, 4, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="indptr"):
        triton_headwise_decode(*case[:3], case[3][:-1], case[4], 2, 0.1)


def test_split_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented H100 examples, bounds, monotonicity, and buffers that cover the rule for every batch."""
    from madakv_sglang.kernels import triton_decode

    rule = triton_decode.default_num_splits
    buffers = triton_decode.DecodeBuffers.allocate(40, 28, 4, 128, torch.float32, "cpu")
    cpu = torch.device("cpu")
    assert all(
        buffers.workspace.numel() >= triton_decode.workspace_numel(b, 28, 128, rule(b * 4, cpu)) for b in range(1, 41)
    )

    monkeypatch.setattr(triton_decode, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert [rule(b * 4, cuda) for b in (1, 8, 64)] == [16, 9, 2]  # Qwen2.5-VL, H = 4
    assert [rule(b * 32, cuda) for b in (1, 8, 9)] == [9, 2, 1]  # LLaVA-1.5, H = 32
    splits = [rule(v, cuda) for v in range(1, 600)]
    assert all(1 <= s <= triton_decode.MAX_SPLITS for s in splits) and splits == sorted(splits, reverse=True)


def test_import_does_not_load_triton() -> None:
    code = "import sys, madakv_sglang.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_available_backends_lists_triton_only_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from madakv_sglang.kernels import dispatch

    monkeypatch.setattr(dispatch, "_BACKENDS", {"torch": dispatch.torch_headwise_decode})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.available_backends() == ("torch", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        assert dispatch.available_backends() == ("torch",)
        with pytest.raises(ValueError, match="cannot run here"):
            dispatch.headwise_decode(*make_case([1], 1, 1, 64, torch.float32, 0), 1, 1.0, backend="triton")
    with pytest.raises(ValueError, match="unknown decode backend"):
        dispatch.headwise_decode(*make_case([1], 1, 1, 64, torch.float32, 0), 1, 1.0, backend="nope")


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.fixture
def seed() -> int:
    value = int.from_bytes(os.urandom(4), "little")
    print(f"seed {value}")
    return value


def gpu_lengths(virtual: int, seed: int) -> list[int]:
    """Random lengths with an empty head, a single-entry head and one long head (several splits of many blocks)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 700, (virtual,), generator=generator).tolist()
    lengths[0], lengths[-1], lengths[virtual // 2] = 0, 1, 3000
    return lengths


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("hq", "hkv", "dim"), [(28, 4, 128), (32, 32, 128), (16, 2, 64), (7, 1, 128)])
def test_gpu_matches_reference(dtype: torch.dtype, hq: int, hkv: int, dim: int, seed: int) -> None:
    from madakv_sglang.kernels.triton_decode import DecodeBuffers, triton_headwise_decode

    batch = 8
    case = make_case(gpu_lengths(batch * hkv, seed), hkv, hq // hkv, dim, dtype, seed, device="cuda")
    buffers = DecodeBuffers.allocate(batch, hq, hkv, dim, dtype, "cuda")
    for num_splits in (None, 1):
        for tensor in (buffers.out, buffers.lse, buffers.workspace):
            tensor.fill_(float("nan"))
        out, lse = triton_headwise_decode(
            *case, hkv, dim**-0.5, num_splits=num_splits, out=buffers.out, lse=buffers.lse, workspace=buffers.workspace
        )
        assert not out.isnan().any() and not lse.isnan().any(), "every output element must be written"
        assert_matches_reference(out, lse, case, hkv, TOLERANCE[dtype])


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_equals_eager(seed: int) -> None:
    """Capture once (Qwen2.5-VL heads, batch 8) over fixed buffers; replay with new lengths, tables and values."""
    from madakv_sglang.kernels.triton_decode import DecodeBuffers, triton_headwise_decode

    hq, hkv, dim, batch, dtype = 28, 4, 128, 8, torch.bfloat16
    virtual, max_nnz, cells = batch * hkv, 40_000, 100_000
    q = torch.zeros(batch, hq, dim, dtype=dtype, device="cuda")
    k = torch.zeros(cells, dim, dtype=dtype, device="cuda")
    v = torch.zeros_like(k)
    indptr = torch.zeros(virtual + 1, dtype=torch.int32, device="cuda")
    indices = torch.zeros(max_nnz, dtype=torch.int32, device="cuda")
    buffers = DecodeBuffers.allocate(batch, hq, hkv, dim, dtype, "cuda")

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        return triton_headwise_decode(
            q, k, v, indptr, indices, hkv, dim**-0.5, out=buffers.out, lse=buffers.lse, workspace=buffers.workspace
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the call itself must not synchronise with the host
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()

    k[-1], v[-1] = float("nan"), float("nan")  # the table tail points here: reading past a list poisons the output
    for step in range(3):
        case = make_case(
            gpu_lengths(virtual, seed + step),
            hkv,
            hq // hkv,
            dim,
            dtype,
            seed + step,
            torch.int32,
            torch.int32,
            device="cuda",
        )
        nnz, used_cells = case[4].numel(), case[1].shape[0]
        assert nnz <= max_nnz and used_cells < cells
        q.copy_(case[0])
        k[:used_cells].copy_(case[1])
        v[:used_cells].copy_(case[2])
        indptr.copy_(case[3])
        indices[:nnz].copy_(case[4])
        indices[nnz:] = cells - 1
        graph.replay()
        eager_out, eager_lse = triton_headwise_decode(q, k, v, indptr, indices[:nnz], hkv, dim**-0.5)
        assert torch.equal(buffers.out, eager_out) and torch.equal(buffers.lse, eager_lse), f"step {step}"
        assert_matches_reference(buffers.out, buffers.lse, (q, k, v, indptr, indices[:nnz]), hkv, TOLERANCE[dtype])


@pytest.mark.gpu
def test_gpu_dispatch_lists_and_runs_triton(seed: int) -> None:
    from madakv_sglang.kernels import available_backends, headwise_decode
    from madakv_sglang.kernels.triton_decode import triton_headwise_decode

    assert "triton" in available_backends()
    case = make_case(gpu_lengths(8 * 32, seed), 32, 1, 128, torch.bfloat16, seed, device="cuda")
    via_dispatch = headwise_decode(*case, 32, 128**-0.5, backend="triton")
    direct = triton_headwise_decode(*case, 32, 128**-0.5)
    assert torch.equal(via_dispatch[0], direct[0]) and torch.equal(via_dispatch[1], direct[1])


def test_decode_kernel_choice_follows_the_device_and_the_environment() -> None:
    from madakv_sglang.kernels import KERNEL_ENV, decode_kernel_for

    assert decode_kernel_for("cpu", {}) == "torch"
    assert decode_kernel_for("cpu", {KERNEL_ENV: "torch"}) == "torch"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        decode_kernel_for("cpu", {KERNEL_ENV: "flashinfer"})
    with pytest.raises(ValueError, match="unknown decode backend 'fast'"):
        decode_kernel_for("cpu", {KERNEL_ENV: "fast", "TRITON_INTERPRET": "1"})
