"""The block manager's eviction order and admission count, and the scheduler's cost model, each against what
the documented policy says, worked out by hand in the test (not read back from the code under test)."""

from __future__ import annotations

import pytest

from hotcold.engine.block_manager import BlockManager
from hotcold.engine.scheduler import Scheduler

BS = 4
PA = [10 + i for i in range(10)]  # two full blocks and a partial one of 2 tokens
PB = [100 + i for i in range(10)]
FRESH = [200 + i for i in range(3)]  # shares no block with anything


def _run(bm: BlockManager, prompt: list[int], total: int, computed: int):
    """Admit a sequence, take its blocks for `total` positions and hash the ones `computed` tokens filled."""
    table = bm.allocate(prompt, total_tokens=total)
    assert table is not None
    bm.grow(table, total)
    bm.register(table, prompt + [0] * total, computed)
    return table


def _take_order(bm: BlockManager, num: int) -> list[int]:
    """The blocks the next allocations take, in order (a prompt hitting nothing, `num` blocks long)."""
    table = bm.allocate(FRESH, total_tokens=num * BS)
    assert table is not None and table.blocks == []
    bm.grow(table, num * BS)
    return table.blocks


def _two_released_sequences():
    """A pool of 6 blocks filled by A then B (2 hashed blocks and 1 partial each), A released before B."""
    bm = BlockManager(num_blocks=6, block_size=BS)
    a, b = _run(bm, PA, 12, 10), _run(bm, PB, 12, 10)
    blocks_a, blocks_b = list(a.blocks), list(b.blocks)
    assert len(bm.free) == 0 and len(bm.cached) == 4
    bm.release(a)
    bm.release(b)
    return bm, blocks_a, blocks_b


def test_release_reuses_partial_blocks_first_then_lru_cached_with_the_prefix_head_last():
    """Policy: partial (unhashable) blocks are reused first; cached blocks go least recently used first, and
    within one released prefix its later blocks go before its first, so a shared head survives longest."""
    bm, (a0, a1, a_part), (b0, b1, b_part) = _two_released_sequences()
    order = _take_order(bm, 6)
    assert set(order[:2]) == {a_part, b_part}
    assert order[2:] == [a1, a0, b1, b0]  # A released first: its blocks are the least recently used


def test_evicting_cached_blocks_keeps_the_prefix_head_longest():
    """After three blocks are taken (both partials, then A's second block), A's head is still a cache hit,
    A's second block is not, and all of B's prefix is."""
    bm, (a0, _, _), (b0, b1, _) = _two_released_sequences()
    _take_order(bm, 3)
    hit_a = bm.allocate(PA, total_tokens=12)
    assert hit_a.blocks == [a0]
    bm.release(hit_a)
    assert bm.allocate(PB, total_tokens=12).blocks == [b0, b1]


def test_a_cache_hit_makes_the_reused_blocks_most_recently_used():
    """A third sequence reusing A's prefix and then released makes A's blocks newer than B's: B's go first.
    Its own partial block (taken from the front, a partial one) goes back to the front."""
    bm, (a0, a1, a_part), (b0, b1, b_part) = _two_released_sequences()
    c = bm.allocate(PA[:9], total_tokens=12)  # 9 tokens: both of A's full blocks are found
    assert c.blocks == [a0, a1] and c.promised == 1
    bm.grow(c, 12)
    assert c.blocks[2] in (a_part, b_part)
    bm.release(c)
    order = _take_order(bm, 6)
    assert set(order[:2]) == {a_part, b_part}
    assert order[2:] == [b1, b0, a1, a0]


def test_admission_counts_cached_unreferenced_blocks_it_reuses():
    """A request reusing cached blocks that nobody references takes them out of the free pool, so they cannot
    also be promised as fresh blocks: admit exactly what fits, and every promised block can then be taken."""
    num_blocks = 8
    bm = BlockManager(num_blocks=num_blocks, block_size=BS)
    prompt = [300 + i for i in range(24)]
    bm.release(_run(bm, prompt, 24, 24))  # 6 cached, unreferenced blocks; 2 never used
    assert len(bm.cached) == 6 and bm.num_referenced == 0
    e = bm.allocate([7, 7, 7, 7], total_tokens=8)  # another sequence: 2 promised, 1 of them taken now
    bm.grow(e, 4)
    # by hand: 8 blocks - 1 referenced by E = 7 unreferenced; 1 more is promised to E; the new request
    # reuses 2 of the 7 (its 12-token prompt's first two blocks are cached); fresh blocks left: 7 - 1 - 2 = 4
    request = prompt[:8] + [400, 401, 402, 403]
    reused, fresh_left = 2, num_blocks - 1 - 1 - 2
    largest_fit = (reused + fresh_left) * BS  # positions the request can hold
    assert bm.allocate(request, total_tokens=largest_fit + 1) is None  # one block more than fits
    d = bm.allocate(request, total_tokens=largest_fit)
    assert d is not None and len(d.blocks) == reused and d.promised == fresh_left
    bm.grow(d, largest_fit)  # neither grow may run out of blocks
    bm.grow(e, 8)
    assert len(bm.free) == 0 and bm.num_referenced == num_blocks
    # blocks found but already referenced are not taken from the pool: a request needing no fresh block fits
    f = bm.allocate(prompt[:9], total_tokens=8)
    assert f is not None and f.blocks == d.blocks[:2] and f.promised == 0
    assert all(bm.blocks[b].ref_count == 2 for b in f.blocks)


@pytest.mark.parametrize("attention_scale", [37.0, 512.0])
def test_step_cost_is_the_sum_over_positions_of_the_per_token_cost(attention_scale):
    """The documented model: a token at position p costs 1 + p / attention_scale token-equivalents."""
    sched = Scheduler(4, 64, BlockManager(num_blocks=4, block_size=BS), attention_scale=attention_scale)
    for start, n in [(0, 1), (0, 2), (0, 50), (7, 1), (7, 13), (1000, 64), (4095, 300)]:
        want = sum(1.0 + p / attention_scale for p in range(start, start + n))
        assert sched.cost(start, n) == pytest.approx(want, rel=1e-12)
    unscaled = Scheduler(4, 64, BlockManager(num_blocks=4, block_size=BS))  # attention_scale=inf: 1 per token
    assert unscaled.cost(500, 17) == 17
