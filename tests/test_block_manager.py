"""The paged KV-cache allocator: exact block accounting, never block 0, LIFO reuse.

Proves that `BlockManager` hands each sequence exactly ceil(num_tokens / block_size) blocks,
never hands out the null block 0, reuses freed blocks last-in first-out, grows a block table
only when the next token crosses a block boundary, and, under long random alloc / append / free
runs (a hypothesis state machine), never gives one block to two sequences nor loses a block.
"""
from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vbatch.engine.block_manager import BlockManager, num_blocks_for
from vbatch.engine.sampling_params import SamplingParams
from vbatch.engine.sequence import Sequence

PARAMS = SamplingParams(temperature=0.0)


def make_seq(seq_id: int, num_tokens: int) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", list(range(num_tokens)), PARAMS, seed=0,
                    row_key=f"k{seq_id}")


@pytest.mark.parametrize("num_tokens, block_size, expected",
                         [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2), (9, 4, 3),
                          (1, 1, 1), (7, 1, 7), (16, 16, 1), (17, 16, 2)])
def test_num_blocks_for_is_ceil(num_tokens, block_size, expected):
    assert num_blocks_for(num_tokens, block_size) == expected


def test_needs_two_blocks():
    with pytest.raises(ValueError, match="null block"):
        BlockManager(1, 4, enable_prefix_caching=False)
    assert BlockManager(2, 4, enable_prefix_caching=False).num_free_blocks == 1


def test_allocate_and_free_accounting():
    bm = BlockManager(10, 4, enable_prefix_caching=False)
    assert bm.num_free_blocks == 9                    # block 0 is reserved
    a, b = make_seq(0, 5), make_seq(1, 12)
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 2 and bm.num_free_blocks == 7
    bm.allocate(b)
    assert len(b.block_table) == 3 and bm.num_free_blocks == 4
    assert not set(a.block_table) & set(b.block_table)
    a.num_computed_tokens = 5
    bm.free(a)
    assert a.block_table == [] and a.num_computed_tokens == 0
    assert bm.num_free_blocks == 6
    bm.free(b)
    assert bm.num_free_blocks == 9
    assert sorted(bm.free_block_ids) == list(range(1, 10))


def test_first_blocks_are_handed_out_in_ascending_order():
    bm = BlockManager(6, 2, enable_prefix_caching=False)
    seq = make_seq(0, 9)                              # 5 blocks: all of them
    bm.allocate(seq)
    assert seq.block_table == [1, 2, 3, 4, 5]
    assert bm.num_free_blocks == 0


def test_block_zero_is_never_handed_out():
    bm = BlockManager(5, 1, enable_prefix_caching=False)
    seqs = [make_seq(i, 1) for i in range(4)]
    for seq in seqs:
        bm.allocate(seq)
    assert sorted(b for s in seqs for b in s.block_table) == [1, 2, 3, 4]
    assert not bm.can_allocate(make_seq(9, 1))
    with pytest.raises(RuntimeError):
        bm.allocate(make_seq(9, 1))
    # grow one past the boundary: no block left, and still never 0
    seqs[0].append_token(0)
    assert not bm.can_append(seqs[0])


def test_can_allocate_counts_prompt_and_generated_tokens():
    bm = BlockManager(3, 4, enable_prefix_caching=False)  # 2 usable blocks = 8 slots
    seq = make_seq(0, 7)
    seq.append_token(1)
    assert seq.num_tokens == 8 and bm.can_allocate(seq)
    seq.append_token(2)
    assert not bm.can_allocate(seq)


def test_allocate_twice_is_an_error():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    seq = make_seq(0, 3)
    bm.allocate(seq)
    with pytest.raises(RuntimeError, match="already owns"):
        bm.allocate(seq)


def test_freed_blocks_are_reused_last_in_first_out():
    bm = BlockManager(20, 4, enable_prefix_caching=False)
    a, b = make_seq(0, 12), make_seq(1, 8)
    bm.allocate(a)
    bm.allocate(b)
    freed = list(a.block_table)
    bm.free(a)
    c = make_seq(2, 12)
    bm.allocate(c)
    # the most recently freed blocks come back first, and in the same order as before
    assert c.block_table == freed
    d = make_seq(3, 4)
    bm.allocate(d)
    assert d.block_table == [max(b.block_table) + 1]  # then fresh blocks, lowest first


def test_lifo_single_block_reuse():
    bm = BlockManager(20, 4, enable_prefix_caching=False)
    seqs = [make_seq(i, 4) for i in range(3)]
    for s in seqs:
        bm.allocate(s)
    last = seqs[1].block_table[0]
    bm.free(seqs[1])
    fresh = make_seq(9, 1)
    bm.allocate(fresh)
    assert fresh.block_table == [last]


def test_append_slot_only_at_block_boundaries():
    bs = 4
    bm = BlockManager(10, bs, enable_prefix_caching=False)
    seq = make_seq(0, 3)
    bm.allocate(seq)
    assert len(seq.block_table) == 1
    for n in range(4, 4 * bs + 1):                    # grow token by token up to 4 full blocks
        seq.append_token(n)
        assert seq.num_tokens == n
        assert bm.can_append(seq)
        free_before = bm.num_free_blocks
        bm.append_slot(seq)
        crossed = (n - 1) % bs == 0                   # token n sits first in a new block
        assert bm.num_free_blocks == free_before - int(crossed)
        assert len(seq.block_table) == num_blocks_for(n, bs)
        bm.append_slot(seq)                           # idempotent
        assert len(seq.block_table) == num_blocks_for(n, bs)


def test_can_append_without_free_blocks():
    bm = BlockManager(3, 2, enable_prefix_caching=False)                           # 2 usable blocks
    seq = make_seq(0, 2)
    other = make_seq(1, 2)
    bm.allocate(seq)
    bm.allocate(other)
    assert bm.num_free_blocks == 0
    seq.num_computed_tokens = 2
    seq.append_token(7)                               # token 3 needs a second block
    assert not bm.can_append(seq)
    bm.free(other)
    assert bm.can_append(seq)
    bm.append_slot(seq)
    assert len(seq.block_table) == 2
    seq.append_token(8)                               # token 4: still in the second block
    assert bm.num_free_blocks == 0 and bm.can_append(seq)
    seq.append_token(9)                               # token 5: a third block, none left
    assert not bm.can_append(seq)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / grow / free; blocks are conserved and owned by at most one sequence."""

    NUM_BLOCKS = 12
    BLOCK_SIZE = 3
    PREFIX_CACHING = False

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(self.NUM_BLOCKS, self.BLOCK_SIZE,
                               enable_prefix_caching=self.PREFIX_CACHING)
        self.live: list[Sequence] = []
        self.next_id = 0

    @rule(num_tokens=st.integers(1, 20))
    def allocate(self, num_tokens):
        seq = make_seq(self.next_id, num_tokens)
        self.next_id += 1
        expected = num_blocks_for(num_tokens, self.BLOCK_SIZE) <= self.bm.num_free_blocks
        assert self.bm.can_allocate(seq) == expected
        if expected:
            free_before = self.bm.num_free_blocks
            self.bm.allocate(seq)
            assert len(seq.block_table) == num_blocks_for(num_tokens, self.BLOCK_SIZE)
            assert self.bm.num_free_blocks == free_before - len(seq.block_table)
            self.live.append(seq)
        else:
            with pytest.raises(RuntimeError):
                self.bm.allocate(seq)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 1000))
    def grow(self, index):
        seq = self.live[index % len(self.live)]
        seq.append_token(0)
        if self.bm.can_append(seq):
            self.bm.append_slot(seq)
            assert len(seq.block_table) == num_blocks_for(seq.num_tokens, self.BLOCK_SIZE)
        else:
            assert self.bm.num_free_blocks == 0
            seq.token_ids.pop()                       # the scheduler would preempt instead

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 1000))
    def free(self, index):
        seq = self.live.pop(index % len(self.live))
        n = len(seq.block_table)
        free_before = self.bm.num_free_blocks
        self.bm.free(seq)
        assert self.bm.num_free_blocks == free_before + n
        assert seq.block_table == []

    @invariant()
    def conserved_and_exclusive(self):
        owned = [b for s in self.live for b in s.block_table]
        assert len(owned) == len(set(owned)), "a block is owned by two sequences"
        assert 0 not in owned and 0 not in self.bm.free_block_ids
        assert not set(owned) & set(self.bm.free_block_ids), "an owned block is also free"
        assert len(self.bm.free_block_ids) == len(set(self.bm.free_block_ids))
        assert len(owned) + self.bm.num_free_blocks == self.NUM_BLOCKS - 1
        assert set(owned) | set(self.bm.free_block_ids) == set(range(1, self.NUM_BLOCKS))


BlockManagerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                                 deadline=None, derandomize=True)
TestBlockManagerMachine = BlockManagerMachine.TestCase


# ---- prefix caching ------------------------------------------------------------------------

def allocate_and_compute(bm: BlockManager, seq: Sequence) -> None:
    """Allocate `seq` and compute all its tokens, as a scheduled prefill step does."""
    bm.allocate(seq)
    bm.cache_blocks(seq, seq.num_tokens)


def _seq_with(seq_id, tokens):
    seq = make_seq(seq_id, len(tokens))
    seq.token_ids = list(tokens)
    return seq


def test_shared_prefix_blocks_are_reused_and_reference_counted():
    bm = BlockManager(10, 4)
    prefix = [7, 7, 7, 7, 8, 8, 8, 8]
    a = _seq_with(0, prefix + [1, 2])
    b = _seq_with(1, prefix + [3])
    allocate_and_compute(bm, a)
    assert a.num_computed_tokens == 0 and len(a.block_table) == 3
    free_before = bm.num_free_blocks
    allocate_and_compute(bm, b)
    assert b.block_table[:2] == a.block_table[:2]           # both prefix blocks shared
    assert b.num_computed_tokens == 8                        # only the last token is computed
    assert bm.num_free_blocks == free_before - 1
    bm.free(a)
    assert bm.num_free_blocks == free_before                 # shared blocks still held by b
    bm.free(b)
    assert bm.num_free_blocks == 9


def test_last_token_is_always_computed():
    bm = BlockManager(10, 4)
    tokens = [5] * 8
    allocate_and_compute(bm, _seq_with(0, tokens))
    again = _seq_with(1, tokens)
    allocate_and_compute(bm, again)
    assert again.num_computed_tokens == 4                    # block 2 holds the last token


def test_freed_blocks_keep_their_hash_until_reused():
    bm = BlockManager(4, 2)                                  # 3 usable blocks
    first = _seq_with(0, [1, 2, 3, 4, 9])
    allocate_and_compute(bm, first)
    bm.free(first)
    hit = _seq_with(1, [1, 2, 3, 4, 5])
    allocate_and_compute(bm, hit)
    assert hit.num_computed_tokens == 4 and bm.num_free_blocks == 0
    bm.free(hit)
    other = _seq_with(2, [6, 6, 6, 6, 6, 6])                # takes every block: hashes evicted
    allocate_and_compute(bm, other)
    bm.free(other)
    miss = _seq_with(3, [1, 2, 3, 4, 5])
    allocate_and_compute(bm, miss)
    assert miss.num_computed_tokens == 0


def test_chained_hash_differs_after_a_different_block():
    bm = BlockManager(10, 2)
    allocate_and_compute(bm, _seq_with(0, [1, 1, 2, 2, 0]))
    other = _seq_with(1, [9, 9, 2, 2, 0])                   # same 2nd block, other prefix
    allocate_and_compute(bm, other)
    assert other.num_computed_tokens == 0


def test_can_allocate_counts_hits_on_live_blocks_as_free_of_charge():
    bm = BlockManager(4, 2)                                  # 3 usable blocks
    allocate_and_compute(bm, _seq_with(0, [1, 2, 3, 4, 5]))               # uses all 3
    twin = _seq_with(1, [1, 2, 3, 4, 7])
    assert not bm.can_allocate(twin)                         # needs 1 new block, none free
    assert not bm.can_allocate(_seq_with(3, [8, 8, 8]))


def test_blocks_are_offered_only_once_a_step_computes_them():
    bm = BlockManager(10, 4)
    prefix = [7, 7, 7, 7, 8, 8, 8, 8]
    first = _seq_with(0, prefix + [1])
    bm.allocate(first)                                       # not computed by any step yet
    early = _seq_with(1, prefix + [2])
    bm.allocate(early)
    assert early.num_computed_tokens == 0                    # nothing shared
    bm.cache_blocks(first, 5)                                # a chunk of 5 tokens: block 0
    later = _seq_with(2, prefix + [3])
    bm.allocate(later)
    assert later.num_computed_tokens == 4 and later.block_table[0] == first.block_table[0]
