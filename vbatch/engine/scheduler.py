"""Continuous batching: which sequences run in the next model step.

Each step is either a prefill step (new or preempted sequences, their uncomputed tokens) or a
decode step (one token for every running sequence). Prefills go first, so a slot freed by a
finished sequence is refilled at the very next step. Limits: at most `max_num_seqs` running
sequences and `max_num_batched_tokens` tokens per step. When a decode step needs a KV block and
none is free, the most recently admitted sequence is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed from its prompt and tokens so far.

A request of n samples counts as n running sequences from its admission (its samples are
forked right after its prefill). A sequence that asks for prompt logprobs computes its whole
prompt on its first prefill (a cached prefix has no logits), without using cached blocks.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vbatch.engine.block_manager import BlockManager
from vbatch.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """The sequences of one step, and whether it is a prefill step."""

    seqs: list[Sequence]
    is_prefill: bool
    num_preempted: int = 0
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)


class Scheduler:
    """FCFS scheduler over a `BlockManager`; see the module docstring for the policy."""

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Its prompt must fit the token budget and the whole cache."""
        if seq.num_tokens > self.max_num_batched_tokens:
            raise ValueError(f"prompt of {seq.num_tokens} tokens exceeds max_num_batched_tokens="
                             f"{self.max_num_batched_tokens}")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        """Pick the next step's sequences (and allocate their KV blocks)."""
        prefill = self._schedule_prefill()
        if prefill:
            return SchedulerOutput(prefill, is_prefill=True)
        return self._schedule_decode()

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        num_tokens = 0
        while self.waiting:
            seq = self.waiting[0]
            # A lone request wider than max_num_seqs still runs (alone), or it never would.
            if self.running and len(self.running) + seq.num_samples_to_fork > self.max_num_seqs:
                break
            # The token budget shapes batches; a lone sequence (e.g. a preempted one that has
            # grown past the budget) is always admitted, or it would wait forever.
            if scheduled and num_tokens + seq.num_tokens > self.max_num_batched_tokens:
                break
            use_cached = not seq.needs_prompt_logprobs
            if not self.block_manager.can_allocate(seq, use_cached):
                if not self.running and not scheduled:
                    raise RuntimeError(
                        f"a sequence of {seq.num_tokens} tokens does not fit in the whole KV cache "
                        f"({self.block_manager.num_blocks} blocks of "
                        f"{self.block_manager.block_size}); raise the KV cache memory budget or "
                        "lower max_model_len")
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, use_cached)
            seq.status = SequenceStatus.RUNNING
            num_tokens += seq.num_tokens - seq.num_computed_tokens
            self.running.append(seq)
            scheduled.append(seq)
        return scheduled

    def _schedule_decode(self) -> SchedulerOutput:
        scheduled: list[Sequence] = []
        copies: list[tuple[int, int]] = []
        num_preempted = 0
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                    num_preempted += 1
                else:
                    self._preempt(seq)
                    num_preempted += 1
                    seq = None
                    break
            if seq is None:
                break
            copy = self.block_manager.append_slot(seq)
            if copy is not None:
                copies.append(copy)
            scheduled.append(seq)
        self.running.extend(scheduled)
        return SchedulerOutput(scheduled, is_prefill=False, num_preempted=num_preempted,
                               blocks_to_copy=copies)

    def add_running(self, seq: Sequence) -> None:
        """Run a sequence forked from a running one (it already shares its blocks)."""
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def abort_request(self, request_id: str) -> list[Sequence]:
        """Remove every sequence of `request_id` (waiting or running), free their blocks and
        mark them finished; returns them. A sequence of a step still in flight may be
        removed: that step's result skips finished sequences, and its blocks are reused only
        by this scheduler's next step, which the workers run after the one in flight."""
        removed = [seq for queue in (self.waiting, self.running) for seq in queue
                   if seq.request_id == request_id]
        for seq in removed:
            queue = self.running if seq.status is SequenceStatus.RUNNING else self.waiting
            queue.remove(seq)
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED
        return removed

    def finish(self, seq: Sequence) -> None:
        """Remove a finished sequence from the running queue and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        self.running.remove(seq)
        self.block_manager.free(seq)
