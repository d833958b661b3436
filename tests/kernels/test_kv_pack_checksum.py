"""The fused pack/unpack + checksum kernel (the KV channel's) against its references: several
layers per launch, word offsets inside a transfer, and the pieces adding up to the checksum
of the whole payload."""

import pytest
import torch

from pdserve.kernels.kv_checksum import kv_checksum, kv_checksum_ref
from pdserve.kernels.kv_pack import (
    pack_kv_checksum,
    pack_kv_checksum_ref,
    unpack_kv_checksum,
    unpack_kv_checksum_ref,
)

pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layers", [1, 3])
def test_pack_unpack_checksum(dtype: torch.dtype, layers: int) -> None:
    gen = torch.Generator().manual_seed(layers)
    pool = torch.randn(4, 2, 10, 16, 2, 32, generator=gen).to(dtype)  # [L, 2, N, bs, Hk, D]
    ids = torch.tensor([7, 0, 9, 3, 5])
    caches = pool[1 : 1 + layers]
    out = torch.empty(layers, 2, 5, 16, 2, 32, dtype=dtype)
    out_ref = torch.empty_like(out)
    offset = 12345
    part = pack_kv_checksum(caches, ids, out, offset)
    part_ref = pack_kv_checksum_ref(caches, ids, out_ref, offset)
    assert torch.equal(out, out_ref)
    assert int(part) == int(part_ref) == int(kv_checksum_ref(out, offset))
    assert int(part) != int(kv_checksum_ref(out, 0))  # the offset matters

    dst = torch.zeros_like(pool)
    dst_ref = torch.zeros_like(pool)
    dst_ids = torch.tensor([1, 2, 8, 4, 6])
    back = unpack_kv_checksum(out, dst[:layers], dst_ids, offset)
    back_ref = unpack_kv_checksum_ref(out, dst_ref[:layers], dst_ids, offset)
    assert torch.equal(dst, dst_ref)
    assert torch.equal(dst[:layers][:, :, dst_ids], caches[:, :, ids])
    assert int(back) == int(back_ref) == int(part)


def test_message_checksums_add_up_to_the_whole() -> None:
    """A transfer sent as messages of 2 + 2 + 1 layers: the messages' checksums at their
    word offsets sum (mod 2**64) to the checksum of the whole packed payload, and a swap of
    two layers changes it."""
    gen = torch.Generator().manual_seed(9)
    pool = torch.randn(5, 2, 6, 16, 1, 64, generator=gen).to(torch.bfloat16)
    ids = torch.tensor([4, 1, 5])
    whole = torch.empty(5, 2, 3, 16, 1, 64, dtype=torch.bfloat16)
    words_per_layer = whole[0].numel() * 2 // 4
    total = torch.zeros((), dtype=torch.int64)
    for start, stop in ((0, 2), (2, 4), (4, 5)):
        total += pack_kv_checksum(pool[start:stop], ids, whole[start:stop],
                                  start * words_per_layer)
    assert int(total) == int(kv_checksum_ref(whole)) == int(kv_checksum(whole, block=512))
    swapped = whole[[1, 0, 2, 3, 4]].contiguous()
    assert int(kv_checksum_ref(swapped)) != int(total)


@pytest.mark.parametrize("direction", ["pack", "unpack"])
def test_shares_add_into_a_running_checksum(direction: str) -> None:
    """Given ``acc``, each message's share is added to it in place (the KV channel's running
    checksum), launcher and reference alike; the sum wraps mod 2**64 as the checksum does."""
    gen = torch.Generator().manual_seed(3)
    pool = torch.randint(-2**15, 2**15, (4, 2, 6, 16, 1, 64), generator=gen,
                         dtype=torch.int16).view(torch.bfloat16)
    ids = torch.tensor([5, 0, 2])
    whole = torch.empty(4, 2, 3, 16, 1, 64, dtype=torch.bfloat16)
    for start, stop in ((0, 2), (2, 4)):
        pack_kv_checksum_ref(pool[start:stop], ids, whole[start:stop], 0)
    words_per_layer = whole[0].numel() * 2 // 4
    start_at = (1 << 63) - 5  # close to the wrap
    for fn in ((pack_kv_checksum, pack_kv_checksum_ref) if direction == "pack"
               else (unpack_kv_checksum, unpack_kv_checksum_ref)):
        acc = torch.tensor(start_at, dtype=torch.int64)
        dst = torch.zeros_like(pool)
        for start, stop in ((0, 2), (2, 4)):
            if direction == "pack":
                got = fn(pool[start:stop], ids, torch.empty_like(whole[start:stop]),
                         start * words_per_layer, acc)
            else:
                got = fn(whole[start:stop], dst[start:stop], ids, start * words_per_layer, acc)
            assert got is acc
        want = (start_at + int(kv_checksum_ref(whole))) & ((1 << 64) - 1)
        assert int(acc) & ((1 << 64) - 1) == want


def test_empty_and_unaligned() -> None:
    cache = torch.zeros(1, 2, 4, 16, 1, 32)
    out = torch.empty(1, 2, 0, 16, 1, 32)
    assert int(pack_kv_checksum(cache, torch.empty(0, dtype=torch.int64), out, 0)) == 0
    # fp16 rows of an odd head_dim are not whole 32-bit words: no checksum there
    odd = torch.zeros(1, 2, 4, 1, 1, 3, dtype=torch.float16)
    with pytest.raises(AssertionError, match="32-bit-word"):
        pack_kv_checksum(odd, torch.tensor([1]), torch.empty(1, 2, 1, 1, 1, 3,
                                                              dtype=torch.float16), 0)
