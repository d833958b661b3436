import pytest
import torch

from pdserve.kernels.kv_checksum import kv_checksum, kv_checksum_ref


@pytest.mark.parametrize("shape", [(2, 3, 16, 2, 32), (7,), (1000, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_checksum_equals_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert int(kv_checksum(x, block=256)) == int(kv_checksum_ref(x))


def test_checksum_sees_swapped_blocks_and_single_bits() -> None:
    x = torch.randn(2, 4, 16, 2, 8, generator=torch.Generator().manual_seed(2))
    base = int(kv_checksum_ref(x))
    swapped = x.clone()
    swapped[:, [0, 1]] = x[:, [1, 0]]
    assert int(kv_checksum_ref(swapped)) != base
    flipped = x.clone()
    flipped.view(torch.int32).view(-1)[123] ^= 1
    assert int(kv_checksum_ref(flipped)) != base
    assert int(kv_checksum(flipped, block=128)) == int(kv_checksum_ref(flipped))
