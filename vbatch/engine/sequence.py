"""A request in flight: its tokens, its KV-cache blocks and its place in the schedule."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from vbatch.engine.outputs import TokenLogprob
from vbatch.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """One sample of one prompt: the prompt and the tokens generated so far.

    `token_ids` is prompt + generated so far. `num_computed_tokens` counts the leading tokens
    whose keys/values are in the KV cache (`block_table` lists their blocks); it drops back to 0
    when the sequence is preempted and its blocks are freed (recompute preemption).

    A request with n samples starts as one sequence (sample 0) with `num_samples_to_fork = n`:
    its prompt is prefilled once, n first tokens are drawn from the prompt's logits, and
    samples 1..n-1 are forked from it (`fork`), sharing its prompt's KV blocks.
    `grammar` is the structured-output matcher (None without a constraint); `token_logprobs`
    collects the logprobs of the generated tokens when the request asks for them.
    """

    def __init__(self, seq_id: int, request_id: str, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, seed: int, row_key: str,
                 prompt: str | None = None):
        self.seq_id = seq_id
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.seed = seed
        self.row_key = row_key
        self.sample_index = 0
        self.num_samples_to_fork = sampling_params.n
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # prefix-cache hashes of the prompt's full blocks (block_manager.py), and how many of
        # them are in the index already
        self.block_hashes: list[tuple[int, tuple[int, ...]]] = []
        self.num_cached_blocks = 0
        self.num_computed_tokens = 0
        self.has_prefilled = False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.grammar = None
        self.token_logprobs: list[TokenLogprob] | None = (
            None if sampling_params.logprobs is None else [])
        self.cumulative_logprob = 0.0

    def fork(self, seq_id: int, sample_index: int) -> Sequence:
        """A new sample of the same prompt, at the same point: same tokens, same block table
        (the caller adds the block references) and a fresh logprob list; no grammar (the caller
        gives it its own matcher)."""
        child = Sequence(seq_id, self.request_id, self.token_ids, self.sampling_params,
                         seed=self.seed, row_key=self.row_key, prompt=self.prompt)
        child.num_prompt_tokens = self.num_prompt_tokens
        child.sample_index = sample_index
        child.num_samples_to_fork = 1
        child.status = self.status
        child.block_table = list(self.block_table)
        child.num_computed_tokens = self.num_computed_tokens
        child.has_prefilled = self.has_prefilled
        return child

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """True until the first prefill of a request that asks for prompt logprobs."""
        return self.sampling_params.prompt_logprobs is not None and not self.has_prefilled

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)


@dataclass(slots=True)
class ScheduledSequence:
    """The slim, picklable slice of a Sequence that one model step needs on every worker.

    `token_ids` are the tokens to run this step (positions start at `start_position`);
    `block_table` covers every position up to start_position + len(token_ids). Sampling fields
    are only read on the sampling rank.
    """

    seq_id: int
    token_ids: list[int]
    start_position: int
    block_table: list[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    row_key: str
    output_index: int
    sample_index: int = 0
    num_samples: int = 1               # > 1: draw this many samples (a request's first token)
    num_logprobs: int = -1             # top alternatives to return per sampled token; -1: none
    num_prompt_logprobs: int = -1      # the same for every prompt token of this step; -1: none
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Penalised sequences only: every token so far, and how many of them are the prompt.
    history: list[int] | None = None
    num_prompt_tokens: int = 0
    grammar_row: int = -1              # row of the step's grammar bitmask; -1: unconstrained


@dataclass(slots=True)
class StepInput:
    """One model step as every rank receives it: the sequences, the KV blocks to copy first
    (copy-on-write of a block shared by a request's samples: (source, destination) pairs), and
    the structured-output bitmask ([rows, ceil(V / 32)] int32) of the constrained sequences."""

    seqs: list[ScheduledSequence]
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    grammar_bitmask: object = None


@dataclass(slots=True)
class SampleLogprobs:
    """Logprob of one sampled token: its value, rank and the top alternatives (ids, values)."""

    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class PromptLogprobs:
    """Logprobs of prompt tokens 1..P-1 of one sequence (each given the tokens before it):
    `logprobs` [P-1] float32, `ranks` [P-1] int64, `top_ids` / `top_logprobs` [P-1, K]."""

    logprobs: object
    ranks: object
    top_ids: object
    top_logprobs: object


@dataclass(slots=True)
class StepOutput:
    """What the sampling rank returns for one step, per sequence in step order: the sampled
    token ids (`num_samples` each), their logprobs when asked for, and prompt logprobs."""

    token_ids: list[list[int]]
    logprobs: list[list[SampleLogprobs] | None] | None = None
    prompt_logprobs: dict[int, PromptLogprobs] | None = None
