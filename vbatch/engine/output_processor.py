"""A step's sampled tokens -> sequence updates -> the requests that finished.

For every sequence of the step, in order: the prompt logprobs it computed are kept for its
request; a request's first step forks its samples 1..n-1 from sample 0 (`Sequence.fork`, the
blocks shared through `BlockManager.fork`); then each sample appends its token, records the
token's logprob, advances its grammar matcher and is checked for a stop. A request is returned
(one `RequestOutput`, its completions in sample order) when all of its samples have finished.
A grammar that has reached its end finishes its sample with "stop".

A request added with `stream=True` is also returned after every step that advanced it, as a
cumulative snapshot (`finished=False`; each completion's text, tokens and logprobs so far,
`finish_reason` None until that sample ends; see `StopChecker.partial_text`). An aborted
request is forgotten at once; its sequences in a step still in flight are skipped when that
step's result arrives (the scheduler marked them finished).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vbatch.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob, TopLogprob
from vbatch.engine.scheduler import Scheduler, SchedulerOutput
from vbatch.engine.sequence import PromptLogprobs, SampleLogprobs, Sequence, StepOutput
from vbatch.engine.stop_checker import StopChecker


class TokenTexts:
    """Each token id's text on its own (`tokenizer.decode([id])`), decoded once and kept."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text


@dataclass
class RequestState:
    """One request's samples while they run, and what they produced so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    completions: list[CompletionOutput | None]
    num_finished: int = 0
    prompt_token_logprobs: list[TokenLogprob | None] | None = None
    stop_checkers: dict[int, StopChecker] = field(default_factory=dict)
    stream: bool = False
    samples: list[Sequence] = field(default_factory=list)     # by sample index


class OutputProcessor:
    """Applies step outputs to the sequences of one engine (see module docstring).

    `make_stop_checker(params)` builds a sample's stop checker; `new_matcher(params)` a fresh
    grammar matcher for a forked sample; `next_seq_id()` numbers forked samples.
    """

    def __init__(self, tokenizer, make_stop_checker: Callable, new_matcher: Callable,
                 next_seq_id: Callable[[], int]):
        self.token_text = TokenTexts(tokenizer)
        self.make_stop_checker = make_stop_checker
        self.new_matcher = new_matcher
        self.next_seq_id = next_seq_id
        self.requests: dict[str, RequestState] = {}
        self.num_prompt_prefills = 0

    def add(self, seq: Sequence, *, stream: bool = False) -> None:
        """Track a new request (its sample 0); `stream`: return snapshots as it advances."""
        n = seq.sampling_params.n
        state = RequestState(seq.request_id, seq.prompt, seq.token_ids[:seq.num_prompt_tokens],
                             [None] * n, stream=stream, samples=[seq])
        state.stop_checkers[seq.seq_id] = self.make_stop_checker(seq.sampling_params)
        self.requests[seq.request_id] = state

    def abort(self, request_id: str) -> bool:
        """Forget a request (the scheduler removes its sequences); False if it is unknown."""
        return self.requests.pop(request_id, None) is not None

    def process(self, scheduler: Scheduler, scheduled: SchedulerOutput,
                result: StepOutput) -> list[RequestOutput]:
        """Apply one step's `result` to its sequences; return the requests that finished."""
        finished: list[RequestOutput] = []
        streamed: dict[str, RequestState] = {}
        logprobs = result.logprobs
        for index, (seq, num_new) in enumerate(zip(scheduled.seqs, scheduled.num_new_tokens)):
            if seq.is_finished:     # aborted while this step was in flight
                continue
            seq.num_computed_tokens += num_new
            if seq.num_computed_tokens < seq.num_tokens:
                continue            # a prefill chunk: the prompt's next chunk runs next step
            state = self.requests[seq.request_id]
            if state.stream:
                streamed[state.request_id] = state
            if result.prompt_logprobs and index in result.prompt_logprobs:
                state.prompt_token_logprobs = self._prompt_entries(
                    state.prompt_token_ids, result.prompt_logprobs[index])
            if not seq.has_prefilled:
                seq.has_prefilled = True
                if seq.sample_index == 0:
                    self.num_prompt_prefills += 1
            token_ids = result.token_ids[index]
            samples = [seq]
            if seq.num_samples_to_fork > 1:
                samples += self._fork(scheduler, state, seq, len(token_ids))
            for sample, token_id in zip(samples, token_ids):
                sample_logprobs = logprobs[index] if logprobs is not None else None
                entry = None if sample_logprobs is None else sample_logprobs[
                    sample.sample_index - seq.sample_index]
                output = self._append(scheduler, state, sample, token_id, entry)
                if output is not None:
                    finished.append(output)
        finished.extend(self._snapshot(state) for state in streamed.values()
                        if self.requests.get(state.request_id) is state)
        return finished

    def _snapshot(self, state: RequestState) -> RequestOutput:
        """A streamed request's output so far (see module docstring)."""
        outputs = []
        for sample in state.samples:
            done = state.completions[sample.sample_index]
            if done is not None:
                outputs.append(done)
                continue
            checker = state.stop_checkers[sample.seq_id]
            entries = sample.token_logprobs
            outputs.append(CompletionOutput(
                index=sample.sample_index, text=checker.partial_text(sample),
                token_ids=sample.generated_token_ids, finish_reason=None,
                cumulative_logprob=None if entries is None else sample.cumulative_logprob,
                token_logprobs=None if entries is None else list(entries)))
        return RequestOutput(request_id=state.request_id, prompt=state.prompt,
                             prompt_token_ids=state.prompt_token_ids, outputs=outputs,
                             finished=False, prompt_token_logprobs=state.prompt_token_logprobs)

    def _fork(self, scheduler: Scheduler, state: RequestState, parent: Sequence,
              num_samples: int) -> list[Sequence]:
        parent.num_samples_to_fork = 1
        children = []
        for sample_index in range(1, num_samples):
            child = parent.fork(self.next_seq_id(), sample_index)
            scheduler.block_manager.fork(parent, child)
            if parent.grammar is not None:
                child.grammar = self.new_matcher(parent.sampling_params)
            scheduler.add_running(child)
            state.samples.append(child)
            state.stop_checkers[child.seq_id] = self.make_stop_checker(parent.sampling_params)
            children.append(child)
        return children

    def _append(self, scheduler: Scheduler, state: RequestState, seq: Sequence, token_id: int,
                entry: SampleLogprobs | None) -> RequestOutput | None:
        seq.append_token(token_id)
        if entry is not None and seq.token_logprobs is not None:
            seq.token_logprobs.append(self._entry(token_id, entry.logprob, entry.rank,
                                                  entry.top_ids, entry.top_logprobs))
            seq.cumulative_logprob += entry.logprob
        checker = state.stop_checkers[seq.seq_id]
        done = checker.check(seq)
        if seq.grammar is not None and not done:
            if not seq.grammar.accept_token(token_id):
                # The mask allowed only tokens the grammar accepts, so this is a bug: stop the
                # sample rather than emit a text that breaks its constraint.
                raise RuntimeError(f"request {seq.request_id}: the grammar rejected token "
                                   f"{token_id} that its mask allowed")
            if seq.grammar.is_terminated:
                seq.finish_reason, seq.stop_reason, done = "stop", token_id, True
        if not done:
            return None
        scheduler.finish(seq)
        del state.stop_checkers[seq.seq_id]
        state.completions[seq.sample_index] = CompletionOutput(
            index=seq.sample_index, text=checker.final_text(seq),
            token_ids=seq.generated_token_ids, finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            cumulative_logprob=None if seq.token_logprobs is None else seq.cumulative_logprob,
            token_logprobs=seq.token_logprobs)
        state.num_finished += 1
        if state.num_finished < len(state.completions):
            return None
        del self.requests[state.request_id]
        return RequestOutput(request_id=state.request_id, prompt=state.prompt,
                             prompt_token_ids=state.prompt_token_ids,
                             outputs=list(state.completions),
                             prompt_token_logprobs=state.prompt_token_logprobs)

    def _entry(self, token_id: int, logprob: float, rank: int, top_ids, top_logprobs
               ) -> TokenLogprob:
        text = self.token_text
        return TokenLogprob(token_id, text(token_id), logprob, rank,
                            [TopLogprob(t, text(t), lp) for t, lp in zip(top_ids, top_logprobs)])

    def _prompt_entries(self, prompt_token_ids: list[int], computed: PromptLogprobs
                        ) -> list[TokenLogprob | None]:
        logprobs = computed.logprobs.tolist()
        ranks = computed.ranks.tolist()
        top_ids = computed.top_ids.tolist()
        top_logprobs = computed.top_logprobs.tolist()
        entries: list[TokenLogprob | None] = [None]
        for position in range(1, len(prompt_token_ids)):
            i = position - 1
            entries.append(self._entry(prompt_token_ids[position], logprobs[i], ranks[i],
                                       top_ids[i], top_logprobs[i]))
        return entries
