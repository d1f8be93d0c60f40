"""JobConfig.validate() and YAML loading / precedence in vbatch.jobs.config."""
from __future__ import annotations

import dataclasses

import pytest

from vbatch.engine.sampling_params import SamplingParams
from vbatch.errors import VBatchUsageError
from vbatch.jobs.config import FIELD_NAMES, JobConfig, load_job_config, read_yaml_config


def test_defaults_are_valid():
    config = JobConfig(input="data.jsonl").validate()
    assert config.model is None
    assert config.max_tokens == 256
    assert config.stop == []
    assert config.dtype == "auto"
    assert config.kv_cache_memory_gb is None


def test_stop_default_is_not_shared_between_instances():
    first, second = JobConfig(input="a"), JobConfig(input="b")
    first.stop.append("x")
    assert second.stop == []


def test_top_k_minus_one_means_disabled():
    assert JobConfig(input="a", top_k=-1).validate().top_k == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"temperature": 0.0},
        {"top_p": 1.0},
        {"top_p": 1e-6},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"top_k": 50},
        {"max_model_len": 1},
        {"kv_cache_memory_gb": 0.5},
        {"dtype": "bfloat16"},
        {"stop": ["\n\n", "###"]},
    ],
)
def test_edge_values_are_accepted(changes):
    JobConfig(input="a", **changes).validate()


@pytest.mark.parametrize(
    ("changes", "expected_in_message"),
    [
        ({"max_tokens": 0}, "--max-tokens"),
        ({"temperature": -0.1}, "--temperature"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 2.0}, "--top-p"),
        ({"top_k": -2}, "--top-k"),
        ({"min_p": -0.5}, "--min-p"),
        ({"min_p": 1.5}, "--min-p"),
        ({"seed": -1}, "--seed"),
        ({"max_num_seqs": 0}, "--max-num-seqs"),
        ({"max_num_batched_tokens": 0}, "--max-num-batched-tokens"),
        ({"max_model_len": 0}, "--max-model-len"),
        ({"dtype": "float8"}, "--dtype"),
        ({"rows_per_file": 0}, "--rows-per-file"),
        ({"batch_size": 0}, "--batch-size"),
        ({"kv_cache_memory_gb": 0.0}, "--kv-cache-memory-gb"),
        ({"kv_cache_memory_gb": -1.0}, "--kv-cache-memory-gb"),
        ({"prompt_column": ""}, "--prompt-column"),
        ({"id_column": "  "}, "--id-column"),
        ({"stop": [""]}, "--stop"),
        ({"input": ""}, "INPUT"),
        ({"output": ""}, "--output"),
        ({"model": ""}, "--model"),
    ],
)
def test_invalid_values_raise_one_line_usage_error(changes, expected_in_message):
    with pytest.raises(VBatchUsageError) as excinfo:
        JobConfig(**{"input": "a", **changes}).validate()
    message = str(excinfo.value)
    assert expected_in_message in message
    assert "\n" not in message


def test_usage_error_is_a_value_error():
    with pytest.raises(ValueError):
        JobConfig(input="a", max_tokens=0).validate()


def test_to_dict_round_trips():
    config = JobConfig(input="a", stop=["x"], top_k=5)
    assert JobConfig(**config.to_dict()) == config


# --- YAML --------------------------------------------------------------------------------------

def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_yaml_accepts_underscores_and_dashes(tmp_path):
    path = write(tmp_path, "max_tokens: 12\nmax-num-seqs: 3\ntop-p: 0.9\nstop: END\nchat: yes\n")
    values = read_yaml_config(path)
    assert values == {"max_tokens": 12, "max_num_seqs": 3, "top_p": 0.9, "stop": ["END"],
                      "chat": True}


def test_yaml_int_is_accepted_for_float_fields(tmp_path):
    values = read_yaml_config(write(tmp_path, "temperature: 0\nkv_cache_memory_gb: 2\n"))
    assert values == {"temperature": 0.0, "kv_cache_memory_gb": 2.0}
    assert isinstance(values["temperature"], float)


def test_yaml_null_keeps_optional_fields_unset(tmp_path):
    assert read_yaml_config(write(tmp_path, "model: null\nmax_model_len: ~\n")) == {
        "model": None, "max_model_len": None}


def test_empty_yaml_means_no_values(tmp_path):
    assert read_yaml_config(write(tmp_path, "")) == {}


def test_unknown_yaml_key_names_the_key_and_lists_valid_ones(tmp_path):
    path = write(tmp_path, "max_token: 3\n")
    with pytest.raises(VBatchUsageError) as excinfo:
        read_yaml_config(path)
    message = str(excinfo.value)
    assert "'max_token'" in message and path in message
    assert "max_tokens" in message and "temperature" in message
    assert "\n" not in message


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "max_tokens: [1, 2\n")
    with pytest.raises(VBatchUsageError, match="not valid YAML") as excinfo:
        read_yaml_config(path)
    assert path in str(excinfo.value)


def test_missing_yaml_names_the_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(VBatchUsageError, match="cannot read config file") as excinfo:
        read_yaml_config(path)
    assert path in str(excinfo.value)


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(VBatchUsageError, match="mapping"):
        read_yaml_config(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize(
    "text",
    ["max_tokens: ten\n", "max_tokens: 1.5\n", "chat: 1\n", "temperature: hot\n", "stop: [1, 2]\n",
     "max_tokens: true\n"],
)
def test_yaml_wrong_types_are_rejected(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(VBatchUsageError, match="must be") as excinfo:
        read_yaml_config(path)
    assert path in str(excinfo.value)


def test_yaml_key_given_twice_in_both_spellings_is_rejected(tmp_path):
    with pytest.raises(VBatchUsageError, match="twice"):
        read_yaml_config(write(tmp_path, "max_tokens: 1\nmax-tokens: 2\n"))


# --- load_job_config precedence ------------------------------------------------------------------

def test_cli_values_override_yaml_which_overrides_defaults(tmp_path):
    path = write(tmp_path, "input: from_yaml.jsonl\nmax_tokens: 64\ntemperature: 0.5\n")
    config = load_job_config({"max_tokens": 8, "stop": ("a", "b")}, path)
    assert config.input == "from_yaml.jsonl"
    assert config.max_tokens == 8          # flag
    assert config.temperature == 0.5       # YAML
    assert config.top_p == 1.0             # default
    assert config.stop == ["a", "b"]       # tuple from click becomes a list


def test_missing_input_is_a_usage_error(tmp_path):
    with pytest.raises(VBatchUsageError, match="missing INPUT"):
        load_job_config({}, write(tmp_path, "max_tokens: 3\n"))
    with pytest.raises(VBatchUsageError, match="missing INPUT"):
        load_job_config({}, None)


def test_merged_config_is_validated(tmp_path):
    with pytest.raises(VBatchUsageError, match="--top-p"):
        load_job_config({"input": "a"}, write(tmp_path, "top_p: 3\n"))


def test_non_field_cli_values_are_ignored():
    assert load_job_config({"input": "a", "quiet": True}, None) == JobConfig(input="a")


def test_every_field_is_loadable_from_yaml(tmp_path):
    config = JobConfig(input="x.parquet", model="m", output="out", stop=["s"],
                       max_model_len=128, kv_cache_memory_gb=1.5)
    lines = [f"{name}: {value!r}" if isinstance(value, str) else f"{name}: {value}"
             for name, value in dataclasses.asdict(config).items()]
    text = "\n".join(line.replace("None", "null") for line in lines) + "\n"
    assert load_job_config({}, write(tmp_path, text)) == config
    assert set(FIELD_NAMES) == set(config.to_dict())


# --- 64-bit bounds and binary config files ------------------------------------------------------

_INT64_MAX, _UINT64_MAX = 2**63 - 1, 2**64 - 1


@pytest.mark.parametrize(("name", "largest"), [
    ("seed", _UINT64_MAX), ("top_k", _INT64_MAX), ("max_tokens", _INT64_MAX),
    ("max_model_len", _INT64_MAX), ("max_num_seqs", _INT64_MAX),
    ("max_num_batched_tokens", _INT64_MAX), ("tensor_parallel_size", _INT64_MAX),
    ("pipeline_parallel_size", _INT64_MAX), ("batch_size", _INT64_MAX),
    ("rows_per_file", _INT64_MAX), ("replicas", 4096), ("max_replica_restarts", _INT64_MAX),
])
def test_integer_options_are_bounded_to_64_bits(name, largest):
    """The largest value that fits is accepted; one more is refused naming the flag (it used
    to reach torch or Arrow: "Overflow when unpacking long long", an internal error)."""
    JobConfig(input="a", **{name: largest}).validate()
    with pytest.raises(VBatchUsageError) as excinfo:
        JobConfig(input="a", **{name: largest + 1}).validate()
    flag = "--" + name.replace("_", "-")
    assert str(excinfo.value) == f"{flag} must be <= {largest}, got {largest + 1}"


def test_sampling_params_bound_64_bit_values_naming_the_field():
    SamplingParams(top_k=_INT64_MAX, seed=_UINT64_MAX, max_tokens=_INT64_MAX)
    with pytest.raises(ValueError, match=rf"^top_k must be <= {_INT64_MAX}, got 10+$"):
        SamplingParams(top_k=10**23)
    with pytest.raises(ValueError, match=rf"^seed must be <= {_UINT64_MAX}, got"):
        SamplingParams(seed=2**64)


def test_yaml_seed_above_64_bits_names_the_flag(tmp_path):
    path = write(tmp_path, "seed: 99999999999999999999999\n")
    with pytest.raises(VBatchUsageError, match=r"^--seed must be <= 18446744073709551615, got "):
        load_job_config({"input": "a"}, path)


def _write_bytes(tmp_path, data, name="job.yaml"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(("data", "expected"), [
    (bytes(range(128, 256)) * 4, "is not UTF-8 text (byte 0x80 at line 1, column 1)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "is not UTF-8 text (byte 0x89 at line 1"),
    ("max_tokens: 4\n".encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
    ("max_tokens: 4\n".encode("utf-16-le"), "is not YAML text: character #x0000 at line 1, "
                                            "column 2"),
    (b"max_tokens: 4\n# caf\xe9\n", "is not UTF-8 text (byte 0xe9 at line 2, column 6)"),
    (b"max_tokens: 4\nstop: \x00\x01\n", "is not YAML text: character #x0000 at line 2, "
                                         "column 7"),
], ids=["random-bytes", "png", "utf-16", "utf-16-le-no-bom", "latin-1", "nul-byte"])
def test_binary_or_non_utf8_yaml_names_the_file(tmp_path, data, expected):
    path = _write_bytes(tmp_path, data)
    with pytest.raises(VBatchUsageError) as excinfo:
        read_yaml_config(path)
    message = str(excinfo.value)
    assert message.startswith(f"config file {path} ") and expected in message
    assert "\n" not in message


def test_yaml_with_a_utf8_byte_order_mark_is_read(tmp_path):
    path = _write_bytes(tmp_path, "max_tokens: 4\nstop: café\n".encode("utf-8-sig"))
    assert read_yaml_config(path) == {"max_tokens": 4, "stop": ["café"]}


def test_invalid_yaml_position_is_still_reported(tmp_path):
    path = write(tmp_path, "max_tokens: 4\nstop: [a, b\n")
    with pytest.raises(VBatchUsageError, match=r"is not valid YAML at line 3, column 1$"):
        read_yaml_config(path)
