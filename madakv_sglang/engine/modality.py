"""Visual-position masks from SGLang's multimodal inputs.

SGLang records, per image or video item, inclusive ``(start, end)`` token ranges in prompt coordinates
(``MultimodalDataItem.offsets``). The embedding step clears ``forward_batch.mm_inputs`` before the decoder
layers run, so the backend reads them in ``init_forward_metadata``. Video frames count as visual; audio is
treated as text until the policy has a third modality. A request without items gets an all-text mask: MadaKV
then runs on the text modality alone (its visual share is zero).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

VISUAL_MODALITIES = frozenset({"IMAGE", "VIDEO"})


def visual_mask(mm_inputs: Any, length: int) -> Tensor:
    """``[length]`` bool, True where an image or video token sits; ranges are clipped to ``length``."""
    mask = torch.zeros(length, dtype=torch.bool)
    if mm_inputs is None:
        return mask
    for item in getattr(mm_inputs, "mm_items", None) or ():
        modality = getattr(getattr(item, "modality", None), "name", "")
        if modality not in VISUAL_MODALITIES:
            continue
        for start, end in getattr(item, "offsets", None) or ():
            mask[max(int(start), 0) : min(int(end) + 1, length)] = True
    return mask
