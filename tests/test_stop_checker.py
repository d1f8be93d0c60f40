"""When generation stops, why, and the final text, with a real byte-level BPE tokenizer.

Feeds token streams one token at a time through `StopChecker.check`, as `LLMEngine.step` does,
and proves: EOS ends a sequence with "stop" (unless ignore_eos); stop_token_ids do too;
max_tokens and max_model_len end it with "length"; a stop string is cut from the final text
(kept with include_stop_str_in_output); the earliest of several stop strings wins, also when
several appear in one step; a stop string spanning two tokens is found; text in the prompt never
matches, also when a stop string ends in a multi-byte character whose bytes arrive in several
tokens. The checks run in the documented order (stop token, stop string, length).
"""
from __future__ import annotations

import pytest
from conftest import build_tokenizer

from vbatch.engine.sampling_params import SamplingParams
from vbatch.engine.sequence import Sequence
from vbatch.engine.stop_checker import StopChecker

TEXT = "Paris is the capital of France; Berlin is the capital of Germany."


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def run(tok, stream: list[int], params: SamplingParams, *, prompt: list[int] | None = None,
        max_model_len: int = 10_000):
    """Append tokens until the checker says stop; return (seq, checker, num_checks)."""
    seq = Sequence(0, "req", prompt if prompt is not None else ids_of(tok, "Hello"), params,
                   seed=0, row_key="k")
    checker = StopChecker(tok, params, {tok.eos_token_id}, max_model_len)
    for n, token in enumerate(stream, 1):
        seq.append_token(token)
        if checker.check(seq):
            return seq, checker, n
    return seq, checker, None


def test_tokenizer_splits_text_into_many_tokens(tok):
    ids = ids_of(tok, TEXT)
    assert len(ids) > 8 and tok.decode(ids) == TEXT


def test_eos_stops(tok):
    stream = ids_of(tok, "Paris is") + [tok.eos_token_id] + ids_of(tok, " more")
    seq, checker, n = run(tok, stream, SamplingParams(max_tokens=100))
    assert n == len(ids_of(tok, "Paris is")) + 1
    assert seq.finish_reason == "stop" and seq.stop_reason == tok.eos_token_id
    assert checker.final_text(seq) == "Paris is"         # the special EOS is not in the text


def test_ignore_eos(tok):
    stream = ids_of(tok, "Paris") + [tok.eos_token_id] + ids_of(tok, " is the capital")
    seq, _, n = run(tok, stream, SamplingParams(max_tokens=len(stream), ignore_eos=True))
    assert n == len(stream) and seq.finish_reason == "length"
    assert seq.generated_token_ids == stream


def test_stop_token_ids(tok):
    stream = ids_of(tok, TEXT)
    target = stream[3]
    seq, checker, n = run(tok, stream, SamplingParams(max_tokens=100, stop_token_ids=[target]))
    assert n == 4 and seq.finish_reason == "stop" and seq.stop_reason == target
    assert checker.final_text(seq) == tok.decode(stream[:4])   # a stop token id stays in text


def test_ignore_eos_keeps_explicit_stop_token_ids(tok):
    eos = tok.eos_token_id
    stream = ids_of(tok, "Paris") + [eos]
    seq, _, n = run(tok, stream, SamplingParams(max_tokens=100, ignore_eos=True,
                                                stop_token_ids=[eos]))
    assert n == 2 and seq.finish_reason == "stop" and seq.stop_reason == eos


def test_max_tokens(tok):
    stream = ids_of(tok, TEXT)
    seq, checker, n = run(tok, stream, SamplingParams(max_tokens=5))
    assert n == 5 and seq.num_generated_tokens == 5
    assert seq.finish_reason == "length" and seq.stop_reason is None
    assert checker.final_text(seq) == tok.decode(stream[:5])


def test_max_tokens_one(tok):
    seq, _, n = run(tok, ids_of(tok, TEXT), SamplingParams(max_tokens=1))
    assert n == 1 and seq.finish_reason == "length"


def test_max_tokens_none_runs_to_max_model_len(tok):
    prompt = ids_of(tok, "Hello world")
    stream = ids_of(tok, TEXT)
    max_model_len = len(prompt) + 6
    seq, _, n = run(tok, stream, SamplingParams(max_tokens=None), prompt=prompt,
                    max_model_len=max_model_len)
    assert n == 6 and seq.num_tokens == max_model_len and seq.finish_reason == "length"


def test_max_model_len_before_max_tokens(tok):
    prompt = ids_of(tok, "Hello world")
    seq, _, n = run(tok, ids_of(tok, TEXT), SamplingParams(max_tokens=50), prompt=prompt,
                    max_model_len=len(prompt) + 3)
    assert n == 3 and seq.finish_reason == "length"


def test_stop_string_is_cut(tok):
    stream = ids_of(tok, TEXT)
    seq, checker, n = run(tok, stream, SamplingParams(max_tokens=100, stop="capital"))
    assert seq.finish_reason == "stop" and seq.stop_reason == "capital"
    assert checker.final_text(seq) == "Paris is the "
    assert "capital" in tok.decode(stream[:n]) and "capital" not in tok.decode(stream[:n - 1])


def test_stop_string_kept_with_include_stop_str_in_output(tok):
    params = SamplingParams(max_tokens=100, stop="capital", include_stop_str_in_output=True)
    seq, checker, _ = run(tok, ids_of(tok, TEXT), params)
    assert seq.finish_reason == "stop"
    assert checker.final_text(seq) == "Paris is the capital"


def test_stop_string_text_after_match_in_same_token_is_dropped(tok):
    # " capital" is one token: "cap" ends mid-token, the rest of the token is cut too
    stream = ids_of(tok, TEXT)
    seq, checker, _ = run(tok, stream, SamplingParams(max_tokens=100, stop="cap",
                                                      include_stop_str_in_output=True))
    assert checker.final_text(seq) == "Paris is the cap"


def test_earliest_of_several_stop_strings_wins(tok):
    params = SamplingParams(max_tokens=100, stop=["Germany", "France", "Berlin"])
    seq, checker, _ = run(tok, ids_of(tok, TEXT), params)
    assert seq.stop_reason == "France"
    assert checker.final_text(seq) == "Paris is the capital of "


@pytest.mark.parametrize("stop, reason, text", [
    (["ital", "cap"], "cap", "Paris is the "),          # both appear in the same new token
    (["tal", "capital"], "capital", "Paris is the "),   # the longer one starts earlier
    (["pital", "apita"], "apita", "Paris is the c"),
])
def test_earliest_stop_string_within_one_step(tok, stop, reason, text):
    stream = ids_of(tok, TEXT)
    assert "capital" in [tok.decode([t]).strip() for t in stream]   # one token
    seq, checker, _ = run(tok, stream, SamplingParams(max_tokens=100, stop=stop))
    assert seq.stop_reason == reason and checker.final_text(seq) == text


def _boundary_spanning_stop(tok, text: str) -> tuple[str, int]:
    """A stop string made of the last 2 chars of one token and the first 2 of the next."""
    ids = ids_of(tok, text)
    for i in range(len(ids) - 1):
        left, right = tok.decode(ids[: i + 1]), tok.decode(ids[: i + 2])
        piece = right[len(left):]
        if len(left) >= 2 and len(piece) >= 2 and text.count(left[-2:] + piece[:2]) == 1:
            return left[-2:] + piece[:2], i + 2
    raise AssertionError("no multi-character adjacent tokens")


def test_stop_string_spanning_two_tokens(tok):
    stop, num_tokens = _boundary_spanning_stop(tok, TEXT)
    stream = ids_of(tok, TEXT)
    seq, checker, n = run(tok, stream, SamplingParams(max_tokens=100, stop=stop))
    assert n == num_tokens, (stop, n, num_tokens)
    assert seq.finish_reason == "stop" and seq.stop_reason == stop
    assert checker.final_text(seq) == TEXT[: TEXT.index(stop)]


def test_stop_string_spanning_many_tokens(tok):
    stop = "is the capital of Fr"
    seq, checker, _ = run(tok, ids_of(tok, TEXT), SamplingParams(max_tokens=100, stop=stop))
    assert seq.stop_reason == stop and checker.final_text(seq) == "Paris "


def test_stop_string_in_prompt_does_not_match(tok):
    prompt = ids_of(tok, "capital")
    stream = ids_of(tok, " of France")
    seq, checker, n = run(tok, stream, SamplingParams(max_tokens=len(stream), stop="capital"),
                          prompt=prompt)
    assert seq.finish_reason == "length" and checker.final_text(seq) == " of France"


def test_no_stop_means_full_text(tok):
    stream = ids_of(tok, TEXT)
    seq, checker, n = run(tok, stream, SamplingParams(max_tokens=len(stream), stop="Tokyo"))
    assert n == len(stream) and seq.finish_reason == "length"
    assert checker.final_text(seq) == TEXT


def test_stop_token_checked_before_stop_string_and_length(tok):
    eos = tok.eos_token_id
    stream = ids_of(tok, "Paris") + [eos]
    seq, _, n = run(tok, stream, SamplingParams(max_tokens=len(stream), stop="Paris"))
    # "Paris" is matched at token 1 already
    assert n == 1 and seq.stop_reason == "Paris"
    seq, _, n = run(tok, stream, SamplingParams(max_tokens=len(stream), stop="xyz"))
    assert n == len(stream) and seq.finish_reason == "stop" and seq.stop_reason == eos


def test_stop_string_wins_over_length_on_the_same_token(tok):
    stream = ids_of(tok, TEXT)
    params = SamplingParams(max_tokens=1, stop="Par")
    seq, checker, n = run(tok, stream, params)
    assert n == 1 and seq.finish_reason == "stop" and checker.final_text(seq) == ""


def test_multibyte_stream_decodes_through_partial_characters(tok):
    text = "café au lait"
    stream = ids_of(tok, text)
    seq, checker, n = run(tok, stream, SamplingParams(max_tokens=100, stop="au"))
    assert checker.final_text(seq) == "café "


@pytest.mark.parametrize("text, stop", [
    ("café au lait", "é"), ("café au lait", "fé"), ("café au lait", "é au"),
    ("I like 😀 a lot", "😀"), ("I like 😀 a lot", "e 😀"), ("日本語 text", "本語"),
    ("日本語 text", "日"),
])
def test_stop_string_ending_in_split_multibyte_character(tok, text, stop):
    """A multi-byte character split over byte tokens first decodes to U+FFFD, then is replaced in
    place (the text does not grow): a stop string ending in it must still be found."""
    stream = ids_of(tok, text)
    partial = [tok.decode(stream[:i]) for i in range(1, len(stream) + 1)]
    assert any("\ufffd" in p for p in partial)          # the character is split over tokens
    seq, checker, n = run(tok, stream, SamplingParams(max_tokens=100, stop=stop))
    assert seq.finish_reason == "stop" and seq.stop_reason == stop
    assert checker.final_text(seq) == text[: text.index(stop)]
    # found at the first token where the decoded text contains it
    assert n == next(i for i, p in enumerate(partial, 1) if stop in p)
