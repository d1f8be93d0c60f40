"""`JobConfig`: everything one `vbatch run` job needs, merged from flags, env vars and a YAML file.

Precedence, highest first:

1. command-line flags the user actually typed;
2. `VBATCH_*` environment variables (only for the few options that declare one in `cli.py`:
   `VBATCH_MODEL`, `VBATCH_DTYPE`, `VBATCH_MAX_NUM_SEQS`, `VBATCH_MAX_NUM_BATCHED_TOKENS`,
   `VBATCH_KV_CACHE_MEMORY_GB`, `VBATCH_ON_LONG_PROMPT`, `VBATCH_MAX_ERROR_RATE`,
   `VBATCH_OUTPUT_ROOT`); click
   reports them as explicitly set, so they rank with flags and beat the YAML file;
3. the `--config job.yaml` file;
4. the defaults of the `JobConfig` fields below.

This module checks values only (`JobConfig.validate`); whether files and models exist is the
runner's business.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

from vbatch.errors import VBatchUsageError

VALID_DTYPES = ("auto", "float32", "bfloat16", "float16")
VALID_RUNNERS = ("auto", "ray", "local")
ON_LONG_PROMPT_CHOICES = ("error", "truncate")


@dataclass(slots=True)
class JobConfig:
    """One batch-inference job, as the user asked for it.

    `top_k` of 0 or -1 both mean "disabled" (-1 is normalized to 0 on construction, as in vLLM).
    `model=None` means vbatch's default model; `output=None` lets the runner pick a directory;
    `kv_cache_memory_gb=None` lets the engine size the KV cache itself.
    `on_long_prompt`: a prompt that leaves no room to generate becomes an error row ("error") or
    keeps its last tokens ("truncate"). `max_error_rate=None`: error rows never fail the job;
    a rate R in [0, 1] fails it (exit code 3) when more than that fraction of rows errored.
    `runner`/`ray_address`/`replicas`: how the job is spread (see `jobs/plan.py`); `replicas=None`
    lets the plan pick (as many as fit on GPUs, 1 on CPU).
    `resume`: continue a killed job in the same output directory, computing only the rows not
    yet committed; `force` resumes even when the job's fingerprint (inputs, model, generation
    settings) differs. `max_replica_restarts`: how often a dead replica is restarted.
    `output_root`: when set, the output directory must resolve inside it (no `..` escapes).
    """

    input: str
    model: str | None = None
    output: str | None = None
    overwrite: bool = False
    prompt_column: str = "prompt"
    id_column: str = "id"
    chat: bool = False
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    kv_cache_memory_gb: float | None = None
    enable_prefix_caching: bool = True
    rows_per_file: int = 10_000
    batch_size: int = 1024
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    on_long_prompt: str = "error"
    max_error_rate: float | None = None
    runner: str = "auto"
    ray_address: str | None = None
    replicas: int | None = None
    preserve_order: bool = False
    resume: bool = False
    force: bool = False
    max_replica_restarts: int = 3
    output_root: str | None = None

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0

    def validate(self) -> JobConfig:
        """Check every value; raise `VBatchUsageError` with a one-line, actionable message.

        Returns `self` so callers can write `config = load_job_config(...).validate()`.
        """
        if not isinstance(self.input, str) or not self.input.strip():
            _fail("missing INPUT: pass it as `vbatch run INPUT` or set `input:` in the --config file")
        if self.output is not None and not self.output.strip():
            _fail("--output must not be empty")
        if self.resume and self.overwrite:
            _fail("--resume and --overwrite exclude each other: resume keeps the committed "
                  "rows, overwrite deletes them")
        if self.force and not self.resume:
            _fail("--force only applies to --resume")
        _require_at_least("max_replica_restarts", self.max_replica_restarts, 0)
        if self.model is not None and not self.model.strip():
            _fail("--model must not be empty (leave it out to use the default model)")
        for name in ("prompt_column", "id_column"):
            if not getattr(self, name).strip():
                _fail(f"--{_flag(name)} must be a non-empty column name")
        _require_at_least("max_tokens", self.max_tokens, 1)
        if not math.isfinite(self.temperature) or self.temperature < 0:
            _fail(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            _fail(f"--top-p must be in (0, 1] (1 = disabled), got {self.top_p}")
        if self.top_k < -1:
            _fail(f"--top-k must be >= 0 (0 or -1 = disabled), got {self.top_k}")
        if not (0 <= self.min_p <= 1):
            _fail(f"--min-p must be in [0, 1] (0 = disabled), got {self.min_p}")
        _require_at_least("seed", self.seed, 0)
        for stop_string in self.stop:
            if not isinstance(stop_string, str) or stop_string == "":
                _fail(f"--stop strings must be non-empty, got {stop_string!r}")
        if self.dtype not in VALID_DTYPES:
            _fail(f"--dtype must be one of {', '.join(VALID_DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None:
            _require_at_least("max_model_len", self.max_model_len, 1)
        _require_at_least("max_num_seqs", self.max_num_seqs, 1)
        if self.max_num_batched_tokens is not None:
            _require_at_least("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if self.kv_cache_memory_gb is not None and not (
            math.isfinite(self.kv_cache_memory_gb) and self.kv_cache_memory_gb > 0
        ):
            _fail(
                f"--kv-cache-memory-gb must be > 0 (leave it out for the engine default), "
                f"got {self.kv_cache_memory_gb}"
            )
        _require_at_least("rows_per_file", self.rows_per_file, 1)
        _require_at_least("tensor_parallel_size", self.tensor_parallel_size, 1)
        _require_at_least("pipeline_parallel_size", self.pipeline_parallel_size, 1)
        if self.runner not in VALID_RUNNERS:
            _fail(f"--runner must be one of {', '.join(VALID_RUNNERS)}, got {self.runner!r}")
        if self.replicas is not None:
            _require_at_least("replicas", self.replicas, 1)
        if self.ray_address is not None and not self.ray_address.strip():
            _fail("--ray-address must not be empty (leave it out to start a private local Ray)")
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            _fail("--distributed-executor-backend must be mp or ray, got "
                  f"{self.distributed_executor_backend!r}")
        _require_at_least("batch_size", self.batch_size, 1)
        if self.on_long_prompt not in ON_LONG_PROMPT_CHOICES:
            _fail(f"--on-long-prompt must be one of {', '.join(ON_LONG_PROMPT_CHOICES)}, "
                  f"got {self.on_long_prompt!r}")
        if self.max_error_rate is not None and not (
            math.isfinite(self.max_error_rate) and 0 <= self.max_error_rate <= 1
        ):
            _fail(f"--max-error-rate must be in [0, 1] (leave it out for no limit), "
                  f"got {self.max_error_rate}")
        return self

    def engine_config(self):
        """The `EngineConfig` of the engine this job runs."""
        from vbatch.engine.config import EngineConfig
        return EngineConfig(model=self.model, dtype=self.dtype, seed=self.seed,
                            max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens,
                            kv_cache_memory_gb=self.kv_cache_memory_gb,
                            enable_prefix_caching=self.enable_prefix_caching,
                            tensor_parallel_size=self.tensor_parallel_size,
                            pipeline_parallel_size=self.pipeline_parallel_size,
                            distributed_executor_backend=self.distributed_executor_backend,
                            trust_remote_code=self.trust_remote_code,
                            allow_pickle=self.allow_pickle)

    def sampling_params(self):
        """The `SamplingParams` applied to every row (the row key varies the random draws)."""
        from vbatch.engine.sampling_params import SamplingParams
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              min_p=self.min_p, seed=self.seed, stop=list(self.stop) or None,
                              max_tokens=self.max_tokens, ignore_eos=self.ignore_eos)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-serializable dict of all fields (for manifests and logs)."""
        return dataclasses.asdict(self)


def _flag(field_name: str) -> str:
    return field_name.replace("_", "-")


def _fail(message: str) -> NoReturn:
    raise VBatchUsageError(message)


def _require_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        _fail(f"--{_flag(name)} must be >= {minimum}, got {value}")


# ---------------------------------------------------------------------------------------------
# Type checking of values that come from YAML (click already converts flag values).

def _as_str(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError("a string")
    return str(value)


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("true or false")
    return value


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("an integer")
    return value


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("a number")
    return float(value)


def _as_str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError("a string or a list of strings")
    return list(value)


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else convert(value)


_FIELD_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "input": _as_str,
    "model": _optional(_as_str),
    "output": _optional(_as_str),
    "overwrite": _as_bool,
    "prompt_column": _as_str,
    "id_column": _as_str,
    "chat": _as_bool,
    "max_tokens": _as_int,
    "temperature": _as_float,
    "top_p": _as_float,
    "top_k": _as_int,
    "min_p": _as_float,
    "seed": _as_int,
    "stop": _as_str_list,
    "ignore_eos": _as_bool,
    "dtype": _as_str,
    "max_model_len": _optional(_as_int),
    "max_num_seqs": _as_int,
    "max_num_batched_tokens": _optional(_as_int),
    "kv_cache_memory_gb": _optional(_as_float),
    "enable_prefix_caching": _as_bool,
    "rows_per_file": _as_int,
    "batch_size": _as_int,
    "tensor_parallel_size": _as_int,
    "pipeline_parallel_size": _as_int,
    "distributed_executor_backend": _optional(_as_str),
    "trust_remote_code": _as_bool,
    "allow_pickle": _as_bool,
    "on_long_prompt": _as_str,
    "max_error_rate": _optional(_as_float),
    "runner": _as_str,
    "ray_address": _optional(_as_str),
    "replicas": _optional(_as_int),
    "preserve_order": _as_bool,
    "resume": _as_bool,
    "force": _as_bool,
    "max_replica_restarts": _as_int,
    "output_root": _optional(_as_str),
}

FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(JobConfig))
if set(FIELD_NAMES) != set(_FIELD_CONVERTERS):  # keeps the table honest when a field is added
    raise ImportError("vbatch.jobs.config: _FIELD_CONVERTERS does not match JobConfig fields")


def field_default(name: str) -> Any:
    """The built-in default of JobConfig field `name` (for help texts); None if it has none."""
    for config_field in dataclasses.fields(JobConfig):
        if config_field.name == name:
            if config_field.default is not dataclasses.MISSING:
                return config_field.default
            if config_field.default_factory is not dataclasses.MISSING:
                return config_field.default_factory()
            return None
    raise KeyError(name)


def read_yaml_config(config_path: str) -> dict[str, Any]:
    """Read a job YAML file into `{field_name: value}` with values type-checked.

    Keys may use underscores or dashes (`max_tokens` or `max-tokens`). Raises `VBatchUsageError`
    naming the file for an unreadable file, invalid YAML, a top level that is not a mapping, an
    unknown key (listing the valid ones) or a value of the wrong type.
    """
    import yaml  # lazy: keeps `vbatch --help` fast

    try:
        with open(config_path, encoding="utf-8") as config_file:
            document = yaml.safe_load(config_file)
    except OSError as exc:
        raise VBatchUsageError(
            f"cannot read config file {config_path}: {exc.strerror or exc}"
        ) from exc
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise VBatchUsageError(f"config file {config_path} is not valid YAML{where}") from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise VBatchUsageError(
            f"config file {config_path} must be a mapping of option: value, "
            f"got a {type(document).__name__}"
        )
    values: dict[str, Any] = {}
    for raw_key, raw_value in document.items():
        name = str(raw_key).replace("-", "_")
        if name not in _FIELD_CONVERTERS:
            raise VBatchUsageError(
                f"unknown key {raw_key!r} in config file {config_path}; "
                f"valid keys: {', '.join(FIELD_NAMES)}"
            )
        if name in values:
            raise VBatchUsageError(f"key {raw_key!r} appears twice in config file {config_path}")
        try:
            values[name] = _FIELD_CONVERTERS[name](raw_value)
        except TypeError as exc:
            raise VBatchUsageError(
                f"config file {config_path}: {raw_key!r} must be {exc}, got {raw_value!r}"
            ) from exc
    return values


def load_job_config(cli_values: dict[str, Any], config_path: str | None) -> JobConfig:
    """Merge `cli_values` over the YAML file at `config_path` over the defaults; validate.

    `cli_values` must hold only the values the user set explicitly (flags or `VBATCH_*` env vars;
    the CLI filters with `ctx.get_parameter_source`), keyed by field name. Keys outside the
    JobConfig fields are ignored. Tuples (click's `multiple=True`) become lists.
    Returns a validated `JobConfig`; raises `VBatchUsageError` on any problem.
    """
    merged: dict[str, Any] = read_yaml_config(config_path) if config_path else {}
    for name, value in cli_values.items():
        if name in _FIELD_CONVERTERS:
            merged[name] = list(value) if isinstance(value, tuple) else value
    if merged.get("input") is None:
        raise VBatchUsageError(
            "missing INPUT: pass it as `vbatch run INPUT` or set `input:` in the --config file"
        )
    return JobConfig(**merged).validate()
