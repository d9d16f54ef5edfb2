"""What the scheduler tells the backend about the requests of the batch it is about to run.

A ``ForwardBatch`` carries tensors, not requests: whether an extend finishes a prompt (chunked prefill), the
request's own policy override and a retracted request's stored kept set are only known to the scheduler. The
``reclaim`` hook on ``Scheduler.run_batch`` publishes them here, in batch order, for the duration of the run.
Without a scheduler (``bench_one_batch``) nothing is published and every extend counts as a whole prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from madakv_sglang.config import PolicyConfig
from madakv_sglang.sglang.ledger import Replay


@dataclass(frozen=True)
class RequestInfo:
    """Attributes:
    rid: the request id (for logs).
    full_len: ``len(origin_input_ids) + len(output_ids)``: the prefill is complete when the extend reaches it.
    config: the policy settings for this request (server flags, or its per-request override).
    replay: the kept set decided before a retraction (positions past its n0 are the outputs generated
        before it and are all kept), so re-prefill does not depend on memory pressure.
    """

    rid: str
    full_len: int
    config: PolicyConfig
    replay: Replay | None = None


_current: list[RequestInfo] | None = None


@contextmanager
def publish(infos: list[RequestInfo]) -> Iterator[None]:
    global _current
    previous, _current = _current, infos
    try:
        yield
    finally:
        _current = previous


def current() -> list[RequestInfo] | None:
    return _current
