"""The FlashInfer head-wise decode (``kernels/flashinfer_decode.py``) against the torch reference, on a GPU.

Every test here needs CUDA and the flashinfer-python wheel (it JIT-compiles its kernels); on the CPU machine the
whole module is reported as skipped. Inputs are random on every run (the seed is printed on failure).
"""

from __future__ import annotations

import os

import pytest
import torch

from madakv_sglang.kernels.torch_decode import headwise_decode

pytestmark = pytest.mark.gpu

# bf16 keeps 8 mantissa bits: q, k, v and the probabilities are rounded once each, so outputs of unit-scale
# attention differ from the float32 reference by a few 1e-3; fp16 keeps 11 bits.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _tables(lengths: list[int], cells: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    indptr = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    indptr[1:] = torch.tensor(lengths).cumsum(0)
    indices = torch.randint(1, cells, (int(indptr[-1]),), generator=generator)
    return indptr, indices


@pytest.fixture
def seed() -> int:
    value = int.from_bytes(os.urandom(4), "little")
    print(f"seed {value}")
    return value


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("hq", "hkv", "dim"), [(28, 4, 128), (32, 32, 128), (8, 2, 64), (4, 4, 64)])
def test_flashinfer_matches_the_reference(dtype: torch.dtype, hq: int, hkv: int, dim: int, seed: int) -> None:
    from madakv_sglang.kernels.flashinfer_decode import FlashInferHeadwiseDecoder

    generator = torch.Generator().manual_seed(seed)
    batch, slots = 8, 4096
    cells = slots * hkv
    decoder = FlashInferHeadwiseDecoder("cuda")
    k = torch.randn(cells, dim, generator=generator).to("cuda", dtype)
    v = torch.randn(cells, dim, generator=generator).to("cuda", dtype)
    q = torch.randn(batch, hq, dim, generator=generator).to("cuda", dtype)
    for layer in range(3):  # one plan, three layers with their own tables (the per-layer buffer swap)
        lengths = torch.randint(0, 700, (batch * hkv,), generator=generator).tolist()
        lengths[0], lengths[-1] = 0, 1  # an empty head (out 0, lse -inf) and a single-entry head
        indptr, indices = _tables(lengths, cells, generator)
        out = decoder(q, k, v, indptr.cuda(), indices.cuda(), hkv, dim**-0.5)
        ref_out, ref_lse = headwise_decode(
            q.float(), k.float(), v.float(), indptr.cuda(), indices.cuda(), hkv, dim**-0.5
        )
        torch.testing.assert_close(out[0].float(), ref_out, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(out[1][finite], ref_lse[finite], atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
        assert torch.all(out[1][~finite] == float("-inf")), f"layer {layer}: an empty head must give lse -inf"


@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_decode_over_a_shared_pool_past_32_bit_byte_offsets(backend: str, seed: int) -> None:
    """The ``shared`` layout hands the kernels every layer's cells as one array and cell ids up to 2^31: a cell's
    byte offset (id x D x 2) passes 2^32 here, so any 32-bit offset arithmetic in a kernel reads the wrong cell.
    Ids are drawn from the top of the array, the rest of which stays unread (``torch.empty``)."""
    from madakv_sglang.kernels import headwise_decode as dispatch_decode

    generator = torch.Generator().manual_seed(seed)
    hq, hkv, dim, batch = 8, 2, 128, 4
    cells = 2**25 + 7  # 2^25 cells x 128 x 2 bytes = 8 GiB each for K and V: offsets above 2^32 bytes
    k = torch.empty(cells, dim, dtype=torch.bfloat16, device="cuda")
    v = torch.empty(cells, dim, dtype=torch.bfloat16, device="cuda")
    lengths = torch.randint(1, 300, (batch * hkv,), generator=generator).tolist()
    indptr = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    indptr[1:] = torch.tensor(lengths).cumsum(0)
    indices = torch.randint(cells - 2**20, cells, (int(indptr[-1]),), generator=generator)
    used = indices.unique().cuda()
    k[used] = torch.randn(used.numel(), dim, generator=generator).to("cuda", torch.bfloat16)
    v[used] = torch.randn(used.numel(), dim, generator=generator).to("cuda", torch.bfloat16)
    q = torch.randn(batch, hq, dim, generator=generator).to("cuda", torch.bfloat16)
    out, lse = dispatch_decode(q, k, v, indptr.cuda(), indices.cuda().to(torch.int32), hkv, dim**-0.5, backend=backend)
    ref_out, ref_lse = headwise_decode(
        q.float(), k, v, indptr.cuda(), indices.cuda(), hkv, dim**-0.5
    )  # gathers, then casts
    torch.testing.assert_close(out.float(), ref_out, atol=TOLERANCE[torch.bfloat16], rtol=TOLERANCE[torch.bfloat16])
    torch.testing.assert_close(lse, ref_lse, atol=TOLERANCE[torch.bfloat16], rtol=TOLERANCE[torch.bfloat16])
