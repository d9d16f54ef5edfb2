"""Head-wise decode on FlashInfer's tensor-core paged kernel, through "virtual requests".

Every (request b, KV head h) becomes its own request v = b * H + h with one KV head, G query heads and page size 1,
whose pages are flat cells of one layer's pool viewed as ``[cells, 1, D]`` (cell = slot * H + column): exactly
the per-head cell lists the packed layout produces. FlashInfer's ``VariableBlockSparseAttentionWrapper`` maps
heads to requests the same way internally. The tensor-core (FA2 prefill) kernel takes any G, unlike the CUDA-core
decode kernel (G in {1, 2, 3, 4, 6, 8, 16}), so Qwen2.5-VL's G = 7 works.

With ``disable_split_kv=True`` the plan depends only on the batch shape (B * H, G, D, dtypes), not on the lengths,
so one plan serves every layer of a forward: before each layer's ``run`` the wrapper is pointed at that layer's
``(indptr, indices)``. That reads FlashInfer's private ``_paged_kv_indptr_buf`` / ``_paged_kv_indices_buf``
attributes, which is why ``flashinfer-python`` is pinned (0.7.2, SGLang 0.5.23's pin) and the path is checked
against the torch reference on every GPU test run.

GPU only; nothing here imports flashinfer until :class:`FlashInferHeadwiseDecoder` is built.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's float workspace; SGLang uses the same size for decode
_LN2 = math.log(2.0)


class FlashInferHeadwiseDecoder:
    """One FlashInfer decode wrapper, planned once per batch shape and run once per layer.

    Args:
        device: a CUDA device.
    """

    name = "flashinfer"

    def __init__(self, device: torch.device | str) -> None:
        import flashinfer

        self.device = torch.device(device)
        self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._wrapper: Any = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=True, backend="fa2"
        )
        self._planned: tuple[int, int, int, torch.dtype, torch.dtype, float] | None = None
        self._ones = torch.ones(0, dtype=torch.int32, device=self.device)

    def _plan(
        self,
        virtual: int,
        group: int,
        dim: int,
        q_dtype: torch.dtype,
        kv_dtype: torch.dtype,
        scale: float,
        indptr: Tensor,
        indices: Tensor,
    ) -> None:
        shape = (virtual, group, dim, q_dtype, kv_dtype, scale)
        if self._planned == shape:
            return
        if self._ones.numel() < virtual:
            self._ones = torch.ones(max(virtual, 2 * self._ones.numel()), dtype=torch.int32, device=self.device)
        self._wrapper.plan(
            indptr,
            indices,
            self._ones[:virtual],
            group,
            1,
            dim,
            1,
            q_data_type=q_dtype,
            kv_data_type=kv_dtype,
            sm_scale=scale,
            disable_split_kv=True,
        )
        self._planned = shape

    def __call__(
        self,
        q: Tensor,
        k_cells: Tensor,
        v_cells: Tensor,
        indptr: Tensor,
        indices: Tensor,
        num_kv_heads: int,
        scale: float,
    ) -> tuple[Tensor, Tensor]:
        """Same contract as :func:`madakv_sglang.kernels.torch_decode.headwise_decode` (lse in natural log)."""
        batch, hq, dim = q.shape
        group, virtual = hq // num_kv_heads, batch * num_kv_heads
        indptr32, indices32 = indptr.to(torch.int32), indices.to(torch.int32)
        self._plan(virtual, group, dim, q.dtype, k_cells.dtype, scale, indptr32, indices32)
        self._wrapper._paged_kv_indptr_buf = indptr32
        self._wrapper._paged_kv_indices_buf = indices32
        out, lse = self._wrapper.run(
            q.reshape(virtual, group, dim), (k_cells.view(-1, 1, dim), v_cells.view(-1, 1, dim)), return_lse=True
        )
        return out.reshape(batch, hq, dim), lse.reshape(batch, hq).float() * _LN2  # FlashInfer's lse is base 2
