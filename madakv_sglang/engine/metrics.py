"""Prometheus metrics of the compression, exported on SGLang's own ``/metrics`` endpoint.

SGLang runs prometheus_client in multiprocess mode: with ``--enable-metrics`` the launching process sets
``PROMETHEUS_MULTIPROC_DIR`` before it spawns the schedulers (``engine._set_envs_and_config``), every process
writes its samples there, and the HTTP server's ``/metrics`` aggregates the directory. So a scheduler only has to
create its metrics after that variable is set, which is the case whenever compression runs. Like SGLang's
scheduler collector, only the first attention-TP rank records (every rank makes the same decision) unless
``--enable-metrics-for-all-schedulers`` is given; the labels follow SGLang's (``model_name``, ``tp_rank``) plus
the ``policy`` that made the decision and the pool's ``layout`` (``shared`` or ``per-layer``).

Exported series (counters get prometheus_client's ``_total`` suffix):

- ``madakv_compressed_requests_total``: requests whose prompt was compressed.
- ``madakv_prompt_slots_total``: prompt slots those requests held before compression.
- ``madakv_reclaimed_slots_total``: slots returned to SGLang's KV pool.
- ``madakv_packing_waste_cells_total``: (slot, head, layer) cells held but not kept (docs/design.md §4).
- ``madakv_compression_seconds``: histogram of the time from scores to freed slots, per batch.
- ``madakv_skipped_requests_total``: requests served uncompressed by the skip rule, by ``reason`` (``short
  prompt``: below ``--kv-min-prompt``; ``small saving``: the budget would reclaim less than ``--kv-min-reclaim``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LABELS = ("model_name", "tp_rank", "policy", "layout")
# From a sub-millisecond decision on a GPU to seconds for a long prompt on CPU.
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class CompressionMetrics:
    """The madakv series in one prometheus registry (the default one, which multiprocess mode aggregates)."""

    def __init__(self, labels: Mapping[str, str], registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Histogram

        registry = REGISTRY if registry is None else registry
        self.labels = dict(labels)
        names = list(LABELS)
        self.requests = Counter(
            "madakv_compressed_requests", "Requests whose prompt KV was compressed.", names, registry=registry
        )
        self.prompt_slots = Counter(
            "madakv_prompt_slots",
            "Prompt KV slots held by compressed requests before compression.",
            names,
            registry=registry,
        )
        self.reclaimed = Counter(
            "madakv_reclaimed_slots", "KV slots returned to the pool by compression.", names, registry=registry
        )
        self.waste = Counter(
            "madakv_packing_waste_cells",
            "Packed (slot, head, layer) cells held but not kept.",
            names,
            registry=registry,
        )
        self.seconds = Histogram(
            "madakv_compression_seconds",
            "Time spent compressing, from window scores to freed slots.",
            names,
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.skipped = Counter(
            "madakv_skipped_requests",
            "Requests served uncompressed by the skip rule, by reason.",
            [*names, "reason"],
            registry=registry,
        )

    def record(
        self, prompt_slots: int, kept_slots: int, waste_cells: int, seconds: float, policy: str, layout: str
    ) -> None:
        labels = {**self.labels, "policy": policy, "layout": layout}
        self.requests.labels(**labels).inc()
        self.prompt_slots.labels(**labels).inc(max(prompt_slots, 0))
        self.reclaimed.labels(**labels).inc(max(prompt_slots - kept_slots, 0))
        self.waste.labels(**labels).inc(max(waste_cells, 0))
        self.seconds.labels(**labels).observe(max(seconds, 0.0))

    def record_skip(self, reason: str, policy: str, layout: str) -> None:
        self.skipped.labels(**self.labels, policy=policy, layout=layout, reason=reason).inc()


_UNDECIDED = object()
_metrics: Any = _UNDECIDED


def record_compression(
    prompt_slots: int, kept_slots: int, waste_cells: int, seconds: float, policy: str, layout: str
) -> None:
    """Count one compressed request (``policy``: the request's, which may be an override); a no-op unless SGLang
    runs with ``--enable-metrics``."""
    metrics = _active()
    if metrics is not None:
        metrics.record(prompt_slots, kept_slots, waste_cells, seconds, policy, layout)


def record_skip(reason: str, policy: str, layout: str) -> None:
    """Count one request served uncompressed by the skip rule; a no-op unless SGLang runs with
    ``--enable-metrics``."""
    metrics = _active()
    if metrics is not None:
        metrics.record_skip(reason, policy, layout)


def _active() -> CompressionMetrics | None:
    """Create the series once per process, on first use (after SGLang has set up multiprocess mode)."""
    global _metrics
    if _metrics is _UNDECIDED:
        labels = metric_labels()
        _metrics = None if labels is None else CompressionMetrics(labels)
    return _metrics  # type: ignore[no-any-return]


def metric_labels(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The labels of this process's series, or None when it must not record.

    Outside a published SGLang context (an in-process test) the multiprocess directory alone decides.
    """
    environ = os.environ if environ is None else environ
    if not environ.get(MULTIPROC_ENV):
        return None  # --enable-metrics is off: nothing would export the samples
    try:
        from sglang.srt.runtime_context import get_observability, get_parallel, get_serving

        observability = get_observability()
        rank = get_parallel().attn_tp_rank
        if not observability.enable_metrics:
            return None
        if rank != 0 and not observability.enable_metrics_for_all_schedulers:
            return None
        return {"model_name": str(get_serving().served_model_name), "tp_rank": str(get_parallel().tp_rank)}
    except (ImportError, ValueError, AttributeError):
        return {"model_name": "", "tp_rank": "0"}
