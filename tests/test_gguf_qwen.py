"""GGUF files of the qwen2 and qwen3 architectures -> Hugging Face Qwen2/Qwen3 directories.

Tiny random HF models are written to float32 GGUF files the way llama.cpp's convert_hf_to_gguf
does for these architectures: tensor names from the `gguf` package's own HF -> GGUF name map,
q/k rows NOT permuted (only llama's are), the `{arch}.*` metadata keys, and the tiny byte-level
BPE tokenizer the LLaMA GGUF tests use.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_loader import CHAT_TEMPLATE, _gguf_tokens

from vbatch.engine.loader import convert_gguf
from vbatch.errors import VBatchUsageError

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

PROMPT = torch.tensor([[1, 5, 9, 200, 42, 2, 7]])


def tiny_qwen(arch: str, *, tie: bool, **overrides):
    """A tiny random Qwen2ForCausalLM / Qwen3ForCausalLM (4 heads, 2 KV heads, GQA).

    The Qwen3 has head_dim 32 (not hidden / heads = 16), so an explicit head_dim must survive.
    """
    kwargs = dict(vocab_size=len(_gguf_tokens()[0]), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "qwen3":
        kwargs["head_dim"] = 32
    kwargs.update(overrides)
    torch.manual_seed(0)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kwargs))
    with torch.no_grad():  # norms start at 1 and biases at 0: randomize so a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def write_qwen_gguf(path: Path, model, arch: str, *, metadata=None, skip=(),
                    file_arch=None) -> None:
    """Write `model` as a float32 GGUF of architecture `arch`, the way llama.cpp would.

    `metadata` adds (key, value) pairs; `skip` leaves out tensors whose HF name contains one of
    the given strings; `file_arch` overrides the `general.architecture` written.
    """
    cfg = model.config
    tokens, types, merges = _gguf_tokens()
    w = gguf.GGUFWriter(str(path), file_arch or arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "head_dim", None) is not None:  # llama.cpp: only if the HF config has it
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if (cfg.tie_word_embeddings and name == "lm_head.weight") or any(s in name for s in skip):
            continue
        stem, suffix = name.rsplit(".", 1)
        w.add_tensor(f"{name_map.get_name(stem)}.{suffix}", tensor.numpy())  # no q/k permute
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,tie", [("qwen2", False), ("qwen2", True), ("qwen3", False),
                                      ("qwen3", True)])
def test_qwen_gguf_round_trip(tmp_path, arch, tie):
    model = tiny_qwen(arch, tie=tie)
    write_qwen_gguf(tmp_path / "tiny.gguf", model, arch)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "cache")

    config = transformers.AutoConfig.from_pretrained(out)
    ours, theirs = config.to_dict(), model.config.to_dict()
    assert ours["model_type"] == arch
    assert ours["architectures"] == [type(model).__name__]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_parameters",
                "tie_word_embeddings", "max_position_embeddings", "use_sliding_window",
                "sliding_window", "layer_types", "bos_token_id", "eos_token_id", "attention_bias"):
        if key in theirs:
            assert ours[key] == theirs[key], key
    assert config.head_dim == (32 if arch == "qwen3" else 16)

    got = load_file(out / "model.safetensors")
    expected = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], value), name

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(reloaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PROMPT).logits, model(PROMPT).logits,
                                   atol=1e-5, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.decode(tokenizer("hello world")["input_ids"]) == "hello world"


def test_qwen2_matches_transformers_own_gguf_loader(tmp_path):
    """An independent reading of the same file: transformers loads qwen2 GGUFs itself."""
    model = tiny_qwen("qwen2", tie=False)
    write_qwen_gguf(tmp_path / "tiny.gguf", model, "qwen2")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "cache")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(PROMPT).logits, theirs(PROMPT).logits, atol=1e-5, rtol=0)


def test_qwen2_yarn_rope_scaling_is_carried(tmp_path):
    model = tiny_qwen("qwen2", tie=False)
    write_qwen_gguf(tmp_path / "yarn.gguf", model, "qwen2", metadata={
        "qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
        "qwen2.rope.scaling.original_context_length": 64})
    config = json.loads((convert_gguf(tmp_path / "yarn.gguf", tmp_path / "c") / "config.json")
                        .read_text())
    assert config["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 1000000.0,
                                         "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("arch,metadata,skip,words", [
    ("qwen3", {"qwen3.attention.sliding_window": 64}, (), ["qwen3.attention.sliding_window = 64",
                                                          "not supported"]),
    ("qwen2", {}, ("q_proj.bias",), ["Qwen2ForCausalLM", "missing",
                                     "model.layers.0.self_attn.q_proj.bias"]),
    ("qwen3", {}, ("k_norm",), ["Qwen3ForCausalLM", "model.layers.0.self_attn.k_norm.weight"]),
])
def test_unconvertible_qwen_gguf_is_refused(tmp_path, arch, metadata, skip, words):
    write_qwen_gguf(tmp_path / "bad.gguf", tiny_qwen(arch, tie=False), arch, metadata=metadata,
                    skip=skip)
    with pytest.raises(VBatchUsageError) as excinfo:
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "cache")
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # temp dir cleaned up


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    write_qwen_gguf(tmp_path / "moe.gguf", tiny_qwen("qwen2", tie=False), "qwen2",
                    file_arch="qwen2moe")
    with pytest.raises(VBatchUsageError, match="'qwen2moe'.*not supported; supported: "
                                               "llama, qwen2, qwen3"):
        convert_gguf(tmp_path / "moe.gguf", tmp_path / "cache")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_vbatch_runs_a_qwen_gguf_like_the_original_model(tmp_path, monkeypatch, arch):
    """`LLM("x.gguf")` on a Qwen2/Qwen3 GGUF: prompt logits within 1e-4 of the original HF
    model's, greedy tokens equal to its `generate`."""
    from vbatch import LLM, SamplingParams
    monkeypatch.setenv("VBATCH_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_qwen(arch, tie=False)
    write_qwen_gguf(tmp_path / "tiny.gguf", model, arch)
    llm = LLM(str(tmp_path / "tiny.gguf"), dtype="float32", kv_cache_memory_gb=0.01)
    prompt = PROMPT[0].tolist()
    [out] = llm.generate([{"prompt_token_ids": prompt}],
                         SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                        prompt_logprobs=0))
    with torch.no_grad():
        expected = model.generate(PROMPT, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  pad_token_id=2)[0, PROMPT.shape[1]:]
        logprobs = torch.log_softmax(model(PROMPT).logits[0].double(), -1)
    assert out.outputs[0].token_ids == expected.tolist()
    for position, entry in enumerate(out.prompt_logprobs[1:], start=1):
        token = prompt[position]
        assert abs(entry[token].logprob - logprobs[position - 1, token].item()) < 1e-4
