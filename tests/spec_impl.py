"""A deliberately simple, loop-by-loop implementation of docs/design.md §2, written from the text of the design and
sharing no code with the package. Tests compare the vectorized policies against it.

One request at a time; plain Python lists, floats and Fractions. Slow on purpose: nothing here is clever.
"""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import pairwise
from typing import Any

import numpy as np


def _option(cfg: Any, name: str, default: Any) -> Any:
    """A policy option's value; the defaults are the spec's own (PyramidKV's beta 20, AdaKV's alpha 0.2), written
    here rather than read from the code under test."""
    return dict(cfg.options).get(name, default)


def _water_fill(weights: list[int], lo: list[int], hi: list[int], total: int) -> list[int]:
    """x_k = clamp(s * w_k, lo_k, hi_k) summing to total (exact), then floors + largest remainders."""

    def fill(s: Fraction) -> list[Fraction]:
        return [min(max(s * w, Fraction(a)), Fraction(b)) for w, a, b in zip(weights, lo, hi, strict=True)]

    points = {Fraction(0)}
    for w, a, b in zip(weights, lo, hi, strict=True):
        if w > 0:
            points.add(Fraction(a, w))
            points.add(Fraction(b, w))
    points_sorted = sorted(points)
    s_star = points_sorted[-1]
    for left, right in pairwise(points_sorted):
        f_left, f_right = sum(fill(left)), sum(fill(right))
        if f_left <= total <= f_right:
            s_star = left if f_right == f_left else left + (total - f_left) * (right - left) / (f_right - f_left)
            break
    exact = fill(s_star)
    assert sum(exact) == total, (exact, total)
    floors = [math.floor(x) for x in exact]
    short = total - sum(floors)
    by_remainder = sorted(range(len(exact)), key=lambda k: (-(exact[k] - floors[k]), k))
    for k in by_remainder[:short]:
        floors[k] += 1
    return floors


def _pool(psi: list[float], segment: list[int], kernel: int, mode: str) -> list[float]:
    """Pooling over same-segment neighbours. avg sums in float32 in the order self, +1, -1, +2, -2, ... (the
    order the package sums in), so equal inputs give bit-equal rankings."""
    if mode == "none" or kernel == 1:
        return list(psi)
    n = len(psi)
    out = []
    for i in range(n):
        if mode == "max":
            best = psi[i]
            for j in range(max(0, i - kernel // 2), min(n, i + kernel // 2 + 1)):
                if segment[j] == segment[i]:
                    best = max(best, psi[j])
            out.append(best)
        else:
            total, count = np.float32(psi[i]), np.float32(1)
            for off in range(1, kernel // 2 + 1):
                for j in (i + off, i - off):
                    if 0 <= j < n and segment[j] == segment[i]:
                        total = np.float32(total + np.float32(psi[j]))
                        count = np.float32(count + 1)
            out.append(float(np.float32(total / count)))
    return out


def _coverage(values: list[float], theta: float) -> int:
    ordered = sorted(values, reverse=True)
    mass = 0.0
    prefix = []
    for v in ordered:
        mass += v
        prefix.append(mass)
    if not ordered or mass <= 0:
        return 0
    for k, p in enumerate(prefix, start=1):
        if p >= theta * mass:
            return k
    return len(ordered)


def _top(candidates: list[int], rank: list[float], count: int) -> list[int]:
    """The ``count`` best candidates by rank, later position first among equal ranks."""
    return sorted(candidates, key=lambda i: (-rank[i], -i))[:count]


def spec_select(
    scores: list[list[list[float]]],
    visual: list[bool],
    prompt_len: int,
    cfg: Any,
    total_heads: int,
    head_offset: int = 0,
) -> list[list[list[int]]]:
    """Kept positions ``[layer][head] -> sorted list`` for one request; ``scores[l][h][i]`` covers every head.

    Supports full, madakv (all modes and ablations), snapkv, pyramidkv, adakv, lookm, streamingllm.
    """
    if head_offset != 0:
        raise ValueError("the spec always works on every head")
    n, L, H = prompt_len, len(scores), total_heads
    nominal = cfg.budget.tokens if cfg.budget.tokens is not None else math.ceil(cfg.budget.ratio * n)
    B = min(max(nominal, cfg.min_keep or 1), n)
    # Skip rule: a short prompt, or a budget that would reclaim less than min_reclaim of the prompt.
    if n < cfg.min_prompt or Fraction(n - B) < Fraction(str(cfg.min_reclaim)) * n:
        B = n
    if cfg.policy == "full" or n <= B:
        return [[list(range(n)) for _ in range(H)] for _ in range(L)]

    # Protected tokens: the kept window shares the budget with the sinks until B covers S + 2W.
    S = cfg.sink
    W = min(cfg.window, max(1, math.floor(Fraction(str(cfg.window_share)) * (B - S))), B)
    S = min(S, B - W)
    floor = min(max(W + S, cfg.min_keep or 0), n)
    protected = set(range(n - W, n)) | set(range(S))
    window = sorted(protected)
    vis_rest = [i for i in range(n) if visual[i] and i not in protected]
    txt_rest = [i for i in range(n) if not visual[i] and i not in protected]
    segment = []
    run = 0
    for i in range(n):
        if i in protected:
            segment.append(-1)
        else:
            if i > 0 and visual[i] != visual[i - 1]:
                run += 1
            segment.append(run)

    policy = cfg.policy
    mpa = policy == "madakv" and cfg.mpa
    hcc = cfg.hcc if policy == "madakv" else "off"
    head_split = cfg.head_split if policy == "madakv" else "uniform"
    pooling = "none" if policy in ("streamingllm", "h2o") else cfg.pooling

    demand = [[0] * H for _ in range(L)]
    mass_v = [[0.0] * H for _ in range(L)]
    mass_t = [[0.0] * H for _ in range(L)]
    for l in range(L):
        for h in range(H):
            psi = scores[l][h]
            mass_v[l][h] = sum(psi[i] for i in vis_rest)
            mass_t[l][h] = sum(psi[i] for i in txt_rest)
            k_v = _coverage([psi[i] for i in vis_rest], cfg.theta)
            k_t = _coverage([psi[i] for i in txt_rest], cfg.theta)
            demand[l][h] = W + S + k_v + k_t

    cap = None if cfg.cap is None else Fraction(str(cfg.cap))  # None: no cap but the prompt
    if hcc == "off" and policy != "pyramidkv":
        layer_total = [H * B] * L
    elif policy == "pyramidkv":
        weights = (
            [1] * L
            if L == 1
            else [(L - 1) + (2 * _option(cfg, "pyramid_beta", 20) - 2) * (L - 1 - l) for l in range(L)]
        )
        layer_total = _water_fill(weights, [H * floor] * L, [H * n] * L, min(L * H * B, L * H * n))
    elif hcc == "global":
        hi = H * n if cap is None else min(H * n, math.floor(cap * H * B))
        layer_total = _water_fill([sum(d) for d in demand], [H * floor] * L, [hi] * L, min(L * H * B, L * hi))
    else:  # paper
        remaining = L * H * B
        layer_total = []
        for l in range(1, L + 1):
            hi = min(H * n, remaining - (L - l) * H * floor)
            if cap is not None:
                hi = min(hi, math.floor(cap * remaining / (L - l + 1)), math.floor(cap * H * B))
            t = min(max(sum(demand[l - 1]), H * floor), hi)
            layer_total.append(t)
            remaining -= t

    kept: list[list[list[int]]] = []
    for l in range(L):
        rank_per_head = []
        for h in range(H):
            rank_per_head.append(_pool(scores[l][h][:n], segment, cfg.pool_kernel, pooling))
        if policy == "adakv":
            guaranteed = min(max(math.floor(_option(cfg, "adakv_alpha", 0.2) * B), floor), B)
            pool = []
            for h in range(H):
                ordered = sorted(vis_rest + txt_rest, key=lambda i: (-rank_per_head[h][i], -i))
                for idx, i in enumerate(ordered):
                    if idx >= guaranteed - W - S:
                        pool.append((-rank_per_head[h][i], h, idx))
            pool.sort()
            head_budget = [guaranteed] * H
            for _, h, _ in pool[: H * (B - guaranteed)]:
                head_budget[h] += 1
        elif head_split == "demand":
            head_budget = _water_fill(demand[l], [floor] * H, [n] * H, layer_total[l])
        else:
            head_budget = [layer_total[l] // H + (1 if g < layer_total[l] % H else 0) for g in range(H)]

        layer_kept = []
        for h in range(H):
            rank = rank_per_head[h]
            rest = head_budget[h] - W - S
            if policy == "streamingllm":
                chosen = sorted(vis_rest + txt_rest, reverse=True)[:rest]
            elif policy == "lookm":
                b_t = min(rest, len(txt_rest))
                chosen = _top(txt_rest, rank, b_t) + _top(vis_rest, rank, rest - b_t)
            elif mpa:
                wv, wt = mass_v[l][h], mass_t[l][h]
                share = wv / (wv + wt) if wv + wt > 0 else len(vis_rest) / max(1, len(vis_rest) + len(txt_rest))
                b_v = math.floor(rest * share + 0.5)
                b_v = min(max(b_v, rest - len(txt_rest)), len(vis_rest))
                chosen = _top(vis_rest, rank, b_v) + _top(txt_rest, rank, rest - b_v)
            else:
                chosen = _top(vis_rest + txt_rest, rank, rest)
            layer_kept.append(sorted(set(chosen) | set(window)))
        kept.append(layer_kept)
    return kept
