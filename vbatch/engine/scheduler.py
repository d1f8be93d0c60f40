"""Continuous batching: which sequences run in the next model step, and how many tokens each.

A step mixes decodes and prefills (vLLM V1's policy): every running sequence first gets its
next token (a decode) or the next chunk of its prompt (a prefill in progress), then waiting
sequences are admitted, first come first served, with the token budget that is left. So a
decode never waits for a prefill, and a slot freed by a finished sequence is refilled at the
very next step. Limits: at most `max_num_seqs` running sequences and `max_num_batched_tokens`
tokens per step; a prompt longer than what is left of the budget is prefilled in chunks over
several steps (chunked prefill), its first token sampled after its last chunk. When a decode
needs a KV block and none is free, the most recently admitted sequence is preempted: its blocks
are freed and it goes back to the front of the queue, to be recomputed from its prompt and
tokens so far; no sequence is admitted in a step that preempted one.

A request of n samples counts as n running sequences from its admission (its samples are
forked right after its prefill). A sequence that asks for prompt logprobs computes its whole
prompt in one step (a cached prefix has no logits, and its logits are not kept across chunks),
without using cached blocks: its prompt must fit `max_num_batched_tokens`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vbatch.engine.block_manager import BlockManager
from vbatch.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """The sequences of one step and the tokens each computes (`num_new_tokens[i]` of
    `seqs[i]`, from its `num_computed_tokens` on); a sequence whose tokens end before its last
    one is a prefill chunk and samples nothing."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    num_preempted: int = 0
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens of the step that are not decodes (prompts, chunks, recomputation)."""
        return sum(n for seq, n in zip(self.seqs, self.num_new_tokens)
                   if n > 1 or not seq.has_prefilled)


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
        """Queue a new sequence. One that asks for prompt logprobs must fit the token budget."""
        if seq.needs_prompt_logprobs and seq.num_tokens > self.max_num_batched_tokens:
            raise ValueError(f"prompt of {seq.num_tokens} tokens exceeds max_num_batched_tokens="
                             f"{self.max_num_batched_tokens} (prompt logprobs are computed in "
                             "one step)")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        """Pick the next step's sequences and token counts (allocating their KV blocks)."""
        step = SchedulerOutput([], [])
        budget = self._schedule_running(step, self.max_num_batched_tokens)
        if not step.num_preempted:
            self._schedule_waiting(step, budget)
        return step

    def _schedule_running(self, step: SchedulerOutput, budget: int) -> int:
        """Running sequences in admission order: each its next token or prompt chunk, as far
        as the budget goes; returns what is left of it."""
        kept: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            remaining = seq.num_tokens - seq.num_computed_tokens
            if budget == 0:
                kept.append(seq)          # runs next step
                continue
            if remaining == 1:      # a decode: its new token needs a slot of its own
                while not self.block_manager.can_append(seq):
                    victim = self.running.pop() if self.running else seq
                    self._preempt(victim)
                    step.num_preempted += 1
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    break
                copy = self.block_manager.append_slot(seq)
                if copy is not None:
                    step.blocks_to_copy.append(copy)
            budget -= self._add_to_step(step, seq, min(remaining, budget))
            kept.append(seq)
        self.running.extend(kept)
        return budget

    def _schedule_waiting(self, step: SchedulerOutput, budget: int) -> None:
        """Admit waiting sequences first come first served while the budget, `max_num_seqs`
        and the free KV blocks allow."""
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            # A lone request wider than max_num_seqs still runs (alone), or it never would.
            if self.running and len(self.running) + seq.num_samples_to_fork > self.max_num_seqs:
                break
            use_cached = not seq.needs_prompt_logprobs
            if not use_cached and seq.num_tokens > budget:
                break                     # its prompt runs in one step: wait for the budget
            if not self.block_manager.can_allocate(seq, use_cached):
                if not self.running:
                    raise RuntimeError(
                        f"a sequence of {seq.num_tokens} tokens does not fit in the whole KV cache "
                        f"({self.block_manager.num_blocks} blocks of "
                        f"{self.block_manager.block_size}); raise the KV cache memory budget or "
                        "lower max_model_len")
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, use_cached)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            remaining = seq.num_tokens - seq.num_computed_tokens
            budget -= self._add_to_step(step, seq, min(remaining, budget))

    def _add_to_step(self, step: SchedulerOutput, seq: Sequence, num_tokens: int) -> int:
        step.seqs.append(seq)
        step.num_new_tokens.append(num_tokens)
        self.block_manager.cache_blocks(seq, seq.num_computed_tokens + num_tokens)
        return num_tokens

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
