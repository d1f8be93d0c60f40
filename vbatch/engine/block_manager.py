"""Paged KV-cache bookkeeping: fixed-size blocks handed out to sequences and taken back, with
prefix caching.

The cache holds `num_blocks` blocks of `block_size` token slots each; slot s of block b is global
slot b * block_size + s. A sequence with n tokens owns ceil(n / block_size) blocks, in order,
listed in its block table. Block 0 is never handed out: it is the zeroed "null block" that
padded attention reads point at.

Prefix caching: a full block of a prompt is identified by a hash chained over all tokens up to
its end, h_i = hash(h_{i-1}, tokens of block i). When a new sequence's leading full blocks have
hashes already in the cache, it shares those blocks (reference counted) and skips computing
them, e.g. a chat template's system prompt shared by every row. A freed block keeps its hash
and can still be hit until the block is handed out again. The last prompt token is always
computed (its logits are needed), so at most (n - 1) // block_size blocks are shared. A block
enters the index only once a scheduled step computes it (`cache_blocks`, called by the
scheduler for the tokens it schedules): a prompt prefilled in chunks over several steps never
offers a block whose keys/values are not written yet. (Within one step every layer writes all
new keys/values before attending, so a block computed in a step may be shared in that step.)

Samples of one request share blocks too: `fork` gives a new sample the parent's block table
(reference counted), and a shared block is copied before it is written (copy-on-write:
`append_slot` returns the (source, destination) copy the workers must do first), so a prompt is
computed and stored once for all its samples.

Free blocks are reused last-in first-out, so a cache allocated lazily (untouched pages) only
ever touches as much memory as the peak working set.
"""
from __future__ import annotations

from vbatch.engine.sequence import Sequence


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Reference-counted allocator of KV-cache blocks with a prefix-hash index."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 block_ids: range | None = None):
        """Manage blocks 1 .. num_blocks - 1 of a cache of `num_blocks` blocks, or only the
        ids in `block_ids` (a slice of a shared cache: each pipeline virtual engine owns one)."""
        block_ids = range(1, num_blocks) if block_ids is None else block_ids
        if len(block_ids) < 1 or block_ids.start < 1 or block_ids.stop > num_blocks:
            raise ValueError("the KV cache must hold at least two blocks (one is the null block)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_block_ids: list[int] = list(reversed(block_ids))
        self.ref_counts = [0] * num_blocks
        self.block_hash: dict[int, tuple[int, tuple[int, ...]]] = {}   # block -> (hash, tokens)
        self.hash_to_block: dict[int, int] = {}
        self.num_cached_token_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _prefix_hashes(self, seq: Sequence) -> list[tuple[int, tuple[int, ...]]]:
        """(chained hash, tokens) of every shareable full block of `seq` (last token excluded)."""
        if not self.enable_prefix_caching:
            return []
        bs, out, prev = self.block_size, [], 0
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            prev = hash((prev, tokens))
            out.append((prev, tokens))
        return out

    def _cached_block(self, block_hash: int, tokens: tuple[int, ...]) -> int | None:
        block_id = self.hash_to_block.get(block_hash)
        if block_id is not None and self.block_hash.get(block_id, (None, None))[1] == tokens:
            return block_id
        return None

    def _num_new_blocks(self, seq: Sequence, use_cached: bool = True) -> int:
        """Blocks `seq` would take off the free list (cache hits on live blocks cost none)."""
        needed = num_blocks_for(seq.num_tokens, self.block_size)
        for block_hash, tokens in self._prefix_hashes(seq) if use_cached else ():
            block_id = self._cached_block(block_hash, tokens)
            if block_id is None:
                break
            if self.ref_counts[block_id] > 0:
                needed -= 1
        return needed

    def can_allocate(self, seq: Sequence, use_cached: bool = True) -> bool:
        """True if every token of `seq` (prompt + generated) fits in the free blocks."""
        return self._num_new_blocks(seq, use_cached) <= self.num_free_blocks

    def allocate(self, seq: Sequence, use_cached: bool = True) -> None:
        """Give `seq` blocks for all of its tokens, sharing cached prefix blocks; sets
        `seq.num_computed_tokens` to the number of tokens whose KV is already cached.

        `use_cached=False` computes every token (a request that needs the logits of each prompt
        position); its full blocks are still registered, for later requests to hit."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already owns blocks")
        if not self.can_allocate(seq, use_cached):
            raise RuntimeError("allocate() called without can_allocate()")
        table: list[int] = []
        hashes = self._prefix_hashes(seq)
        num_hit_blocks = 0
        for block_hash, tokens in hashes if use_cached else ():
            block_id = self._cached_block(block_hash, tokens)
            if block_id is None:
                break
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.remove(block_id)
            self.ref_counts[block_id] += 1
            table.append(block_id)
            num_hit_blocks += 1
        for _ in range(num_hit_blocks, num_blocks_for(seq.num_tokens, self.block_size)):
            table.append(self._take_free_block())
        seq.block_table = table
        seq.block_hashes = hashes
        seq.num_cached_blocks = num_hit_blocks
        seq.num_computed_tokens = num_hit_blocks * self.block_size
        self.num_cached_token_hits += seq.num_computed_tokens

    def cache_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Enter `seq`'s full prompt blocks within its first `num_tokens` tokens into the
        prefix index: the step being scheduled computes them (see module docstring)."""
        end = min(len(seq.block_hashes), num_tokens // self.block_size)
        for index in range(seq.num_cached_blocks, end):
            self._register(seq.block_table[index], *seq.block_hashes[index])
        seq.num_cached_blocks = max(seq.num_cached_blocks, end)

    def _take_free_block(self) -> int:
        block_id = self.free_block_ids.pop()
        old = self.block_hash.pop(block_id, None)
        if old is not None and self.hash_to_block.get(old[0]) == block_id:
            del self.hash_to_block[old[0]]
        self.ref_counts[block_id] = 1
        return block_id

    def _register(self, block_id: int, block_hash: int, tokens: tuple[int, ...]) -> None:
        self.block_hash[block_id] = (block_hash, tokens)
        self.hash_to_block[block_hash] = block_id

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks; blocks no other sequence uses return to the free list (last
        block first, so the hot prefix blocks are the last to be reused)."""
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_cached_blocks = 0
        seq.num_computed_tokens = 0

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` (a copy of `parent`'s block table) now shares every block of it."""
        for block_id in child.block_table:
            self.ref_counts[block_id] += 1

    def can_append(self, seq: Sequence) -> bool:
        """True if `seq`'s last token has a slot of its own: in an owned, unshared block, or a
        free block to take (a new block, or the copy of a shared one)."""
        return self._needs_new_block(seq) <= self.num_free_blocks

    def append_slot(self, seq: Sequence) -> tuple[int, int] | None:
        """Make sure the block holding `seq`'s last token is allocated and `seq`'s alone.
        Returns the (source, destination) block copy to do before the step writes it, when that
        block was shared (copy-on-write), else None."""
        index = (seq.num_tokens - 1) // self.block_size
        if index == len(seq.block_table):
            seq.block_table.append(self._take_free_block())
            return None
        block_id = seq.block_table[index]
        if self.ref_counts[block_id] == 1:
            return None
        copy = self._take_free_block()
        self.ref_counts[block_id] -= 1
        seq.block_table[index] = copy
        return block_id, copy

    def _needs_new_block(self, seq: Sequence) -> int:
        index = (seq.num_tokens - 1) // self.block_size
        if index >= len(seq.block_table):
            return 1
        return int(self.ref_counts[seq.block_table[index]] > 1)
