"""The engine: requests in, finished completions out, one scheduler step at a time."""
from __future__ import annotations

import gc
import itertools
import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from vbatch.engine.block_manager import BlockManager, num_blocks_for
from vbatch.engine.config import (
    DEFAULT_CPU_KV_CACHE_GB,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    EngineConfig,
    check_parallel_sizes,
)
from vbatch.engine.executor.base import PendingResult
from vbatch.engine.executor.factory import choose_backend, make_executor
from vbatch.engine.loader import resolve_model
from vbatch.engine.models.registry import check_supported, longrope_original_length, model_class_for
from vbatch.engine.output_processor import OutputProcessor
from vbatch.engine.outputs import RequestOutput
from vbatch.engine.platform import (
    check_device_visible,
    resolve_block_size,
    resolve_device,
    resolve_dtype,
)
from vbatch.engine.sampling_params import SamplingParams
from vbatch.engine.scheduler import Scheduler, SchedulerOutput
from vbatch.engine.sequence import ScheduledSequence, Sequence, StepInput
from vbatch.engine.stop_checker import StopChecker
from vbatch.engine.worker import WorkerSpec
from vbatch.env import NUM_THREADS, check_environment
from vbatch.parallel.int8_linear import check_int8_supported
from vbatch.parallel.pipeline import layer_partition


@dataclass
class VirtualEngine:
    """One independent stream of steps: a scheduler over its own slice of the KV blocks, and
    the step it has in flight (at most one: its next step needs this one's tokens)."""

    scheduler: Scheduler
    in_flight: tuple[SchedulerOutput, PendingResult] | None = None


class LLMEngine:
    """Owns the tokenizer, scheduler and executor of one model replica.

    Use `add_request` for each prompt and call `step` until `has_unfinished_requests` is False;
    `step` returns the requests that finished in that step (and, for requests added with
    `stream=True`, a cumulative snapshot of each one it advanced, `finished=False`).
    `abort_request` removes a request wherever it is and frees its KV blocks.

    With pipeline parallelism (pp > 1) the engine runs pp virtual engines, as vLLM does: the
    requests and the KV blocks are split among them, and each keeps one step in flight, so
    while the last stage finishes virtual engine A's step, the first stage already runs B's;
    every stage stays busy once the pipeline is full.

    `executor_backend` names the executor it chose ("uni", "mp" or "ray"; see
    `executor/backend.py`).
    """

    def __init__(self, config: EngineConfig):
        from transformers import AutoConfig, AutoTokenizer  # noqa: PLC0415 - start-up: transformers loads when an engine is built

        config.validate()
        check_environment()     # the VBATCH_* variables, as `vbatch run` checks them
        self.config = config
        self.resolved_model = resolve_model(config.model, allow_pickle=config.allow_pickle,
                                            trust_remote_code=config.trust_remote_code,
                                            storage_options=config.storage_options)
        model_dir = self.resolved_model.path
        self.hf_config = AutoConfig.from_pretrained(model_dir,
                                                    trust_remote_code=config.trust_remote_code)
        model_class_for(self.hf_config)  # unsupported architecture: fail before loading anything
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir,
                                                       trust_remote_code=config.trust_remote_code)
        self.device = resolve_device(config.device)
        self.executor_backend = choose_backend(
            config.distributed_executor_backend, device=self.device,
            world_size=config.tensor_parallel_size * config.pipeline_parallel_size)
        if self.executor_backend != "ray":       # Ray rank actors get their own GPUs
            check_device_visible(self.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.block_size = resolve_block_size(config.block_size, self.device)
        self.max_model_len = self._derive_max_model_len()
        check_supported(self.hf_config, self.max_model_len)   # before any worker starts
        self.max_num_batched_tokens = config.max_num_batched_tokens or max(8192,
                                                                           self.max_model_len)
        self.eos_token_ids = self._eos_token_ids(model_dir)
        self.executor = self._make_executor(model_dir)
        self.num_kv_blocks = self._init_kv_cache()
        self.virtual_engines = self._make_virtual_engines()
        self._in_flight: deque[VirtualEngine] = deque()
        self._seq_ids = itertools.count()
        self._grammars = None      # GrammarCompilerCache, built by the first constrained request
        self.output_processor = OutputProcessor(
            self.tokenizer, self._stop_checker,
            new_matcher=lambda params: self._grammar_cache().new_matcher(
                params.structured_outputs),
            next_seq_id=lambda: next(self._seq_ids))
        self.num_prefill_tokens = 0
        # Everything allocated so far (transformers' and torch's module graphs, the tokenizer)
        # lives for the whole run: move it out of the cyclic GC's generations, so the full
        # collections that many small per-step objects trigger stop re-traversing it (vLLM
        # does the same after start-up). Measured: ~2% of a SmolLM2 job's CPU time went to GC.
        gc.collect()
        gc.freeze()

    # ---- set-up -------------------------------------------------------------------------
    def _make_virtual_engines(self) -> list[VirtualEngine]:
        """pp schedulers, each over an equal slice of blocks 1.. and max_num_seqs / pp."""
        pp_size = self.config.pipeline_parallel_size
        per_engine = (self.num_kv_blocks - 1) // pp_size
        engines = []
        for index in range(pp_size):
            first = 1 + index * per_engine
            blocks = BlockManager(self.num_kv_blocks, self.block_size,
                                  enable_prefix_caching=self.config.enable_prefix_caching,
                                  block_ids=range(first, first + per_engine))
            engines.append(VirtualEngine(Scheduler(
                blocks, max_num_seqs=max(1, self.config.max_num_seqs // pp_size),
                max_num_batched_tokens=self.max_num_batched_tokens)))
        return engines

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler of the first virtual engine (the only one when pp = 1)."""
        return self.virtual_engines[0].scheduler

    def _derive_max_model_len(self) -> int:
        return derive_max_model_len(self.hf_config, self.config.max_model_len)

    def _eos_token_ids(self, model_dir: Path) -> set[int]:
        ids: set[int] = set()
        generation_config = Path(model_dir) / "generation_config.json"
        if generation_config.is_file():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _make_executor(self, model_dir: Path):
        tp_size = self.config.tensor_parallel_size
        pp_size = self.config.pipeline_parallel_size
        self._check_parallel_sizes(tp_size, pp_size)
        spec = WorkerSpec(model_dir=str(model_dir), hf_config=self.hf_config, dtype=self.dtype,
                          device=str(self.device), block_size=self.block_size,
                          max_position=self.max_model_len, seed=self.config.seed,
                          num_threads=NUM_THREADS.read(), model_source=self.config.model or "",
                          model_fingerprint=self.resolved_model.fingerprint,
                          storage_options=self.config.storage_options,
                          allow_pickle=self.config.allow_pickle,
                          quantization=self.config.quantization)
        if self.config.quantization is not None:  # refused here, before any worker starts
            check_int8_supported(self.device)
        return make_executor(spec, tp_size=tp_size, pp_size=pp_size,
                             backend=self.executor_backend)

    def _check_parallel_sizes(self, tp_size: int, pp_size: int) -> None:
        """tp must split the attention heads (and the KV heads, or be a multiple of them); pp
        at most the number of layers, and VBATCH_PP_LAYER_PARTITION (if set) must fit this
        model, checked here before any worker starts."""
        heads = self.hf_config.num_attention_heads
        check_parallel_sizes(
            num_heads=heads, num_layers=self.hf_config.num_hidden_layers, tp_size=tp_size,
            num_kv_heads=getattr(self.hf_config, "num_key_value_heads", None) or heads,
            pp_size=pp_size)
        layer_partition(self.hf_config.num_hidden_layers, pp_size)

    def _init_kv_cache(self) -> int:
        block_bytes = max(self.executor.collective_rpc("kv_cache_bytes_per_block"))
        if self.config.kv_cache_memory_gb is not None:
            budget = int(self.config.kv_cache_memory_gb * (1 << 30))
        else:
            available = self.executor.collective_rpc(
                "available_kv_cache_bytes", DEFAULT_GPU_MEMORY_UTILIZATION,
                self.max_num_batched_tokens, self.config.max_num_seqs)
            budget = (int(DEFAULT_CPU_KV_CACHE_GB * (1 << 30)) if available[0] is None
                      else min(available))
        # Never more than every running sequence at full length could use.
        pp_size = self.config.pipeline_parallel_size
        blocks_per_seq = num_blocks_for(self.max_model_len, self.block_size)
        useful = max(self.config.max_num_seqs, pp_size) * blocks_per_seq
        num_blocks = min(budget // block_bytes, useful + 1)   # + the null block
        min_blocks = pp_size * blocks_per_seq + 1
        if num_blocks < min_blocks:
            per = "" if pp_size == 1 else f" per pipeline virtual engine ({pp_size})"
            raise ValueError(f"the KV cache budget ({budget / (1 << 30):.2f} GiB) holds "
                             f"{num_blocks * self.block_size} tokens, fewer than one "
                             f"sequence of max_model_len={self.max_model_len}{per}; raise "
                             "kv_cache_memory_gb or lower max_model_len")
        self.executor.collective_rpc("init_kv_cache", num_blocks)
        self.kv_cache_bytes = num_blocks * block_bytes
        return num_blocks

    # ---- requests -----------------------------------------------------------------------
    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None
                      ) -> list[int]:
        """Token ids of a raw prompt (tokenizer's special tokens added) or of chat messages
        (the chat template with the generation prompt; no extra special tokens)."""
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of many raw prompts at once (the fast tokenizer batches them)."""
        return self.tokenizer(prompts, add_special_tokens=True)["input_ids"]

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling_params: SamplingParams, *, prompt: str | None = None,
                    row_key: str | None = None, seed: int | None = None,
                    stream: bool = False) -> None:
        """Queue one prompt. `row_key` (default: request_id) and `seed` (default: the params'
        seed, else the engine's) fix its random draws. `stream`: `step` also returns the
        request's output so far after each step that advanced it (cumulative, finished=False).
        Raises ValueError for a prompt that cannot run, and `StructuredOutputError` (a
        ValueError) for a structured-output spec that does not compile."""
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("the prompt is empty")
        if num_prompt >= self.max_model_len:
            raise ValueError(f"the prompt has {num_prompt} tokens, which leaves no room to "
                             f"generate within max_model_len={self.max_model_len}")
        if request_id in self.output_processor.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        grammar = None
        if sampling_params.structured_outputs is not None:
            from vbatch.engine.structured_output import StructuredOutputError  # noqa: PLC0415 - xgrammar loads only for constrained requests
            try:
                grammar = self._grammar_cache().new_matcher(sampling_params.structured_outputs)
            except ValueError as error:
                raise StructuredOutputError(str(error)) from None
        if seed is None:
            seed = sampling_params.seed if sampling_params.seed is not None else self.config.seed
        seq = Sequence(next(self._seq_ids), request_id, prompt_token_ids, sampling_params,
                       seed=seed, row_key=row_key if row_key is not None else request_id,
                       prompt=prompt)
        seq.grammar = grammar
        target = min(self.virtual_engines, key=lambda ve: ve.scheduler.num_unfinished)
        target.scheduler.add(seq)
        self.output_processor.add(seq, stream=stream)

    def abort_request(self, request_id: str) -> bool:
        """Remove a request (all its samples) wherever it is: waiting, running, or in a step in
        flight (whose result then skips it); its KV blocks are freed now. Returns False when
        no such request is unfinished (already finished, aborted, or never added)."""
        if not self.output_processor.abort(request_id):
            return False
        for ve in self.virtual_engines:
            ve.scheduler.abort_request(request_id)
        return True

    @property
    def num_free_kv_blocks(self) -> int:
        """KV blocks not held by any sequence, over all virtual engines (cached prefix blocks
        no sequence uses count as free): back to its initial value when the engine is idle."""
        return sum(ve.scheduler.block_manager.num_free_blocks for ve in self.virtual_engines)

    def _stop_checker(self, params: SamplingParams) -> StopChecker:
        return StopChecker(self.tokenizer, params, self.eos_token_ids, self.max_model_len)

    def _grammar_cache(self):
        """The structured-output compiler for this tokenizer (xgrammar loads on first use)."""
        if self._grammars is None:
            from vbatch.engine.structured_output import GrammarCompilerCache  # noqa: PLC0415 - xgrammar loads only for constrained requests
            self._grammars = GrammarCompilerCache(
                self.tokenizer, vocab_size=self.hf_config.vocab_size,
                stop_token_ids=sorted(self.eos_token_ids))
        return self._grammars

    def has_unfinished_requests(self) -> bool:
        """True while a request is unfinished or a step is in flight (one whose requests were
        all aborted still has to be collected)."""
        return bool(self._in_flight) or any(ve.scheduler.has_unfinished()
                                            for ve in self.virtual_engines)

    @property
    def num_unfinished_requests(self) -> int:
        """Requests not finished yet (a request of n samples counts once)."""
        return len(self.output_processor.requests)

    @property
    def num_prompt_prefills(self) -> int:
        """Prompts prefilled from scratch so far: once per request, whatever its n (samples
        share their prompt's computation); recomputation after preemption not counted."""
        return self.output_processor.num_prompt_prefills

    def step(self) -> list[RequestOutput]:
        """Start a step on every idle virtual engine with work, then finish the oldest step in
        flight; return the requests that finished in it."""
        for ve in self.virtual_engines:
            if ve.in_flight is None and ve.scheduler.has_unfinished():
                scheduled = ve.scheduler.schedule()
                if scheduled.seqs:
                    ve.in_flight = (scheduled,
                                    self.executor.execute_model_async(self._step_input(scheduled)))
                    self._in_flight.append(ve)
        if not self._in_flight:
            return []
        ve = self._in_flight.popleft()
        (scheduled, pending), ve.in_flight = ve.in_flight, None
        self.num_prefill_tokens += scheduled.num_prefill_tokens
        return self.output_processor.process(ve.scheduler, scheduled, pending.driver_result())

    def _step_input(self, scheduled: SchedulerOutput) -> StepInput:
        batch = [self._slim(seq, n) for seq, n in zip(scheduled.seqs, scheduled.num_new_tokens)]
        bitmask = None
        constrained = [(slim, seq) for slim, seq in zip(batch, scheduled.seqs)
                       if seq.grammar is not None]
        if constrained:
            from vbatch.engine.structured_output import allocate_bitmask  # noqa: PLC0415 - only constrained steps load xgrammar
            bitmask = allocate_bitmask(len(constrained), self.hf_config.vocab_size)
            for row, (slim, seq) in enumerate(constrained):
                seq.grammar.fill_bitmask(bitmask, row)
                slim.grammar_row = row
        return StepInput(batch, scheduled.blocks_to_copy, bitmask)

    def _slim(self, seq: Sequence, num_new_tokens: int) -> ScheduledSequence:
        params = seq.sampling_params
        start = seq.num_computed_tokens
        slim = ScheduledSequence(
            seq_id=seq.seq_id, token_ids=seq.token_ids[start:start + num_new_tokens],
            start_position=seq.num_computed_tokens, block_table=seq.block_table,
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            min_p=params.min_p, seed=seq.seed, row_key=seq.row_key,
            output_index=seq.num_generated_tokens, sample_index=seq.sample_index,
            num_samples=seq.num_samples_to_fork)
        if params.logprobs is not None:
            slim.num_logprobs = params.logprobs
        if seq.needs_prompt_logprobs:
            slim.num_prompt_logprobs = params.prompt_logprobs
        if params.has_penalties:
            slim.repetition_penalty = params.repetition_penalty
            slim.presence_penalty = params.presence_penalty
            slim.frequency_penalty = params.frequency_penalty
            slim.history = seq.token_ids
            slim.num_prompt_tokens = seq.num_prompt_tokens
        return slim

    def shutdown(self) -> None:
        """Stop the workers (idempotent)."""
        self.executor.shutdown()


def derive_max_model_len(hf_config, wanted: int | None) -> int:
    """The engine's max_model_len: `wanted`, or the model config's own maximum; a `wanted`
    beyond the model's maximum raises ValueError. By default a longrope model (Phi-3-128k,
    Phi-3.5, Phi-4-mini) gets its original_max_position_embeddings, the longest context vbatch
    implements for it (asking for more explicitly is refused by check_supported)."""
    limits = [getattr(hf_config, name) for name in
              ("max_position_embeddings", "n_positions") if getattr(hf_config, name, None)]
    model_limit = min(limits) if limits else None
    if wanted is None:
        if model_limit is None:
            raise ValueError("the model config gives no maximum length; pass max_model_len")
        original = longrope_original_length(hf_config)
        return min(model_limit, original) if original else model_limit
    if model_limit is not None and wanted > model_limit:
        raise ValueError(f"max_model_len={wanted} exceeds the model's maximum of {model_limit}")
    return wanted
