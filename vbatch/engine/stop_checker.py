"""When a sequence is done, and its final text.

Checked after every new token, in order: a stop token (EOS unless ignore_eos, or one of
stop_token_ids) -> "stop"; a stop string in the text -> "stop", the text cut before it;
max_tokens or max_model_len reached -> "length".
"""
from __future__ import annotations

from vbatch.engine.sampling_params import SamplingParams
from vbatch.engine.sequence import Sequence


class StopChecker:
    """Per-sequence stop logic. Stop strings are matched on the decoded text of the generated
    tokens; only the tail that could contain a new match is searched each step."""

    def __init__(self, tokenizer, params: SamplingParams, eos_token_ids: set[int],
                 max_model_len: int):
        self.tokenizer = tokenizer
        self.params = params
        self.stop_token_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            self.stop_token_ids |= eos_token_ids
        self.max_model_len = max_model_len
        self.stop_text_end: int | None = None
        self._searched_upto = 0

    def check(self, seq: Sequence) -> bool:
        """Set seq.finish_reason / stop_reason and return True if `seq` is finished."""
        token_id = seq.last_token_id
        if token_id in self.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token_id
            return True
        if self.params.stop_strings and self._check_stop_strings(seq):
            return True
        max_tokens = self.params.max_tokens
        if (max_tokens is not None and seq.num_generated_tokens >= max_tokens) \
                or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
            return True
        return False

    def _check_stop_strings(self, seq: Sequence) -> bool:
        text = self._decode(seq)
        longest = max(len(s) for s in self.params.stop_strings)
        # The tail of the previous text may have changed: an incomplete UTF-8 sequence decodes
        # to up to 3 replacement characters until its last byte arrives.
        start = max(0, self._searched_upto - longest - 3)
        best = None
        for stop in self.params.stop_strings:
            index = text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        self._searched_upto = len(text)
        if best is None:
            return False
        index, stop = best
        self.stop_text_end = index + len(stop) if self.params.include_stop_str_in_output else index
        seq.finish_reason, seq.stop_reason = "stop", stop
        return True

    def _decode(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.generated_token_ids,
                                     skip_special_tokens=self.params.skip_special_tokens)

    def partial_text(self, seq: Sequence) -> str:
        """The text so far as a stream may show it: it never shrinks later, so the tail that
        could still become a stop string (cut from the final text) and an incomplete UTF-8
        character at the end (decoded as U+FFFD until its last byte arrives) are held back."""
        text = self._decode(seq)
        if self.params.stop_strings and not self.params.include_stop_str_in_output:
            hold_back = max(len(s) for s in self.params.stop_strings) - 1
            text = text[:max(0, len(text) - hold_back)]
        return text.rstrip("\ufffd")

    def final_text(self, seq: Sequence) -> str:
        """The completion text (cut at the stop string when one ended it)."""
        text = self._decode(seq)
        return text if self.stop_text_end is None else text[: self.stop_text_end]
