"""Admission's KV-pool check (router.capacity): a request no worker's pool could hold is
refused at once, naming the field; pools of unknown size refuse nothing."""

from __future__ import annotations

import pytest

from pdserve.router.capacity import TooLarge, check_fits
from pdserve.router.policy import DecodeLoad, PrefillLoad

BS = 16


def _d(*sizes: int) -> list[DecodeLoad]:
    return [DecodeLoad(f"decode-{i}", num_blocks=n) for i, n in enumerate(sizes)]


def _p(*sizes: int) -> list[PrefillLoad]:
    return [PrefillLoad(f"prefill-{i}", num_blocks=n) for i, n in enumerate(sizes)]


def test_a_request_that_fits_the_largest_pool_passes() -> None:
    # 10 blocks hold 160 tokens: 150 + 10 fit exactly in the larger decode pool.
    check_fits(150, 10, _p(4, 10), _d(3, 10), BS)
    check_fits(150, 10, [], _d(10), BS)  # colocated: no prefill pool


def test_prompt_plus_max_tokens_past_every_decode_pool_names_max_tokens() -> None:
    with pytest.raises(TooLarge, match=r"^sampling\.max_tokens: .*need 11 KV blocks .* "
                       r"largest decode worker holds 10 \(160 tokens\)"):
        check_fits(150, 11, [], _d(3, 10), BS)


def test_a_prompt_past_every_decode_pool_names_the_input() -> None:
    with pytest.raises(TooLarge, match=r"^input: "):
        check_fits(170, 1, [], _d(10), BS)


def test_a_prompt_past_every_prefill_pool_names_the_input() -> None:
    with pytest.raises(TooLarge, match=r"^input: the prompt's 65 tokens need 5 KV blocks .* "
                       r"largest prefill worker holds 4"):
        check_fits(65, 1, _p(4, 2), _d(100), BS)


def test_pools_of_unknown_size_refuse_nothing() -> None:
    check_fits(10_000, 10_000, _p(0), _d(0, 0), BS)
    check_fits(10_000, 10_000, [], [], BS)
