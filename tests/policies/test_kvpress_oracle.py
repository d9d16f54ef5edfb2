"""External oracle: our ``snapkv`` and ``adakv`` keep what NVIDIA kvpress 0.5.5 keeps, configured alike.

kvpress runs in its own venv (``scripts/setup-kvpress.sh`` makes ``.venv-kvpress``; it needs transformers<5.3).
``tests/kvpress_dump.py`` runs there on a tiny seeded random Llama (2 layers, 4 query / 2 KV heads, head_dim 16,
query heads given different softmax temperatures so AdaKV's head budgets really differ) and a fixed 96-token
input, and dumps, per press and layer, the post-RoPE window queries and keys kvpress scored with,
its scores and the positions it kept. Here our own math runs on those very tensors.

How kvpress 0.5.5 maps onto PolicyConfig (read from its source: snapkv_press.py, scorer_press.py,
adakv_press.py, utils.py):

* ``window_size`` -> ``window``. The last W queries score all keys with an explicit fp32 softmax under the
  causal mask (as our ``window_scores``); kvpress then takes the *mean* over the W queries where we take the
  sum: a factor W shared by every head and position, which changes no ranking, not even AdaKV's cross-head one.
* GQA: mean over the query heads of a KV group (``gqa="mean"``).
* Window kept: kvpress pads the window's scores with ``max(scores) + 1`` so it wins every top-k; we keep it
  unconditionally. The same whenever B >= W, with ``window_share=1`` (the kept window may take the whole budget
  our sinks leave) and no sinks (``sink=0``); our defaults shrink the window below S + 2W and keep 4 sinks.
* ``compression_ratio`` r -> ``budget`` B = ``max(1, int(n * (1 - r)))`` tokens, the floor of the kept
  fraction. Our ratio budgets take ``ceil(ratio * n)``, so the cases give B in tokens
  (test_budget_mapping pins the one-token difference).
* ``kernel_size`` k: ``F.avg_pool1d(k, padding=k // 2)`` over the non-window scores only (never into the
  window, as ours). ``k = 1`` is the identity -> ``pooling="none"``. For k > 1 the one difference: avg_pool1d
  counts the zero padding (``count_include_pad=True``), so within k // 2 of either end of the non-window range
  kvpress divides by k where our ``avg`` divides by the neighbours that exist. Interior positions agree.
  kvpress has no max pooling, so our default ``pooling="max"`` has no kvpress counterpart.
* AdaKV ``alpha_safeguard`` a -> ``adakv_alpha``: kvpress first keeps, per head, the top
  ``n_safe = max(1, int(a * B))`` scores, window included (it holds the top W scores); the rest of the layer's
  H * B cells go to the best remaining cells of any head. Ours guarantees ``g = max(W, floor(a * B))`` per head
  (window + top g - W; ``min_keep`` unset, so the floor is W), then the same cross-head top-k. When n_safe >= W
  both guarantee the window plus the top n_safe - W; when n_safe < W kvpress's safeguard only picks window
  cells, which are kept anyway, and ours guarantees just the window: identical again. (a * B is the same
  double-precision product on both sides, so int() and floor() agree.)
* Ties: kvpress leaves them to ``torch.topk``; ours prefer the later position (lower head across heads).
  The fixed input has no ties at any cut (asserted, with margins far above fp32 rounding), so exact kept-set
  equality is the right assertion.
"""

from __future__ import annotations

import json
import os
import subprocess
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from madakv_sglang.config import Budget, PolicyConfig
from madakv_sglang.policies import PolicyInputs, get_policy
from madakv_sglang.policies.scoring import pool_within_segments, window_scores
from madakv_sglang.settings import policy_config

ROOT = Path(__file__).resolve().parents[2]
KVPRESS_PYTHON = ROOT / ".venv-kvpress" / "bin" / "python"
DUMP_SCRIPT = ROOT / "tests" / "kvpress_dump.py"

# (press, window_size, kernel_size, compression_ratio, alpha_safeguard). n = 96 prompt tokens.
CASES = [
    dict(press="snapkv", window_size=16, kernel_size=1, compression_ratio=0.5),  # B = 48
    dict(press="adakv", window_size=16, kernel_size=1, compression_ratio=0.5, alpha_safeguard=0.2),  # n_safe 9 < W
    dict(press="adakv", window_size=16, kernel_size=1, compression_ratio=0.25, alpha_safeguard=0.8),  # B 72, n_safe 57
    dict(press="adakv", window_size=8, kernel_size=1, compression_ratio=0.5, alpha_safeguard=0.8),  # n_safe 38
    dict(press="adakv", window_size=8, kernel_size=1, compression_ratio=0.7, alpha_safeguard=0.5),  # B 28, n_safe 14
    dict(press="snapkv", window_size=16, kernel_size=5, compression_ratio=0.5),  # kvpress's kernel
    dict(press="adakv", window_size=16, kernel_size=5, compression_ratio=0.25, alpha_safeguard=0.9),
    dict(press="snapkv", window_size=64, kernel_size=5, compression_ratio=0.25),  # kvpress defaults, B = 72
    dict(press="adakv", window_size=64, kernel_size=5, compression_ratio=0.25, alpha_safeguard=0.2),
]

# Scores: the same fp32 math in a different order (bmm vs matmul, W-sum vs W-mean, GQA mean before vs after
# pooling), so they agree to rounding, not bitwise: on this input within 1.6e-7 of the largest score. rtol 1e-5
# is ~80 fp32 epsilons; atol 1e-9 only covers scores that underflow towards 0.
SCORE_RTOL, SCORE_ATOL = 1e-5, 1e-9
# A kept/evicted decision counts as robust when the two scores around the cut differ by this much relative to
# the largest score: the two sides' scores differ by at most ~1.2e-7 of it on this input, so 1e-5 leaves a
# factor ~100 and equal kept sets are not luck (nor would a tie-rule difference be hidden by one).
MIN_MARGIN = 1e-5


@pytest.fixture(scope="module")
def dump(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not KVPRESS_PYTHON.exists():
        pytest.fail(
            f"{KVPRESS_PYTHON} is missing: run scripts/setup-kvpress.sh first (it creates .venv-kvpress with "
            "kvpress 0.5.5, transformers 5.2.0 and the local CPU torch, about 45 s and 1.4 GB)",
            pytrace=False,
        )
    out = tmp_path_factory.mktemp("kvpress") / "dump.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run(
        [str(KVPRESS_PYTHON), str(DUMP_SCRIPT), str(out), json.dumps(CASES)],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"tests/kvpress_dump.py failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}", pytrace=False)
    return torch.load(out, weights_only=True)


def _case_id(case: dict) -> str:
    return "-".join(str(v) for v in case.values())


def _result(dump: dict, case: dict) -> dict:
    (found,) = [r for r in dump["results"] if r["case"] == case]
    return found


def _config(case: dict, n_kept: int, pooling: str) -> PolicyConfig:
    return policy_config(
        policy=case["press"],
        budget=Budget(tokens=n_kept),
        window=case["window_size"],
        pooling=pooling,  # type: ignore[arg-type]
        pool_kernel=case["kernel_size"],
        gqa="mean",
        adakv_alpha=case.get("alpha_safeguard", 0.2),
        # kvpress keeps no sinks, keeps its whole window whenever B >= W, and has no skip rule.
        sink=0,
        window_share=1.0,
        min_prompt=0,
        min_reclaim=0.0,
    )


def _our_scores(dump: dict, result: dict, gqa: str = "mean") -> torch.Tensor:
    """psi ``[L, H, n]`` from our window_scores on the queries and keys kvpress used."""
    scale = dump["head_dim"] ** -0.5
    return torch.stack([window_scores(l["q_window"], l["keys"], scale=scale, gqa=gqa) for l in result["layers"]])


def _kvpress_avg_pool(psi: torch.Tensor, window: int, kernel: int) -> torch.Tensor:
    """The adapter: kvpress's pooling rule on our psi. Non-window positions get F.avg_pool1d with zero padding
    counted (divide by k everywhere); the window is left alone (our policies keep it without ranking it)."""
    rest = psi[..., :-window]
    pooled = F.avg_pool1d(rest.flatten(0, -2)[:, None], kernel, stride=1, padding=kernel // 2)[:, 0].view_as(rest)
    return torch.cat([pooled, psi[..., -window:]], dim=-1)


def _run_policy(cfg: PolicyConfig, scores: torch.Tensor) -> torch.Tensor:
    L, H, n = scores.shape
    inputs = PolicyInputs(
        visual=torch.zeros(1, n, dtype=torch.bool),  # kvpress is text-only: one modality run
        prompt_len=torch.tensor([n]),
        nominal_budget=torch.tensor([cfg.budget.tokens_for(n)]),
        num_layers=L,
        total_heads=H,
        scores=scores[None],
    )
    return get_policy(cfg.policy).select(inputs, cfg).keep[0]


def _kvpress_keep(result: dict) -> torch.Tensor:
    return torch.stack([l["keep"] for l in result["layers"]])


def _kvpress_scores(result: dict, window: int) -> torch.Tensor:
    """kvpress's ranked scores ``[L, H, n - W]`` (the window's max + 1 padding dropped)."""
    return torch.stack([l["scores"][:, :-window] for l in result["layers"]])


def _describe(ours: torch.Tensor, theirs: torch.Tensor) -> str:
    lines = []
    for l, h in (ours != theirs).any(-1).nonzero().tolist():
        only_ours = (ours[l, h] & ~theirs[l, h]).nonzero().flatten().tolist()
        only_theirs = (theirs[l, h] & ~ours[l, h]).nonzero().flatten().tolist()
        lines.append(f"layer {l} head {h}: only ours {only_ours}, only kvpress {only_theirs}")
    return "\n".join(lines)


def _margin(scores: torch.Tensor, keep: torch.Tensor, case: dict, n_safe: int | None) -> float:
    """The smallest score gap (relative to the largest score) at any cut that decided ``keep``.

    SnapKV: per head, lowest kept vs highest evicted non-window score. AdaKV: per head, the safeguard's cut
    (its (n_safe - W)-th vs next non-window score) when n_safe > W, then per layer the cross-head cut among
    the cells the safeguard left open.
    """
    window = case["window_size"]
    kept = keep[..., :-window]
    gaps = []
    for l in range(scores.shape[0]):
        s, k = scores[l].double(), kept[l]
        if case["press"] == "snapkv":
            for h in range(s.shape[0]):
                gaps.append(s[h][k[h]].min() - s[h][~k[h]].max())
            continue
        open_ = torch.ones_like(k)
        extra = max(0, (n_safe or 0) - window)
        if extra:
            ordered = s.sort(dim=-1, descending=True)
            gaps.extend((ordered.values[:, extra - 1] - ordered.values[:, extra]).tolist())
            open_.scatter_(-1, ordered.indices[:, :extra], False)
        gaps.append(s[k & open_].min() - s[~k & open_].max())
    return float(min(gaps) / scores.abs().max())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_scores_match_kvpress(dump: dict, case: dict) -> None:
    """Our window_scores / W, pooled by kvpress's rule, equal kvpress's scores (to fp32 rounding)."""
    result = _result(dump, case)
    window = case["window_size"]
    ours = _kvpress_avg_pool(_our_scores(dump, result) / window, window, case["kernel_size"])[..., :-window]
    torch.testing.assert_close(ours, _kvpress_scores(result, window), rtol=SCORE_RTOL, atol=SCORE_ATOL)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kept_sets_match_kvpress(dump: dict, case: dict) -> None:
    """Same kept (layer, head, position) cells as kvpress. For kernel 1 this is our policy as configured
    (pooling none); for kernel k > 1 our policy runs on the adapter's kvpress-pooled scores with pooling none,
    which isolates the one documented difference (edge normalisation, see test_avg_pool_edges)."""
    result = _result(dump, case)
    theirs = _kvpress_keep(result)
    window, n = case["window_size"], theirs.shape[-1]
    margin = _margin(_kvpress_scores(result, window), theirs, case, result.get("n_safe"))
    assert margin > MIN_MARGIN, f"near-tie at a cut (margin {margin:.2e}); change a seed in tests/kvpress_dump.py"
    assert result["n_kept"] >= window and bool(theirs[..., -window:].all()), "kvpress dropped a window token"
    per_layer = theirs.sum(dim=(1, 2))
    assert bool((per_layer == theirs.shape[1] * result["n_kept"]).all()), "kvpress should keep H*B cells per layer"

    cfg = _config(case, result["n_kept"], "none")
    scores = _kvpress_avg_pool(_our_scores(dump, result, cfg.gqa), window, case["kernel_size"])
    ours = _run_policy(cfg, scores)
    assert ours.shape == theirs.shape == (2, 2, n)
    assert torch.equal(ours, theirs), _describe(ours, theirs)


# Our own pooling="avg" (as configured, no adapter) against kvpress on the fixed input: the cells only one side
# keeps, pinned so that a change in either side's pooling is noticed. The edge cells, within k // 2 = 2 of either
# end of the non-window range, are 0, 1, 78, 79 (W = 16) and 0, 1, 30, 31 (W = 64).
EXPECTED_AVG_DIFF: dict[str, str] = {
    "snapkv-16-5-0.5": "layer 0 head 0: only ours [78, 79], only kvpress [47, 63]",
    "adakv-16-5-0.25-0.9": "layer 0 head 0: only ours [0], only kvpress [65]\n"
    "layer 1 head 1: only ours [1], only kvpress [3]",
    "snapkv-64-5-0.25": "layer 0 head 1: only ours [0, 1], only kvpress [16, 17]\n"
    "layer 1 head 1: only ours [0, 30, 31], only kvpress [7, 23, 28]",
    "adakv-64-5-0.25-0.2": "layer 0 head 0: only ours [], only kvpress [16]\n"
    "layer 0 head 1: only ours [0, 1], only kvpress [17]\n"
    "layer 1 head 0: only ours [], only kvpress [23]\n"
    "layer 1 head 1: only ours [0, 1, 31], only kvpress [2, 7]",
}


@pytest.mark.parametrize("case", [c for c in CASES if c["kernel_size"] > 1], ids=_case_id)
def test_avg_pool_edges(dump: dict, case: dict) -> None:
    """Our own ``pooling="avg"`` differs from kvpress's avg_pool1d at the edges only, and the kept sets with it.

    Scores: equal in the interior; within k // 2 of either end of the non-window range kvpress's value is
    ours * (neighbours present) / k, because avg_pool1d counts the zero padding (count_include_pad=True), so
    kvpress ranks edge cells lower. Kept sets (our policy as configured: pooling avg, kernel k):
    * SnapKV, per head a top-(B - W): the interior keeps its order, so a head can only differ if one of its edge
      cells changes membership (asserted), and then the freed or taken slots move to interior cells.
    * AdaKV: the cross-head top-k spreads the same effect to other heads of the layer (a head may differ at
      interior cells only); on this input every layer that differs has a differing edge cell (asserted).
    test_kept_sets_match_kvpress shows the sets are equal once the edge rule is aligned.
    """
    result = _result(dump, case)
    window, k = case["window_size"], case["kernel_size"]
    cfg = _config(case, result["n_kept"], "avg")
    psi = _our_scores(dump, result, cfg.gqa)
    n = psi.shape[-1]
    rest = n - window
    segments = torch.where(torch.arange(n) >= rest, 0, 1)  # the window is its own segment, as in ranking_scores
    ours = pool_within_segments(psi, segments, k, "avg")[..., :rest]
    theirs = _kvpress_avg_pool(psi, window, k)[..., :rest]
    pos = torch.arange(rest)
    present = 1 + torch.clamp(pos, max=k // 2) + torch.clamp(rest - 1 - pos, max=k // 2)
    edge = present < k
    assert int(edge.sum()) == 2 * (k // 2)
    torch.testing.assert_close(theirs[..., ~edge], ours[..., ~edge], rtol=SCORE_RTOL, atol=SCORE_ATOL)
    scaled = ours[..., edge] * present[edge] / k
    torch.testing.assert_close(theirs[..., edge], scaled, rtol=SCORE_RTOL, atol=SCORE_ATOL)
    assert bool((theirs[..., edge] < ours[..., edge]).all())

    mine = _run_policy(cfg, psi)
    kv = _kvpress_keep(result)
    differs = (mine != kv)[..., :rest]
    assert not (mine != kv)[..., rest:].any(), "the window must be kept by both"
    if case["press"] == "snapkv":
        for l, h in differs.any(-1).nonzero().tolist():
            assert bool(differs[l, h, edge].any()), _describe(mine, kv)
    else:
        for l in differs.flatten(1).any(-1).nonzero().flatten().tolist():
            assert bool(differs[l][:, edge].any()), _describe(mine, kv)
    assert _describe(mine, kv) == EXPECTED_AVG_DIFF[_case_id(case)]


def test_budget_mapping(dump: dict) -> None:
    """kvpress keeps int(n * (1 - r)) tokens; our ratio budget is ceil(ratio * n). They differ by one token
    when n * (1 - r) is fractional (96 * 0.3 = 28.8: kvpress 28, ours 29), hence token budgets above."""
    by_ratio = {r["case"]["compression_ratio"]: r["n_kept"] for r in dump["results"]}
    assert by_ratio == {0.5: 48, 0.7: 28, 0.25: 72}
    assert Budget(ratio=Fraction(3, 10)).tokens_for(96) == 29
    assert [r["n_safe"] for r in dump["results"] if r["case"]["press"] == "adakv"] == [9, 57, 38, 14, 64, 14]
    assert dump["versions"]["kvpress"] == "0.5.5", dump["versions"]
