"""Decode-path kernels (installed as ``madakv_sglang.kernels``).

``headwise_decode`` is the entry point the attention backend calls. On CPU it is the torch reference
(``torch_decode``); GPU kernels (Triton, FlashInfer virtual requests) register here and are checked
against that reference.
"""

from .dispatch import KERNEL_ENV, available_backends, decode_kernel_for, headwise_decode

__all__ = ["KERNEL_ENV", "available_backends", "decode_kernel_for", "headwise_decode"]
