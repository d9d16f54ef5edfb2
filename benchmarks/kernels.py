"""Build, check and time the decode-path kernels in one GPU call; print a table and write JSON.

    python benchmarks/kernels.py --out benchmarks/results/kernels.json

For each model shape (Qwen2.5-VL-7B: 28 q / 4 KV heads; LLaVA-1.5-7B: 32 / 32; D = 128), context n = 32k,
budget 10% and batch 1, 8, 32, one layer:
- dense: FlashInfer's paged decode over the whole cache (page size 1, SGLang's tensor-core rule: G >= 4), the
  speed a `full` server gets;
- head-wise: every registered decode kernel over per-head cell lists of ~B = 0.1 n entries (lengths drawn in
  [0.5 B, 1.5 B] so heads differ, as MadaKV's do), each first checked against the float32 torch reference;
- bandwidth: the bytes the kept cells need (K + V + int32 indices) over the time, against the measured
  device-to-device copy bandwidth;
- window scores (torch, fp32) at n = 32k against SDPA causal prefill of the same layer, to decide whether a
  score kernel is worth writing (only if it costs more than 5% of prefill).

Timings are CUDA-event medians over repeated runs after warm-up. Needs CUDA and flashinfer-python.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from madakv_sglang.kernels import available_backends, headwise_decode
from madakv_sglang.kernels.torch_decode import headwise_decode as reference_decode
from madakv_sglang.policies.scoring import window_scores

SHAPES = {"qwen2.5-vl-7b": (28, 4, 128), "llava-1.5-7b": (32, 32, 128)}
# bf16 outputs of unit-scale attention against the float32 reference (see tests/kernels/test_kernels_flashinfer.py).
CHECK_TOLERANCE = 2e-2


def time_ms(fn: Callable[[], Any], repeats: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: read + write bytes over time."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), repeats=20, warmup=3)
    return 2 * source.numel() / ms / 1e6


def dense_decode_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, n: int, hkv: int) -> float:
    import flashinfer

    workspace = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    group = q.shape[1] // hkv
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=group >= 4)
    indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * n
    indices = torch.arange(batch * n, dtype=torch.int32, device="cuda")
    wrapper.plan(
        indptr,
        indices,
        torch.ones(batch, dtype=torch.int32, device="cuda"),
        q.shape[1],
        hkv,
        q.shape[2],
        1,
        q_data_type=q.dtype,
        kv_data_type=k.dtype,
    )
    return time_ms(lambda: wrapper.run(q, (k, v)))


def headwise_case(
    hq: int, hkv: int, dim: int, batch: int, n: int, budget: float, generator: torch.Generator, copy_gbs: float
) -> list[dict[str, Any]]:
    dtype = torch.bfloat16
    slots = batch * n
    k = torch.randn(slots, hkv, dim, dtype=dtype, device="cuda")
    v = torch.randn(slots, hkv, dim, dtype=dtype, device="cuda")
    q = torch.randn(batch, hq, dim, dtype=dtype, device="cuda")
    rows: list[dict[str, Any]] = []
    dense = dense_decode_ms(q, k, v, batch, n, hkv)
    kept = int(budget * n)
    lengths = torch.randint(kept // 2, kept + kept // 2 + 1, (batch * hkv,), generator=generator)
    indptr = torch.zeros(batch * hkv + 1, dtype=torch.int64)
    indptr[1:] = lengths.cumsum(0)
    # Each head reads cells of its own request's slots, at random positions (what packing leaves is contiguous;
    # random is the harder case for the memory system).
    request = torch.arange(batch * hkv) // hkv
    head = torch.arange(batch * hkv) % hkv
    owner = torch.repeat_interleave(torch.arange(batch * hkv), lengths)
    slot = request[owner] * n + torch.randint(0, n, (int(indptr[-1]),), generator=generator)
    indices = (slot * hkv + head[owner]).cuda()
    indptr = indptr.cuda()
    k_cells, v_cells = k.view(-1, dim), v.view(-1, dim)
    scale = dim**-0.5
    expected, _ = reference_decode(q.float(), k_cells.float(), v_cells.float(), indptr, indices, hkv, scale)
    useful_bytes = int(indptr[-1]) * (2 * dim * k.element_size() + 4)
    for backend in [b for b in available_backends() if b != "torch"]:
        out, _ = headwise_decode(q, k_cells, v_cells, indptr, indices, hkv, scale, backend=backend)
        error = float((out.float() - expected).abs().max())
        ms = time_ms(
            lambda backend=backend: headwise_decode(q, k_cells, v_cells, indptr, indices, hkv, scale, backend=backend)
        )
        rows.append(
            {
                "kernel": backend,
                "batch": batch,
                "max_abs_error": error,
                "ok": error <= CHECK_TOLERANCE,
                "ms": ms,
                "dense_ms": dense,
                "speedup_vs_dense": dense / ms,
                "achieved_gbs": useful_bytes / ms / 1e6,
                "copy_gbs": copy_gbs,
                "fraction_of_bandwidth": useful_bytes / ms / 1e6 / copy_gbs,
            }
        )
    return rows


def window_score_share(hq: int, hkv: int, dim: int, n: int, window: int) -> dict[str, float]:
    q = torch.randn(1, hq, n, dim, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1, hkv, n, dim, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    prefill = time_ms(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), repeats=10
    )
    q_window = q[0, :, -window:].transpose(0, 1).contiguous()  # [W, Hq, D]
    keys = k[0].transpose(0, 1).contiguous()  # [n, H, D]
    scores = time_ms(lambda: window_scores(q_window, keys, scale=dim**-0.5), repeats=10)
    return {"prefill_ms": prefill, "window_scores_ms": scores, "share": scores / prefill}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")
    generator = torch.Generator().manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    device = torch.cuda.get_device_name()
    print(
        f"{device}; torch {torch.__version__}; copy bandwidth {copy_gbs:.0f} GB/s; context {args.context}, "
        f"budget {args.budget}"
    )
    results: dict[str, Any] = {"device": device, "host": platform.node(), "copy_gbs": copy_gbs, "cases": []}
    print(f"{'shape':15} {'batch':>5} {'kernel':>10} {'ok':>3} {'ms':>8} {'dense ms':>9} {'speed-up':>8} {'of bw':>6}")
    for name, (hq, hkv, dim) in SHAPES.items():
        for batch in args.batches:
            for row in headwise_case(hq, hkv, dim, batch, args.context, args.budget, generator, copy_gbs):
                row["shape"] = name
                results["cases"].append(row)
                print(
                    f"{name:15} {batch:5d} {row['kernel']:>10} {'yes' if row['ok'] else 'NO':>3} {row['ms']:8.3f} "
                    f"{row['dense_ms']:9.3f} {row['speedup_vs_dense']:7.1f}x {row['fraction_of_bandwidth']:6.0%}"
                )
            torch.cuda.empty_cache()
        share = window_score_share(hq, hkv, dim, args.context, args.window)
        results[f"window_scores_{name}"] = share
        print(
            f"{name}: window scores {share['window_scores_ms']:.2f} ms vs causal prefill {share['prefill_ms']:.2f} ms "
            f"per layer ({share['share']:.1%})"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
