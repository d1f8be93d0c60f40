"""Paged KV-cache bookkeeping: fixed-size blocks handed out to sequences and taken back.

The cache holds `num_blocks` blocks of `block_size` token slots each; slot s of block b is global
slot b * block_size + s. A sequence with n computed tokens owns ceil(n / block_size) blocks, in
order, listed in its block table. Block 0 is never handed out: it is the zeroed "null block"
that padded attention reads point at. Freed blocks are reused last-in first-out, so a cache
allocated lazily (untouched pages) only ever touches as much memory as the peak working set.
"""
from __future__ import annotations

from vbatch.engine.sequence import Sequence


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Free-list allocator of KV-cache blocks."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError("the KV cache must hold at least two blocks (one is the null block)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: list[int] = list(range(num_blocks - 1, 0, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def can_allocate(self, seq: Sequence) -> bool:
        """True if every token of `seq` (prompt + generated) fits in the free blocks."""
        return num_blocks_for(seq.num_tokens, self.block_size) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` the blocks for all of its tokens (it must own none)."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already owns blocks")
        needed = num_blocks_for(seq.num_tokens, self.block_size)
        if needed > self.num_free_blocks:
            raise RuntimeError("allocate() called without can_allocate()")
        seq.block_table = [self.free_block_ids.pop() for _ in range(needed)]

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks to the pool."""
        self.free_block_ids.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_computed_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        """True if `seq`'s next token has a slot: it is in an owned block or a block is free."""
        return self._needs_new_block(seq) <= self.num_free_blocks

    def append_slot(self, seq: Sequence) -> None:
        """Make sure the block holding `seq`'s last token is allocated."""
        if self._needs_new_block(seq):
            seq.block_table.append(self.free_block_ids.pop())

    def _needs_new_block(self, seq: Sequence) -> int:
        return int(num_blocks_for(seq.num_tokens, self.block_size) > len(seq.block_table))
