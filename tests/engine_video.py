"""Run one multimodal request through ``sglang.Engine`` in a fresh process, for inputs HTTP cannot carry.

Video through the server needs a decoder: SGLang 0.5.23 decodes ``video_data`` with torchcodec or decord, and
transformers' video processor fetches paths and URLs with torchcodec, none of which is installed on the CPU path
(the HTTP front end also rejects ``processor_output`` dicts). ``Engine.generate`` takes frames as an array: SGLang's
``load_video`` and the Qwen preprocessor pass ``[T, H, W, 3]`` uint8 arrays straight to the processor.

A fresh process keeps the test process free of SGLang's imports and of the ``MADAKV_KV_*`` environment that
``use_policy`` sets. Usage: ``python -m tests.engine_video SPEC.json OUT.json``; the spec holds ``model``,
``policy`` (PolicyConfig strings), ``text``, ``images`` (paths), ``videos`` (lists of frame paths), ``rid``,
``max_new_tokens`` and ``max_total_tokens``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from tests.sglang_server import CPU_ENV, STRICT_ENV


def main(spec_path: str, out_path: str) -> None:
    os.environ.update({**CPU_ENV, **STRICT_ENV})  # the same checks as the tests' servers
    with open(spec_path) as handle:
        spec: dict[str, Any] = json.load(handle)
    import numpy as np
    import sglang
    from PIL import Image

    from madakv_sglang.engine.environment import use_policy

    use_policy(**spec["policy"])
    videos = [np.stack([np.asarray(Image.open(p).convert("RGB")) for p in frames]) for frames in spec["videos"]]
    engine = sglang.Engine(
        model_path=spec["model"],
        device="cpu",
        disable_overlap_schedule=True,
        mem_fraction_static=0.3,
        dtype="float32",
        max_total_tokens=spec["max_total_tokens"],
    )
    try:
        output = engine.generate(
            prompt=spec["text"],
            image_data=spec["images"] or None,
            video_data=videos or None,
            rid=spec["rid"],
            sampling_params={"temperature": 0, "max_new_tokens": spec["max_new_tokens"], "ignore_eos": True},
            return_logprob=True,
        )
    finally:
        engine.shutdown()
    with open(out_path, "w") as handle:
        json.dump(output, handle, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
